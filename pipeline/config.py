"""One typed configuration for every stage, loadable from TOML and overridable by flags.

Each section is a frozen dataclass; every field declares its constraint once (as
scikit-learn's ``_parameter_constraints``) and is checked when the configuration
is built, so an invalid value fails before any work with the key's dotted name::

    [knn]
    k = 80
    mode = "auto"
    precision = "auto"   # exact mode's candidate GEMM: bfloat16 where the CPU has it (same neighbours)

``Config.load(path, overrides={"knn.k": 30})`` merges TOML and flags (flags win).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """An invalid configuration value (message names the key)."""


# -- constraints ---------------------------------------------------------------
def _int(lo=None, hi=None, none=False):
    def check(v):
        if v is None and none:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer{' or unset' if none else ''}, got {v!r}"
        if lo is not None and v < lo:
            return f"must be >= {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None
    return check


def _float(lo=None, hi=None, none=False, lo_open=False):
    def check(v):
        if v is None and none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number{' or unset' if none else ''}, got {v!r}"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None
    return check


def _choice(*options):
    def check(v):
        return None if v in options else f"must be one of {', '.join(map(repr, options))}, got {v!r}"
    return check


def _str(none=True):
    def check(v):
        if v is None and none:
            return None
        return None if isinstance(v, str) else f"must be a string, got {v!r}"
    return check


def _bool():
    def check(v):
        return None if isinstance(v, bool) else f"must be true or false, got {v!r}"
    return check


def _bool_or(*words):
    def check(v):
        return None if isinstance(v, bool) or v in words else \
            f"must be true, false or {', '.join(map(repr, words))}, got {v!r}"
    return check


def _float_list(lo=None, hi=None, none=True):
    def check(v):
        if v is None and none:
            return None
        if not isinstance(v, (list, tuple)) or not v:
            return f"must be a non-empty list of numbers, got {v!r}"
        for x in v:
            err = _float(lo, hi)(x)
            if err:
                return f"every element {err}"
        return None
    return check


def _range01(none=False):
    def check(v):
        if v is None and none:
            return None
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            return f"must be a [low, high] pair, got {v!r}"
        lo, hi = v
        if not all(isinstance(x, (int, float)) for x in v) or not 0 <= lo <= hi <= 1:
            return f"must satisfy 0 <= low <= high <= 1, got {v!r}"
        return None
    return check


def opt(default: Any, check: Callable[[Any], str | None], help: str = ""):
    """A config field with its constraint and a one-line help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"check": check, "help": help})
    return field(default=default, metadata={"check": check, "help": help})


class _Section:
    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            v = getattr(self, f.name)
            if isinstance(v, tuple):  # TOML gives lists; store tuples for hashability
                v = list(v)
            err = check(v)
            if err:
                raise ConfigError(f"{self._section}.{f.name}: {err}")
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}


# -- sections --------------------------------------------------------------------
@dataclass(frozen=True)
class DaskConfig(_Section):
    _section = "dask"
    scheduler: str | None = opt(None, _str(), "address of an existing scheduler (tcp://HOST:8786); else DASK_SCHEDULER_ADDRESS, else a LocalCluster")
    n_workers: int | None = opt(None, _int(1, none=True), "LocalCluster worker processes (default: one per core)")
    threads_per_worker: int = opt(1, _int(1), "threads per worker process (faiss/torch threads inside a task)")
    memory_limit: str = opt("auto", _str(none=False), "memory per LocalCluster worker ('auto' or e.g. '4GiB')")
    openblas_coretype: str = opt("auto", _str(none=False), "OpenBLAS kernel for faiss ('auto' detects the CPU; 'none' leaves it)")
    jobqueue: str | None = opt(None, lambda v: None if v in (None, "slurm", "pbs") else f"must be 'slurm', 'pbs' or unset, got {v!r}", "start workers as SLURM/PBS jobs via dask-jobqueue")
    jobs: int = opt(1, _int(1), "number of SLURM/PBS jobs")
    job_cores: int = opt(4, _int(1), "cores per job")
    job_memory: str = opt("16GiB", _str(none=False), "memory per job")
    job_walltime: str = opt("02:00:00", _str(none=False), "walltime per job")
    job_queue: str | None = opt(None, _str(), "queue / partition")
    job_account: str | None = opt(None, _str(), "account / project to charge")
    tls_ca_file: str | None = opt(None, _str(), "TLS: CA certificate (PEM) for tls:// schedulers (else dask config distributed.comm.tls.*)")
    tls_cert: str | None = opt(None, _str(), "TLS: this client's certificate (PEM, may include the key)")
    tls_key: str | None = opt(None, _str(), "TLS: this client's private key (PEM; omit if inside tls_cert)")
    connect_timeout: float = opt(30.0, _float(0.0, lo_open=True), "seconds to wait for the scheduler, and for its first worker")


@dataclass(frozen=True)
class IngestConfig(_Section):
    _section = "ingest"
    chunk_rows: int = opt(16384, _int(1), "rows per chunk of `features` (R)")
    drop_invalid: bool = opt(False, _bool(), "skip NaN/inf/zero rows instead of failing (recorded in input_rows)")
    dim: int | None = opt(None, _int(1, none=True), "feature dimension of a raw .bin input")
    column: str | None = opt(None, _str(), "Parquet column holding the feature vectors")
    label_column: str | None = opt(None, _str(), "Parquet column holding integer labels")


@dataclass(frozen=True)
class KnnConfig(_Section):
    _section = "knn"
    k: int = opt(80, _int(1), "neighbours per face (self excluded)")
    mode: str = opt("auto", _choice("auto", "exact", "ivf"), "exact (IndexFlatIP blocks) or ivf; auto = ivf from ivf_min_n faces")
    ivf_min_n: int = opt(1_000_000, _int(1), "auto mode uses IVF from this many faces")
    nlist: int | None = opt(None, _int(1, none=True), "IVF lists (default nlist_factor*sqrt(N))")
    nprobe: int | None = opt(None, _int(1, none=True), "IVF lists probed per query (default: tuned on a sample)")
    train_size: int = opt(200_000, _int(1000), "IVF quantizer training sample")
    db_rows: int | None = opt(None, _int(1, none=True), "database rows per task (default: by memory budget)")
    nlist_factor: float = opt(8.0, _float(0.1), "default nlist = nlist_factor * sqrt(N) (8: at 1M, 8000 lists reached 0.98 edge recall probing 256)")
    train_iter: int = opt(10, _int(1), "IVF k-means iterations")
    tune_queries: int = opt(2000, _int(10), "query sample for tuning nprobe (exact vs IVF)")
    recall_target: float = opt(0.97, _float(0.0, 1.0), "tuned nprobe: recall of edges with sim >= edge_th against exact")
    edge_th: float | None = opt(None, _float(-1.0, 1.0, none=True), "lowest similarity threshold used downstream (default: Otsu on the tuning sample)")
    reverse: bool = opt(False, _bool(), "IVF: join each list with the faces that list it (the kNN graph's transpose: "
                        "neighbours a face's probes missed, for no search) and count them in the tune (at 1M built-in faces "
                        "edge recall 0.97 at nprobe 33 instead of 133; see the README for what it does to the clusters)")
    q_rows: int | None = opt(None, _int(1, none=True), "query rows per task (default: sized for ~task_seconds)")
    task_seconds: float = opt(2.0, _float(0.0, lo_open=True), "target duration of a search task")
    memory_fraction: float = opt(0.4, _float(0.0, 1.0, lo_open=True), "share of a worker's memory for the database it holds")
    fan_in: int = opt(8, _int(2), "fan-in of the top-k merge tree")
    margin: int = opt(16, _int(0), "extra candidates fetched before exact re-scoring")
    precision: str = opt("auto", _choice("auto", "float32", "bfloat16"),
                         "exact mode's candidate GEMM: bfloat16 (torch; candidates re-scored exactly, same neighbours) "
                         "or float32 (faiss); auto = bfloat16 where the CPU has avx512_bf16/amx_bf16 and it measures faster")
    bf16_margin: int = opt(48, _int(0), "extra bfloat16 candidates before exact re-scoring (wider: the bfloat16 bound is ~5e-3)")


@dataclass(frozen=True)
class ProposalConfig(_Section):
    _section = "proposals"
    preset: str = opt("default", _choice("fast", "default", "thorough"), "set of proposal settings (2 / 8 / 20 settings)")
    thresholds: tuple | None = opt(None, _float_list(-1.0, 1.0), "explicit level-0 thresholds (default: derived from the data)")
    step: float = opt(0.05, _float(0.0, 1.0, lo_open=True), "threshold ladder step: tau <- tau + (1 - tau) * step")
    max_size: int = opt(300, _int(2), "largest super-vertex (faces)")
    min_size: int = opt(2, _int(1), "smallest proposal kept (faces); 2 lets pairs cluster (uncovered faces stay singletons)")
    max_proposal_size: int = opt(500, _int(2), "largest proposal kept (faces) by the max_size-split settings")
    whole_size: int = opt(2000, _int(0), "largest plain connected component kept by the preset's whole-component cuts (0: no such cuts)")
    levels: int = opt(2, _int(1, 4), "proposal levels per setting (1 = super-vertices only; 2 adds groups of super-vertices)")
    sv_k: int = opt(3, _int(1, 16), "neighbours of each super-vertex at levels >= 1")
    sv_th: float | None = opt(None, _float(-1.0, 1.0, none=True), "threshold at levels >= 1 (default: 1 - 1.5 * (1 - anchor threshold))")
    min_edge_sim: float | None = opt(None, _float(-1.0, 1.0, none=True), "graph stage: drop kNN edges below this (default: 1 - 1.5 * (1 - anchor), below every automatic threshold; -1 keeps all)")
    fan_in: int = opt(4, _int(2), "forests merged per task in the graph stage's tree reduction")
    forest_edges: int | None = opt(None, _int(1, none=True), "kNN entries one spanning-forest task reads, and edges one merge "
                                   "holds (whole chunks, at least one chunk or two forests; ~114 bytes each at the peak); "
                                   "default: from the smallest worker's memory limit (40% of it at ~114 bytes an edge, a power of two in 2^22..2^26)")


@dataclass(frozen=True)
class GCNConfig(_Section):
    _section = "gcn"
    hidden: tuple = opt([128, 64], lambda v: None if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and x > 0 for x in v) else f"must be a list of positive integers, got {v!r}", "graph-conv widths")
    dropout: float = opt(0.2, _float(0.0, 0.99), "node dropout while training (whole node rows)")
    epochs: int = opt(20, _int(1), "training epochs (the best epoch on the validation identities is kept)")
    lr: float = opt(0.001, _float(0.0, lo_open=True), "learning rate (AdamW, cosine decay)")
    weight_decay: float = opt(1e-4, _float(0.0), "AdamW weight decay")
    batch_size: int = opt(32, _int(1), "proposals per training batch")
    size_weight: tuple = opt([0.0, 1.0], _float_list(0.0, 2.0, none=False), "GCN-D loss weight per proposal: size ** w; one GCN-D per candidate w, the best on the validation identities (dedup pairwise F) is kept")
    ensemble: int = opt(1, _int(1, 16), "GCN-D models averaged at scoring; member i trains with seed + i on its own identity split (training and GCN-D cost x this)")
    seed: int = opt(0, _int(0), "training seed")
    val_fraction: float = opt(0.2, _float(0.0, 0.9), "share of training identities held out for validation")
    relative: str = opt("mean", _choice("mean", "raw", "none"), "vertex features: relative to the proposal mean, raw, or none")
    boundary: bool = opt(True, _bool(), "boundary inputs (kNN edges leaving the proposal)")
    structure: bool = opt(True, _bool(), "structure inputs (inside similarity, coverage, size)")
    outside: bool = opt(True, _bool(), "proposal inputs: |P| / (|P| + distinct outside faces its members reach), four ways")
    connectivity: bool = opt(True, _bool(), "proposal inputs: algebraic connectivity (lambda_2) of the proposal's inside kNN graph")
    weights: str = opt("both", _choice("both", "prob", "sim"), "edge weights of GCN-D/GCN-S with an edge scorer: the learned P (prob), P plus the cosine inputs (both), or the cosine (sim); without one: sim")
    layout: str = opt("padded", _choice("padded", "block"), "training batch layout: size-sorted padded dense or block-diagonal sparse")
    score_batch: int | None = opt(None, _int(1, none=True), "proposals per score task and per forward block (a score's last bit can depend on it; default: blocks of P / 8 within 512..4,096, as few tasks as hold 1 GiB of member rows each, at least 2 per worker)")
    segment: bool = opt(True, _bool(), "run GCN-S (false: GCN-D only)")
    iop_range: tuple | None = opt(None, _range01(none=True), "GCN-S runs on proposals whose predicted IoP is in this range (default: the range tuned on the validation identities in training, recorded in the model)")
    keep_prob: float | None = opt(None, _float(0.0, 1.0, none=True), "GCN-S removes vertices with P(member) <= this (default: the model's tuned value)")
    dedup_faces: int = opt(1 << 20, _int(1), "faces per dedup reduce task")


@dataclass(frozen=True)
class EdgesConfig(_Section):
    """[edges]: the learned affinity (edge scorer, communities, merge, attach) trained beside GCN-D/GCN-S."""
    _section = "edges"
    learn: bool = opt(True, _bool(), "train an edge scorer (P(same identity) per kNN edge) with GCN-D/GCN-S; false: the 0.1 chain")
    hidden: tuple = opt([64, 64], lambda v: None if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and x > 0 for x in v) else f"must be a list of positive integers, got {v!r}", "edge scorer MLP widths")
    epochs: int = opt(6, _int(1), "edge scorer training epochs (the best validation loss is kept)")
    lr: float = opt(0.001, _float(0.0, lo_open=True), "edge scorer learning rate (Adam)")
    batch_size: int = opt(4096, _int(1), "edges per training step")
    balance: str = opt("auto", _choice("auto", "face", "none"), "edge scorer loss weights: face = every face's same-identity edges weigh alike in total, whatever its identity's size (what BCubed F counts); none = every edge once; auto = the one whose out-of-fold communities score higher")
    communities: bool = opt(True, _bool(), "add Infomap communities of the learned-affinity graph to the proposals")
    output_only: bool = opt(True, _bool(), "where the model's output is its communities (the general model's is), run only what that output needs: the communities at the model's floor, proposed and scored, without the graph, the super-vertex proposals and the other floors (the same labels); false: every stage, for GCN-D's own dedup over every proposal (bench quality, the demo) or to inspect the proposals")
    merge: bool = opt(True, _bool(), "merge the model's communities by the learned affinity between them (level chosen in training; used where the model's output is its communities)")
    attach: bool = opt(True, _bool(), "attach faces no proposal claims to their most probable neighbour's cluster (level chosen in training)")
    adapt: bool | str = opt("auto", _bool_or("auto"), "cluster time: fit a linear model on the run's own edge inputs, labelled by the scorer's confident edges (P >= 0.9 / <= 0.1); the run's P is the rank average of the scorer's P and that model's score, mapped onto the scorer's distribution of P, and the run takes the model's adapt_levels (self-training; measured to help the general model's communities on every real and generated set). auto = in the learned method where the model records adapt_levels (the general model; a model trained on your own labels does not), not for --method threshold's cut or --method infomap's cosine floor (measured mixed there); true = everywhere")


@dataclass(frozen=True)
class AddConfig(_Section):
    """[add]: adding faces to a clustered run (`facecluster add`)."""
    _section = "add"
    recluster: str = opt("new", _choice("new", "touched"), "learned method: new = each new face joins its most probable old neighbour's cluster (at the model's attach level) and only the others are clustered, with the old singletons they reach; touched = the old clusters a new face reaches (P >= the model's floor) are re-clustered with the new faces (closer to clustering all faces afresh, costs more)")


@dataclass(frozen=True)
class Config:
    dask: DaskConfig = field(default_factory=DaskConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    gcn: GCNConfig = field(default_factory=GCNConfig)
    edges: EdgesConfig = field(default_factory=EdgesConfig)
    add: AddConfig = field(default_factory=AddConfig)

    SECTIONS = ("dask", "ingest", "knn", "proposals", "gcn", "edges", "add")

    @classmethod
    def from_dict(cls, data: dict | None = None, overrides: dict | None = None) -> "Config":
        # non-table values (`knn = 3`) are kept as they are and reported below with their key
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            sec, _, name = key.partition(".")
            data.setdefault(sec, {})[name] = value
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = f.default_factory  # type: ignore[misc]
            given = data.pop(f.name, {})
            if not isinstance(given, dict):
                raise ConfigError(f"[{f.name}]: must be a table of settings, got {given!r}")
            known = {x.name for x in dataclasses.fields(section_cls)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ConfigError(f"{f.name}.{unknown[0]}: unknown setting; known: {', '.join(sorted(known))}")
            try:
                kwargs[f.name] = section_cls(**given)
            except TypeError as e:
                raise ConfigError(f"[{f.name}]: {e}") from None
        if data:
            raise ConfigError(f"[{sorted(data)[0]}]: unknown section; known: {', '.join(cls.SECTIONS)}")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> "Config":
        data = {}
        if path is not None:
            p = Path(path)
            try:
                data = tomllib.loads(p.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{p}: configuration file not found") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{p}: not valid TOML ({e})") from None
        try:
            return cls.from_dict(data, overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None

    def to_dict(self) -> dict:
        return {name: getattr(self, name).to_dict() for name in self.SECTIONS}

    def to_toml(self) -> str:
        lines = []
        for name in self.SECTIONS:
            sec = getattr(self, name)
            lines.append(f"[{name}]")
            for f in dataclasses.fields(sec):
                v = getattr(sec, f.name)
                help_ = f.metadata.get("help", "")
                if v is None:
                    lines.append(f"# {f.name} =   # {help_}")
                else:
                    lines.append(f"{f.name} = {_toml_value(v)}   # {help_}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)
