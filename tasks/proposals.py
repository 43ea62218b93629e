"""Multi-scale cluster proposals (Algorithm 2) and their CSR form (kernels, no Dask).

Level 0 of a setting is its super-vertex partition (Algorithm 1 on the maximum
spanning forest). Level i+1 treats every level-i group as one node with the
L2-normalised mean feature of its faces, links each node to its ``sv_k``
nearest nodes, and runs Algorithm 1 again with the size counted in nodes;
groups of >= 2 nodes become proposals (expanded to faces). Level features are
computed from per-group feature *sums* (float64), which add up across levels
and across feature chunks in any order to the same float32 means.
"""

from __future__ import annotations

import numpy as np

from .arrays import descending_key, unique_sorted
from .components import knn_edges, spanning_forest, super_vertices


# -- CSR ------------------------------------------------------------------------------
def to_csr(groups) -> tuple[np.ndarray, np.ndarray]:
    """List of member arrays -> (offsets (P+1 int64), members (M int64))."""
    groups = [np.asarray(g, np.int64).ravel() for g in groups]
    offsets = np.zeros(len(groups) + 1, np.int64)
    if groups:
        np.cumsum([len(g) for g in groups], out=offsets[1:])
    members = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    return offsets, members.astype(np.int64, copy=False)


def from_csr(offsets: np.ndarray, members: np.ndarray) -> list[np.ndarray]:
    """(offsets, members) -> list of member arrays (views into ``members``)."""
    offsets = np.asarray(offsets, np.int64)
    return [members[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def groups_of(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Members of every label 0..C-1 as CSR, members ascending within each group."""
    labels = np.asarray(labels, np.int64)
    order = np.argsort(labels, kind="stable")  # stable: members stay ascending
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, order.astype(np.int64)


# -- level features ---------------------------------------------------------------------
def add_group_sums(sums: np.ndarray, features: np.ndarray, labels: np.ndarray) -> None:
    """Add one chunk's feature rows to their groups' float64 sums, in place (``sums``: ``n_groups x d``).

    Only the groups present in the chunk are touched: a dense ``n_groups x d`` product per chunk was a
    second 1 GB array beside the sums at 1M faces (a cut task's peak) and 1 GB of memory traffic per
    16k-row chunk. A group's chunk members are added in row order, as the dense product added them.
    """
    present, local = np.unique(np.asarray(labels, np.int64), return_inverse=True)
    sums[present] += _indicator(local, len(present)) @ np.asarray(features, np.float64)


def aggregate_sums(sums: np.ndarray, group_of: np.ndarray, n_groups: int) -> np.ndarray:
    """Sums of the next level: add node sums per node group."""
    return _indicator(group_of, n_groups) @ sums


def _indicator(labels: np.ndarray, n_groups: int):
    """Sparse (n_groups x n) 0/1 matrix: row g marks the members of group g (sums by a matmul)."""
    import scipy.sparse as sp

    labels = np.asarray(labels, np.int64)
    return sp.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n_groups, len(labels)))


UNIT_MEANS_ROWS = 1 << 14  # rows per step of unit_means


def unit_means(sums: np.ndarray) -> np.ndarray:
    """L2-normalised means (the direction of the sum) as float32.

    Made ``UNIT_MEANS_ROWS`` rows at a time (the same values): the whole quotient in float64 was a second array
    as large as ``sums`` (1 GB beside the sums' 1 GB in the proposals cut of 502k super-vertices at 1M faces)."""
    out = np.empty(sums.shape, np.float32)
    for a in range(0, len(sums), UNIT_MEANS_ROWS):
        part = sums[a:a + UNIT_MEANS_ROWS]
        norm = np.linalg.norm(part, axis=1, keepdims=True)
        norm[norm == 0] = 1.0
        out[a:a + UNIT_MEANS_ROWS] = part / norm
    return out


QUERY_BLOCK = 32768  # level-graph queries per list-major search call (and per proposals kNN task)
EXACT_MAX = 50_000  # level graphs up to this many nodes: exact kNN


def small_knn(x: np.ndarray, k: int, threads: int = 1, exact_max: int = EXACT_MAX, seed: int = 1234):
    """kNN among ``x`` rows (self excluded): (index int64, sim float32), rows sorted (sim desc, id asc).

    Exact (faiss IndexFlatIP) up to ``exact_max`` rows; above, IVF (nlist ~ 4 sqrt(n),
    nprobe 16, seeded training) searched list-major (:class:`facecluster.tasks.knn.IvfLists`):
    level-i+1 graphs need only a few neighbours, and IVF with that nprobe finds nearly
    all of the close ones. Profiled at 1M faces (408k level-1 nodes), faiss's own
    IVF scan was 65% of a proposal setting's 152 s. Missing neighbours: id -1, sim 0.
    """
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))
    x = np.ascontiguousarray(x, np.float32)
    n, d = x.shape
    if n > exact_max:
        plan = ivf_plan(x, threads, seed)
        blocks = [(a, min(a + QUERY_BLOCK, n)) for a in range(0, n, QUERY_BLOCK)]
        return join_blocks([ivf_block(plan, a, b, k, threads) for a, b in blocks])
    kk = min(k + 1, n)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    sim, idx = index.search(x, kk)
    rows = np.arange(n)[:, None]
    sim = np.where((idx == rows) | (idx < 0), -np.inf, sim)
    # ties by id, self and padding last
    order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -sim), axis=1)
    idx = np.take_along_axis(idx, order, 1)[:, :k]
    sim = np.take_along_axis(sim, order, 1)[:, :k]
    idx = np.where(np.isfinite(sim), idx, -1).astype(np.int64)
    sim = np.where(np.isfinite(sim), sim, 0).astype(np.float32)
    return idx, sim


PLAN_SLICE = 1 << 16  #: rows per slice of a plan's probes and lists


def ivf_plan(x: np.ndarray, threads: int = 1, seed: int = 1234) -> dict:
    """The IVF side of :func:`small_knn` above ``exact_max`` rows, before any query: seeded
    training (nlist ~ 4 sqrt(n)), each row's 16 probes, the rows grouped by list.

    Returns ``{"lists", "probes", "where", "n"}`` (``where``: each row's position in
    ``lists.rows``, so a query block needs nothing else).
    """
    from .knn import IvfLists, ivf_assign, load_ivf, set_threads, train_ivf

    set_threads(threads)
    to_rows = (lambda v: np.ascontiguousarray(v, np.float32))
    n = len(x)
    nlist = int(4 * np.sqrt(n))
    rng = np.random.default_rng(seed)
    sample = to_rows(x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))])
    index = load_ivf(train_ivf(sample, nlist, seed))
    del sample
    slices = [(a, min(a + PLAN_SLICE, n)) for a in range(0, n, PLAN_SLICE)]
    # ranked by (similarity, list id): column 0 = the row's own list; chunking-independent (ivf_assign)
    probes = np.concatenate([ivf_assign(index, to_rows(x[a:b]), 16) for a, b in slices])
    lists = IvfLists((to_rows(x[a:b]) for a, b in slices), np.arange(n, dtype=np.int64), probes[:, 0], nlist)
    where = np.empty(n, np.int64)
    where[lists.ids] = np.arange(n, dtype=np.int64)
    return {"lists": lists, "probes": probes, "where": where, "n": n}


def ivf_block(plan: dict, a: int, b: int, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Raw top-``k`` (sim, idx) of rows ``[a, b)`` of a :func:`ivf_plan`.

    The results do not depend on the blocking (tested).
    """
    import faiss

    from .knn import knn_ivf_lists, set_threads

    faiss.omp_set_num_threads(max(1, int(threads)))
    set_threads(threads)
    lists = plan["lists"]
    return knn_ivf_lists(lists, lists.rows[plan["where"][a:b]], np.arange(a, b, dtype=np.int64), plan["probes"][a:b], k)


def join_blocks(parts) -> tuple[np.ndarray, np.ndarray]:
    """(index int64, sim float32) of all rows from the :func:`ivf_block` results in row order; missing: -1, 0."""
    sim = np.concatenate([p[0] for p in parts])
    idx = np.concatenate([p[1] for p in parts])
    ok = np.isfinite(sim)
    return np.where(ok, idx, -1).astype(np.int64), np.where(ok, sim, 0).astype(np.float32)


GRAPH_NEIGHBOURS = 20  #: each face's first kNN neighbours that propose its super-vertex's level-1 candidates
PAIR_BATCH = 1 << 18  #: candidate pairs per batch of exact similarities
SELECT_PAIRS = 1 << 22  #: about this many pairs per block of nodes whose top k are selected together


def graph_candidate_keys(row_labels: np.ndarray, neighbours: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Level-1 candidate pairs from one chunk of the face kNN lists: for every face and each neighbour it lists,
    the pair {its super-vertex, the neighbour's} when they differ, as sorted unique keys ``lo * n_groups + hi``
    (``lo < hi``).

    ``row_labels``: the chunk's faces' super-vertices; ``neighbours``: their kNN ids (``-1`` padding);
    ``labels``: every face's super-vertex. The union over chunks does not depend on the chunking.
    """
    nb = np.asarray(neighbours, np.int64)
    ok = nb >= 0
    lb = np.asarray(labels, np.int64)[np.where(ok, nb, 0)]
    la = np.broadcast_to(np.asarray(row_labels, np.int64)[:, None], lb.shape)
    ok &= la != lb
    a, b = la[ok], lb[ok]
    return unique_sorted(np.minimum(a, b) * np.int64(n_groups) + np.maximum(a, b))


def candidate_knn(keys: np.ndarray, means: np.ndarray, k: int, select_pairs: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The top-``k`` of each node among its candidates (sorted unique pair keys ``lo * n + hi`` of
    :func:`graph_candidate_keys`, ``n = len(means)``; each pair is a candidate of both its nodes) by the exact
    float32 similarity of their unit mean features: (index int64, sim float32) as :func:`small_knn` returns
    them (rows sorted by sim desc, id asc; a node with fewer candidates padded with -1, 0).

    Why candidates from the face graph: two super-vertices whose faces list each other are the ones a
    level-1 edge can join. Measured at 1M built-in faces (502k super-vertices, sv_k 3, 4,000 sampled
    nodes against exact search): the IVF search used before found 0.49 of the exact top-3, these
    candidates (each face's first 20 neighbours, both directions) 0.87 (0.92 after :func:`refine_knn`);
    their cost grows linearly with the faces where the IVF's grew as N^1.5.
    """
    select_pairs = SELECT_PAIRS if select_pairs is None else select_pairs
    n = len(means)
    keys = np.asarray(keys, np.int64)
    ids = np.int32 if n < 2 ** 31 else np.int64  # node ids in 4 B where they fit: the pairs are most of the memory
    lo = (keys // n).astype(ids)
    hi = (keys - lo.astype(np.int64) * n).astype(ids)
    del keys
    sim = np.empty(len(lo), np.float32)
    for s in range(0, len(lo), PAIR_BATCH):  # each pair's similarity once, for both its nodes
        e = s + PAIR_BATCH
        sim[s:e] = np.einsum("ij,ij->i", means[lo[s:e]], means[hi[s:e]])
    by_hi = np.argsort(hi, kind="stable").astype(ids)  # within a node's pairs as hi, lo ascending (keys are sorted)
    hi_sorted = hi[by_hi]
    idx = np.full((n, k), -1, np.int64)
    out = np.zeros((n, k), np.float32)
    # Nodes in blocks of about ``select_pairs`` pairs: a node's top k needs only its own pairs, and ranking all
    # 2P (node, pair) entries at once took ~150 B per pair (1 GB at 1M faces, ~10 GB for a 10M-face cut).
    block = max(1, int(n * int(select_pairs) // max(2 * len(lo), 1)))
    for u0 in range(0, n, block):
        u1 = min(u0 + block, n)
        s0, s1 = np.searchsorted(lo, [u0, u1])
        t = by_hi[slice(*np.searchsorted(hi_sorted, [u0, u1]))]
        # each node's pairs in ascending order of the other end: first those where it is hi (the other end below it,
        # ascending: by_hi is stable over keys sorted by lo), then those where it is lo (above it, ascending)
        a = np.concatenate([hi[t], lo[s0:s1]]).astype(np.int64)
        b = np.concatenate([lo[t], hi[s0:s1]]).astype(np.int64)
        v = np.concatenate([sim[t], sim[s0:s1]])
        # within a node: similarity desc, then id asc: one stable sort of (node, sim) keys, since equal keys keep
        # that id order. (0.7.12 sorted by id first, a second argsort: 4.7 -> 3.1-3.3 s per call on a 1M-face cut's
        # 3.9M pairs, the same arrays.)
        order = np.argsort(((a - u0).astype(np.uint64) << np.uint64(32)) | descending_key(v), kind="stable")
        a, b, v = a[order], b[order], v[order]
        pos = np.arange(len(a)) - np.searchsorted(a, np.arange(u0, u1))[a - u0]
        keep = pos < k
        idx[a[keep], pos[keep]] = b[keep]
        out[a[keep], pos[keep]] = v[keep]
    return idx, out


def refine_knn(idx: np.ndarray, means: np.ndarray, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One round of neighbours' neighbours (the join step of NN-descent, forward lists only): every node's
    candidates become its current neighbours and theirs, re-ranked by :func:`candidate_knn` (the same k).

    At most k + k^2 candidates per node whatever the graph's in-degrees (a node that is the nearest of many
    adds nothing to their lists' length). Measured at 1M built-in faces (502k super-vertices, k = 3): the
    face graph's candidates found 0.870 of the exact top-3, one round 0.924, for 3.4M more similarities.
    """
    n, k = idx.shape
    a = np.repeat(np.arange(n, dtype=np.int64), k)
    b = idx.ravel()
    ok = b >= 0
    a, b = a[ok], b[ok]
    deg = np.bincount(a, minlength=n)
    start = np.concatenate([[0], np.cumsum(deg)])
    reach = deg[b]  # for each edge (x, y): y's own neighbours become x's candidates
    x = np.repeat(a, reach)
    pos = np.repeat(start[b], reach) + (np.arange(int(reach.sum())) - np.repeat(np.cumsum(reach) - reach, reach))
    z = b[pos]
    far = x != z
    x, z = x[far], z[far]
    keys = unique_sorted(np.concatenate([np.minimum(x, z) * np.int64(n) + np.maximum(x, z),
                                         np.minimum(a, b) * np.int64(n) + np.maximum(a, b)]))
    if stats is not None:
        stats["pairs"] = stats.get("pairs", 0) + len(keys)
    return candidate_knn(keys, means, k)


def face_graph_knn(labels: np.ndarray, means: np.ndarray, k: int, neighbour_chunks,
                   stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The level-1 kNN of the super-vertices ``labels`` (one per face; ``means``: their :func:`unit_means`) among
    the candidates their faces' kNN lists propose, then one :func:`refine_knn` round: ``neighbour_chunks`` yields
    ``(row0, rows)``, consecutive chunks of every face's first kNN neighbours. Returns (index, sim) as
    :func:`candidate_knn`. ``stats``: ``"pairs"`` gets the similarities computed (both passes).

    It takes the unit means, not the float64 sums, so that a caller can let the sums go first (half the bytes)."""
    n_groups = len(means)
    parts = [graph_candidate_keys(labels[r0:r0 + len(rows)], rows, labels, n_groups) for r0, rows in neighbour_chunks]
    keys = unique_sorted(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    if stats is not None:
        stats["pairs"] = stats.get("pairs", 0) + len(keys)
    idx, _ = candidate_knn(keys, means, min(int(k), n_groups - 1))
    return refine_knn(idx, means, stats)


def level_knn(sums: np.ndarray, k: int, threads: int = 1):
    """The kNN graph among level-i nodes (their unit mean features): input of :func:`higher_level`."""
    return small_knn(unit_means(sums), min(k, len(sums) - 1), threads)


def higher_level(sums: np.ndarray, k: int, th: float, step: float, max_nodes: int, threads: int = 1, knn=None):
    """One step of Algorithm 2: group level-i nodes (given their feature sums).

    ``knn``: the nodes' (index, sim) from :func:`level_knn` when already computed
    (settings that share a level-0 cut share it). Returns (group of each node
    (canonical labels), n_groups).
    """
    n = len(sums)
    if n < 2:
        return np.zeros(n, np.int64), n
    idx, sim = level_knn(sums, k, threads) if knn is None else knn
    forest = spanning_forest(*knn_edges(idx, sim, 0, th))
    labels, _ = super_vertices(n, *forest, th, step, max_nodes)
    return labels, int(labels.max()) + 1


def select_proposals(labels: np.ndarray, min_size: int, max_size: int, node_counts: np.ndarray | None = None,
                     min_nodes: int = 1) -> list[np.ndarray]:
    """Groups of a face labelling kept as proposals, ordered by (smallest member, size).

    ``node_counts``: number of lower-level nodes in each group (kept when >= ``min_nodes``).
    """
    offsets, members = groups_of(labels)
    sizes = np.diff(offsets)
    keep = (sizes >= min_size) & (sizes <= max_size)
    if node_counts is not None:
        keep &= np.asarray(node_counts) >= min_nodes
    # canonical labels are numbered by smallest member, so label order = (min member) order
    return [members[offsets[g]:offsets[g + 1]] for g in np.flatnonzero(keep)]


def dedup_proposals(groups) -> tuple[list[np.ndarray], np.ndarray]:
    """Drop repeated member sets, keeping the first occurrence; returns (kept, kept positions)."""
    seen = set()
    kept, pos = [], []
    for i, g in enumerate(groups):
        key = np.asarray(g, np.int64).tobytes()
        if key in seen:
            continue
        seen.add(key)
        kept.append(g)
        pos.append(i)
    return kept, np.asarray(pos, np.int64)
