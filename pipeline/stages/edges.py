"""Stage "edges": the learned affinity, P(same identity) of every kNN edge (``edges/prob``, N x k float32).

Runs the model's edge scorer (``facecluster.tasks.edges``) chunk-wise on the workers after
"knn". The data's similarity scale (:class:`facecluster.tasks.edges.SimStats`: the CDF of
its kNN similarities and its median first / last neighbour similarity) is taken
once from a stride sample of rows, so every input is read on this data's own
scale, whatever the face model. Each task reads its rows' kNN lists and the rows
of their distinct neighbours (an orthogonal selection: never the whole matrix),
and writes its whole chunk of ``edges/prob`` (chunked like ``knn``).
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np

from ..config import Config
from ..model_files import load_edge_scorer, model_digest
from ..forest import row_chunks
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "edges"
SAMPLE_ROWS = 20_000
_SCORERS: dict = {}  # (model dir, digest) -> scorer: loaded once per worker process


def _scorer(model_dir: str, digest: str):
    key = (model_dir, digest)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = load_edge_scorer(model_dir)[0]
    return _SCORERS[key]


def stats_task(url: str, max_rows: int = SAMPLE_ROWS) -> dict:
    """Worker task: the data's similarity scale from a stride sample of kNN rows."""
    from facecluster.tasks.edges import sample_rows, sim_stats

    idx = open_array(url, "knn/index")
    rows = sample_rows(idx.shape[0], max_rows)
    return sim_stats(idx.get_orthogonal_selection((rows, slice(None))),
                     open_array(url, "knn/sim").get_orthogonal_selection((rows, slice(None)))).to_dict()


def edges_task(url: str, out_path: str, r0: int, r1: int, model_dir: str, digest: str, stats: dict) -> dict:
    """Worker task: ``edges/prob`` rows r0..r1 (one whole chunk)."""
    import torch

    from facecluster.tasks.edges import SNN_M, SimStats, edge_inputs, gather_positions, predict_edges

    from ..cluster import worker_threads

    torch.set_num_threads(worker_threads())
    zi, zs = open_array(url, "knn/index"), open_array(url, "knn/sim")
    idx, sim = zi[r0:r1], zs[r0:r1]
    uniq, pos = gather_positions(idx)
    nbr_sim = zs.get_orthogonal_selection((uniq, slice(None)))
    nbr_idx = zi.get_orthogonal_selection((uniq, slice(0, min(SNN_M, zi.shape[1]))))
    x = edge_inputs(np.arange(r0, r1), idx, sim, pos, nbr_sim, nbr_idx, SimStats.from_dict(stats))
    p = predict_edges(_scorer(model_dir, digest), x)
    open_array(url, out_path, mode="r+")[r0:r1] = p
    ok = idx >= 0
    return {"rows": int(r1 - r0), "neighbour_rows": int(len(uniq)), "edges": int(ok.sum()),
            "above_half": int((p[ok] >= 0.5).sum())}


def run_edges(store: RunStore, model_dir: str, cfg: Config, client, force: bool = False) -> dict:
    """Score every kNN edge with the model's edge scorer; writes ``edges/prob`` (stage "edges", input "knn").

    Returns the stage summary: the data's similarity scale, edges scored, share with
    P >= 0.5, the largest neighbour gather of a task.
    """
    store.require("knn", f"run `facecluster knn {store.url}` first")
    load_edge_scorer(model_dir)  # a bad model fails here, before any task runs
    index = store.array("knn/index")
    n, k = index.shape
    r = int(index.chunks[0])
    digest = model_digest(model_dir)
    params = {"model_digest": digest}
    with store.stage(STAGE, params, inputs=["knn"], extra={"model": os.path.abspath(model_dir)}, force=force) as w:
        if w is None:
            return store.record(STAGE).get("summary", {})
        token = uuid.uuid4().hex[:8]
        stats = client.submit(stats_task, store.url, key=f"edges-scale-{token}").result()
        w.create_array("edges/prob", (n, k), (r, k), np.float32, fill_value=0.0)
        futs = [client.submit(edges_task, store.url, w.tmp_path("edges/prob"), a, b, os.path.abspath(model_dir), digest,
                              stats, key=f"edges-{a}-{token}") for a, b in row_chunks(n, r)]
        parts = wait_futures(futs, "edges")
        n_edges = sum(p["edges"] for p in parts)
        summary = {"n": int(n), "k": int(k), "tasks": len(parts), "edges": int(n_edges),
                   "share_above_half": float(sum(p["above_half"] for p in parts) / max(n_edges, 1)),
                   "largest_gather_rows": int(max((p["neighbour_rows"] for p in parts), default=0)),
                   "scale": {"top1": stats["top1"], "last": stats["last"],
                             "median": stats["quantiles"][len(stats["quantiles"]) // 2]}}
        w.summary.update(summary)
        log.info("edges: %d edges scored, %.1f%% with P >= 0.5", n_edges, 100 * summary["share_above_half"])
        return summary
