"""Stage "score": GCN-D (predicted IoU, IoP) on every proposal, then GCN-S on the uncertain ones.

One Dask task per batch of ``gcn.score_batch`` proposals (default :func:`auto_batch`). A task reads only what it
needs from the store by URL: its slice of ``proposals/offsets`` and ``members``, and
the ``features`` / ``knn`` rows of those members (orthogonal selection of the sorted
unique ids), so no worker holds the feature matrix. The models are loaded once per
worker process (module-level cache keyed by model directory + digest) and torch
uses the worker's thread count.

Determinism: ``facecluster.tasks.gcn.score_batch`` runs every proposal in a fixed-shape forward
(size bucket x fixed proposal count), so a proposal's scores are bitwise the same
for any batch size or worker count (tested), which dedup's tie-breaking needs.

Outputs: ``score/iou``, ``score/iop`` (P float32), ``score/segmented`` (P bool: GCN-S
ran on it), ``score/keep`` (M bool, aligned with ``proposals/members``: False where
GCN-S removed the member).
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np

from ..config import Config
from ..model_files import check_dim, edge_weight_array, load_models, model_digest, read_model_config
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "score"
_MODELS: dict = {}  # (model_dir, digest) -> (gcnd, gcns, meta); one load per worker process


def _models(model_dir: str, digest: str):
    key = (os.path.abspath(model_dir), digest)
    if key not in _MODELS:
        _MODELS.clear()  # one model per worker at a time
        _MODELS[key] = load_models(model_dir)
        log.info("score: loaded model %s (%s) in pid %d", model_dir, digest[:12], os.getpid())
    return _MODELS[key]


def model_loads() -> int:
    """Models currently cached in this process (tests check one load per worker)."""
    return len(_MODELS)


def score_task(url: str, model_dir: str, digest: str, p0: int, p1: int, iop_range, keep_prob: float,
               segment: bool = True) -> dict:
    """Worker task: score proposals ``[p0, p1)``; returns their outputs (small arrays)."""
    import torch

    from facecluster.tasks.gcn import build_batch, score_batch

    from ..cluster import worker_threads

    torch.set_num_threads(worker_threads())
    gcnd, gcns, meta = _models(model_dir, digest)
    off = open_array(url, "proposals/offsets")[p0:p1 + 1]
    members = open_array(url, "proposals/members")[int(off[0]):int(off[-1])]
    ids, inv = np.unique(members, return_inverse=True)  # sorted: row locality in the store
    feats = open_array(url, "features").get_orthogonal_selection((ids, slice(None)))
    kidx = open_array(url, "knn/index").get_orthogonal_selection((ids, slice(None)))
    ksim = open_array(url, edge_weight_array(meta["spec"])).get_orthogonal_selection((ids, slice(None)))
    kcos = (open_array(url, "knn/sim").get_orthogonal_selection((ids, slice(None)))[inv]
            if meta["spec"].get("weights") == "both" else None)
    batch = build_batch(np.diff(off), members, feats[inv], kidx[inv], ksim[inv], meta["spec"], knn_cos=kcos)
    if iop_range is None:  # the model's validation tuning found GCN-S does not help
        segment, iop_range = False, (1.0, 0.0)
    out = score_batch(gcnd, batch, gcns if segment else None, tuple(iop_range), keep_prob)
    return {"p0": p0, "iou": out["iou"], "iop": out["iop"], "segmented": out["segmented"], "keep": out["keep"]}


def auto_batch(n_prop: int, n_workers: int, lo: int = 512, hi: int = 4096) -> int:
    """Proposals per score task: about 4 tasks per worker, within ``lo..hi``.

    Large batches because a task's reads dominate at scale: the members of a batch are
    scattered over the whole store, so every task decodes nearly every chunk of
    ``features`` and ``knn`` (measured at 1M faces, one task: 512 proposals 200/s,
    4,096 proposals 1,219/s); ``lo`` keeps small runs spread over the workers. The
    price is memory, bounded by ``hi``: at 100k faces 3,149 proposals per task peaked
    at 1.4 GB per worker against 0.75 GB with 512 (``gcn.score_batch`` sets it).
    """
    return int(min(hi, max(lo, -(-int(n_prop) // (4 * max(1, int(n_workers)))))))


def segmentation_params(cfg: Config, meta: dict) -> tuple[list | None, float]:
    """GCN-S (iop_range, keep_prob): [gcn] values when set, else the model's validation-tuned ones.

    ``iop_range`` None means GCN-S is skipped (training found it did not help on the
    validation identities). Models without a tuned record fall back to (0.3, 0.7) / 0.5.
    """
    tuned = meta.get("segmentation") or {"iop_range": [0.3, 0.7], "keep_prob": 0.5}
    g = cfg.gcn
    rng = list(g.iop_range) if g.iop_range is not None else tuned.get("iop_range")
    kp = float(g.keep_prob) if g.keep_prob is not None else float(tuned.get("keep_prob", 0.5))
    return (None if rng is None else [float(x) for x in rng]), kp


def run_score(store: RunStore, model_dir: str, cfg: Config, client, force: bool = False) -> dict:
    """Score every proposal with the model in ``model_dir`` (stage "score", input "proposals").

    Raises
    ------
    BadInput : when the model directory is incomplete or its feature dimension
        differs from the run's.
    """
    store.require("proposals", f"run `facecluster proposals {store.url}` first")
    meta = read_model_config(model_dir)
    check_dim(meta, store.array("features").shape[1], model_dir, store.url)
    digest = model_digest(model_dir)
    g = cfg.gcn
    iop_range, keep_prob = segmentation_params(cfg, meta)
    params = {"segment": g.segment, "iop_range": iop_range, "keep_prob": keep_prob}
    extra = {"model": os.path.abspath(model_dir), "model_digest": digest}
    inputs = ["proposals"] + (["edges"] if edge_weight_array(meta["spec"]) == "edges/prob" else [])
    with store.stage(STAGE, params, inputs=inputs, extra=extra, force=force) as w:
        if w is None:
            return store.record(STAGE).get("summary", {})
        n_prop = store.array("proposals/offsets").shape[0] - 1
        token = uuid.uuid4().hex[:8]
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        per = g.score_batch or auto_batch(n_prop, n_workers)
        bounds = list(range(0, n_prop, per)) + [n_prop]
        model_dir = os.path.abspath(model_dir)
        futs = [client.submit(score_task, store.url, model_dir, digest, a, b, iop_range, keep_prob,
                              g.segment, key=f"score-{a}-{token}") for a, b in zip(bounds[:-1], bounds[1:])]
        import time

        t0 = time.perf_counter()
        res = wait_futures(futs, "score")
        seconds = time.perf_counter() - t0
        cat = (lambda k: np.concatenate([r[k] for r in res]) if res else np.zeros(0))
        iou = cat("iou").astype(np.float32)
        iop = cat("iop").astype(np.float32)
        seg = cat("segmented").astype(bool) & g.segment & (iop_range is not None)
        keep = cat("keep").astype(bool)
        w.write_array("score/iou", iou)
        w.write_array("score/iop", iop)
        w.write_array("score/segmented", seg)
        w.write_array("score/keep", keep)
        summary = {"n_proposals": int(n_prop), "tasks": len(futs), "proposals_per_task": int(per),
                   "seconds": round(seconds, 3),
                   "proposals_per_s": round(n_prop / max(seconds, 1e-9), 1),
                   "proposals_per_s_per_worker": round(n_prop / max(seconds, 1e-9) / n_workers, 1),
                   "segmented": int(seg.sum()), "members_removed": int((~keep).sum()),
                   "mean_iou": float(iou.mean()) if len(iou) else None, "model": model_dir,
                   "iop_range": iop_range, "keep_prob": keep_prob,
                   "model_metrics": meta.get("metrics", {})}
        w.summary.update(summary)
        return summary
