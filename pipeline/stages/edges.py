"""Stage "edges": the learned affinity, P(same identity) of every kNN edge (``edges/prob``, N x k float32).

Runs the model's edge scorer (``facecluster.tasks.edges``) chunk-wise on the workers after
"knn". The data's similarity scale (:class:`facecluster.tasks.edges.SimStats`: the CDF of
its kNN similarities and its median first / last neighbour similarity) is taken
once from a stride sample of rows, so every input is read on this data's own
scale, whatever the face model.

Two passes over whole chunks of ``knn`` rows:

1. one task per chunk: each row's summary (first, last, mean, std, density of its similarities) and first
   ``SNN_M`` ids, written to ``edges/row_summary`` and ``edges/first_ids``: computed once
   per row. (Before, every task recomputed the summaries of its ~590k distinct
   neighbours at 1M faces and decoded all of ``knn/index`` for their first ids: 2.8 s of
   a 3.4 s block.)
2. ``edges/prob``, one task per ``EDGE_TASK_ENTRIES`` kNN entries: a task reads its rows' kNN lists and, for their distinct neighbours,
   their similarity rows, summaries and first ids (orthogonal selections: never the
   whole matrix), and writes its whole chunks (chunked like ``knn``).

With ``[edges] adapt`` one task between the two passes scores the edges of the scale sample's
rows, the driver fits the run's adaptation on them
(:func:`facecluster.tasks.edges.fit_adaptation`: a linear model on the run's own inputs,
pseudo-labelled by the scorer's confident edges), and the second pass writes the adapted P
(:func:`facecluster.tasks.edges.adapted_prob`) instead of the scorer's. The adaptation is kept
in the stage's summary (``adaptation``), so ``add`` scores new edges with it, and the later stages
read the model's levels for adapted runs (:func:`run_levels`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid

import numpy as np

from ..cluster import heap_reuse, total_threads, worker_infos
from ..config import Config
from ..model_files import edge_meta, load_edge_scorer, model_digest
from ..forest import row_chunks
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "edges"
SAMPLE_ROWS = 20_000
# kNN entries (rows x k) a second-pass task scores, in whole chunks. Each task reads the similarity rows, summaries
# and first ids of its rows' distinct neighbours, and decodes nearly every chunk of ``knn/sim`` to do it, whatever its
# size: fewer, larger tasks decode the store fewer times, and their rows share neighbours (1M built-in faces, rows in
# no particular order: 580,633 distinct neighbours for 16,384 rows, 862,156 for 65,536). The stage alone at 1M:
# 1 / 2 / 4 chunks of 16,384 rows a task 112.5 / 83.9-92.1 / 74.7-76.0 s, peak per worker 822 / 1,027 / 1,349 MiB.
# A task holds at most entries x (4k + 8 SNN_M + 40) B of neighbour rows (k = 80: 2.3 GB where no two of its
# entries share a neighbour) and entries x 60 B of inputs.
EDGE_TASK_ENTRIES = 80 << 16  # 65,536 rows at k = 80
_SCORERS: dict = {}  # (model dir, digest) -> scorer: loaded once per worker process


def edge_scorer(model_dir: str, digest: str):
    key = (model_dir, digest)
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = load_edge_scorer(model_dir)[0]
    return _SCORERS[key]


def summary_task(url: str, summary_path: str, first_path: str, r0: int, r1: int, stride: int,
                 index_path: str = "knn/index", sim_path: str = "knn/sim") -> dict:
    """Worker task, first pass: rows r0..r1's summaries and first SNN_M ids, and the scale sample's rows among them.

    Writes ``edges/row_summary`` and ``edges/first_ids`` (one whole chunk each); returns the
    kNN rows of the scale sample (every ``stride``-th row, as :func:`facecluster.tasks.edges.sample_rows`) that fall in r0..r1.
    ``index_path`` / ``sim_path``: the kNN arrays read (an add reads its grown copies).
    """
    from facecluster.tasks.edges import SNN_M, row_summaries

    idx, sim = open_array(url, index_path)[r0:r1], open_array(url, sim_path)[r0:r1]
    open_array(url, summary_path, mode="r+")[r0:r1] = row_summaries(idx, sim)
    open_array(url, first_path, mode="r+")[r0:r1] = idx[:, :min(SNN_M, idx.shape[1])]
    local = np.arange(-(-r0 // stride) * stride, r1, stride) - r0
    return {"index": idx[local], "sim": sim[local]}


def row_inputs(url: str, rows: np.ndarray, summary_path: str, first_path: str, stats: dict):
    """(kNN ids [R, k], edge inputs [R, k, N_INPUTS]) of the given rows (ascending global ids).

    Gathers, for the rows' distinct neighbours, their similarity rows (the rank an edge
    would have in the other end's list needs them whole), summaries and first ids: from the
    first pass's arrays, so no task recomputes a neighbour's summary or decodes ``knn/index``.
    """
    from facecluster.tasks.edges import SimStats, edge_inputs, gather_positions

    zs, zi = open_array(url, "knn/sim"), open_array(url, "knn/index")
    rows = np.asarray(rows, np.int64)
    contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows)
    if contiguous:  # a chunk: plain slices
        idx, sim = zi[int(rows[0]):int(rows[-1]) + 1], zs[int(rows[0]):int(rows[-1]) + 1]
    else:
        idx, sim = zi.get_orthogonal_selection((rows, slice(None))), zs.get_orthogonal_selection((rows, slice(None)))
    uniq, pos = gather_positions(idx)
    nbr_sim = zs.get_orthogonal_selection((uniq, slice(None)))
    nbr_summary = open_array(url, summary_path).get_orthogonal_selection((uniq, slice(None)))
    nbr_idx = open_array(url, first_path).get_orthogonal_selection((uniq, slice(None)))
    x = edge_inputs(rows, idx, sim, pos, nbr_sim, nbr_idx, SimStats.from_dict(stats), nbr_summary=nbr_summary)
    return idx, x, len(uniq)


def edge_task_ranges(n: int, r: int, k: int, threads: int, task_entries: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of the second pass's tasks: whole chunks of ``r`` rows, up to ``task_entries`` kNN entries
    (:data:`EDGE_TASK_ENTRIES`) each, and at least two tasks per worker thread where there are enough chunks (so no
    thread waits on a last large task)."""
    chunks = -(-n // r)
    per = max(1, min((task_entries or EDGE_TASK_ENTRIES) // (max(1, k) * r), chunks // max(1, 2 * threads)))
    return row_chunks(n, per * r)


def run_adaptation(store: RunStore) -> dict | None:
    """The adaptation the run's edges stage fitted (``[edges] adapt`` and enough confident edges), else None."""
    return ((store.record(STAGE) or {}).get("summary") or {}).get("adaptation")


def adapted(store: RunStore) -> bool:
    """Whether the run's edges stage adapted the scorer's P to the run."""
    return bool(run_adaptation(store))


LEVEL_KEYS = ("floor", "merge", "attach", "cut", "infomap_level")


def run_levels(edges: dict, store: RunStore | None) -> dict:
    """The model's levels for this run (communities floor, merge, attach, the components cut of
    ``--method threshold``, the cosine-floor level of ``--method infomap``): those chosen on adapted out-of-fold P
    (``adapt_levels``) where the run's P was adapted and the model records them, else its own (also without a
    run: ``store`` None).

    A level a model's ``adapt_levels`` lacks (recorded before facecluster 0.7: cut, infomap_level) is its own.
    """
    own = {key: edges.get(key) for key in LEVEL_KEYS}
    alt = edges.get("adapt_levels")
    return {key: alt.get(key, own[key]) for key in own} if alt and store is not None and adapted(store) else own


def adapts(cfg: Config, model_dir: str) -> bool:
    """Whether the edges stage adapts the model's P to the run: ``[edges] adapt``, where ``"auto"`` means
    the model records levels for adapted P (``adapt_levels``: the general model does, and its communities were
    measured to gain on every set; a model trained on one's own labels does not, and gained nothing measurable)."""
    if cfg.edges.adapt == "auto":
        meta = edge_meta(model_dir)
        return bool(meta and meta.get("adapt_levels"))
    return bool(cfg.edges.adapt)


def scorer_p(cfg: Config) -> Config:
    """``cfg`` for the readers of the general model's own P when ``[edges] adapt`` is ``"auto"``: the components
    cut of ``--method threshold`` and the cosine floor of ``--method infomap``. Adapted P measured mixed for
    both (README, "Per-run adaptation": the cut up on every real and built-in set but down on a third of the
    unseen generated worlds, up to -0.36 pairwise F on one; the floor down 0.003-0.012 on the built-in
    variants), so they adapt only where ``adapt = true`` asks for it."""
    if cfg.edges.adapt != "auto":
        return cfg
    return dataclasses.replace(cfg, edges=dataclasses.replace(cfg.edges, adapt=False))


def sample_task(url: str, rows: np.ndarray, summary_path: str, first_path: str, model_dir: str, digest: str,
                stats: dict) -> dict:
    """Worker task (``[edges] adapt``): the inputs and scorer P of the scale sample's rows' edges, valid ones only."""
    import torch

    from facecluster.tasks.edges import predict_edges

    from ..cluster import worker_threads

    torch.set_num_threads(worker_threads())
    idx, x, _ = row_inputs(url, rows, summary_path, first_path, stats)
    ok = idx >= 0
    return {"inputs": x[ok], "prob": predict_edges(edge_scorer(model_dir, digest), x)[ok]}


def edges_task(url: str, out_path: str, summary_path: str, first_path: str, r0: int, r1: int, model_dir: str,
               digest: str, stats: dict, adaptation: dict | None = None) -> dict:
    """Worker task, second pass: ``edges/prob`` rows r0..r1 (whole chunks, :func:`edge_task_ranges`): the scorer's
    P, or the run's adapted P where ``adaptation`` is given."""
    import torch

    from facecluster.tasks.edges import adapted_prob, predict_edges

    from ..cluster import worker_threads

    torch.set_num_threads(worker_threads())
    idx, x, n_uniq = row_inputs(url, np.arange(r0, r1), summary_path, first_path, stats)
    p = predict_edges(edge_scorer(model_dir, digest), x)
    if adaptation:
        p = adapted_prob(x, adaptation, p)
    open_array(url, out_path, mode="r+")[r0:r1] = p
    ok = idx >= 0
    return {"rows": int(r1 - r0), "neighbour_rows": int(n_uniq), "edges": int(ok.sum()),
            "above_half": int((p[ok] >= 0.5).sum())}


def run_edges(store: RunStore, model_dir: str, cfg: Config, client, force: bool = False) -> dict:
    """Score every kNN edge with the model's edge scorer; writes ``edges/prob`` (stage "edges", input "knn").

    Returns the stage summary: the data's similarity scale, edges scored, share with
    P >= 0.5, the largest neighbour gather of a task.
    """
    from facecluster.tasks.edges import ROW_SUMMARY, SNN_M, fit_adaptation, sample_stride, sim_stats  # torch: imported when run

    store.require("knn", f"run `facecluster knn {store.url}` first")
    load_edge_scorer(model_dir)  # a bad model fails here, before any task runs
    index = store.array("knn/index")
    n, k = index.shape
    r = int(index.chunks[0])
    digest = model_digest(model_dir)
    adapt = adapts(cfg, model_dir)
    params = {"model_digest": digest, **({"adapt": True} if adapt else {})}  # runs without it keep their digest
    with store.stage(STAGE, params, inputs=["knn"], extra={"model": os.path.abspath(model_dir)}, force=force) as w:
        if w is None:
            return store.record(STAGE).get("summary", {})
        token = uuid.uuid4().hex[:8]
        m = min(SNN_M, k)
        w.create_array("edges/row_summary", (n, len(ROW_SUMMARY)), (r, len(ROW_SUMMARY)), np.float64,
                       fill_value=np.nan, attrs={"columns": list(ROW_SUMMARY)})
        w.create_array("edges/first_ids", (n, m), (r, m), index.dtype)
        w.create_array("edges/prob", (n, k), (r, k), np.float32, fill_value=0.0)
        summary_path, first_path = w.tmp_path("edges/row_summary"), w.tmp_path("edges/first_ids")
        stride = sample_stride(n, SAMPLE_ROWS)
        with heap_reuse(client):  # its temporaries reuse freed heap instead of fresh pages (as in score)
            futs = [client.submit(summary_task, store.url, summary_path, first_path, a, b, stride, key=f"edges-rows-{a}-{token}")
                    for a, b in row_chunks(n, r)]
            rows = wait_futures(futs, "edges (row summaries)")
            # the scale sample's rows in row order: the same quantiles however the rows were chunked
            stats = sim_stats(np.concatenate([p["index"] for p in rows]), np.concatenate([p["sim"] for p in rows])).to_dict()
            adaptation = None
            if adapt:  # the scale sample's rows: their edges teach the run's adaptation
                sample = client.submit(sample_task, store.url, np.arange(0, n, stride), summary_path, first_path,
                                       os.path.abspath(model_dir), digest, stats, key=f"edges-sample-{token}")
                got = wait_futures([sample], "edges (adaptation sample)")[0]
                adaptation = fit_adaptation(got["inputs"], got["prob"])
                del got
                log.info("edges: adaptation %s", "fitted on %d + %d confident sample edges" % tuple(
                    adaptation["pseudo_labels"]) if adaptation else "skipped: too few confident sample edges")
            futs = [client.submit(edges_task, store.url, w.tmp_path("edges/prob"), summary_path, first_path, a, b,
                                  os.path.abspath(model_dir), digest, stats, adaptation, key=f"edges-{a}-{token}")
                    for a, b in edge_task_ranges(n, r, k, total_threads(worker_infos(client)))]
            parts = wait_futures(futs, "edges")
        n_edges = sum(p["edges"] for p in parts)
        summary = {"n": int(n), "k": int(k), "tasks": len(parts), "edges": int(n_edges),
                   "share_above_half": float(sum(p["above_half"] for p in parts) / max(n_edges, 1)),
                   "largest_gather_rows": int(max((p["neighbour_rows"] for p in parts), default=0)),
                   "scale": {"top1": stats["top1"], "last": stats["last"],
                             "median": stats["quantiles"][len(stats["quantiles"]) // 2]}}
        if adapt:
            summary["adaptation"] = adaptation  # None: asked for, too few confident edges to fit
        w.summary.update(summary)
        log.info("edges: %d edges scored, %.1f%% with P >= 0.5", n_edges, 100 * summary["share_above_half"])
        return summary
