"""Kernels of adding faces to a clustered run (no Dask): kNN lists updated by new faces, the rows the new
faces touch, a run's rows cut out as a smaller run, and cluster ids kept where members did not change.

Every function is a pure function of its arrays, so the add's result does not depend on how rows are
cut into chunks or tasks.
"""

from __future__ import annotations

import numpy as np

from .components import components
from .knn import IvfLists, merge_topk, probe_groups


def _gemm_tolerance(norms: np.ndarray, max_norm: float, d: int) -> np.ndarray:
    """|float32 GEMM - exact| <= 2 d u |x| |y| (any summation order), plus a margin for the rounding of kth."""
    return (d * 2.0 ** -23 * np.asarray(norms, np.float64) * max_norm + 1e-6).astype(np.float32)


def _max_norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x, dtype=np.float64)))) if len(x) else 0.0


def _exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products summed in float64 and rounded once to float32: the value the kNN stage stores."""
    return np.einsum("pd,pd->p", a, b, dtype=np.float64).astype(np.float32)


def candidate_lists(r: np.ndarray, new_ids: np.ndarray, sim: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (row ``r``, new face ``new_ids``, exact ``sim``) as per-row candidate arrays.

    Returns cand_sim, cand_index : (n_rows, c) float32 / int64, each row's candidates ordered by id (padding
    -inf / -1), c >= 1.
    """
    r = np.asarray(r, np.int64)
    new_ids = np.asarray(new_ids, np.int64)
    counts = np.bincount(r, minlength=n_rows)
    width = max(1, int(counts.max()) if len(counts) else 1)
    order = np.lexsort((new_ids, r))
    r, c, sim = r[order], new_ids[order], np.asarray(sim, np.float32)[order]
    slot = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
    cand_sim = np.full((n_rows, width), -np.inf, np.float32)
    cand_idx = np.full((n_rows, width), -1, np.int64)
    cand_sim[r, slot] = sim
    cand_idx[r, slot] = c
    return cand_sim, cand_idx


def entering(rows: np.ndarray, kth: np.ndarray, new: np.ndarray, new_ids: np.ndarray,
             tile: tuple[int, int] = (2048, 8192)) -> tuple[np.ndarray, np.ndarray]:
    """For each old row, the new faces whose similarity beats the row's k-th listed similarity (exact search).

    One float32 GEMM of the rows against the new faces (tile by tile); every pair within the GEMM's
    error bound of the k-th is re-scored exactly (float64 sums rounded once to float32: the value the
    kNN stage stores for a pair), so no entering face is missed and the values are the exact ones. The
    cost is the GEMM, not a top-k search and re-scoring of k candidates per old row.

    Parameters
    ----------
    rows : (R, d) float32 old faces. kth : (R,) their k-th listed similarity (-inf for a padded list).
    new : (M, d) float32 new faces, ``new_ids`` their ids.

    Returns
    -------
    cand_sim, cand_index : (R, c) float32 / int64, each row's candidates (padding -inf / -1), c >= 1.
    """
    rows = np.ascontiguousarray(rows, np.float32)
    new = np.ascontiguousarray(new, np.float32)
    kth = np.asarray(kth, np.float32)
    d = rows.shape[1] if rows.ndim == 2 else 0
    norms_r = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64)) if len(rows) else np.zeros(0)
    tol = _gemm_tolerance(norms_r, _max_norm(new), d)
    pr, pc = [], []
    for a in range(0, len(rows), tile[0]):
        b = min(a + tile[0], len(rows))
        lim = kth[a:b] - tol[a:b]
        for c0 in range(0, len(new), tile[1]):
            c1 = min(c0 + tile[1], len(new))
            g = rows[a:b] @ new[c0:c1].T
            r, c = np.nonzero(g >= lim[:, None])
            pr.append(r + a)
            pc.append(c + c0)
    r = np.concatenate(pr) if pr else np.zeros(0, np.int64)
    c = np.concatenate(pc) if pc else np.zeros(0, np.int64)
    exact = _exact(rows[r], new[c])
    keep = exact > kth[r]  # a new id is larger than every old one: on a tie with the k-th it stays out
    return candidate_lists(r[keep], np.asarray(new_ids, np.int64)[c[keep]], exact[keep], len(rows))


def entering_lists(lists: IvfLists, kth: np.ndarray, new: np.ndarray, new_ids: np.ndarray, probes: np.ndarray,
                   n_old: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IVF counterpart of :func:`entering`: the old faces of one :class:`IvfLists` group whose kNN list a new
    face enters, where each new face is tried against the old faces of the lists it probes.

    That is the IVF search's own approximation seen from the new face's side (the run's search found an old
    face's neighbours in the lists *it* probes; here a new face meets the old faces of the lists the new face
    probes, which costs one IVF search of the new faces instead of re-assigning every old face). Within the
    probed lists nothing is missed: candidates within the float32 GEMM's error bound of a row's k-th are
    re-scored exactly, and only exact similarities above the k-th are returned.

    Parameters
    ----------
    lists : the group (rows with ids >= ``n_old`` are new faces and are skipped).
    kth : (n_old,) every old face's k-th listed similarity, by global id (-inf for a padded list).
    new : (M, d) float32 new faces, ``new_ids`` their ids, ``probes`` (M, nprobe) their probed lists (-1 pads).

    Returns
    -------
    old_ids, entering_ids, sim : the pairs (old face, new face entering its list, exact similarity).
    """
    new = np.ascontiguousarray(new, np.float32)
    new_ids = np.asarray(new_ids, np.int64)
    kth = np.asarray(kth, np.float32)
    probes = np.asarray(probes, np.int64)
    d = lists.rows.shape[1] if lists.rows.ndim == 2 else 0
    max_new = _max_norm(new)
    pos_all, q_all = [], []
    for lst, qs in probe_groups(probes):
        a, b = int(lists.offsets[lst]), int(lists.offsets[lst + 1])
        at = a + np.flatnonzero(lists.ids[a:b] < n_old)
        if len(at) == 0:
            continue
        rows = lists.rows[at] if len(at) < b - a else lists.rows[a:b]
        ids = lists.ids[at]
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        lim = kth[ids] - _gemm_tolerance(norms, max_new, d)
        r, c = np.nonzero(rows @ new[qs].T >= lim[:, None])
        pos_all.append(at[r])
        q_all.append(qs[c])
    pos = np.concatenate(pos_all) if pos_all else np.zeros(0, np.int64)
    qc = np.concatenate(q_all) if q_all else np.zeros(0, np.int64)
    exact = _exact(lists.rows[pos], new[qc])
    old = lists.ids[pos]
    keep = exact > kth[old]  # a new id is larger than every old one: on a tie with the k-th it stays out
    return old[keep], new_ids[qc[keep]], exact[keep]


def merge_entering(index: np.ndarray, sim: np.ndarray, cand_index: np.ndarray, cand_sim: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Old rows' kNN lists with the new faces that enter them.

    Parameters
    ----------
    index, sim : (R, k) the rows' stored lists (sorted by sim descending then id ascending; padding -1 / -inf).
    cand_index, cand_sim : (R, c) each row's best new faces (ids disjoint from ``index``), any order.
    k : columns kept.

    Returns
    -------
    sim, index : (R, k) the merged lists, in the stored order (a new face enters a list when it beats the
        row's k-th entry under that order, so the result is the list exact search over all faces gives).
    changed : (R,) bool, True where a row's list changed.
    """
    new_sim, new_index = merge_topk((sim, index), (cand_sim, cand_index), k)
    changed = (new_index != np.asarray(index)).any(1)
    return new_sim, new_index, changed


def carried_over(index: np.ndarray, old_prob: np.ndarray, n_old: int) -> tuple[np.ndarray, np.ndarray]:
    """Old rows' edge probabilities moved to their columns in the merged lists, and the entries to score.

    A merge keeps a row's old entries in their order, so they are the old list's first entries; the
    entries to score are those of new faces (ids >= ``n_old``).

    Returns
    -------
    prob : (R, k) float32, the old probabilities where the entry is old, 0 elsewhere.
    want : (R, k) bool, the entries that lead to a new face.
    """
    index = np.asarray(index)
    keep = (index >= 0) & (index < n_old)
    rank = np.cumsum(keep, axis=1) - 1
    rows = np.broadcast_to(np.arange(len(index))[:, None], index.shape)
    prob = np.zeros(index.shape, np.float32)
    prob[keep] = np.asarray(old_prob, np.float32)[rows[keep], rank[keep]]
    return prob, index >= n_old


def attach_new(index: np.ndarray, prob: np.ndarray, old_labels: np.ndarray, joinable: np.ndarray,
               level: float) -> np.ndarray:
    """The old cluster each new face joins: that of its most probable neighbour among the old faces in a
    ``joinable`` cluster, when that probability is at least ``level``; -1 where none is.

    Parameters
    ----------
    index, prob : (M, k) the new faces' kNN lists and their edge probabilities.
    old_labels : (n_old,) the stored cluster ids. joinable : (C,) bool per cluster id.
    """
    index = np.asarray(index)
    n_old = len(old_labels)
    ok = (index >= 0) & (index < n_old)
    lab = np.where(ok, old_labels[np.where(ok, index, 0)], -1)
    ok &= lab >= 0
    ok[ok] &= joinable[lab[ok]]
    p = np.where(ok, np.asarray(prob, np.float32), -1.0)
    best = p.argmax(1) if p.shape[1] else np.zeros(len(p), np.int64)
    rows = np.arange(len(p))
    return np.where(p[rows, best] >= np.float32(level), lab[rows, best], -1)


def affected_rows(n_nodes: int, src: np.ndarray, dst: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Boolean mask of the nodes connected to any of ``seeds`` through the edges (src, dst)."""
    lab = components(n_nodes, src, dst)
    hit = np.zeros(int(lab.max()) + 1 if len(lab) else 0, bool)
    hit[lab[np.asarray(seeds, np.int64)]] = True
    return hit[lab]


def cluster_links(labels: np.ndarray, row0: int, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges tying each face to a node standing for its cluster (node ``n_nodes + label``): the rows a
    re-clustering touches are closed under "same old cluster"."""
    labels = np.asarray(labels, np.int64)
    rows = np.arange(row0, row0 + len(labels), dtype=np.int64)
    ok = labels >= 0
    return rows[ok], n_nodes + labels[ok]


def sub_lists(index: np.ndarray, sim: np.ndarray, local_of: np.ndarray, k: int,
              prob: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """kNN lists of some rows renumbered to a sub-run (``local_of[global] = local id`` or -1); neighbours
    outside the sub-run become padding (-1, -inf), sorted last; ``prob`` (per edge) permuted alike.

    Returns (index, sim, prob) of shape (R, k).
    """
    index = np.asarray(index)
    loc = np.where(index >= 0, local_of[np.where(index >= 0, index, 0)], -1)
    s = np.where(loc >= 0, np.asarray(sim, np.float32), -np.inf).astype(np.float32)
    # the stored order (sim descending, then id ascending) with the dropped entries last
    order = np.lexsort((np.where(loc >= 0, loc, np.iinfo(np.int64).max), -s.astype(np.float64)), axis=-1)[:, :k]
    out_idx = np.take_along_axis(loc, order, 1)
    out_sim = np.take_along_axis(s, order, 1)
    out_p = None if prob is None else np.where(out_idx >= 0, np.take_along_axis(np.asarray(prob, np.float32), order, 1), 0.0)
    return out_idx, out_sim, out_p


def keep_ids(old: np.ndarray, rows: np.ndarray, sub_labels: np.ndarray, next_id: int) -> tuple[np.ndarray, int]:
    """Cluster ids of the re-clustered rows: an old id where its cluster's members are unchanged, else fresh ones.

    Parameters
    ----------
    old : (n_old,) the stored cluster id of every old face (ids >= 0).
    rows : (S,) global ids of the re-clustered faces, ascending (new faces have ids >= n_old); every old
        cluster is either wholly inside ``rows`` or wholly outside.
    sub_labels : (S,) their new clustering (any labels).
    next_id : the first unused id.

    Returns
    -------
    ids : (S,) the cluster id of each row. next_id : the first id still unused.
    Fresh ids are given in order of each new cluster's smallest face, so the ids are deterministic.
    """
    old = np.asarray(old, np.int64)
    rows = np.asarray(rows, np.int64)
    n_old = len(old)
    _, first, inv = np.unique(sub_labels, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    n_sub = len(first)
    sizes = np.bincount(inv, minlength=n_sub)
    is_old = rows < n_old
    old_of = np.where(is_old, old[np.where(is_old, rows, 0)], -1)
    old_sizes = np.bincount(old, minlength=int(old.max()) + 1 if n_old else 0)
    # a sub-cluster keeps an old id when all its faces are old, share one old id, and that old cluster has
    # no other member
    lo = np.full(n_sub, np.iinfo(np.int64).max)
    hi = np.full(n_sub, -2, np.int64)
    np.minimum.at(lo, inv, np.where(old_of >= 0, old_of, -1))
    np.maximum.at(hi, inv, old_of)
    keep = (lo == hi) & (lo >= 0)
    keep[keep] &= old_sizes[lo[keep]] == sizes[keep]
    cid = np.where(keep, lo, -1)
    order = np.argsort(first, kind="stable")
    fresh = order[~keep[order]]
    cid[fresh] = next_id + np.arange(len(fresh))
    return cid[inv], int(next_id + len(fresh))
