"""The run store: one Zarr v3 group per run, with a record of every stage.

Layout of a run group (``RUN.zarr``)::

    features          N x d float32, row chunks of R rows (L2-normalised)
    labels            N int64 (optional: ground-truth identities)
    input_rows        N int64 (row of the original input for every face)
    knn/index, knn/sim
    graph/...         proposals/...   score/...   clusters
    _tmp/             arrays being written (never read as results)

Group attribute ``facecluster`` holds ``{"stages": {name: record}}``. A record has
the stage's parameters, the digest of its inputs (its upstream stages' digests and
input file fingerprints), package versions, start/end time and ``complete``.

Why this shape:

* An array is created under ``_tmp/`` and moved to its final name only when the
  stage finishes, so a crash never leaves a half-written array at a final name.
  The stage record is written last; on object stores, where a move is a copy, the
  record (not the presence of an array) is what says an output is complete.
* A stage whose record matches its parameters and input digest is skipped on a
  re-run; a changed upstream digest changes every downstream digest, so stale
  results are recomputed automatically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

log = logging.getLogger(__name__)

ATTR_KEY = "facecluster"
TMP_GROUP = "_tmp"
FORMAT_VERSION = 1
_VERSIONED_PACKAGES = ("facecluster", "numpy", "scipy", "dask", "distributed", "zarr", "faiss-cpu", "torch")


class StoreError(RuntimeError):
    """A run store is missing, corrupt or lacks a stage's output."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and numpy scalars/arrays converted, for digests."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))


def digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(canonical_json(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file or directory (size, mtime, head/tail hash).

    Hashing a 100 GB feature file on every run would cost minutes; size + mtime +
    the first and last MiB catch every realistic change (re-export, truncation,
    append) without reading the whole file.
    """
    p = Path(path)
    if p.is_dir():
        entries = []
        for root, _dirs, files in sorted(os.walk(p)):
            for f in sorted(files):
                fp = Path(root) / f
                st = fp.stat()
                entries.append((str(fp.relative_to(p)), st.st_size, st.st_mtime_ns))
        return {"path": str(p.resolve()), "dir": digest(entries)}
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if st.st_size > (2 << 20):
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()}


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def normalize_url(url: str | os.PathLike) -> str:
    """The form of a run store URL that workers get: local paths absolute, ``file://`` stripped.

    Workers started by hand have their own working directory, so a relative path
    would name a different (or no) store there; and zarr hands ``file://`` URLs to
    fsspec's LocalFileSystem, which does not create parent directories. Remote
    fsspec URLs (``s3://``, ``gs://``, ...) are passed through unchanged.
    """
    s = str(url)
    if is_local(s):
        return os.path.abspath(local_path(s))
    return s


def local_path(url: str) -> Path:
    s = str(url)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def open_array(url: str, name: str, mode: str = "r") -> zarr.Array:
    """Open one array of a run store; used on workers (they get the URL, not objects)."""
    try:
        return zarr.open_array(store=normalize_url(url), path=name, mode=mode)
    except (FileNotFoundError, KeyError, ValueError) as e:  # zarr raises several kinds
        raise StoreError(
            f"{url}: array {name!r} is missing or unreadable ({type(e).__name__}); "
            "check that the run store path is reachable from every worker and re-run the stage that writes it"
        ) from e


@dataclass
class StageWriter:
    """Handed to a stage's body: creates its output arrays under ``_tmp/``."""

    store: "RunStore"
    name: str
    tmp_arrays: dict[str, str] = field(default_factory=dict)  # final name -> tmp path
    summary: dict = field(default_factory=dict)

    def create_array(self, name: str, shape, chunks, dtype, fill_value=None, attrs: dict | None = None) -> zarr.Array:
        """Create output array ``name`` at a temporary path; returns it (write via ``tmp_path``)."""
        tmp = f"{TMP_GROUP}/{self.name}__{name.replace('/', '__')}__{uuid.uuid4().hex[:8]}"
        shape = tuple(int(s) for s in shape)
        chunks = tuple(max(1, min(int(c), max(int(s), 1))) for c, s in zip(chunks, shape))
        if fill_value is None:
            fill_value = -1 if np.dtype(dtype).kind in "iu" else 0
        arr = self.store.root.create_array(
            tmp,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
        )
        if attrs:
            arr.attrs.update(attrs)
        self.tmp_arrays[name] = tmp
        return arr

    def tmp_path(self, name: str) -> str:
        return self.tmp_arrays[name]

    def write_array(self, name: str, data: np.ndarray, chunks=None, attrs: dict | None = None) -> None:
        """Create and fill a (small) output array in one go."""
        data = np.asarray(data)
        if chunks is None:
            chunks = (max(1, min(len(data), 1 << 20)),) + data.shape[1:] if data.ndim else ()
        arr = self.create_array(name, data.shape, chunks, data.dtype, attrs=attrs)
        if data.size:
            arr[...] = data


class RunStore:
    """A run's Zarr group plus its stage bookkeeping."""

    def __init__(self, url: str | os.PathLike, root: zarr.Group):
        self.url = normalize_url(url)
        self.root = root

    # -- opening ---------------------------------------------------------------
    @classmethod
    def create(cls, url: str | os.PathLike, overwrite: bool = False) -> "RunStore":
        url = normalize_url(url)
        if is_local(url):
            p = local_path(url)
            if p.exists() and not overwrite and any(p.iterdir()):
                raise StoreError(f"{url}: already exists; pass --overwrite to replace it or choose another -o path")
        root = zarr.open_group(store=url, mode="w" if overwrite else "a")
        root.attrs[ATTR_KEY] = {"format": FORMAT_VERSION, "created": now_iso(), "stages": {}}
        return cls(url, root)

    @classmethod
    def coerce(cls, run: "str | os.PathLike | RunStore", mode: str = "r") -> "RunStore":
        """``run`` itself when it is a RunStore, else the store opened at that path/URL."""
        return run if isinstance(run, RunStore) else cls.open(run, mode=mode)

    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "a") -> "RunStore":
        url = normalize_url(url)
        if is_local(url) and not local_path(url).exists():
            raise StoreError(f"{url}: no such run store; create one with `facecluster ingest FEATS -o {url}`")
        try:
            # "a" would create a group (a zarr.json) in any directory it is pointed at;
            # opening must never write, so an existing group is required ("r+")
            root = zarr.open_group(store=url, mode="r+" if mode == "a" else mode)
            meta = root.attrs.get(ATTR_KEY)
        except Exception as e:  # corrupt zarr.json, not a group, ...
            raise StoreError(f"{url}: not a readable facecluster run store ({e}); re-create it with `facecluster ingest`") from e
        if not isinstance(meta, dict) or "stages" not in meta:
            raise StoreError(f"{url}: is a Zarr group but not a facecluster run store; create one with `facecluster ingest`")
        return cls(url, root)

    # -- records ---------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self.root.attrs[ATTR_KEY])

    def _write_meta(self, meta: dict) -> None:
        self.root.attrs[ATTR_KEY] = json.loads(canonical_json(meta))

    def records(self) -> dict[str, dict]:
        return dict(self.meta.get("stages", {}))

    def record(self, name: str) -> dict | None:
        return self.records().get(name)

    def _set_record(self, name: str, rec: dict) -> None:
        meta = self.meta
        stages = dict(meta.get("stages", {}))
        stages[name] = rec
        meta["stages"] = stages
        self._write_meta(meta)

    def is_complete(self, name: str) -> bool:
        rec = self.record(name)
        return bool(rec and rec.get("complete"))

    def require(self, name: str, hint: str | None = None) -> dict:
        rec = self.record(name)
        if not rec or not rec.get("complete"):
            raise StoreError(f"{self.url}: stage {name!r} has not completed; {hint or f'run it first (facecluster {name} {self.url})'}")
        return rec

    def stage_digest(self, name: str, params: dict, inputs: list[str], extra: Any = None) -> str:
        upstream = {}
        for dep in inputs:
            upstream[dep] = self.require(dep, f"run stage {dep!r} before {name!r}")["digest"]
        return digest(name, params, upstream, extra)

    # -- running a stage ---------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, params: dict, inputs: list[str] = (), extra: Any = None, force: bool = False) -> Iterator[StageWriter | None]:
        """Run a stage body, or yield ``None`` if an identical completed run exists.

        ``inputs`` are upstream stage names; ``extra`` is anything else the result
        depends on (input file fingerprints, model digests). The body creates its
        outputs with ``writer.create_array``; they are moved into place and the
        record marked complete only if the body returns normally.
        """
        dig = self.stage_digest(name, params, list(inputs), extra)
        rec = self.record(name)
        if not force and rec and rec.get("complete") and rec.get("digest") == dig:
            log.info("stage %s: up to date (digest %s), skipped", name, dig[:12])
            yield None
            return
        writer = StageWriter(self, name)
        started = now_iso()
        self._set_record(name, {"complete": False, "status": "running", "params": params, "inputs": list(inputs),
                                "digest": dig, "started": started, "versions": package_versions()})
        try:
            yield writer
        except BaseException:
            self._drop_tmp(writer)
            rec = self.record(name) or {}
            rec.update(status="failed", finished=now_iso())
            self._set_record(name, rec)
            raise
        for final, tmp in writer.tmp_arrays.items():
            self._move(tmp, final)
        finished = now_iso()
        t0 = _dt.datetime.fromisoformat(started)
        t1 = _dt.datetime.fromisoformat(finished)
        self._set_record(name, {"complete": True, "status": "complete", "params": params, "inputs": list(inputs),
                                "digest": dig, "started": started, "finished": finished,
                                "seconds": (t1 - t0).total_seconds(), "outputs": sorted(writer.tmp_arrays),
                                "summary": writer.summary, "versions": package_versions()})

    def invalidate(self, name: str) -> None:
        rec = self.record(name)
        if rec:
            rec["complete"] = False
            rec["status"] = "invalidated"
            self._set_record(name, rec)

    # -- arrays ----------------------------------------------------------------
    def has(self, name: str) -> bool:
        try:
            self.root[name]
            return True
        except KeyError:
            return False

    def array(self, name: str) -> zarr.Array:
        try:
            a = self.root[name]
        except KeyError:
            raise StoreError(f"{self.url}: no array {name!r}; run the stage that writes it first") from None
        if not isinstance(a, zarr.Array):
            raise StoreError(f"{self.url}: {name!r} is a group, not an array")
        return a

    def dask_array(self, name: str):
        import dask.array as da

        a = self.array(name)
        return da.from_zarr(a, chunks=a.chunks)

    def _delete(self, path: str) -> None:
        if is_local(self.url):
            p = local_path(self.url) / path
            if p.exists():
                shutil.rmtree(p)
        else:
            try:
                del self.root[path]
            except KeyError:
                pass

    def _move(self, tmp: str, final: str) -> None:
        parent = final.rsplit("/", 1)[0] if "/" in final else ""
        if parent:
            self.root.require_group(parent)
        self._delete(final)
        if is_local(self.url):
            base = local_path(self.url)
            (base / final).parent.mkdir(parents=True, exist_ok=True)
            os.replace(base / tmp, base / final)
        else:  # object stores: copy + delete; the stage record marks completion
            import fsspec

            fs, root_path = fsspec.core.url_to_fs(self.url)
            fs.mv(f"{root_path.rstrip('/')}/{tmp}", f"{root_path.rstrip('/')}/{final}", recursive=True)

    def _drop_tmp(self, writer: StageWriter) -> None:
        for tmp in writer.tmp_arrays.values():
            with contextlib.suppress(Exception):
                self._delete(tmp)

    def clean_tmp(self) -> None:
        """Remove leftovers of killed runs (called when a store is opened for writing)."""
        with contextlib.suppress(Exception):
            self._delete(TMP_GROUP)
