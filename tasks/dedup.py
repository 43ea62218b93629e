"""De-duplication of overlapping proposals (Algorithm 3) as a group-by argmax over faces.

Algorithm 3 sorts proposals by predicted IoU (descending) and gives each face to the
highest-ranked proposal containing it. Without IoU suppression that is, per face,
the argmax over the proposals containing it of the rank key

    (tier, -score, pid)      smallest wins

where tier 0 = the face is kept by its proposal, tier 1 = GCN-S pruned it there
(pruned memberships rank below every kept one). The label of a face is then

* ``2 * pid``      kept by proposal ``pid`` (its best kept proposal);
* ``2 * pid + 1``  only pruned memberships: it joins the *pruned part* of its
  best such proposal (the faces GCN-S removed from one proposal and that no
  proposal keeps form one cluster of their own, after all proposals);
* none             in no proposal: a singleton.

The argmax is associative and commutative, so partial results of any partition of
the (face, proposal) triples combine to the same winner: chunk-wise partial argmaxes,
then one reduce per face range. Cluster ids are finally numbered 0..C-1 in order of
each cluster's smallest face id (a canonical form: independent of partitioning).
"""

from __future__ import annotations

import numpy as np

Triples = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # face, tier (int8), score (float32), pid (int64)


def proposal_triples(offsets: np.ndarray, members: np.ndarray, scores: np.ndarray, keep: np.ndarray | None = None,
                     pid0: int = 0) -> Triples:
    """(face, tier, score, pid) of every membership of proposals ``pid0 ..`` (CSR slice).

    ``offsets`` are relative to ``members`` (``offsets[0] == 0``); ``keep`` is the
    per-member GCN-S mask aligned with ``members`` (None: all kept).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    pid = np.repeat(np.arange(pid0, pid0 + len(sizes), dtype=np.int64), sizes)
    members = np.asarray(members, dtype=np.int64)
    tier = np.zeros(len(members), np.int8) if keep is None else (~np.asarray(keep, bool)).astype(np.int8)
    score = np.repeat(np.asarray(scores, np.float32), sizes)
    return members, tier, score, pid


def argmax_by_face(*parts: Triples) -> Triples:
    """Per face, the winning triple (smallest (tier, -score, pid)); output sorted by face."""
    face = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    if not len(face):
        return np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.float32), np.zeros(0, np.int64)
    tier = np.concatenate([p[1] for p in parts])
    score = np.concatenate([p[2] for p in parts])
    pid = np.concatenate([p[3] for p in parts])
    # NaN scores rank last within their tier (a NaN must not win by comparing false)
    neg = np.where(np.isnan(score), np.float32(np.inf), -score)
    order = np.lexsort((pid, neg, tier, face))
    f = face[order]
    first = np.ones(len(f), dtype=bool)
    first[1:] = f[1:] != f[:-1]
    w = order[first]
    return face[w], tier[w], score[w], pid[w]


def split_by_face(t: tuple, bounds: np.ndarray) -> list[tuple]:
    """Split arrays aligned with a face array sorted ascending (the first: dedup's triples, the merge step's
    entries) into face ranges ``[bounds[i], bounds[i+1])``."""
    cut = np.searchsorted(t[0], bounds)
    return [tuple(a[cut[i]:cut[i + 1]] for a in t) for i in range(len(bounds) - 1)]


def range_keys(t: Triples, lo: int, hi: int) -> np.ndarray:
    """Cluster key of every face in ``[lo, hi)`` from its winning triple.

    Keys: ``2*pid`` (kept), ``2*pid+1`` (pruned part), ``-(face+1)`` (singleton).
    """
    keys = -(np.arange(lo, hi, dtype=np.int64) + 1)
    face, tier, _score, pid = t
    keys[face - lo] = 2 * pid + tier.astype(np.int64)
    return keys


def first_faces(keys: np.ndarray, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct key of a range with its smallest face id (input to the global numbering)."""
    u, idx = np.unique(keys, return_index=True)
    return u, idx.astype(np.int64) + lo


def global_numbering(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-range (key, first face) lists: sorted keys and their cluster id (by smallest face)."""
    keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    faces = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.lexsort((faces, keys))
    k, f = keys[order], faces[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    k, f = k[first], f[first]
    cid = np.empty(len(k), np.int64)
    cid[np.argsort(f, kind="stable")] = np.arange(len(k))
    return k, cid


def apply_numbering(keys: np.ndarray, table_keys: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Cluster ids of ``keys`` from the global table (sorted ``table_keys``)."""
    return table_ids[np.searchsorted(table_keys, keys)]


def dedup(n: int, offsets: np.ndarray, members: np.ndarray, scores: np.ndarray,
          keep: np.ndarray | None = None) -> np.ndarray:
    """In-memory group-by-argmax dedup: cluster id (0..C-1) of every face 0..n-1."""
    t = argmax_by_face(proposal_triples(offsets, members, scores, keep))
    keys = range_keys(t, 0, n)
    tk, tid = global_numbering([first_faces(keys, 0)])
    return apply_numbering(keys, tk, tid)


def dedup_sequential(n: int, offsets: np.ndarray, members: np.ndarray, scores: np.ndarray,
                     keep: np.ndarray | None = None) -> np.ndarray:
    """Reference: the paper's loop (proposals by score descending, ties by id; unclaimed faces only).

    Faces pruned by GCN-S are handled in a second pass in the same order (the
    pruned part of a proposal takes its still-unclaimed pruned faces); faces in
    no proposal are singletons. Clusters numbered by smallest face.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    keep = np.ones(len(members), bool) if keep is None else np.asarray(keep, bool)
    neg = np.where(np.isnan(scores), np.float32(np.inf), -scores)
    order = np.lexsort((np.arange(len(scores)), neg))
    label = np.full(n, -1, dtype=np.int64)
    for tier, want in ((0, True), (1, False)):
        for p in order:
            a, b = offsets[p], offsets[p + 1]
            for face, k in zip(members[a:b], keep[a:b]):
                if k == want and label[face] < 0:
                    label[face] = 2 * p + tier
    for face in range(n):
        if label[face] < 0:
            label[face] = -(face + 1)
    _, first, inv = np.unique(label, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv]
