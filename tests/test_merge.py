"""The merge step (tasks/merge.py): against a plain-Python oracle of its definition, chunk invariance, and
the level's choice in training (no level that costs any validation run more than MERGE_WORST_LOSS)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from facecluster.tasks.components import canonical_labels
from facecluster.tasks.dedup import split_by_face
from facecluster.tasks.merge import (MERGE_WORST_LOSS, MIN_P, MIN_SIZE, MergeRounds, combine_entries, combine_sums,
                                     cross_entries, eligible_clusters, merge_by_affinity, merge_clusters, round_sums)


def oracle_merge(index, prob, labels, level, min_size=MIN_SIZE):
    """The definition, written plainly: undirected kNN edges; a face's best P into every other cluster;
    rounds of mutual best partners (score = min of the two directions' mean best P, edges below MIN_P left
    out; ties to the smaller id)."""
    labels = list(canonical_labels(np.asarray(labels)))
    n = len(labels)
    size0 = np.bincount(labels)
    eligible = {c for c in range(len(size0)) if size0[c] >= min_size}
    nbrs = [dict() for _ in range(n)]  # face -> {neighbour: P}
    for i in range(n):
        for j, p in zip(index[i], prob[i]):
            if j < 0 or j == i or p < np.float32(MIN_P):
                continue
            nbrs[i][int(j)] = max(nbrs[i].get(int(j), -1.0), float(p))
            nbrs[int(j)][i] = max(nbrs[int(j)].get(i, -1.0), float(p))
    cur = {c: c for c in range(len(size0))}
    while True:
        cl = [cur[labels[i]] for i in range(n)]
        members = {}
        for i in range(n):
            if labels[i] in eligible:
                members.setdefault(cl[i], []).append(i)
        best = {}  # (A, B) -> sum over A's faces of the best P into B
        for a, faces in members.items():
            for i in faces:
                top = {}
                for j, p in nbrs[i].items():
                    b = cl[j]
                    if b != a and b in members:
                        top[b] = max(top.get(b, 0.0), p)
                for b, p in top.items():
                    best[(a, b)] = best.get((a, b), 0.0) + p
        score = {}
        for (a, b), s in best.items():
            pair = (min(a, b), max(a, b))
            mine = s / len(members[a])
            theirs = best.get((b, a), 0.0) / len(members[b])
            score[pair] = min(mine, theirs)
        partner = {}
        for (a, b), s in sorted(score.items()):
            if s < level:
                continue
            for x, y in ((a, b), (b, a)):
                if x not in partner or (s, -y) > (partner[x][0], -partner[x][1]):
                    partner[x] = (s, y)
        pairs = [(a, partner[a][1]) for a in partner if a < partner[a][1] and partner.get(partner[a][1], (0, -1))[1] == a]
        if not pairs:
            break
        for a, b in pairs:
            for c, v in cur.items():
                if v == b:
                    cur[c] = a
    return canonical_labels(np.array([cur[x] for x in labels]))


GRID = np.array([0.0, 0.04, MIN_P, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], np.float32)


def _graph(seed, n, k, n_clusters):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_clusters, n)
    index = np.full((n, k), -1, np.int64)
    prob = np.zeros((n, k), np.float32)
    for i in range(n):
        m = int(rng.integers(0, k + 1))
        nb = rng.choice(np.delete(np.arange(n), i), size=min(m, n - 1), replace=False)
        index[i, :len(nb)] = nb
        # probabilities on a coarse grid, so that ties between partners occur, and around MIN_P
        prob[i, :len(nb)] = rng.choice(GRID, len(nb))
    return index, prob, labels


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(1, 6), st.integers(1, 8),
       st.sampled_from([0.3, 0.5, 0.7, 0.9]))
def test_merge_matches_the_plain_oracle(seed, n, k, n_clusters, level):
    index, prob, labels = _graph(seed, n, k, n_clusters)
    np.testing.assert_array_equal(merge_by_affinity(index, prob, labels, level), oracle_merge(index, prob, labels, level))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 60), st.lists(st.integers(1, 59), max_size=4))
def test_entries_and_merge_do_not_depend_on_the_row_chunks(seed, n, cuts):
    index, prob, labels = _graph(seed, n, 5, 6)
    labels = canonical_labels(labels)
    elig = eligible_clusters(labels)
    bounds = sorted({0, n, *[c for c in cuts if c < n]})
    parts = [cross_entries(a, index[a:b], prob[a:b], labels, elig) for a, b in zip(bounds[:-1], bounds[1:])]
    whole = cross_entries(0, index, prob, labels, elig)
    for x, y in zip(combine_entries(*reversed(parts)), whole):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(merge_clusters(labels, combine_entries(*parts), 0.5)[0],
                                  merge_by_affinity(index, prob, labels, 0.5))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 60), st.lists(st.integers(1, 59), max_size=4),
       st.sampled_from([0.3, 0.5, 0.7]))
def test_rounds_over_face_ranges_equal_the_rounds_over_all_entries(seed, n, cuts, level):
    """The dedup stage keeps each face range's entries on a worker and sums per pair of clusters there: any split
    of the faces gives the same merges, rounds and labels (the sums are exact), in any order of the ranges."""
    index, prob, labels = _graph(seed, n, 6, 5)
    labels = canonical_labels(labels)
    entries = cross_entries(0, index, prob, labels, eligible_clusters(labels))
    bounds = np.array(sorted({0, n, *[c for c in cuts if c < n]}))
    ranges = split_by_face(entries, bounds)
    assert sum(len(r[0]) for r in ranges) == len(entries[0])
    rounds = MergeRounds(labels, level)
    while True:
        done = [round_sums(r, labels, rounds.cur) for r in ranges]
        ranges = [d[0] for d in done]
        if not rounds.step(combine_sums(*reversed([d[1] for d in done]))):
            break
    out, stats = rounds.labels()
    whole, whole_stats = merge_clusters(labels, entries, level)
    np.testing.assert_array_equal(out, whole)
    assert stats == whole_stats


def test_pair_sums_are_exact_in_any_order():
    """Why the split cannot change a score: P >= MIN_P in float32 are multiples of 2^-28, so their float64 sums
    are exact; summed forwards, backwards or in pieces they agree bit for bit."""
    rng = np.random.default_rng(0)
    p = rng.uniform(MIN_P, 1.0, 200_000).astype(np.float32)
    fwd, bwd = np.sum(p.astype(np.float64)), np.sum(p[::-1].astype(np.float64))
    pieces = sum(np.sum(x.astype(np.float64)) for x in np.array_split(p, 7))
    assert fwd == bwd == pieces


def _two_parts_and_a_lookalike():
    """Faces 0-9: one identity cut into two communities (0-4, 5-9) whose faces see each other at P 0.9;
    faces 10-13: another identity whose faces each see one face of the first at P 0.4."""
    n, k = 14, 12
    index = np.full((n, k), -1, np.int64)
    prob = np.zeros((n, k), np.float32)
    for i in range(10):
        nb = [j for j in range(10) if j != i]
        index[i, :9], prob[i, :9] = nb, [0.95 if (j < 5) == (i < 5) else 0.9 for j in nb]
    for i in range(10, 14):
        nb = [j for j in range(10, 14) if j != i] + [i - 10]
        index[i, :4], prob[i, :4] = nb, [0.95, 0.95, 0.95, 0.4]
    labels = np.array([0] * 5 + [1] * 5 + [2] * 4)
    return index, prob, labels


def test_an_identity_cut_in_two_is_merged_and_a_lookalike_is_not():
    index, prob, labels = _two_parts_and_a_lookalike()
    out, stats = merge_clusters(labels, cross_entries(0, index, prob, labels, eligible_clusters(labels)), 0.8)
    np.testing.assert_array_equal(out, [0] * 10 + [1] * 4)
    assert stats == {"merges": 1, "rounds": 1, "faces_in_merged": 10}
    # the look-alike: its faces' best P into the identity is 0.4, the identity's into it 0 for most faces
    np.testing.assert_array_equal(merge_by_affinity(index, prob, labels, 0.3), out)
    np.testing.assert_array_equal(merge_by_affinity(index, prob, labels, None), labels)
    # two-face clusters take no part: the same identity as 2 + 3 + 5 faces merges only its two larger parts
    small = np.array([3, 3, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(merge_by_affinity(index, prob, small, 0.8),
                                  canonical_labels(np.array([3, 3] + [0] * 8 + [2] * 4)))


def test_merge_level_is_chosen_only_where_no_run_loses_more_than_the_bound():
    """choose_levels_over takes the best mean level among those that cost no run more than MERGE_WORST_LOSS;
    a run where merging joins two identities blocks the level that helps the other run more."""
    from facecluster.tasks.edges import choose_levels_over

    index, prob, labels = _two_parts_and_a_lookalike()
    truth_a = np.array([0] * 10 + [1] * 4)  # the two parts are one identity: merging helps
    faces = np.arange(len(truth_a))
    one = choose_levels_over([(index, prob, truth_a, faces)], floor_grid=(0.94,), attach_grid=(),
                             merge_grid=(None, 0.8))
    assert one["merge"] == 0.8
    curve = {c["level"]: c for c in one["merge_curve"]}
    assert curve[0.8]["pairwise_f"] > curve[None]["pairwise_f"] and curve[0.8]["worst_loss"] <= 0
    truth_b = np.array([0] * 5 + [1] * 5 + [2] * 4)  # the two parts are two identities: merging hurts
    both = choose_levels_over([(index, prob, truth_a, faces), (index, prob, truth_b, faces)], floor_grid=(0.94,),
                              attach_grid=(), merge_grid=(None, 0.8))
    curve = {c["level"]: c for c in both["merge_curve"]}
    assert curve[0.8]["worst_loss"] > MERGE_WORST_LOSS and both["merge"] is None
