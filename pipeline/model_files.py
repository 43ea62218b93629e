"""The files of a model directory and their digest, and the edge scorer's (``edges.pt`` + the ``edges``
table of ``config.json``).

Kept apart from training so that the stages that run a model (edges, communities,
score, dedup's attach step) read the format without importing training.
A model directory without ``edges.pt`` is a model from before the learned
affinity (0.1.x): it still loads and runs the old chain.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import BadInput

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
