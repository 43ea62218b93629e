"""The model directory format: its files and their digest, ``config.json``, the GCN-D/GCN-S weights
(``gcnd.pt``, ``gcns.pt``) and the edge scorer's (``edges.pt`` + the ``edges`` table of ``config.json``).

Kept apart from training so that the stages that run a model (edges, communities,
score, dedup's attach step), the clustering methods and the Python API read the
format without importing training.
A model directory without ``edges.pt`` is a model from before the learned
affinity (0.1.x): it still loads and runs the old chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np

from .errors import BadInput

#: the general model shipped in the package (``facecluster train --general`` writes it): what
#: ``facecluster cluster`` and ``FaceClusterer`` use for the learned method when no model is given
GENERAL_MODEL_DIR = Path(__file__).resolve().parent / "models" / "general"
#: :func:`model_digest` of those files (tests/test_general.py checks them against it)
GENERAL_MODEL_DIGEST = "92afa2d61d2b55f5d50e7d6a5926ad72"
FORMAT = 2  # 2: gcnd.pt holds a GCNDEnsemble (config.json "ensemble" members); 1: one GCND
MODEL_FILES = ("gcnd.pt", "gcns.pt", "config.json")
EDGE_FILE = "edges.pt"  # optional: models from before 0.2 have none
RETRAIN_NOTE = ("model {model} has no edge scorer (trained before facecluster 0.2): clustering without the learned "
                "affinity; re-train it with `facecluster train` for the edges/communities stages")


def edge_weight_array(spec: dict) -> str:
    """The array GCN-D/GCN-S read as edge weights: the learned P (``weights = "prob"``) or the cosine."""
    return "edges/prob" if spec.get("weights") in ("prob", "both") else "knn/sim"


def model_digest(model_dir: str | os.PathLike) -> str:
    """Digest of a model directory's files (part of the identity of every stage that runs it)."""
    h = hashlib.sha256()
    for name in MODEL_FILES + (EDGE_FILE,):
        p = Path(model_dir) / name
        if p.exists():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def edge_meta(model_dir: str | os.PathLike) -> dict | None:
    """The ``edges`` table of a model's config.json (None: the model has no edge scorer)."""
    d = Path(model_dir)
    try:
        meta = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    e = meta.get("edges") if isinstance(meta, dict) else None
    if not e:
        return None
    if not (d / EDGE_FILE).exists():
        raise BadInput(f"{d}: config.json describes an edge scorer but {EDGE_FILE} is missing; re-train the model")
    return e


def load_edge_scorer(model_dir: str | os.PathLike):
    """(EdgeScorer in eval mode, its ``edges`` table); BadInput when the files do not match."""
    import torch

    from facecluster.tasks.edges import EdgeScorer, N_INPUTS

    meta = edge_meta(model_dir)
    if meta is None:
        raise BadInput(f"{model_dir}: has no edge scorer; re-train it with `facecluster train`")
    if list(meta.get("inputs", [])) and len(meta["inputs"]) != N_INPUTS:
        raise BadInput(f"{model_dir}: edge scorer expects {len(meta['inputs'])} inputs, this version computes "
                       f"{N_INPUTS}; re-train the model")
    model = EdgeScorer(N_INPUTS, tuple(meta["hidden"]))
    try:
        model.load_state_dict(torch.load(Path(model_dir) / EDGE_FILE, weights_only=True, map_location="cpu"))
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a bad or foreign file
        raise BadInput(f"{Path(model_dir) / EDGE_FILE}: not a facecluster edge scorer ({str(e).splitlines()[0][:120]}); "
                       "re-train the model") from None
    return model.eval(), meta


def save_edge_scorer(out_dir: str | os.PathLike, model) -> Path:
    import torch

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), d / EDGE_FILE)
    return d / EDGE_FILE


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` of a model directory; BadInput when missing or incomplete."""
    d = Path(model_dir)
    missing = [n for n in MODEL_FILES if not (d / n).exists()]
    if missing:
        raise BadInput(f"{d}: not a facecluster model directory (missing {', '.join(missing)}); "
                       f"train one with `facecluster train RUN.zarr --out {d}`")
    try:
        meta = json.loads((d / "config.json").read_text())
        meta["dim"], meta["hidden"], meta["spec"]  # noqa: B018 - presence check
        if meta["dim"] is None:  # a model for any dimension: its inputs must not hold the feature itself
            if meta["spec"].get("x", "mean") != "none":
                raise ValueError(f"dim null (any dimension) needs spec x 'none', got {meta['spec'].get('x')!r}")
        elif not isinstance(meta["dim"], int) or isinstance(meta["dim"], bool) or meta["dim"] < 1:
            raise ValueError(f"dim must be a positive integer or null, got {meta['dim']!r}")
        for key in ("outside", "connectivity"):  # models from before 0.1.4 have neither input group
            meta["spec"].setdefault(key, False)
        meta["spec"].setdefault("weights", "sim")  # models from before 0.2 read cosines
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, a key missing, "spec" not a table
        raise BadInput(f"{d / 'config.json'}: unreadable model configuration ({e!r}); re-train the model") from None
    return meta


def check_dim(meta: dict, dim: int, model_dir, run_url: str) -> None:
    """BadInput when a model was trained on features of another dimension than the run's (``dim`` null: any)."""
    if meta["dim"] is not None and int(meta["dim"]) != int(dim):
        raise BadInput(f"{model_dir}: model was trained on {meta['dim']}-d features but {run_url} has {dim}-d features; "
                       f"train a model on a run with {dim}-d features (`facecluster train`) or use a matching model")


def load_models(model_dir: str | os.PathLike, dim: int | None = None, run_url: str = "the run"):
    """(gcnd, gcns, meta) in eval mode, loaded with ``torch.load(weights_only=True)``."""
    import torch

    from facecluster.tasks.gcn import GCND, GCNS, GCNDEnsemble, input_dim

    meta = read_model_config(model_dir)
    if dim is not None:
        check_dim(meta, dim, model_dir, run_url)
    in_dim = input_dim(int(meta["dim"] or 0), meta["spec"])
    d = Path(model_dir)
    n_members = int(meta.get("ensemble", 0))  # 0: a format-1 directory, one plain GCND
    hidden = tuple(meta["hidden"])
    gd = GCNDEnsemble([GCND(in_dim, hidden, 0.0) for _ in range(n_members)]) if n_members else GCND(in_dim, hidden, 0.0)
    gs = GCNS(in_dim + 2, tuple(meta["hidden"]), 0.0)
    for net, name in ((gd, "gcnd.pt"), (gs, "gcns.pt")):
        try:
            net.load_state_dict(torch.load(d / name, weights_only=True, map_location="cpu"))
        except pickle.UnpicklingError:
            # torch's message advises weights_only=False, i.e. running the file's code: never
            raise BadInput(f"{d / name}: refused - the file holds more than tensors (pickled code or objects), "
                           "which facecluster never loads; re-train the model or use one from a trusted source") from None
        except (RuntimeError, OSError, ValueError) as e:
            raise BadInput(f"{d / name}: model weights do not match its config.json ({str(e).splitlines()[0]}); "
                           "re-train the model") from None
    gd.eval()
    gs.eval()
    return gd, gs, meta


def save_models(out_dir: str | os.PathLike, gcnd, gcns, meta: dict) -> Path:
    """Write the state_dicts and config.json (config last: its presence marks a complete directory)."""
    import torch

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").unlink(missing_ok=True)
    torch.save(gcnd.state_dict(), d / "gcnd.pt")
    torch.save(gcns.state_dict(), d / "gcns.pt")
    tmp = d / "config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    os.replace(tmp, d / "config.json")
    return d


def check_model(model_dir: str | os.PathLike, dim: int, run_url: str = "the run") -> None:
    """Load every file of a model directory once: a missing, unsafe or foreign file, or a model for
    another feature dimension, fails here (BadInput) before any stage runs."""
    load_models(model_dir, dim, run_url)
    if edge_meta(model_dir) is not None:
        load_edge_scorer(model_dir)
