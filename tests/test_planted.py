"""The planted kNN lists of `bench scale` (facecluster.tasks.planted) against a brute-force reading of the model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from facecluster.tasks import planted
from facecluster.tasks.planted import Planted


def _planted(n: int, seed: int) -> Planted:
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, 40)))
    sizes[-1] -= sum(sizes) - n
    return Planted(np.array([s for s in sizes if s > 0]), seed=seed, window=30)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 600), k=st.integers(1, 30), seed=st.integers(0, 5), cut=st.integers(1, 599),
       block=st.integers(1, 5000))
def test_lists_are_sorted_symmetric_and_chunk_free(n, k, seed, cut, block):
    p = _planted(n, seed)
    idx, sim = p.knn(0, n, k)
    cut = min(cut, n)
    # any cut into chunks, and any block size inside a chunk: the same rows
    default = planted.BLOCK_CANDIDATES
    planted.BLOCK_CANDIDATES = block
    try:
        a, b = p.knn(0, cut, k), p.knn(cut, n, k)
    finally:
        planted.BLOCK_CANDIDATES = default
    np.testing.assert_array_equal(np.concatenate([a[0], b[0]]), idx)  # any cut into chunks: the same rows
    np.testing.assert_array_equal(np.concatenate([a[1], b[1]]), sim)
    rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
    ok = idx >= 0
    assert not (idx == rows).any() and np.isneginf(sim[~ok]).all()
    # sorted by similarity descending, then id ascending; no neighbour twice; padding last
    key = np.where(ok, -sim.astype(np.float64), 10.0)  # padding after every similarity
    assert (np.diff(key, axis=1) >= 0).all()
    tie = np.diff(key, axis=1) == 0
    assert (np.diff(idx, axis=1)[tie & ok[:, 1:]] > 0).all()
    # a pair's similarity is the same from both ends, to the bit, and is the cosine of the two faces' latent
    # vectors (the oracle: float64 dot products, one pair at a time)
    np.testing.assert_array_equal(p.similarity(rows[ok], idx[ok]), sim[ok])
    np.testing.assert_array_equal(p.similarity(idx[ok], rows[ok]), sim[ok])
    zi, zj = p.latent(rows[ok]), p.latent(idx[ok])
    np.testing.assert_allclose(sim[ok], [float(a @ b) for a, b in zip(zi, zj)], atol=1e-6)
    lab = p.identity(np.arange(n))
    # every other member of a small identity is a candidate: listed, or outranked by the row's k-th
    sizes = np.bincount(lab)
    for i in np.flatnonzero(sizes[lab] - 1 <= k)[:50]:
        missing = np.setdiff1d(np.setdiff1d(np.flatnonzero(lab == lab[i]), [i]), idx[i])
        if len(missing):
            assert ok[i].all() and (p.similarity(np.full(len(missing), i), missing) <= sim[i, -1]).all()


def test_identities_are_scattered_over_the_ids_and_features_are_unit():
    p = _planted(20000, 0)
    lab = p.identity(np.arange(20000))
    # members of one identity are not neighbours in id order (as after a real ingest)
    big = np.argmax(np.bincount(lab))
    assert np.diff(np.flatnonzero(lab == big)).min() > 1
    # features: the latent vectors padded, so their cosines are the lists' similarities; any row range alike
    x = p.features(100, 200, 48)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(x[50:], p.features(150, 200, 48))
    idx, sim = p.knn(100, 200, 10)
    np.testing.assert_allclose((x[:, None, :] * p.features(0, 20000, 48)[idx]).sum(2), sim, atol=1e-6)
    with pytest.raises(ValueError, match="dim >= 32"):
        p.features(0, 10, 16)


def test_lists_have_a_neighbourhood_structure():
    """Same-identity pairs rank above the window's look-alikes, which rank above the rest, as on real faces (the
    first planted lists drew every pair's similarity independently: no shared-neighbour or density structure),
    and a face's own identity fills the top of its list."""
    p = _planted(20000, 1)
    idx, sim = p.knn(0, 20000, 20)
    lab = p.identity(np.arange(20000))
    ok = idx >= 0
    same = (lab[np.maximum(idx, 0)] == lab[:, None]) & ok
    assert sim[same].mean() > sim[ok & ~same].mean() + 0.2
    # the top neighbour is of the same identity for most faces of identities of 2+ faces
    multi = np.bincount(lab)[lab] > 1
    assert same[multi, 0].mean() > 0.9
    # shared neighbours: two faces of one identity share more of their lists than two faces that list each other
    # across identities
    first = [set(r[r >= 0]) for r in idx]
    rows = np.repeat(np.arange(20000), 20).reshape(idx.shape)
    jac = lambda a, b: len(first[a] & first[b]) / max(len(first[a] | first[b]), 1)
    s_same = np.mean([jac(a, b) for a, b in zip(rows[same][:2000], idx[same][:2000])])
    s_diff = np.mean([jac(a, b) for a, b in zip(rows[ok & ~same][:2000], idx[ok & ~same][:2000])])
    assert s_same > 2 * s_diff
