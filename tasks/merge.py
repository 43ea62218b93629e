"""Merging communities by the learned affinity between them (kernels, no Dask).

At the model's floor the communities are precise but split large identities (on
every set measured, pairwise precision 0.97-1.0 and recall 0.47-0.98): Infomap cuts
an identity whose faces form two dense groups joined by few edges. The faces of
two such parts still see each other: most faces of one part have a probable
neighbour in the other. That is what this step measures.

Score of two clusters A and B: the smaller of the two directions' mean, over one
side's faces, of each face's most probable kNN neighbour in the other side (0 for
a face with none). An identity cut in two scores high in both directions; a small
cluster hanging off a large one by one look-alike scores low from the large side.
The kNN graph is taken undirected (j in i's list or i in j's: the scorer gives
both ends the same probability), so the score is symmetric.

Agglomeration in rounds: every round scores all pairs of current clusters that
share an edge, and merges each pair that is the other's best partner with a score
at or above the level (ties to the smaller id); it stops when no pair reaches the
level. The best pair of a round is always mutual, so every round merges. Only
clusters of at least ``MIN_SIZE`` faces take part: one- and two-face clusters have
one or two neighbours to vote, and merging through them chains identities
(measured: one pass over all pairs above a level gave pairwise F as low as 0.08;
including them in the agglomeration cost LFW x SFace 0.017 BCubed F).

A face's best P into another cluster counts when it is at least ``MIN_P`` (below, it counts as no
neighbour there, 0): most kNN edges between clusters are impostors at P ~ 0.01, and keeping them would
hold 9-40 entries per face on the driver (1M planted faces, 48 per face: 3.4 GB more at its peak) for
terms that move a pair's score by less than MIN_P; with it, 0.55-3.2 per face on the test sets of the README
(and the same labels at every level measured but the lowest, 0.6, on two of them).

Everything is a function of the sets of (face, other cluster, best P) entries,
reduced with max and summed in a canonical order, so the result does not depend
on how the kNN rows were split into chunks.
"""

from __future__ import annotations

import numpy as np

from .components import canonical_labels, max_by_key

MIN_SIZE = 3
MIN_P = 0.05  # a cost bound, not a quality setting: see above
# the merge level's grid (P of the score above), from no merge (None) down; chosen on validation identities
MERGE_GRID = (None, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
# a level is taken only if no validation run loses more than this (pairwise or BCubed F) against no merge.
# Why 0.005 and not 0.01: at 0.01 the general model's 12 training worlds chose 0.75, and on 36 generated
# worlds its scorer never saw that level lost up to 0.020 pairwise F on two (both of identities of 2-30
# faces), twice its worst training world; at 0.005 they choose 0.85, which lost at most 0.006 on those 36
# worlds and nothing on any test split of the README
MERGE_WORST_LOSS = 0.005

# face (int32), other cluster (int32), best P (float32): 12 B an entry, held by the workers through the rounds
# (~10 entries per face on planted lists: int64 ids made the dedup workers' peak 4.3 GB at 10M faces)
Entries = tuple[np.ndarray, np.ndarray, np.ndarray]


def _max_by_pair(face: np.ndarray, other: np.ndarray, p: np.ndarray) -> Entries:
    """One entry per (face, other) with its largest P, sorted by (face, other)."""
    if len(face) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    width = np.int64(other.max()) + 1
    key, best = max_by_key(np.asarray(face, np.int64) * width + other, np.asarray(p, np.float32))  # ids < 2^31
    return (key // width).astype(np.int32), (key % width).astype(np.int32), best


def cross_entries(row0: int, index: np.ndarray, prob: np.ndarray, labels: np.ndarray, eligible: np.ndarray) -> Entries:
    """Entries of one row chunk: for each kNN edge (i, j) with P >= ``MIN_P`` between two different eligible
    clusters, both (i, cluster of j, P) and (j, cluster of i, P), each (face, cluster) pair once with its
    largest P.

    ``index``/``prob`` are rows ``row0 ..`` of ``knn/index`` and ``edges/prob``; ``labels`` the clusters of
    all faces; ``eligible`` per cluster id. Combine chunks with :func:`combine_entries`.
    """
    index = np.asarray(index)
    r, k = index.shape
    rows = np.repeat(np.arange(row0, row0 + r, dtype=np.int64), k)
    nb = index.reshape(-1).astype(np.int64, copy=False)
    p = np.asarray(prob, np.float32).reshape(-1)
    ok = (nb >= 0) & (p >= np.float32(MIN_P))
    rows, nb, p = rows[ok], nb[ok], p[ok]
    la, lb = labels[rows], labels[nb]
    keep = (la != lb) & eligible[la] & eligible[lb]
    rows, nb, p, la, lb = rows[keep], nb[keep], p[keep], la[keep], lb[keep]
    return _max_by_pair(np.concatenate([rows, nb]), np.concatenate([lb, la]), np.concatenate([p, p]))


def combine_entries(*parts: Entries) -> Entries:
    """The entries of several chunks as one set (max per pair; canonical order)."""
    if not parts:
        return _max_by_pair(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    return _max_by_pair(*(np.concatenate(x) for x in zip(*parts)))


def eligible_clusters(labels: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """Per cluster id of ``labels`` (0..C-1): whether it has at least ``min_size`` faces."""
    return np.bincount(labels) >= min_size if len(labels) else np.zeros(0, bool)


PairSums = tuple[np.ndarray, np.ndarray]  # key own * C + other (int64, ascending), sum of best P (float64)


def round_sums(entries: Entries, labels: np.ndarray, cur: np.ndarray) -> tuple[Entries, PairSums]:
    """One round's work on some faces' entries: the entries under the current clusters ``cur`` (original cluster
    -> current; pairs now inside one cluster dropped, a face's best P into a merged cluster the max of its
    parts'), and per (own current cluster, other) the sum over those faces of their best P.

    The sums are exact, so any split of the faces gives the same totals (:func:`combine_sums`): every P here
    is a float32 >= MIN_P > 2^-5, a multiple of 2^-28, and at most 1, so a sum over fewer than 2^25 faces (a
    cluster's) is a multiple of 2^-28 below 2^25: 53 bits, exact in float64 in any order.
    """
    face, other, p = entries
    other = cur[other]
    keep = cur[labels[face]] != other
    face, other, p = _max_by_pair(face[keep], other[keep], p[keep])
    c = np.int64(len(cur))
    uniq, inv = np.unique(cur[labels[face]] * c + other, return_inverse=True)
    sums = np.bincount(inv.reshape(-1), weights=p.astype(np.float64), minlength=len(uniq))
    return (face, other, p), (uniq, sums)


def combine_sums(*parts: PairSums) -> PairSums:
    """Several face ranges' :func:`round_sums` as one (sum per key; exact, so in any order)."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    uniq, inv = np.unique(np.concatenate([x[0] for x in parts]), return_inverse=True)
    return uniq, np.bincount(inv.reshape(-1), weights=np.concatenate([x[1] for x in parts]), minlength=len(uniq))


def pair_scores(sums: PairSums, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unordered pair (a < b) of clusters sharing an entry: min of the two directions' mean best P.

    ``sums``: :func:`combine_sums` (keys own * C + other, C = ``len(sizes)``); ``sizes`` per cluster.
    """
    uniq, total = sums
    c = np.int64(len(sizes))
    mean = total / sizes[uniq // c]
    a, b = uniq // c, uniq % c
    # each unordered pair's two directions; a direction with no entry scores 0
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pk = lo * c + hi
    pairs, pinv, count = np.unique(pk, return_inverse=True, return_counts=True)
    score = np.full(len(pairs), np.inf)
    np.minimum.at(score, pinv, mean)
    score[count < 2] = 0.0
    return pairs // c, pairs % c, score


def mutual_best(a: np.ndarray, b: np.ndarray, score: np.ndarray, level: float,
                n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (a < b) scoring >= ``level`` that are each other's best partner (highest score, ties to the
    smaller partner id): a matching, each cluster in at most one pair."""
    cand = score >= level
    a, b, score = a[cand], b[cand], score[cand]
    ends = np.concatenate([a, b])
    partner = np.concatenate([b, a])
    sc = np.concatenate([score, score])
    order = np.lexsort((partner, -sc, ends))
    ends, partner = ends[order], partner[order]
    first = np.ones(len(ends), bool)
    first[1:] = ends[1:] != ends[:-1]
    best = np.full(n_clusters, -1, np.int64)
    best[ends[first]] = partner[first]
    mutual = (best[a] == b) & (best[b] == a)
    return a[mutual], b[mutual]


class MergeRounds:
    """The rounds' bookkeeping, apart from where the entries live (one array here, or face ranges on several
    workers: :func:`facecluster.pipeline.stages.dedup.run_dedup`): feed each round's combined
    :func:`round_sums` to :meth:`step` until it returns False, then :meth:`labels`.

    Every round scores all pairs of current clusters that share an entry and merges each mutual best pair at or
    above the level; the best pair of a round is always mutual, so every round that has a pair at the level
    merges."""

    def __init__(self, labels: np.ndarray, level: float):
        self.labels0 = np.asarray(labels, np.int64)
        self.level = float(level)
        self.sizes = np.bincount(self.labels0).astype(np.int64) if len(self.labels0) else np.zeros(0, np.int64)
        self.cur = np.arange(len(self.sizes), dtype=np.int64)  # original cluster -> current cluster
        self.merges = self.rounds = 0

    def step(self, sums: PairSums) -> bool:
        """Merge this round's mutual best pairs; False when none reaches the level (no round done)."""
        if not len(sums[0]):
            return False
        a, b = mutual_best(*pair_scores(sums, self.sizes), self.level, len(self.sizes))
        if not len(a):
            return False
        step = np.arange(len(self.sizes), dtype=np.int64)
        step[b] = a  # a matching: each cluster in at most one pair, a < b
        self.cur = step[self.cur]
        self.sizes[a] += self.sizes[b]
        self.sizes[b] = 0
        self.merges += len(a)
        self.rounds += 1
        return True

    def labels(self) -> tuple[np.ndarray, dict]:
        """Canonical labels (0..C'-1 by smallest face) and {"merges", "rounds", "faces_in_merged"}."""
        labels = self.labels0
        out = canonical_labels(self.cur[labels]) if len(labels) else labels
        grown = int((np.bincount(out)[out] > np.bincount(labels)[labels]).sum()) if len(labels) else 0
        return out, {"merges": int(self.merges), "rounds": int(self.rounds), "faces_in_merged": grown}


def merge_clusters(labels: np.ndarray, entries: Entries, level: float) -> tuple[np.ndarray, dict]:
    """``labels`` (0..C-1) with clusters merged in rounds of mutual best partners scoring >= ``level``.

    ``entries``: :func:`combine_entries` of every chunk's :func:`cross_entries` for these labels (clusters
    of fewer than ``MIN_SIZE`` faces have none, so they never merge). Returns canonical labels (0..C'-1 by
    smallest face) and {"merges", "rounds", "faces_in_merged"} (faces of the clusters that merged).
    """
    rounds = MergeRounds(labels, level)
    while True:
        entries, sums = round_sums(entries, rounds.labels0, rounds.cur)
        if not rounds.step(sums):
            return rounds.labels()


def merge_by_affinity(index: np.ndarray, prob: np.ndarray, labels: np.ndarray, level: float | None,
                      min_size: int = MIN_SIZE) -> np.ndarray:
    """:func:`merge_clusters` on whole in-memory kNN lists (training, tests); ``level`` None: ``labels`` as they are."""
    labels = canonical_labels(np.asarray(labels, np.int64))
    if level is None or not len(labels):
        return labels
    entries = cross_entries(0, index, prob, labels, eligible_clusters(labels, min_size))
    return merge_clusters(labels, entries, level)[0]
