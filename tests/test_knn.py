"""kNN: kernels against a numpy oracle, merge properties, the stage on a real LocalCluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facecluster.tasks import knn as K


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n, d, seed=0, centres=40, spread=0.35):
    """Small clustered unit vectors with exact duplicates (ties) mixed in."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, d)))
    x = unit(c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d) * 3)
    dup = rng.choice(n, size=n // 10, replace=False)
    x[dup] = x[dup[0]]  # one large group of identical rows: many exact ties
    return x


def chunked_knn(x, k, q_step, db_step, margin=16):
    n = len(x)
    ids = np.arange(n)
    out_s, out_i = [], []
    for a in range(0, n, q_step):
        parts = [K.knn_block(x[a:a + q_step], ids[a:a + q_step], x[b:b + db_step], ids[b:b + db_step], k, margin)
                 for b in range(0, n, db_step)]
        s, i = K.merge_topk_many(parts, k)
        out_s.append(s)
        out_i.append(i)
    return np.concatenate(out_s), np.concatenate(out_i)


def numpy_oracle(x, k):
    """argsort oracle, independent of tasks.knn: float64 sims, order (sim desc, id asc), self excluded."""
    n = len(x)
    s = (x.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    idx_out = np.full((n, k), -1, np.int64)
    sim_out = np.full((n, k), -np.inf, np.float32)
    for i in range(n):
        cand = np.array([j for j in range(n) if j != i])
        order = sorted(cand.tolist(), key=lambda j: (-s[i, j], j))[:k]
        idx_out[i, :len(order)] = order
        sim_out[i, :len(order)] = s[i, order]
    return sim_out, idx_out


# -- kernels -------------------------------------------------------------------------------
def test_knn_block_equals_numpy_oracle_with_ties_and_duplicates():
    x = clustered(400, 24, seed=3)
    ss, si = numpy_oracle(x, 30)
    for q_step, db_step in [(400, 400), (97, 61), (50, 400), (400, 7)]:
        s, i = chunked_knn(x, 30, q_step, db_step, margin=2)
        np.testing.assert_array_equal(i, si, err_msg=f"q_step={q_step} db_step={db_step}")
        np.testing.assert_array_equal(s, ss)


def test_knn_block_pads_and_excludes_self():
    x = unit(np.random.default_rng(0).standard_normal((5, 8)))
    ids = np.arange(5)
    s, i = K.knn_block(x[:2], ids[:2], x[:3], ids[:3], k=4)
    # query 0 sees rows 1, 2 (self removed) then padding
    assert set(i[0, :2]) == {1, 2} and (i[0, 2:] == -1).all() and np.isneginf(s[0, 2:]).all()
    assert 0 not in i[0] and 1 not in i[1]


def test_certification_handles_more_ties_than_margin():
    # 60 identical rows tie at the boundary; margin 0 must still give the id-ascending choice
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((300, 16)))
    x[100:160] = x[5]
    ss, si = numpy_oracle(x, 10)
    s, i = chunked_knn(x, 10, 300, 300, margin=0)
    np.testing.assert_array_equal(i, si)
    np.testing.assert_array_equal(s, ss)


def topk_lists(n_rows=3, max_len=12):
    ent = st.tuples(st.integers(-3, 3).map(lambda v: v / 4.0), st.integers(0, 40))

    def build(rows):
        k = max(len(r) for r in rows) if rows else 0
        s = np.full((len(rows), k), -np.inf, np.float32)
        i = np.full((len(rows), k), -1, np.int64)
        for r, row in enumerate(rows):
            for c, (v, j) in enumerate(row):
                s[r, c], i[r, c] = v, j
        return s, i

    return st.lists(st.lists(ent, min_size=1, max_size=max_len), min_size=n_rows, max_size=n_rows).map(build)


@settings(max_examples=150, deadline=None)
@given(topk_lists(), topk_lists(), topk_lists(), st.integers(1, 15))
def test_merge_topk_associative_commutative_and_equals_topk_of_concatenation(a, b, c, k):
    ab_c = K.merge_topk(K.merge_topk(a, b, k), c, k)
    a_bc = K.merge_topk(a, K.merge_topk(b, c, k), k)
    ba = K.merge_topk(b, a, k)
    ab = K.merge_topk(a, b, k)
    for x, y in [(ab_c, a_bc), (ab, ba), (ab_c, K.merge_topk_many([c, b, a], k))]:
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    # oracle: python sort of the concatenation by (sim desc, id asc), padded
    for r in range(3):
        ent = sorted(zip(np.concatenate([a[0][r], b[0][r], c[0][r]]).tolist(),
                         np.concatenate([a[1][r], b[1][r], c[1][r]]).tolist()), key=lambda e: (-e[0], e[1]))[:k]
        ent += [(-np.inf, -1)] * (k - len(ent))
        np.testing.assert_array_equal(ab_c[0][r], np.array([e[0] for e in ent], np.float32))
        np.testing.assert_array_equal(ab_c[1][r], np.array([e[1] for e in ent], np.int64))


# -- the bfloat16 kernel ------------------------------------------------------------------------------
def adversarial_rows(n, d, seed, kind):
    """Rows that stress the bfloat16 bound and the int16 selection: clustered with ties, all equal,
    near-duplicates (differences below bfloat16's resolution), mixed norms (unnormalised), or
    anti-correlated halves (negative k-th similarities: the float32 fallback)."""
    rng = np.random.default_rng(seed)
    if kind == "clustered":
        return clustered(n, d, seed=seed, centres=max(1, n // 20)) if n >= 10 else unit(rng.standard_normal((n, d)))
    if kind == "equal":
        return np.repeat(unit(rng.standard_normal((1, d))), n, axis=0)
    if kind == "near_dup":
        base = unit(rng.standard_normal((max(1, n // 8), d)))
        x = base[rng.integers(0, len(base), n)]
        return (x + rng.standard_normal((n, d)).astype(np.float32) * 1e-4).astype(np.float32)
    if kind == "norms":
        return (unit(rng.standard_normal((n, d))) * np.exp(rng.uniform(-4, 4, (n, 1)))).astype(np.float32)
    # "negative": two opposite directions plus noise, so most similarities are near -1
    v = unit(rng.standard_normal((1, d)))
    sign = np.where(rng.random((n, 1)) < 0.5, 1.0, -1.0).astype(np.float32)
    return unit(v * sign + 0.05 * rng.standard_normal((n, d)).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 140), d=st.integers(1, 40), k=st.integers(1, 30), margin=st.integers(0, 12),
       db_step=st.integers(1, 150), seed=st.integers(0, 10_000),
       kind=st.sampled_from(["clustered", "equal", "near_dup", "norms", "negative"]))
def test_bf16_kernel_equals_float32_kernel_and_float64_oracle(n, d, k, margin, db_step, seed, kind):
    x = np.ascontiguousarray(adversarial_rows(n, d, seed, kind), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)
    oracle_s, oracle_i = K.brute_force_knn(x, k)  # float64 sums rounded once, (sim desc, id asc)
    parts32, parts16 = [], []
    for b in range(0, n, db_step):
        xb, ib = x[b:b + db_step], ids[b:b + db_step]
        parts32.append(K.knn_block(x, ids, xb, ib, k, margin))
        parts16.append(K.knn_bf16(K.Bf16Flat(xb, group=int(1 + seed % 8)), x, ids, ib, k, margin))
    s32, i32 = K.merge_topk_many(parts32, k)
    s16, i16 = K.merge_topk_many(parts16, k)
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_array_equal(s16, s32)
    np.testing.assert_array_equal(i16, oracle_i)
    np.testing.assert_array_equal(s16, oracle_s)


@pytest.mark.parametrize("kind", ["clustered", "norms", "near_dup"])
def test_bf16_bound_holds_for_every_row_left_out(kind):
    # the per-query bound Bf16Flat.search states must exceed the exact similarity of every row it did not return
    x = np.ascontiguousarray(adversarial_rows(3000, 64, 11, kind), dtype=np.float32)
    db = K.Bf16Flat(x)
    q = x[::7]
    D, L, upper = db.search(q, 40)
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    for r in range(len(q)):
        if not np.isfinite(upper[r]):
            continue
        out = np.ones(len(x), bool)
        out[L[r][L[r] >= 0]] = False
        assert exact[r, out].max() <= upper[r]
        # and the bfloat16 values returned are within the stated error of the exact ones
        last = float(D[r].min())
        err = upper[r] - last - 2.0 ** -8 * abs(last)
        assert np.all(np.abs(D[r] - exact[r, L[r]]) <= 2.0 ** -8 * np.abs(D[r]) + err)


def test_bf16_kernel_large_block_matches_float32_with_real_selection():
    # a block wide enough that the two-stage selection (group maxima, then the best groups' members) is used
    x = np.ascontiguousarray(adversarial_rows(6000, 48, 3, "clustered"), dtype=np.float32)
    ids = np.arange(len(x))
    q, qi = x[:500], ids[:500]
    a = K.knn_block(q, qi, x, ids, 20)
    b = K.knn_bf16(K.Bf16Flat(x), q, qi, ids, 20, margin=8)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_bf16_first_round_width_adapts_between_batches_and_never_changes_results(monkeypatch):
    # dense similarities (near duplicates): a first round of k + 1 certifies few queries, so the width must grow
    # from batch to batch and be kept on the database; any width gives the certified arrays of the float32 kernel
    monkeypatch.setattr(K, "BF16_BATCH", 64)
    x = np.ascontiguousarray(adversarial_rows(5000, 32, 5, "near_dup"), dtype=np.float32)
    ids = np.arange(len(x))
    q, qi = x[:700], ids[:700]
    want = K.knn_block(q, qi, x, ids, 15)
    db = K.Bf16Flat(x)
    got = K.knn_bf16(db, q, qi, ids, 15, margin=0)
    assert db.first_width[15] > 16  # grew from k + 1
    again = K.knn_bf16(db, q, qi, ids, 15, margin=0)  # starts from the learned width
    wide = K.Bf16Flat(x)
    wide.first_width[15] = 900
    for s, i in (got, again, K.knn_bf16(wide, q, qi, ids, 15)):
        np.testing.assert_array_equal(i, want[1])
        np.testing.assert_array_equal(s, want[0])
    assert K._next_width(100, 0.5, 80) == 150 and K._next_width(100, 0.1, 80) == 120
    assert K._next_width(100, 0.0, 80) == 95 and K._next_width(89, 0.0, 80) == 89  # floor k + 9
    assert K._next_width(1000, 0.9, 80) == K.BF16_MAX_CANDIDATES


def test_choose_precision_settings_and_cpu_detection():
    feats = K.cpu_features()
    assert {"avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8", "torch_capability"} <= set(feats)
    assert K.choose_precision("float32")["precision"] == "float32"
    assert K.choose_precision("bfloat16")["precision"] == "bfloat16"
    auto = K.choose_precision("auto")
    assert auto["precision"] in ("float32", "bfloat16") and auto["reason"]
    if not (feats["avx512_bf16"] or feats["amx_bf16"]):
        assert auto["precision"] == "float32"  # no native bfloat16: today's kernel
    with pytest.raises(ValueError):
        K.choose_precision("int4")


def ivf_setup(n, nlist, nprobe, seed):
    """Clustered rows, a trained quantizer, each row's list and its ``nprobe`` probed lists."""
    x = clustered(n, 16, seed=seed)
    trained = K.train_ivf(x, nlist, niter=5)
    index = K.load_ivf(trained)
    return x, np.arange(len(x)), trained, index, K.ivf_assign(index, x, 1)[:, 0], K.ivf_assign(index, x, nprobe)


def test_quantizer_training_does_not_depend_on_the_callers_threads():
    # the centroids can depend on the training's thread count (OpenBLAS's Haswell kernel: 1 vs 2 threads differ),
    # so train_ivf uses its own fixed count, whatever the worker's threads are set to, and restores them
    import faiss

    x = clustered(6000, 48, seed=2)
    try:
        K.set_threads(1)
        want = bytes(K.train_ivf(x, 120, niter=6, threads=2))
        for threads in (2, 3, 4):
            K.set_threads(threads)
            assert bytes(K.train_ivf(x, 120, niter=6, threads=2)) == want
            assert faiss.omp_get_max_threads() == threads
    finally:
        K.set_threads(1)


@pytest.mark.parametrize("kind", ["clustered", "near_dup", "equal"])
def test_ivf_assign_bf16_candidates_give_the_float32_lists(kind):
    x = np.ascontiguousarray(adversarial_rows(3000, 24, 4, kind), dtype=np.float32)
    index = K.load_ivf(K.train_ivf(clustered(3000, 24, seed=4), 150, niter=4))
    for nprobe in (1, 7, 40):
        np.testing.assert_array_equal(K.ivf_assign(index, x, nprobe, precision="bfloat16"),
                                      K.ivf_assign(index, x, nprobe))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), nlist=st.integers(1, 60), nprobe=st.integers(1, 70), margin=st.integers(0, 6),
       seed=st.integers(0, 10_000), kind=st.sampled_from(["clustered", "equal", "near_dup", "norms"]),
       train_kind=st.sampled_from(["clustered", "near_dup"]))
def test_ivf_probes_are_the_exact_probe_sets(n, nlist, nprobe, margin, seed, kind, train_kind):
    # the set of probed lists decides a search's candidates: ivf_probes must give ivf_assign's sets exactly,
    # ties included (equal queries; near-duplicate centroids, below float32's resolution)
    x = np.ascontiguousarray(adversarial_rows(n, 12, seed, kind), dtype=np.float32)
    train = np.ascontiguousarray(adversarial_rows(max(n, nlist), 12, seed + 1, train_kind), dtype=np.float32)
    index = K.load_ivf(K.train_ivf(train, nlist, niter=3))
    got, want = K.ivf_probes(index, x, nprobe, margin), K.ivf_assign(index, x, nprobe)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
    # with the nearest list (the kNN stage's one pass for a face's list and probes): the same set, and
    # exactly the list ivf_assign gives the row
    both, nearest = K.ivf_probes(index, x, nprobe, margin, nearest=True)
    np.testing.assert_array_equal(both, got)
    np.testing.assert_array_equal(nearest, K.ivf_assign(index, x, 1)[:, 0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 260), nlist=st.integers(1, 30), k=st.integers(1, 25), seed=st.integers(0, 10_000),
       kind=st.sampled_from(["clustered", "equal", "near_dup", "norms"]))
def test_probes_needed_is_what_the_ivf_search_finds_at_every_nprobe(n, nlist, k, seed, kind):
    # the tune counts its recall from probes_needed instead of searching: for every nprobe, the exact
    # neighbours an IVF search finds must be exactly those whose count is <= nprobe (ties and duplicates too)
    k = min(k, n - 1)
    if k < 1:
        return
    x = np.ascontiguousarray(adversarial_rows(n, 12, seed, kind), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)
    index = K.load_ivf(K.train_ivf(x if n >= nlist else np.tile(x, (nlist // n + 1, 1)), nlist, niter=3))
    nl = index.nlist
    lists = K.ivf_assign(index, x, 1)[:, 0]
    group = K.IvfLists(x, ids, lists, nl)
    es, ei = K.knn_block(x, ids, x, ids, k)
    probes = K.ivf_assign(index, x, nl)
    needed = K.probes_needed(probes, np.where(ei >= 0, lists[np.maximum(ei, 0)], -1))
    assert needed.shape == ei.shape and needed.min() >= 1 and needed.max() <= nl + 1
    for p in range(1, nl + 1):
        _, found = K.knn_ivf_lists(group, x, ids, probes[:, :p], k)
        for j in range(n):
            want = set(ei[j][(ei[j] >= 0) & (needed[j] <= p)].tolist())
            assert set(found[j].tolist()) & set(ei[j].tolist()) - {-1} == want
    # a capped ranking (the tune ranks at most 1,024 lists): beyond it, P + 1
    capped = K.probes_needed(probes[:, :1], np.where(ei >= 0, lists[np.maximum(ei, 0)], -1))
    np.testing.assert_array_equal(capped, np.where(needed <= 1, 1, 2))


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       cuts=st.lists(st.integers(1, 39), max_size=4), ties=st.booleans(), share=st.sampled_from([0.1, 0.4, 0.9]))
def test_reverse_join_equals_the_union_oracle_for_any_blocks(n, k, seed, cuts, ties, share):
    """Each row's list joined with the faces whose lists hold it (reverse_entries per source block, add_reverse per
    target block) is the top-k of the union of the row's found candidates and those faces, ids once."""
    rng = np.random.default_rng(seed)
    s = rng.random((n, n)).astype(np.float32)
    if ties:
        s = np.round(s * 4).astype(np.float32) / 4
    s = np.minimum(s, s.T)  # the pair's similarity is the same from either side (rescore)
    found = rng.random((n, n)) < share
    np.fill_diagonal(found, False)
    cols = np.broadcast_to(np.arange(n), (n, n))
    fs, fi = K.sort_topk(np.where(found, s, -np.inf), np.where(found, cols, -1), k)
    union = found.copy()
    for j in range(n):
        union[fi[j][fi[j] >= 0], j] = True
    want_s, want_i = K.sort_topk(np.where(union, s, -np.inf), np.where(union, cols, -1), k)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    blocks = list(zip(bounds[:-1], bounds[1:]))
    entries = [K.reverse_entries(a, fs[a:b], fi[a:b], bounds) for a, b in blocks]
    added = 0
    for t, (a, b) in enumerate(blocks):
        pieces = []
        for dst, src, sim, counts in entries:
            off = np.concatenate([[0], np.cumsum(counts)])
            assert np.all((dst[off[t]:off[t + 1]] >= a) & (dst[off[t]:off[t + 1]] < b))
            pieces.append((dst[off[t]:off[t + 1]], src[off[t]:off[t + 1]], sim[off[t]:off[t + 1]]))
        got_s, got_i, add = K.add_reverse(a, fs[a:b], fi[a:b], *(np.concatenate([p[j] for p in pieces]) for j in range(3)), k)
        added += add
        np.testing.assert_array_equal(got_i, want_i[a:b])
        np.testing.assert_array_equal(got_s, want_s[a:b])
    assert added == sum(int((~np.isin(want_i[r], fi[r]) & (want_i[r] >= 0)).sum()) for r in range(n))


def test_ivf_shards_merge_equals_one_index_and_full_probe_is_exact():
    x, ids, trained, index, lists, probes = ivf_setup(1200, 20, 3, seed=5)
    one = K.ivf_shard(trained, x, ids, lists)
    s1, i1 = K.knn_ivf(one, x, ids, x, ids, probes, 15)
    parts = [K.knn_ivf(K.ivf_shard(trained, x[a:a + 250], np.arange(len(x[a:a + 250])), lists[a:a + 250]),
                       x[a:a + 250], ids[a:a + 250], x, ids, probes, 15) for a in range(0, len(x), 250)]
    s2, i2 = K.merge_topk_many(parts, 15)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    # probing every list is exact search
    s3, i3 = K.knn_ivf(one, x, ids, x, ids, K.ivf_assign(index, x, 20), 15)
    es, ei = K.knn_block(x, ids, x, ids, 15)
    np.testing.assert_array_equal(i3, ei)
    np.testing.assert_array_equal(s3, es)


def probed_oracle(x, ids, lists, q, q_ids, probes, k):
    """Numpy oracle: exact top-k (sim desc, id asc) of each query among rows in its probed lists."""
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for j in range(len(q)):
        cand = np.flatnonzero(np.isin(lists, probes[j]) & (ids != q_ids[j]))
        sims = (x[cand].astype(np.float64) @ q[j].astype(np.float64)).astype(np.float32)
        order = np.lexsort((ids[cand], -sims))[:k]
        out_s[j, :len(order)] = sims[order]
        out_i[j, :len(order)] = ids[cand][order]
    return out_s, out_i


def test_list_major_ivf_equals_faiss_ivf_and_any_grouping():
    x, ids, trained, _, lists, probes = ivf_setup(1500, 24, 4, seed=7)
    s_faiss, i_faiss = K.knn_ivf(K.ivf_shard(trained, x, ids, lists), x, ids, x, ids, probes, 15)
    one = K.IvfLists(x, ids, lists, 24)
    # placed from consecutive slices (as the stage reads them from the store): the same group
    sliced = K.IvfLists((x[a:a + 333] for a in range(0, len(x), 333)), ids, lists, 24)
    np.testing.assert_array_equal(sliced.rows, one.rows)
    np.testing.assert_array_equal(sliced.ids, one.ids)
    np.testing.assert_array_equal(sliced.offsets, one.offsets)
    s1, i1 = K.knn_ivf_lists(one, x, ids, probes, 15)
    np.testing.assert_array_equal(i1, i_faiss)
    np.testing.assert_array_equal(s1, s_faiss)
    # database groups of any size merged, queries in any blocks: the same arrays
    for step in (1, 97, 700):
        parts = [K.knn_ivf_lists(K.IvfLists(x[a:a + step], ids[a:a + step], lists[a:a + step], 24), x, ids, probes, 15)
                 for a in range(0, len(x), step)] if step > 1 else None
        if parts is not None:
            s2, i2 = K.merge_topk_many(parts, 15)
            np.testing.assert_array_equal(i2, i1)
            np.testing.assert_array_equal(s2, s1)
        blocks = [K.knn_ivf_lists(one, x[a:a + max(step, 50)], ids[a:a + max(step, 50)], probes[a:a + max(step, 50)], 15)
                  for a in range(0, len(x), max(step, 50))]
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), i1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 160), nlist=st.integers(1, 12), nprobe=st.integers(1, 12), k=st.integers(1, 30),
       first=st.integers(0, 5), seed=st.integers(0, 10_000), dup=st.booleans(), block=st.sampled_from([None, 1, 7, 64]))
def test_list_major_search_equals_probed_oracle(n, nlist, nprobe, k, first, seed, dup, block):
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, 8)))
    if dup:
        x[: n // 2] = x[0]  # exact ties
    ids = rng.permutation(n).astype(np.int64) * 3  # arbitrary global ids
    lists = rng.integers(0, nlist, n)
    probes = np.stack([rng.permutation(nlist)[:min(nprobe, nlist)] for _ in range(n)])
    group = K.IvfLists(x, ids, lists, nlist)
    np.testing.assert_array_equal(group.candidates(probes), [np.isin(lists, p).sum() for p in probes])
    s, i = K.knn_ivf_lists(group, x, ids, probes, k)
    es, ei = probed_oracle(x, ids, lists, x, ids, probes, k)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(s, es)
    # the raw search alone: its top-kk similarities match the oracle's within float32 GEMM error
    # (``block``: GEMM blocks of a few columns split every list; only memory may depend on it)
    D, L = group.search(x, probes, k + 1, first=first, block_floats=block)
    raw = np.full_like(D, -np.inf)
    ok = L >= 0
    raw[ok] = np.einsum("qd,qd->q", np.repeat(x, k + 1, axis=0).reshape(n, k + 1, 8)[ok], group.rows[L[ok]])
    np.testing.assert_allclose(np.where(ok, D, 0), np.where(ok, raw, 0), atol=1e-5)
    assert (D[:, :-1] >= D[:, 1:]).all()  # descending, pads (-inf) last
    # each query gets min(kk, its candidates) distinct rows of its probed lists, and every row it does not get is
    # no better than the last one it got (up to the GEMM's rounding): the bound certified_topk relies on
    pos_list = np.sort(lists)
    for qi in range(n):
        got = L[qi][ok[qi]]
        probed = np.flatnonzero(np.isin(pos_list, probes[qi]))
        assert len(got) == len(set(got.tolist())) == min(k + 1, len(probed))
        assert np.isin(got, probed).all()
        rest = np.setdiff1d(probed, got)
        if len(rest) and len(got):
            assert (group.rows[rest] @ x[qi]).max() <= D[qi, len(got) - 1] + 1e-5


def test_ivf_lists_rejects_bad_assignments():
    x = unit(np.random.default_rng(0).standard_normal((10, 4)))
    with pytest.raises(ValueError, match="list ids"):
        K.IvfLists(x, np.arange(10), np.full(10, 5), 5)
    with pytest.raises(ValueError, match="assignments"):
        K.IvfLists(x, np.arange(10), np.zeros(9, int), 5)
    with pytest.raises(ValueError, match="assignments"):
        K.IvfLists([x[:4], x[4:]], np.arange(10), np.zeros(11, int), 5)


def test_ivf_query_blocks_amortise_the_per_list_work_within_balance_and_memory():
    from facecluster.pipeline.config import Config
    from facecluster.pipeline.stages import knn as S

    kc = Config().knn
    two = [{"memory_limit": 11 << 30, "nthreads": 1}] * 2
    n, nlist = 1_000_000, 8000
    pl = S.plan(n, 256, 16384, 80, kc, two, True, 136, nlist)
    assert pl["strategy"] == "broadcast" and pl["q_rows"] % 16384 == 0
    assert pl["q_rows"] * K.IVF_FIRST_PROBES / nlist >= S.IVF_LIST_QUERIES  # 65,536 here
    # the time model alone would give one chunk: IVF tasks are sized up, exact ones are not
    assert S.plan(n, 256, 16384, 80, kc, two, False)["q_rows"] < pl["q_rows"]
    # many threads: every thread still gets >= 4 tasks
    many = [{"memory_limit": 11 << 30, "nthreads": 4}] * 16
    assert S.plan(n, 256, 1024, 80, kc, many, True, 136, nlist)["q_rows"] <= n // (4 * 64) + 1024
    # little memory left beside the database share: the task's working set bounds the block
    small = [{"memory_limit": 2 << 30, "nthreads": 2}] * 2
    pl = S.plan(n, 256, 1024, 80, kc, small, True, 136, nlist)  # 37,888 rows
    per_query = 256 * 4 + 136 * 8 + 12 * (80 + kc.margin + 1) + 3 * (80 + kc.margin) * 12
    assert pl["q_rows"] * per_query <= ((2 << 30) - pl["budget"]) // 2 // 2 + 1024 * per_query
    assert pl["q_rows"] < 65536  # the unbounded block at these lists
    assert S.plan(n, 256, 16384, 80, dataclasses.replace(kc, q_rows=16384), two, True, 136, nlist)["q_rows"] == 16384


def test_worker_cache_makes_room_before_it_builds():
    # an entry that would not fit beside the cached ones is made room for before it is built (peak memory)
    from facecluster.pipeline.stages import knn as S

    S.clear_cache()
    S._cached(("a",), 100, lambda: ("A", 60))
    seen = []
    S._cached(("b",), 100, lambda: (seen.append(list(S._CACHE)) or "B", 60), estimate=lambda: 60)
    assert seen == [[]]  # "a" was dropped before "b" was built
    S._cached(("c",), 100, lambda: (seen.append(list(S._CACHE)) or "C", 30), estimate=lambda: 30)
    assert seen[-1] == [("b",)]  # room enough: kept
    # a hit neither builds nor estimates (the estimate may read the store: not on every task)
    assert S._cached(("c",), 100, lambda: 1 / 0, estimate=lambda: 1 / 0) == "C"
    S.clear_cache()
    # before the IVF search the stage drops the tune's exact database and keeps the lists
    for key in (("flat", 1), ("ivf", 1), ("bf16", 1), ("ivf", 2)):
        S._cached(key, 100, lambda: (key, 10))
    S.clear_cache("ivf")
    assert list(S._CACHE) == [("ivf", 1), ("ivf", 2)]
    S.clear_cache()
    assert not S._CACHE


# -- the stage on a real LocalCluster ---------------------------------------------------------------
N_STAGE = 1200


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    try:
        from facecluster.tasks.synth import make_faces

        x, _ = make_faces(N_STAGE, dim=32, seed=7)
    except ImportError:  # the built-in dataset module is optional for this test
        x = clustered(N_STAGE, 32, seed=7)
    x = np.ascontiguousarray(x, dtype=np.float32)
    x[10:40] = x[3]  # duplicates: ties across chunk boundaries
    tmp = tmp_path_factory.mktemp("knnfeat")
    path = tmp / "f.npy"
    np.save(path, x)
    # oracle on the stored features (ingest re-normalises the rows)
    stored = make_store(tmp, path, N_STAGE).array("features")[...]
    return path, K.brute_force_knn(stored, 25)


def make_store(tmp_path, feats_path, chunk_rows):
    from facecluster.pipeline.config import IngestConfig
    from facecluster.pipeline.stages.ingest import run_ingest
    from facecluster.pipeline.store import RunStore

    url = str(tmp_path / f"run{chunk_rows}.zarr")
    run_ingest(feats_path, url, cfg=IngestConfig(chunk_rows=chunk_rows))
    return RunStore.open(url)


def knn_cfg(**kw):
    from facecluster.pipeline.config import Config

    cfg = Config()
    return dataclasses.replace(cfg, knn=dataclasses.replace(cfg.knn, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("chunk_rows,db_rows,client_name,precision", [
    (97, None, "local_client", "bfloat16"),      # broadcast, many small query blocks
    (500, None, "single_worker_client", "float32"),
    (N_STAGE, None, "local_client", "auto"),  # one chunk
    (97, 194, "local_client", "bfloat16"),       # blocks: 7 database groups, merge tree with fan-in 2
    (500, 500, "single_worker_client", "float32"),
])
def test_stage_equals_brute_force_for_any_chunking_and_workers(request, tmp_path, faces, chunk_rows, db_rows, client_name,
                                                              precision):
    client = request.getfixturevalue(client_name)
    path, (bs, bi) = faces
    store = make_store(tmp_path, path, chunk_rows)
    from facecluster.pipeline.stages.knn import run_knn

    cfg = knn_cfg(k=25, mode="exact", db_rows=db_rows, fan_in=2, margin=4, precision=precision, bf16_margin=6)
    summary = run_knn(store, cfg, client)
    assert summary["strategy"] == ("broadcast" if db_rows is None else "blocks")
    if precision != "auto":
        assert summary["precision"] == [precision]
    idx = store.array("knn/index")
    assert idx.chunks == (min(chunk_rows, N_STAGE), 25)
    np.testing.assert_array_equal(idx[...], bi)
    np.testing.assert_array_equal(store.array("knn/sim")[...], bs)
    # up to date: skipped on a re-run
    assert run_knn(store, cfg, client)["skipped"] is True


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
def test_ivf_stage_recall_and_chunking_invariance(tmp_path, faces, local_client, single_worker_client, reverse):
    path, (bs, bi) = faces
    from facecluster.pipeline.stages.knn import run_knn

    results = []
    for chunk_rows, db_rows, client in [(97, None, local_client), (300, 600, single_worker_client)]:
        store = make_store(tmp_path, path, chunk_rows)
        cfg = knn_cfg(k=25, mode="ivf", nlist=24, tune_queries=200, recall_target=0.95, edge_th=0.5,
                      db_rows=db_rows, fan_in=2, reverse=reverse)
        summary = run_knn(store, cfg, client)
        assert summary["mode"] == "ivf" and 1 <= summary["nprobe"] <= 24
        assert summary["edge_recall"] >= 0.95
        # the option is recorded only when on, so that a store written before it stays up to date
        assert store.record("knn")["params"].get("reverse", False) is reverse
        assert ("reverse" in store.record("knn")["params"]) is reverse
        # the smallest nprobe measured to reach the target: every smaller one measured fell short
        curve = summary["tune_curve"]
        assert [c["nprobe"] for c in curve] == sorted({c["nprobe"] for c in curve})
        assert all(c["edge_recall"] < 0.95 for c in curve if c["nprobe"] < summary["nprobe"])
        assert [c["edge_recall"] for c in curve if c["nprobe"] == summary["nprobe"]] == [summary["edge_recall"]]
        results.append((store.array("knn/index")[...], store.array("knn/sim")[...], summary["nprobe"]))
        # the one pass that wrote the lists and the probes the search read: the lists are each face's nearest
        # (ivf_assign), and the arrays those of the kernel searching every face's own exact probe set
        x = store.array("features")[...]
        ids = np.arange(len(x), dtype=np.int64)
        index = K.load_ivf(store.array("knn/ivf_quantizer")[...])
        lists = store.array("knn/ivf_list")[...]
        np.testing.assert_array_equal(lists, K.ivf_assign(index, x, 1)[:, 0])
        ks, ki = K.knn_ivf_lists(K.IvfLists(x, ids, lists, 24), x, ids, K.ivf_assign(index, x, summary["nprobe"]), 25)
        if reverse:
            # ... joined with their reverse entries (the faces whose lists hold the row), whatever the blocks
            dst, src, rs, _ = K.reverse_entries(0, ks, ki, [0, len(x)])
            ks, ki, added = K.add_reverse(0, ks, ki, dst, src, rs, 25)
            assert added == summary["reverse_added"] > 0
            # the tune's estimate holds on the lists written (200 of the edges only the reverse entries can find
            # checked: an estimate of the rate at which they are kept, which the measured recall bears out)
            assert 0 < summary["tune_reverse_checked"] == min(200, summary["tune_reverse_edges"])
            assert abs(summary["edge_recall_measured"] - summary["edge_recall"]) <= 0.01, summary
            assert all(c["edge_recall"] >= c["edge_recall_forward"] for c in curve)
        else:
            assert "reverse_added" not in summary and "edge_recall_forward" not in curve[0]
            assert summary["edge_recall_measured"] >= 0.95
        np.testing.assert_array_equal(results[-1][0], ki)
        np.testing.assert_array_equal(results[-1][1], ks)
        # the probes' scratch array (and the reverse entries') are gone with the stage
        tmp = Path(store.url) / "_tmp"
        assert not tmp.exists() or not [p for p in tmp.iterdir() if "scratch" in p.name]
    (i1, s1, p1), (i2, s2, p2) = results
    assert p1 == p2
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    # recall of above-threshold edges over all queries, against brute force
    edges = bs >= 0.5
    found = sum(np.isin(bi[r][edges[r]], i1[r]).sum() for r in range(len(bi)))
    assert found / edges.sum() >= 0.9


def test_cli_k_not_smaller_than_n_exits_2(tmp_path, capsys):
    from facecluster.pipeline.cli import main

    x = unit(np.random.default_rng(0).standard_normal((20, 8)))
    np.save(tmp_path / "f.npy", x)
    url = str(tmp_path / "r.zarr")
    from facecluster.pipeline.stages.ingest import run_ingest

    run_ingest(tmp_path / "f.npy", url)
    with pytest.raises(SystemExit) as e:
        main(["knn", url, "-k", "20"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "r.zarr" in err and "-k smaller than N" in err


def test_missing_ingest_is_a_clear_error(tmp_path):
    from facecluster.pipeline.stages.knn import check_input
    from facecluster.pipeline.store import RunStore, StoreError

    store = RunStore.create(str(tmp_path / "empty.zarr"))
    with pytest.raises(StoreError, match="ingest"):
        check_input(store, 5)


@pytest.mark.slow
def test_workers_use_the_openblas_kernel_set_in_the_driver(local_client):
    import os

    from facecluster.pipeline.stages.knn import worker_blas

    want = os.environ.get("OPENBLAS_CORETYPE")  # set by configure_blas_env in the fixture
    if not want:
        pytest.skip("no OpenBLAS core type detected for this CPU")
    for info in local_client.run(worker_blas).values():
        assert info["OPENBLAS_CORETYPE"] == want
        assert info["libs"]["faiss"]["architecture"].lower() == want.lower()
