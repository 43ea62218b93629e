"""Connected components as cuts of one maximum spanning forest (kernels, no Dask).

Why a forest: the components of ``{edges with s >= tau}`` are, for *every* tau,
the components of the maximum spanning forest (MSF) edges with ``s >= tau``
(single-linkage hierarchy). So the whole kNN graph (R x k edges per row chunk)
is reduced once to <= N - 1 edges, and every threshold of every proposal
setting, and every raised threshold of Algorithm 1's ladder, is a cheap cut.

Determinism: edges are totally ordered by ``(s descending, src ascending,
dst ascending)`` after de-duplicating each undirected pair (keeping its largest
similarity). With distinct weights the MSF is unique, so the forest computed by
any partition of the edges into chunks and any merge order is the same set of
edges: MSF(A u B) = MSF(MSF(A) u MSF(B)).

Threshold semantics: an edge is kept at threshold ``tau`` when
``sim >= np.float32(tau)`` (the comparison is done in float32, the dtype of the
stored similarities).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

log = logging.getLogger(__name__)

Forest = tuple[np.ndarray, np.ndarray, np.ndarray]  # src (int64), dst (int64), sim (float32); src < dst


def empty_forest() -> Forest:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def knn_edges(index: np.ndarray, sim: np.ndarray, row0: int, min_sim: float | None = None) -> Forest:
    """Undirected edges of one row chunk of kNN lists.

    Parameters
    ----------
    index, sim : (R, k) arrays
        Neighbour ids (``-1`` = padding) and similarities of rows ``row0 .. row0 + R - 1``.
    row0 : int
        Global id of the chunk's first row.
    min_sim : float, optional
        Drop edges with ``sim < min_sim``.

    Returns
    -------
    src, dst, sim : edges with ``src < dst`` (self-loops and padding dropped),
        each pair once with its largest similarity, sorted by (src, dst).
    """
    index = np.asarray(index)
    sim = np.asarray(sim, dtype=np.float32)
    r, k = index.shape
    rows = np.repeat(np.arange(row0, row0 + r, dtype=np.int64), k)
    nb = index.reshape(-1).astype(np.int64, copy=False)
    s = sim.reshape(-1)
    keep = (nb >= 0) & (nb != rows) & np.isfinite(s)
    if min_sim is not None:
        keep &= s >= np.float32(min_sim)
    rows, nb, s = rows[keep], nb[keep], s[keep]
    return dedup_edges(np.minimum(rows, nb), np.maximum(rows, nb), s)


def max_by_key(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys (ascending) and the largest of ``values`` at each: one argsort of the int64 keys and a
    ``maximum.reduceat`` over each key's run.

    The argsort is numpy's stable one, not for stability (a maximum needs none) but for speed: it merges
    ascending runs instead of sorting them, and forests being merged are a few sorted lists one after another
    (19M keys of 8 runs: 0.37 s against quicksort's 1.73 s; a chunk's kNN edges, ascending by row for half
    their ends, 0.11 s against 0.26 s; random keys the same either way)."""
    key, values = np.asarray(key, np.int64), np.asarray(values)
    if not len(key):
        return key, values[:0]
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    return key[starts], np.maximum.reduceat(values[order], starts)


def dedup_edges(src: np.ndarray, dst: np.ndarray, sim: np.ndarray) -> Forest:
    """Keep each (src, dst) pair once, with its largest similarity; sorted by (src, dst).

    Ids must be < 2**31 (both are packed into one int64 sort key: one argsort
    instead of a lexsort over three keys, 3-4x faster).
    """
    src = np.asarray(src, np.int64)
    dst = np.asarray(dst, np.int64)
    sim = np.asarray(sim, np.float32)
    if len(src) == 0:
        return empty_forest()
    key, smax = max_by_key((src << 32) | dst, sim)
    return key >> 32, key & 0xFFFFFFFF, smax


def node_positions(nodes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each of ``ids``' position in the ascending ``nodes`` (-1 where it is not there).

    A table over the ids' span where that span is at most ``64 * len(nodes)`` (4 bytes a slot: at most 256
    bytes per node, under the ~1 KB of kNN rows a task holds per node), else a binary search: on a task of
    481k nodes spread over 1M ids and its 10M edges the search took 2.7 s, the table 0.1 s.
    """
    nodes, ids = np.asarray(nodes, np.int64), np.asarray(ids, np.int64)
    if not len(nodes):
        return np.full(len(ids), -1, np.int64)
    lo, hi = int(nodes[0]), int(nodes[-1])
    if hi - lo + 1 <= 64 * len(nodes) and len(nodes) < 2**31:
        table = np.full(hi - lo + 1, -1, np.int32)
        table[nodes - lo] = np.arange(len(nodes), dtype=np.int32)
        within = (ids >= lo) & (ids <= hi)
        pos = np.full(len(ids), -1, np.int64)
        pos[within] = table[ids[within] - lo]
        return pos
    pos = np.searchsorted(nodes, ids)
    found = (pos < len(nodes)) & (nodes[np.minimum(pos, len(nodes) - 1)] == ids)
    return np.where(found, pos, -1)


def distinct_positions(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``ids`` (ascending) and each entry's position among them: ``np.unique`` with
    ``return_inverse``, by a table over the ids' span where that span is at most ``4 * len(ids)`` (an int32 slot
    each: at most 16 bytes per id, beside the ids' own 8), else by that sort (memory bounded by the ids, not by
    the largest id, at any N). On the 2.6M edge ends of a 16,384-row chunk of 1M faces' kNN (ids spread over
    the 1M) the sort and search took 0.34 s, the table 0.012 s; the edges stage's gather 0.15-0.21 s.
    """
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo + 1 <= 4 * len(ids) and hi - lo + 1 < 2**31:
        seen = np.zeros(hi - lo + 1, bool)
        seen[ids - lo] = True
        table = np.cumsum(seen, dtype=np.int32) - 1
        return np.flatnonzero(seen) + lo, table[ids - lo].astype(np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, inv.reshape(-1).astype(np.int64, copy=False)


def compress_ids(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ids of both ends of some edges, ascending, and each end's position among them."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    nodes, pos = distinct_positions(np.concatenate([src, dst]))
    return nodes, pos[:len(src)], pos[len(src):]


TIE_BITS = 28  #: bits below a float32 weight's last one that order its ties (see :func:`kruskal_weights`)


def kruskal_weights(sim: np.ndarray) -> np.ndarray | None:
    """Distinct float64 weights whose ascending order is the forest's edge order: ``sim`` descending, ties by
    position (the edges come sorted by (src, dst)); None where there are too many edges for that.

    Edge ``i`` (from 1) gets ``-sim + i * ulp(sim) * 2**-TIE_BITS``: the offset stays under half a float32
    step of its ``sim`` (i < 2**(TIE_BITS - 1)), so edges of different float32 weights keep their order, and
    the sum is exact in float64 (24 + TIE_BITS significant bits), so equal weights are ordered by ``i``. It
    is never 0, which the sparse matrix would take for no edge. Sorting ranks once for this order cost as
    much as the minimum spanning tree's own sort (3.4 s of a 19M-edge merge's 12.5 s).
    """
    sim = np.asarray(sim, np.float32)
    if len(sim) >= 2 ** (TIE_BITS - 1):
        return None
    step = np.spacing(np.abs(sim)).astype(np.float64) * 2.0 ** -TIE_BITS
    return np.arange(1, len(sim) + 1, dtype=np.float64) * step - sim.astype(np.float64)


def spanning_forest(src: np.ndarray, dst: np.ndarray, sim: np.ndarray, deduped: bool = False) -> Forest:
    """The unique maximum spanning forest of an edge list (order: sim desc, src asc, dst asc).

    Node ids are compressed to the nodes present, so memory is bounded by the
    number of edges, not by the largest id. Returns edges sorted by (src, dst).
    ``deduped=True``: the input is already ``dedup_edges`` output (skips that pass).
    """
    if not deduped:
        src, dst, sim = dedup_edges(np.minimum(src, dst), np.maximum(src, dst), sim)
    if len(src) == 0:
        return empty_forest()
    nodes, ls, ld = compress_ids(src, dst)
    weight = kruskal_weights(sim)
    if weight is None:
        # Distinct integer weights = rank in the total order, so the MSF is unique
        # (scipy's Kruskal breaks ties arbitrarily). Ranks are exact in float64.
        order = np.argsort(-sim, kind="stable")  # edges are in (src, dst) order: ties stay by (src, dst)
        weight = np.empty(len(src), np.float64)
        weight[order] = np.arange(1, len(src) + 1, dtype=np.float64)
    # the edges ascend by (ls, ld) (compression keeps the (src, dst) order): that is CSR order already, so the
    # matrix is built from its row counts, not by a COO conversion (its scattered writes)
    nn = len(nodes)
    indptr = np.zeros(nn + 1, np.int64)
    np.cumsum(np.bincount(ls, minlength=nn), out=indptr[1:])
    g = sp.csr_matrix((weight, ld, indptr), shape=(nn, nn))
    g.has_sorted_indices = True
    t = minimum_spanning_tree(g, overwrite=True).tocoo()
    # each (ls, ld) pair is one edge: a picked entry's place among them is its edge's
    width = np.int64(nn)
    picked = np.searchsorted(ls * width + ld, t.row.astype(np.int64) * width + t.col.astype(np.int64))
    if len(picked) > 1 and not (picked[1:] > picked[:-1]).all():
        picked.sort()  # keep the (src, dst) order (scipy's tree comes in row order: checked, not assumed)
    return src[picked], dst[picked], sim[picked]


def merge_forests(*forests: Forest) -> Forest:
    """MSF of the union of several forests (= MSF of the union of their graphs)."""
    forests = [f for f in forests if len(f[0])]
    if not forests:
        return empty_forest()
    if len(forests) == 1:
        return forests[0]
    return spanning_forest(np.concatenate([f[0] for f in forests]), np.concatenate([f[1] for f in forests]),
                           np.concatenate([f[2] for f in forests]))


def chunk_forest(index: np.ndarray, sim: np.ndarray, row0: int, min_sim: float | None = None) -> Forest:
    """MSF of one row chunk's kNN edges (memory bounded by the chunk)."""
    return spanning_forest(*knn_edges(index, sim, row0, min_sim), deduped=True)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..C-1 in order of each group's smallest member (a partition's unique form)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return np.zeros(0, np.int64)
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.reshape(-1)]


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components of an edge list over nodes 0..n-1, canonical labels (int64)."""
    if n == 0:
        return np.zeros(0, np.int64)
    src = np.asarray(src, np.int64)
    g = sp.csr_matrix((np.ones(len(src), np.int8), (src, np.asarray(dst, np.int64))), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    return canonical_labels(lab)


def threshold_components(n: int, src: np.ndarray, dst: np.ndarray, sim: np.ndarray, tau: float) -> np.ndarray:
    """Components of the edges with ``sim >= tau`` (float32 comparison); canonical labels."""
    keep = np.asarray(sim, np.float32) >= np.float32(tau)
    return components(n, np.asarray(src)[keep], np.asarray(dst)[keep])


def threshold_ladder(th0: float, step: float, max_steps: int = 100_000):
    """Yield th0, then tau <- tau + (1 - tau) * step while tau still changes (float64)."""
    tau = float(th0)
    yield tau
    for _ in range(max_steps):
        nxt = tau + (1.0 - tau) * step
        if nxt == tau or nxt > 1.0:
            return
        tau = nxt
        yield tau


def super_vertices(n: int, src: np.ndarray, dst: np.ndarray, sim: np.ndarray, th0: float, step: float,
                   max_size: int, sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1: components at ``th0``, oversized ones split again at a raised threshold.

    Every component with more than ``max_size`` members is split on its own
    edges at ``tau <- tau + (1 - tau) * step``, repeatedly, until every piece is
    small enough. All oversized components advance together: one connected
    components call per ladder step over the edges among still-oversized nodes.
    With a maximum spanning forest as input this equals running it on the full
    graph.

    Parameters
    ----------
    n : int
        Number of nodes (ids 0..n-1; nodes without edges become singletons).
    src, dst, sim : edges (any undirected edge list, typically the MSF).
    th0, step, max_size : Algorithm 1's parameters.
    sizes : (n,) int array, optional
        Weight of each node when counting a piece's size (default 1 each).

    Returns
    -------
    labels : (n,) int64, canonical (numbered by smallest member).
    tau : (n,) float64, the threshold at which each node's piece was final.
        Pieces that cannot be split further (edges with similarity >= every
        representable threshold below 1, e.g. duplicate faces) are kept and logged.
    """
    src = np.asarray(src, np.int64)
    dst = np.asarray(dst, np.int64)
    sim = np.asarray(sim, np.float32)
    w = np.ones(n, np.int64) if sizes is None else np.asarray(sizes, np.int64)
    node_tau = np.full(n, float(th0))
    ladder = threshold_ladder(th0, step)
    tau = next(ladder)
    keep = sim >= np.float32(tau)
    src, dst, sim = src[keep], dst[keep], sim[keep]
    labels = components(n, src, dst)
    size = np.bincount(labels, weights=w, minlength=labels.max() + 1 if n else 0)
    active = size[labels] > max_size
    next_label = int(labels.max()) + 1 if n else 0
    while active.any():
        # only edges inside still-oversized pieces matter from now on
        keep = active[src] & active[dst]
        src, dst, sim = src[keep], dst[keep], sim[keep]
        tau = next(ladder, None)
        if tau is None:
            log.warning("super_vertices: %d nodes in pieces > %d cannot be split below similarity 1 (duplicates?); kept",
                        int(active.sum()), max_size)
            break
        t32 = np.float32(tau)
        act = np.flatnonzero(active)
        node_tau[act] = tau
        if len(sim) and sim.min() >= t32:
            continue  # this step cuts no edge: nothing changes
        keep = sim >= t32
        src, dst, sim = src[keep], dst[keep], sim[keep]
        local = np.full(n, -1, np.int64)
        local[act] = np.arange(len(act))
        sub = components(len(act), local[src], local[dst])
        labels[act] = next_label + sub
        next_label += int(sub.max()) + 1
        sub_size = np.bincount(sub, weights=w[act])
        active[act[sub_size[sub] <= max_size]] = False
    return canonical_labels(labels), node_tau
