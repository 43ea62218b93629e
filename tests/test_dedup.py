"""Dedup (Algorithm 3): group-by argmax vs the paper's sequential loop, partition properties."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from facecluster.tasks import dedup as D


@st.composite
def scored_proposals(draw):
    n = draw(st.integers(1, 25))
    n_prop = draw(st.integers(0, 8))
    props = [np.array(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))) for _ in range(n_prop)]
    # few distinct scores: ties between proposals are common
    scores = np.array([draw(st.sampled_from([0.1, 0.5, 0.5, 0.9, 1.0])) for _ in range(n_prop)], np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in props])]).astype(np.int64)
    members = np.concatenate(props).astype(np.int64) if props else np.zeros(0, np.int64)
    keep = np.array(draw(st.lists(st.booleans(), min_size=len(members), max_size=len(members))), bool)
    return n, offsets, members, scores, keep


@settings(max_examples=200, deadline=None)
@given(scored_proposals(), st.booleans())
def test_group_by_argmax_equals_sequential_loop(case, use_keep):
    n, offsets, members, scores, keep = case
    keep = keep if use_keep else None
    a = D.dedup(n, offsets, members, scores, keep)
    b = D.dedup_sequential(n, offsets, members, scores, keep)
    assert np.array_equal(a, b)
    # a partition, numbered 0..C-1 by smallest face
    assert len(a) == n and a.dtype == np.int64
    _, first = np.unique(a, return_index=True)
    assert np.array_equal(np.sort(np.unique(a)), np.arange(len(first)))
    assert np.array_equal(a[np.sort(first)], np.arange(len(first)))
    # every cluster with >1 face lies inside one proposal
    for c in np.unique(a):
        faces = np.flatnonzero(a == c)
        if len(faces) > 1:
            assert any(np.isin(faces, members[offsets[p]:offsets[p + 1]]).all() for p in range(len(offsets) - 1))


@settings(max_examples=100, deadline=None)
@given(scored_proposals(), st.integers(1, 4), st.integers(1, 30))
def test_distributed_shape_equals_in_memory(case, n_chunks, range_size):
    """Chunked partial argmaxes over proposal ranges + face ranges give the in-memory labels."""
    n, offsets, members, scores, keep = case
    n_prop = len(offsets) - 1
    cuts = np.unique(np.linspace(0, n_prop, n_chunks + 1).astype(int))
    bounds = np.unique(np.concatenate([np.arange(0, n, range_size), [n]]))
    maps = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o = offsets[a:b + 1]
        t = D.argmax_by_face(D.proposal_triples(o - o[0], members[o[0]:o[-1]], scores[a:b], keep[o[0]:o[-1]], pid0=a))
        maps.append(D.split_by_face(t, bounds))
    keys, firsts = [], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        k = D.range_keys(D.argmax_by_face(*[m[i] for m in maps]), lo, hi)
        keys.append(k)
        firsts.append(D.first_faces(k, lo))
    tk, tid = D.global_numbering(firsts)
    got = np.concatenate([D.apply_numbering(k, tk, tid) for k in keys]) if keys else np.zeros(0, np.int64)
    assert np.array_equal(got, D.dedup(n, offsets, members, scores, keep))


def test_semantics_small_example():
    # faces 0..6; p0 = {0,1,2} score .9 (face 2 pruned), p1 = {2,3} score .8, p2 = {4,5} score .95 (5 pruned)
    offsets = np.array([0, 3, 5, 7])
    members = np.array([0, 1, 2, 2, 3, 4, 5])
    scores = np.array([0.9, 0.8, 0.95], np.float32)
    keep = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    lab = D.dedup(7, offsets, members, scores, keep)
    # 0,1 -> p0; 2,3 -> p1 (2 kept there beats pruned in p0); 4 -> p2; 5 -> pruned part of p2; 6 singleton
    assert lab.tolist() == [0, 0, 1, 1, 2, 3, 4]
    assert lab.tolist() == D.dedup_sequential(7, offsets, members, scores, keep).tolist()


def test_score_ties_broken_by_proposal_id():
    offsets = np.array([0, 2, 4])
    members = np.array([1, 2, 0, 1])
    lab = D.dedup(3, offsets, members, np.array([0.5, 0.5], np.float32))
    assert lab.tolist() == [0, 1, 1]  # face 1 goes to p0 (lower id), face 0 alone with p1's remainder
