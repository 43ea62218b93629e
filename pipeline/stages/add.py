"""Stage "add": new faces appended to a clustered run, their kNN and the kNN lists they enter, the edge
probabilities they change, and the rows the re-clustering must revisit (worker tasks and their steps).

What an add writes, all under ``_tmp/`` until :meth:`RunStore.commit` moves it into place in one
journalled step (a crash before the commit leaves the run as it was; a crash during it is finished by
the next writing command):

* ``features``, ``input_rows`` (and ``labels``): the old rows, then the new ones;
* ``knn/index``, ``knn/sim``: the new faces' lists and every old list a new face enters, merged into the
  stored lists. A run searched exactly: exact search of the new faces against every face, and of the old
  faces against the new ones (the lists exact search over all faces gives). A run searched through IVF
  lists: the new faces join the run's lists (its stored quantizer, ``knn/ivf_list`` grown) and are searched
  as the kNN stage searches (the run's nprobe, exact re-scoring), and an old face's list gains the new
  faces that probe its list and beat its k-th (runs from before the quantizer was stored: exact);
* ``edges/prob`` (learned method): every edge of a new face scored, and every edge from an old face to
  a new one; an old face's other edges keep their stored probability. (Strictly, an edge's inputs read
  both ends' whole lists, so a list that gained a new face shifts the inputs of all its edges a little;
  re-scoring those too touches nearly every row at 5% added - 98.9% of old lists gain a new face - and
  costs what the edges stage costs, mostly its neighbour gather.)

The re-clustering itself (which method, on which rows) is :mod:`facecluster.pipeline.additions`.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np

from facecluster.tasks import knn as K
from facecluster.tasks.arrays import unique_sorted

from ..cluster import worker_threads
from ..forest import row_chunks
from ..progress import wait_futures
from ..store import RunStore, StageWriter, open_array
from facecluster.tasks.additions import (affected_rows, candidate_lists, carried_over, cluster_links, entering,
                                         entering_lists, merge_entering, sub_lists)
from facecluster.tasks.components import chunk_forest
from facecluster.tasks.thresholds import auto_threshold

from .edges import edge_scorer, run_adaptation, summary_task
from .graph import SAMPLE_ROWS
from .knn import QUANTIZER, assign_lists, clear_cache, index_of, ivf_group, merge_task, plan

STAGE = "add"
log = logging.getLogger(__name__)


# -- worker tasks -------------------------------------------------------------------------------
def copy_rows_task(url: str, out_path: str, name: str, new_url: str, new_name: str, r0: int, r1: int, n_old: int,
                   offset: int = 0) -> int:
    """Rows [r0, r1) of the grown array ``out_path``: the old array's rows, then the new run's (+ ``offset``)."""
    out = open_array(url, out_path, mode="r+")
    parts = []
    if r0 < n_old:
        parts.append(np.asarray(open_array(url, name)[r0:min(r1, n_old)]))
    if r1 > n_old:
        parts.append(np.asarray(open_array(new_url, new_name)[max(r0, n_old) - n_old:r1 - n_old]) + offset)
    out[r0:r1] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return r1 - r0


def knn_group_task(url: str, paths: dict, g0: int, g1: int, n_old: int, k: int) -> dict:
    """Database rows [g0, g1) of the grown run: the new faces' top-k among them (for the merge tree), and,
    for the old rows among them, their lists with the new faces that enter them (written)."""
    K.set_threads(worker_threads())
    feats = open_array(url, paths["features"])
    n = feats.shape[0]
    db = np.ascontiguousarray(feats[g0:g1], dtype=np.float32)
    q = np.ascontiguousarray(feats[n_old:n], dtype=np.float32)
    q_ids = np.arange(n_old, n, dtype=np.int64)
    new_lists = K.knn_flat(K.flat_index(db), q, q_ids, np.arange(g0, g1, dtype=np.int64), k)
    changed = np.zeros(0, bool)
    o1 = min(g1, n_old)
    if o1 > g0:
        old_sim = open_array(url, "knn/sim")[g0:o1]
        cand_sim, cand_idx = entering(db[:o1 - g0], old_sim[:, -1], q, q_ids)
        sim, idx, changed = merge_entering(open_array(url, "knn/index")[g0:o1], old_sim, cand_idx, cand_sim, k)
        open_array(url, paths["knn/index"], "r+")[g0:o1] = idx
        open_array(url, paths["knn/sim"], "r+")[g0:o1] = sim
    return {"new": new_lists, "changed": changed, "g0": g0}


def write_lists_task(url: str, paths: dict, r0: int, r1: int, lists) -> int:
    sim, idx = lists
    open_array(url, paths["knn/index"], "r+")[r0:r1] = idx
    open_array(url, paths["knn/sim"], "r+")[r0:r1] = sim
    return r1 - r0


def grow_lists_task(url: str, paths: dict, r0: int, r1: int, n_old: int, trained: np.ndarray) -> int:
    """Rows [r0, r1) of the grown ``knn/ivf_list``: an old face's list copied, a new face's list assigned by
    the run's quantizer (nearest centroid, as the kNN stage assigns)."""
    K.set_threads(worker_threads())
    out = np.empty(r1 - r0, np.int64)
    o1 = min(r1, n_old)
    if o1 > r0:
        out[:o1 - r0] = open_array(url, "knn/ivf_list")[r0:o1]
    if r1 > n_old:
        a = max(r0, n_old)
        feats = np.ascontiguousarray(open_array(url, paths["features"])[a:r1], np.float32)
        out[a - r0:] = assign_lists(trained, feats)
    open_array(url, paths["knn/ivf_list"], "r+")[r0:r1] = out
    return r1 - r0


def ivf_search_task(url: str, paths: dict, q0: int, q1: int, g0: int, g1: int, n_old: int, k: int, margin: int,
                    nprobe: int, budget: int, trained: np.ndarray, kth: np.ndarray) -> dict:
    """New faces [q0, q1) against the grown run's rows [g0, g1) through the run's IVF lists: their top-k there
    (for the merge), and the (old face, new face, similarity) pairs where a new face enters an old list."""
    K.set_threads(worker_threads())
    group = ivf_group(url, g0, g1, trained, paths["knn/ivf_list"], budget, features=paths["features"])
    q = np.ascontiguousarray(open_array(url, paths["features"])[q0:q1], np.float32)
    q_ids = np.arange(q0, q1, dtype=np.int64)
    probes = K.ivf_probes(index_of(trained), q, nprobe)
    return {"new": K.knn_ivf_lists(group, q, q_ids, probes, k, margin),
            "entering": entering_lists(group, kth, q, q_ids, probes, n_old)}


def merge_old_task(url: str, paths: dict, r0: int, r1: int, k: int, pairs: tuple) -> np.ndarray:
    """Old rows [r0, r1) of the grown lists: the stored lists with the entering new faces ``pairs`` (old id,
    new id, similarity) merged in; returns which rows changed."""
    idx = open_array(url, "knn/index")[r0:r1]
    sim = open_array(url, "knn/sim")[r0:r1]
    old, new, s = pairs
    changed = np.zeros(r1 - r0, bool)
    if len(old):
        cand_sim, cand_idx = candidate_lists(np.asarray(old) - r0, new, s, r1 - r0)
        sim, idx, changed = merge_entering(idx, sim, cand_idx, cand_sim, k)
    open_array(url, paths["knn/index"], "r+")[r0:r1] = idx
    open_array(url, paths["knn/sim"], "r+")[r0:r1] = sim
    return changed


def stats_task(url: str, paths: dict) -> dict:
    """The grown run's similarity scale (as the edges stage reads it, from the same stride sample)."""
    from facecluster.tasks.edges import sample_rows, sim_stats  # imports torch: on the worker only, not in the CLI

    idx = open_array(url, paths["knn/index"])
    rows = sample_rows(idx.shape[0])
    return sim_stats(idx.get_orthogonal_selection((rows, slice(None))),
                     open_array(url, paths["knn/sim"]).get_orthogonal_selection((rows, slice(None)))).to_dict()


def edges_task(url: str, paths: dict, r0: int, r1: int, n_old: int, model_dir: str, digest: str, stats: dict,
               adaptation: dict | None = None) -> int:
    """``edges/prob`` rows [r0, r1) of the grown run: every edge of a new face's row, and every edge of an old
    row that leads to a new face, scored; an old row's other edges keep their stored probability (they keep
    their order in the merged list, so they are its first entries, in order)."""
    import torch  # here and below: on the worker only, so the CLI starts without torch

    from facecluster.tasks.edges import SNN_M, SimStats, adapted_prob, edge_inputs, gather_positions, predict_edges

    torch.set_num_threads(worker_threads())

    def score(x):  # the run's adapted P where its edges stage fitted one (the old edges carry it already)
        p = predict_edges(edge_scorer(model_dir, digest), x)
        return adapted_prob(x, adaptation, p) if adaptation else p

    zi, zs = open_array(url, paths["knn/index"]), open_array(url, paths["knn/sim"])
    idx, sim = zi[r0:r1], zs[r0:r1]
    m_snn = min(SNN_M, zi.shape[1])
    out = np.zeros(idx.shape, np.float32)
    o1 = min(r1, n_old)
    scored = 0
    if o1 > r0:  # old rows: carry the stored probabilities over, score the edges to new faces
        old = slice(0, o1 - r0)
        out[old], want = carried_over(idx[old], open_array(url, "edges/prob")[r0:o1], n_old)
        rows = np.flatnonzero(want.any(1))
        if len(rows):
            ridx = idx[old][rows]
            uniq = unique_sorted(ridx[want[rows]])
            # only new faces are gathered; the other entries point at an empty row and are not used
            pos = np.where(want[rows], np.searchsorted(uniq, np.where(want[rows], ridx, 0)), len(uniq))
            nbr_sim = np.concatenate([zs.get_orthogonal_selection((uniq, slice(None))),
                                      np.full((1, zs.shape[1]), np.nan, np.float32)])
            nbr_idx = np.concatenate([zi.get_orthogonal_selection((uniq, slice(0, m_snn))),
                                      np.full((1, m_snn), -1, np.int64)])
            x = edge_inputs(r0 + rows, ridx, sim[old][rows], pos, nbr_sim, nbr_idx, SimStats.from_dict(stats))
            p = score(x[want[rows]][:, None, :])[:, 0]
            sub = out[old][rows]
            sub[want[rows]] = p
            out[rows] = sub
            scored += int(want.sum())
    if r1 > n_old:  # new faces' rows: every edge
        a = max(r0, n_old) - r0
        nidx = idx[a:]
        uniq, pos = gather_positions(nidx)
        x = edge_inputs(np.arange(r0 + a, r1), nidx, sim[a:], pos, zs.get_orthogonal_selection((uniq, slice(None))),
                        zi.get_orthogonal_selection((uniq, slice(0, m_snn))), SimStats.from_dict(stats))
        out[a:] = score(x)
        scored += int((nidx >= 0).sum())
    open_array(url, paths["edges/prob"], "r+")[r0:r1] = out
    return scored


def anchor_task(url: str, paths: dict) -> dict:
    """The grown run's anchor threshold, read as the graph stage reads it (same stride sample of rows)."""
    z, idx = open_array(url, paths["knn/sim"]), open_array(url, paths["knn/index"])
    n = z.shape[0]
    rows = np.arange(0, n, max(1, -(-n // SAMPLE_ROWS)))
    sim = z.get_orthogonal_selection((rows, slice(None)))
    nb = idx.get_orthogonal_selection((rows, slice(None)))
    return {"anchor": auto_threshold(np.where(nb >= 0, sim, -np.inf)), "rows_sampled": int(len(rows)),
            "source": "auto (Otsu threshold of kNN similarities), re-read by an add"}


def closure_task(url: str, paths: dict, r0: int, r1: int, t_cos: float | None, t_prob: float | None) -> tuple:
    """The forest of rows [r0, r1)'s kNN edges at cosine >= ``t_cos`` and at P >= ``t_prob``: what ties faces
    into one re-clustering unit (the components of these edges are those of the whole edge set)."""
    idx = open_array(url, paths["knn/index"])[r0:r1]
    src, dst = [], []
    for weights, t in (("knn/sim", t_cos), ("edges/prob", t_prob)):
        if t is None:
            continue
        s, d, _ = chunk_forest(idx, open_array(url, paths[weights])[r0:r1], r0, t)
        src.append(s)
        dst.append(d)
    return (np.concatenate(src), np.concatenate(dst)) if src else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def sub_rows_task(url: str, paths: dict, sub_url: str, out: dict, rows: np.ndarray, s0: int, s1: int,
                  local_of: np.ndarray, k: int) -> int:
    """Sub-run rows [s0, s1) (global ids ``rows[s0:s1]``) of the arrays named in ``out`` (name -> path in the
    sub-run): features, input rows (the global ids), kNN lists renumbered (neighbours outside the sub-run
    dropped) and their edge probabilities (permuted as the lists)."""
    g = np.asarray(rows[s0:s1], np.int64)

    def put(name, values):
        open_array(sub_url, out[name], "r+")[s0:s1] = values

    if "features" in out:
        put("features", open_array(url, paths["features"]).get_orthogonal_selection((g, slice(None))))
        put("input_rows", g)
        return s1 - s0
    idx = open_array(url, paths["knn/index"]).get_orthogonal_selection((g, slice(None)))
    sim = open_array(url, paths["knn/sim"]).get_orthogonal_selection((g, slice(None)))
    prob = "edges/prob" in out
    p = open_array(url, paths["edges/prob"]).get_orthogonal_selection((g, slice(None))) if prob else None
    sidx, ssim, sp = sub_lists(idx, sim, local_of, k, p)
    if prob:
        put("edges/prob", sp)
    else:
        put("knn/index", sidx)
        put("knn/sim", ssim)
    return s1 - s0


# -- steps (driver) -------------------------------------------------------------------------------
def grow(store: RunStore, w: StageWriter, new: RunStore, client, input_offset: int) -> dict:
    """Create the grown ``features``, ``input_rows`` (and ``labels``) under ``_tmp/``; the paths written."""
    feats = store.array("features")
    n_old, d = feats.shape
    m = int(new.array("features").shape[0])
    n = n_old + m
    r = int(feats.chunks[0])
    token = uuid.uuid4().hex[:8]
    w.create_array("features", (n, d), (r, d), np.float32)
    w.create_array("input_rows", (n,), store.array("input_rows").chunks, np.int64)
    arrays = [("features", "features", 0), ("input_rows", "input_rows", input_offset)]
    if store.has("labels"):
        w.create_array("labels", (n,), store.array("labels").chunks, np.int64)
        arrays.append(("labels", "labels" if new.has("labels") else None, 0))
    futs = []
    for name, new_name, offset in arrays:
        step = int(store.root[w.tmp_path(name)].chunks[0])
        for a, b in row_chunks(n, step):
            if new_name is None and a >= n_old:  # the new faces have no labels: -1 (the fill value)
                continue
            futs.append(client.submit(copy_rows_task, store.url, w.tmp_path(name), name, new.url, new_name or name,
                                      a, min(b, n_old) if new_name is None else b, n_old, offset,
                                      key=f"add-copy-{name}-{a}-{token}"))
    wait_futures(futs, "add: copy")
    return {name: w.tmp_path(name) for name, _, _ in arrays}


def ivf_of(store: RunStore) -> dict | None:
    """The run's IVF search (mode, nprobe, margin) when its kNN stage stored its quantizer, else None."""
    rec = store.record("knn") or {}
    summary, params = rec.get("summary") or {}, rec.get("params") or {}
    if summary.get("mode") != "ivf":
        return None
    if not (store.has(QUANTIZER) and store.has("knn/ivf_list")):
        log.warning("add: this run's IVF quantizer is not stored (its kNN stage ran before runs stored it): the new "
                    "faces are searched exactly (slower; re-run `facecluster knn --force` to store it)")
        return None
    return {"nprobe": int(summary["nprobe"]), "margin": int(params.get("margin", 16)), "nlist": int(summary["nlist"])}


def knn(store: RunStore, w: StageWriter, client, paths: dict, n_old: int, fan_in: int, kc) -> dict:
    """The grown ``knn/index``/``knn/sim`` (and ``knn/ivf_list`` for an IVF run); returns {"changed": (N,) bool
    of rows whose list changed, "search": "exact" | "ivf", ...}."""
    index = store.array("knn/index")
    k = int(index.shape[1])
    r = int(index.chunks[0])
    n = int(store.root[paths["features"]].shape[0])
    w.create_array("knn/index", (n, k), (r, k), np.int64)
    w.create_array("knn/sim", (n, k), (r, k), np.float32, fill_value=-np.inf)
    paths.update({"knn/index": w.tmp_path("knn/index"), "knn/sim": w.tmp_path("knn/sim")})
    ivf = ivf_of(store)
    if ivf is not None:
        return _knn_ivf(store, w, client, paths, n_old, n, k, r, kc, ivf)
    token = uuid.uuid4().hex[:8]
    # database groups of whole chunks, about 2 per worker and at most 262,144 rows (256 MiB at d = 256)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    per = min(max(r, 262_144 // r * r), -(-n // (2 * n_workers * r)) * r)
    groups = [(a, min(a + per, n)) for a in range(0, n, per)]
    parts = [client.submit(knn_group_task, store.url, paths, g0, g1, n_old, k, key=f"add-knn-{g0}-{token}")
             for g0, g1 in groups]
    lists = [client.submit(lambda p: p["new"], f, key=f"add-knn-new-{i}-{token}") for i, f in enumerate(parts)]
    while len(lists) > 1:
        lists = [client.submit(merge_task, k, *lists[i:i + fan_in], key=f"add-knn-merge-{len(lists)}-{i}-{token}")
                 if len(lists[i:i + fan_in]) > 1 else lists[i] for i in range(0, len(lists), fan_in)]
    done = wait_futures(parts, "add: knn")
    wait_futures([client.submit(write_lists_task, store.url, paths, n_old, n, lists[0], key=f"add-knn-write-{token}")],
                 "add: knn")
    changed = np.ones(n, bool)
    for p in done:
        changed[p["g0"]:p["g0"] + len(p["changed"])] = p["changed"]
    return {"changed": changed, "k": k, "groups": len(groups), "old_rows_changed": int(changed[:n_old].sum()),
            "search": "exact"}


def _knn_ivf(store: RunStore, w: StageWriter, client, paths: dict, n_old: int, n: int, k: int, r: int, kc,
             ivf: dict) -> dict:
    """An IVF run's grown lists: new faces assigned to the run's lists and searched with its nprobe; every
    old list merged with the new faces that enter it (see :func:`entering_lists`)."""
    token = uuid.uuid4().hex[:8]
    d = int(store.root[paths["features"]].shape[1])
    lists = store.array("knn/ivf_list")
    w.create_array("knn/ivf_list", (n,), lists.chunks, np.int64)
    paths["knn/ivf_list"] = w.tmp_path("knn/ivf_list")
    trained, kth = client.scatter([np.asarray(store.array(QUANTIZER)[:], np.uint8),
                                   np.asarray(store.array("knn/sim")[:, -1], np.float32)], broadcast=True)
    wait_futures([client.submit(grow_lists_task, store.url, paths, a, b, n_old, trained,
                                key=f"add-ivf-lists-{a}-{token}") for a, b in row_chunks(n, int(lists.chunks[0]))],
                 "add: IVF lists")
    workers = list(client.scheduler_info().get("workers", {}).values())
    pl = plan(n, d, r, k, kc, workers, True, ivf["nprobe"], ivf["nlist"])
    groups = row_chunks(n, pl["db_rows"])
    m = n - n_old
    q_rows = max(1024, -(-m // (4 * max(1, pl["threads"]))))
    blocks = [(a, min(a + q_rows, n)) for a in range(n_old, n, q_rows)]
    # group-major order: a worker works through one database group at a time (its cache holds it)
    parts = [[client.submit(ivf_search_task, store.url, paths, q0, q1, g0, g1, n_old, k, ivf["margin"], ivf["nprobe"],
                            pl["budget"], trained, kth, key=f"add-ivf-search-{q0}-{g0}-{token}") for q0, q1 in blocks]
             for g0, g1 in groups]
    done = wait_futures([f for g in parts for f in g], "add: knn (IVF)")
    client.run(clear_cache, on_error="ignore")
    by_block = [[done[gi * len(blocks) + bi] for gi in range(len(groups))] for bi in range(len(blocks))]
    new_lists = [K.merge_topk_many([p["new"] for p in ps], k) for ps in by_block]
    old = np.concatenate([p["entering"][0] for p in done])
    new = np.concatenate([p["entering"][1] for p in done])
    sim = np.concatenate([p["entering"][2] for p in done])
    order = np.argsort(old, kind="stable")
    old, new, sim = old[order], new[order], sim[order]
    futs, starts = [], []
    for a, b in row_chunks(n_old, r):
        i0, i1 = np.searchsorted(old, [a, b])
        futs.append(client.submit(merge_old_task, store.url, paths, a, b, k, (old[i0:i1], new[i0:i1], sim[i0:i1]),
                                  key=f"add-ivf-merge-{a}-{token}"))
        starts.append(a)
    changed = np.ones(n, bool)
    for a, ch in zip(starts, wait_futures(futs, "add: knn (old lists)")):
        changed[a:a + len(ch)] = ch
    # the new rows last: the chunk holding both old and new rows is written by one task at a time
    new_sim = np.concatenate([x[0] for x in new_lists])
    new_idx = np.concatenate([x[1] for x in new_lists])
    wait_futures([client.submit(write_lists_task, store.url, paths, n_old, n, (new_sim, new_idx),
                                key=f"add-knn-write-{token}")], "add: knn")
    return {"changed": changed, "k": k, "groups": len(groups), "old_rows_changed": int(changed[:n_old].sum()),
            "search": "ivf", "nprobe": ivf["nprobe"], "entering_pairs": int(len(old))}


def edges(store: RunStore, w: StageWriter, client, paths: dict, n_old: int, model_dir: str, digest: str) -> dict:
    """The grown ``edges/prob``: the new faces' edges scored, the others carried over."""
    n, k = store.root[paths["knn/index"]].shape
    r = int(store.array("edges/prob").chunks[0])
    w.create_array("edges/prob", (n, k), (r, k), np.float32, fill_value=0.0)
    paths["edges/prob"] = w.tmp_path("edges/prob")
    token = uuid.uuid4().hex[:8]
    stats = client.submit(stats_task, store.url, paths, key=f"add-edges-scale-{token}").result()
    adaptation = run_adaptation(store)
    counts = wait_futures([client.submit(edges_task, store.url, paths, a, b, n_old, os.path.abspath(model_dir),
                                         digest, stats, adaptation, key=f"add-edges-{a}-{token}") for a, b in row_chunks(n, r)],
                          "add: edges")
    if store.has("edges/row_summary"):
        # the edges stage's per-row arrays follow the grown lists (every row: a list a new face entered has
        # another summary), so they never describe fewer or other rows than edges/prob
        for name in ("edges/row_summary", "edges/first_ids"):
            old = store.array(name)
            cols = old.attrs.get("columns")
            w.create_array(name, (n, old.shape[1]), (r, old.shape[1]), old.dtype, fill_value=old.fill_value,
                           attrs={"columns": cols} if cols else None)
            paths[name] = w.tmp_path(name)
        wait_futures([client.submit(summary_task, store.url, paths["edges/row_summary"], paths["edges/first_ids"], a, b,
                                    n, paths["knn/index"], paths["knn/sim"], key=f"add-edges-rows-{a}-{token}")
                      for a, b in row_chunks(n, r)], "add: edges (row summaries)")
    return {"edges_scored": int(sum(counts)), "scale": {"top1": stats["top1"], "last": stats["last"]}}


def affected(store: RunStore, client, paths: dict, n: int, old_labels: np.ndarray, seeds: np.ndarray,
             t_cos: float | None, t_prob: float | None) -> np.ndarray:
    """The faces to re-cluster: everything connected to a seed by an edge at cosine >= ``t_cos`` or
    P >= ``t_prob``, or by membership of one old cluster (bool mask over the grown run)."""
    r = int(store.root[paths["knn/index"]].chunks[0])
    token = uuid.uuid4().hex[:8]
    parts = wait_futures([client.submit(closure_task, store.url, paths, a, b, t_cos, t_prob, key=f"add-closure-{a}-{token}")
                          for a, b in row_chunks(n, r)], "add: closure")
    links = cluster_links(old_labels, 0, n)
    src = np.concatenate([p[0] for p in parts] + [links[0]])
    dst = np.concatenate([p[1] for p in parts] + [links[1]])
    n_nodes = n + (int(old_labels.max()) + 1 if len(old_labels) else 0)
    return affected_rows(n_nodes, src, dst, seeds)[:n]


def build_sub_run(store: RunStore, client, paths: dict, rows: np.ndarray, sub_url: str, prob: bool) -> RunStore:
    """A run store of the faces ``rows`` (ascending global ids) with their kNN lists among themselves and, with
    ``prob``, their edge probabilities: its stages "ingest", "knn" (and "edges") recorded as such, so every
    later stage runs on it unchanged."""
    n, d = store.root[paths["features"]].shape
    k = int(store.root[paths["knn/index"]].shape[1])
    r = int(store.root[paths["knn/index"]].chunks[0])
    s = len(rows)
    sub = RunStore.create(sub_url)
    local_of = np.full(n, -1, np.int64)
    local_of[rows] = np.arange(s)
    token = uuid.uuid4().hex[:8]
    rows_f, local_f = client.scatter([rows, local_of], broadcast=True)
    chain = [("ingest", {"features": ((s, d), np.float32, None), "input_rows": ((s,), np.int64, None)}, []),
             ("knn", {"knn/index": ((s, k), np.int64, None), "knn/sim": ((s, k), np.float32, -np.inf)}, ["ingest"])]
    if prob:
        chain.append(("edges", {"edges/prob": ((s, k), np.float32, 0.0)}, ["knn"]))
    for stage, arrays, inputs in chain:
        with sub.stage(stage, {"subset_of": store.url, "rows": int(s)}, inputs=inputs) as sw:
            for name, (shape, dtype, fill) in arrays.items():
                sw.create_array(name, shape, (r,) + tuple(shape[1:]), dtype, fill_value=fill)
            out = {name: sw.tmp_path(name) for name in arrays}
            wait_futures([client.submit(sub_rows_task, store.url, paths, sub.url, out, rows_f, a, b, local_f, k,
                                        key=f"add-sub-{stage}-{a}-{token}") for a, b in row_chunks(s, r)],
                         f"add: sub-run {stage}")
            sw.summary.update({"n": int(s), "subset_of": store.url})
    return sub
