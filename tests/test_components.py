"""Kernels of tasks.components against scipy connected components on the full edge list."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from hypothesis import given, settings, strategies as st
from scipy.sparse.csgraph import connected_components

from facecluster.tasks.components import (canonical_labels, components, chunk_forest, compress_ids, distinct_positions, knn_edges, merge_forests,
                                          node_positions, spanning_forest, super_vertices, threshold_components)
from facecluster.tasks import components as components_module


def scipy_cc(n, src, dst):
    g = sp.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    return canonical_labels(connected_components(g, directed=False)[1])


def random_knn(rng, n, k, ties=False):
    """Random kNN-like lists: (n, k) ids (with -1 padding and self ids) and sims."""
    idx = rng.integers(-1, n, size=(n, k))
    sim = rng.random((n, k)).astype(np.float32)
    if ties:
        sim = np.round(sim * 4) / 4  # many equal similarities
    return idx, sim.astype(np.float32)


def full_edges(idx, sim):
    n, k = idx.shape
    rows = np.repeat(np.arange(n), k)
    nb = idx.ravel()
    ok = (nb >= 0) & (nb != rows)
    return rows[ok], nb[ok], sim.ravel()[ok]


def forest_by_chunks(idx, sim, r, fan_in=2):
    forests = [chunk_forest(idx[a:a + r], sim[a:a + r], a) for a in range(0, len(idx), r)]
    while len(forests) > 1:
        forests = [merge_forests(*forests[i:i + fan_in]) for i in range(0, len(forests), fan_in)]
    return forests[0]


def algorithm1_oracle(n, src, dst, sim, th0, step, max_size):
    """Algorithm 1 as written: CC on the full thresholded edge list, one oversized component at a time."""
    labels = np.full(n, -1, np.int64)
    nxt = 0
    todo = [(np.arange(n), float(th0))]
    while todo:
        nodes, tau = todo.pop()
        inside = np.zeros(n, bool)
        inside[nodes] = True
        keep = inside[src] & inside[dst] & (sim >= np.float32(tau))
        loc = np.full(n, -1)
        loc[nodes] = np.arange(len(nodes))
        lab = scipy_cc(len(nodes), loc[src[keep]], loc[dst[keep]])
        nt = tau + (1.0 - tau) * step
        for c in range(lab.max() + 1):
            members = nodes[lab == c]
            if len(members) > max_size and nt != tau and nt <= 1.0:
                todo.append((members, nt))
            else:
                labels[members] = nxt
                nxt += 1
    return canonical_labels(labels)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 6), seed=st.integers(0, 10_000), r=st.integers(1, 25),
       fan_in=st.integers(2, 4), ties=st.booleans())
def test_forest_cuts_equal_scipy_cc(n, k, seed, r, fan_in, ties):
    rng = np.random.default_rng(seed)
    idx, sim = random_knn(rng, n, k, ties)
    src, dst, s = full_edges(idx, sim)
    f = forest_by_chunks(idx, sim, r, fan_in)
    assert len(f[0]) <= max(n - 1, 0)
    assert np.all(f[0] < f[1])
    # unique forest: independent of chunking and merge order
    g = forest_by_chunks(idx, sim, n, 2)
    for a, b in zip(f, g):
        np.testing.assert_array_equal(a, b)
    for tau in (0.0, 0.25, 0.5, 0.7, 0.9, 1.0):
        keep = s >= np.float32(tau)
        np.testing.assert_array_equal(threshold_components(n, *f, tau), scipy_cc(n, src[keep], dst[keep]))


def kruskal_oracle(src, dst, sim):
    """Plain Kruskal in the forest's order: each pair once with its largest weight, then (sim desc, src, dst)."""
    best = {}
    for a, b, w in zip(src.tolist(), dst.tolist(), np.asarray(sim, np.float32).tolist()):
        key = (min(a, b), max(a, b))
        if a != b and (key not in best or w > best[key]):
            best[key] = w
    parent = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    kept = []
    for (a, b), w in sorted(best.items(), key=lambda e: (-e[1], e[0])):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
            kept.append((a, b, w))
    return sorted(kept)


# float32 weights where an ordering by tie offsets could go wrong: signed zeros, subnormals, both sides of
# binade boundaries (1, 0.5, 2^-20), negatives, and repeats of each (ties)
TRICKY = np.array([0.0, -0.0, 1e-45, 3e-45, 1.0, np.nextafter(np.float32(1), np.float32(0)), 0.5,
                   np.nextafter(np.float32(0.5), np.float32(0)), np.nextafter(np.float32(0.5), np.float32(1)),
                   2.0 ** -20, np.nextafter(np.float32(2.0 ** -20), np.float32(0)), -0.5, -1.0, 0.25, 0.75], np.float32)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 40), m=st.integers(0, 150), seed=st.integers(0, 10_000), parts=st.integers(1, 4),
       limit=st.sampled_from([None, 2]))
def test_spanning_forest_equals_plain_kruskal_on_tricky_weights(n, m, seed, parts, limit):
    """The forest (whole, or merged from parts of the edge list) is plain Kruskal's in its documented order,
    by the tie offsets and, where too many edges for them (``limit``), by ranks."""
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
    sim = rng.choice(TRICKY, m)
    ok = src != dst
    src, dst, sim = src[ok], dst[ok], sim[ok]
    expected = kruskal_oracle(src, dst, sim)
    saved = components_module.TIE_BITS
    try:
        if limit is not None:
            components_module.TIE_BITS = limit  # 2 ** (limit - 1) = 2 edges: the rank path
        f = spanning_forest(src, dst, sim)
        cuts = np.array_split(np.arange(len(src)), parts)
        g = merge_forests(*(spanning_forest(src[c], dst[c], sim[c]) for c in cuts))
    finally:
        components_module.TIE_BITS = saved
    for forest in (f, g):
        got = sorted(zip(forest[0].tolist(), forest[1].tolist(), forest[2].tolist()))
        assert got == expected


def test_knn_edges_drops_self_padding_and_dedups():
    idx = np.array([[1, 0, -1], [0, 2, 1], [1, 0, -1]])
    sim = np.array([[0.9, 1.0, 0.0], [0.8, 0.5, 1.0], [0.5, 0.3, 0.0]], np.float32)
    s, d, w = knn_edges(idx, sim, 0)
    assert list(zip(s.tolist(), d.tolist())) == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(w, [0.9, 0.3, 0.5])  # pair (0,1) keeps its larger similarity
    s, d, w = knn_edges(idx, sim, 0, min_sim=0.4)
    assert list(zip(s.tolist(), d.tolist())) == [(0, 1), (1, 2)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(1, 5), seed=st.integers(0, 10_000), th0=st.floats(0.0, 0.8),
       step=st.sampled_from([0.05, 0.1, 0.3]), max_size=st.integers(1, 12), ties=st.booleans())
def test_super_vertices_equal_oracle_and_postconditions(n, k, seed, th0, step, max_size, ties):
    rng = np.random.default_rng(seed)
    idx, sim = random_knn(rng, n, k, ties)
    src, dst, s = full_edges(idx, sim)
    f = spanning_forest(src, dst, s)
    labels, tau = super_vertices(n, *f, th0, step, max_size)
    full_labels, full_tau = super_vertices(n, src, dst, s, th0, step, max_size)  # on the whole graph
    np.testing.assert_array_equal(labels, full_labels)
    np.testing.assert_array_equal(labels, algorithm1_oracle(n, src, dst, s, th0, step, max_size))
    sizes = np.bincount(labels)
    # every piece <= max_size unless it is held together by similarity-1 edges (cannot be split)
    for c in np.flatnonzero(sizes > max_size):
        m = labels == c
        inner = m[src] & m[dst]
        assert ties and components(n, src[inner & (s >= 1)], dst[inner & (s >= 1)])[m].max() == \
            components(n, src[inner & (s >= 1)], dst[inner & (s >= 1)])[m].min()
    # pieces are cut only along edges below the threshold at which they were split
    cut = labels[src] != labels[dst]
    split_at = np.maximum(tau[src], tau[dst])
    assert np.all(s[cut] < split_at[cut].astype(np.float32))
    # level-0 components are never merged: pieces nest inside components at th0
    base = threshold_components(n, *f, th0)
    for c in range(labels.max() + 1):
        assert len(np.unique(base[labels == c])) == 1


def test_super_vertices_duplicates_do_not_loop():
    # 5 identical faces (similarity 1) cannot be split below max_size 2: kept, no infinite loop
    src = np.array([0, 1, 2, 3]); dst = np.array([1, 2, 3, 4]); s = np.ones(4, np.float32)
    labels, tau = super_vertices(6, src, dst, s, 0.5, 0.5, 2)
    assert labels.tolist() == [0, 0, 0, 0, 0, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=0, max_size=60, unique=True), st.integers(0, 2**31 - 1))
def test_node_positions_by_table_or_search_match_the_set_oracle(ids, seed):
    """Positions of ids among ascending nodes (-1 where absent), by the span table (dense ids) and by the
    binary search (ids spread far apart) alike."""
    rng = np.random.default_rng(seed)
    nodes = np.array(sorted(ids), np.int64)
    queries = rng.integers(-3, 5005, 200)
    if len(nodes):
        queries = np.concatenate([queries, rng.choice(nodes, 50)])
    where = {int(v): i for i, v in enumerate(nodes)}
    oracle = [where.get(int(q), -1) for q in queries]
    assert node_positions(nodes, queries).tolist() == oracle
    spread = nodes * 10**6  # span far over 64 slots per node: the search
    assert node_positions(spread, queries * 10**6).tolist() == oracle


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(1, 10**6), st.integers(0, 2**31 - 1))
def test_compress_ids_by_table_or_sort_match_the_unique_oracle(m, span, seed):
    """The distinct ids of both ends, ascending, and each end's position: by the span table (ids dense over the
    edges) and by the sort (ids spread over a span far above the edges) alike."""
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, span, m) + 7, rng.integers(0, span, m) + 7
    nodes, ls, ld = compress_ids(src, dst)
    oracle = np.unique(np.concatenate([src, dst]))
    np.testing.assert_array_equal(nodes, oracle)
    assert ls.dtype == ld.dtype == np.int64
    uniq, pos = distinct_positions(src)
    np.testing.assert_array_equal(uniq, np.unique(src))
    np.testing.assert_array_equal(uniq[pos], src)
    np.testing.assert_array_equal(nodes[ls], src)
    np.testing.assert_array_equal(nodes[ld], dst)


def test_canonical_labels():
    assert canonical_labels(np.array([7, 3, 7, 1, 3])).tolist() == [0, 1, 0, 2, 1]
