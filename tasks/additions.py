"""Kernels of adding faces to a clustered run (no Dask): kNN lists updated by new faces, the rows the new
faces touch, a run's rows cut out as a smaller run, and cluster ids kept where members did not change.

Every function is a pure function of its arrays, so the add's result does not depend on how rows are
cut into chunks or tasks.
"""

from __future__ import annotations

import numpy as np

from .components import components
from .knn import merge_topk


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


def touched_rows(index: np.ndarray, row0: int, changed: np.ndarray) -> np.ndarray:
    """Rows (local to the block starting at ``row0``) whose edge inputs change: the row's own list changed,
    or it lists a face whose list changed (an edge's inputs read both ends' lists)."""
    index = np.asarray(index)
    own = changed[row0:row0 + len(index)]
    nb = np.where(index >= 0, index, 0)
    return own | (changed[nb] & (index >= 0)).any(1)


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
