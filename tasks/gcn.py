"""GCN-D (proposal IoU / IoP) and GCN-S (per-vertex membership) on CPU: inputs, batching, models.

A proposal P is a set of faces (sorted ids). Its graph is the kNN rows of its members
restricted to the members (A = I + those pairs, weight = cosine clipped at 0,
symmetrised, row-normalised); edges are sliced from the kNN rows when a batch is
built and never stored per proposal.

Why the inputs are not just the members' features (issue 5): the reference recipe
gave a constant predictor on disjoint identities because the true IoU of a proposal
is driven by how much of its identity lies *outside* it, which members-only inputs
cannot show, and raw features let the model memorise training identities. So every
vertex gets

* its feature relative to the proposal (``x - mean(P)``): identity-agnostic;
* boundary inputs from its kNN row: share of its k edges (and of its first 10) that
  leave P, the best outside vs best inside similarity, mean outside similarity,
  share of outside edges at least as strong as its mean inside edge;
* structure inputs: best / mean inside similarity, cosine to the proposal mean,
  coverage (inside neighbours / (|P| - 1)), log |P|, first-neighbour similarity;
* outside inputs, one set per proposal (the same on each of its vertices):
  ``|P| / (|P| + D)`` where D counts the *distinct* faces outside P that its members
  reach in their kNN rows: any of them, those in a first-10 neighbour, those reached
  by at least two members, and those at least as similar to a member as P's mean
  inside edge. Per-vertex inputs cannot tell 100 members pointing at the same 20
  outside faces (IoU <= 0.83) from 100 members pointing at 2,000 different ones; a
  distinct count can. Measured (test pairwise F of GCN-D, same training harness):
  built-in split 0.871 -> 0.890 (mean of 4 seeds), LFW halves 0.980 -> 0.986 (8 seeds);
* connectivity inputs, also one set per proposal: lambda_2 of the normalised Laplacian
  of its inside kNN graph, and lambda_2 * sqrt(|P|). Two complete identities merged
  into one proposal show nothing outside it, but they hang together by a few edges.
  Measured: on LFW a 52 + 17 merge (lambda_2 0.74 against >= 0.96 for every pure
  proposal of 50-100 faces) won dedup in 3 of 8 seeds; with these inputs in none,
  LFW GCN-D pairwise F 0.986 -> 0.992 (min 0.982 -> 0.991); built-in about the same.

Three batch layouts are provided: ``Padded`` (dense (B, n, n) adjacency per size
bucket), ``Packed`` (the same adjacency, node states of the real nodes only; used for
inference: fixed shapes make a proposal's output a function of the proposals sharing
its forward, see ``score_batch``) and ``Block`` (block-diagonal sparse adjacency with
segment pooling). All run the same module weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

BOUNDARY = ("in_share", "in_share10", "best_out", "out_minus_in", "mean_out", "out_strong")
STRUCTURE = ("best_in", "mean_in", "cos_mean", "coverage", "log_size", "sim0")
OUTSIDE = ("iou_est_any", "iou_est_top10", "iou_est_shared", "iou_est_strong")
CONNECTIVITY = ("lambda2", "lambda2_sqrt_size")
DEFAULT_SPEC = {"x": "mean", "boundary": True, "structure": True, "outside": True, "connectivity": True}
BUCKETS = (8, 16, 32, 64, 128, 256, 512)
PACKED_ROWS = 64  #: the packed layout's node rows are a multiple of this (see Packed)


def input_dim(dim: int, spec: dict | None = None) -> int:
    """Width of the node inputs for feature dimension ``dim`` and an input spec."""
    spec = {**DEFAULT_SPEC, **(spec or {})}
    w = 0 if spec["x"] == "none" else dim
    w += len(BOUNDARY) if spec["boundary"] else 0
    w += len(STRUCTURE) if spec["structure"] else 0
    w += len(OUTSIDE) if spec["outside"] else 0
    w += len(CONNECTIVITY) if spec["connectivity"] else 0
    if spec.get("weights") == "both":  # the weight-dependent inputs once more, from the cosine
        w += sum(len(g) for g, on in ((BOUNDARY, spec["boundary"]), (STRUCTURE, spec["structure"]),
                                      (OUTSIDE, spec["outside"])) if on)
    return w


@dataclass
class ProposalBatch:
    """Many proposals concatenated (numpy); node arrays are in member order.

    ``edges`` are (row, col, weight) of the row-normalised adjacency (self-loops
    included) in concatenated node indices; ``seed`` is each proposal's
    deterministic seed vertex (highest inside degree, then inside similarity
    sum, then smallest face id) as a concatenated node index.
    """

    sizes: np.ndarray
    members: np.ndarray
    x: np.ndarray
    edges: tuple
    seed: np.ndarray
    unit: np.ndarray = field(repr=False)  # members' unit features (GCN-S cosine to seed)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @property
    def seg(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.sizes), dtype=np.int64), self.sizes)


def build_batch(sizes: np.ndarray, members: np.ndarray, feats: np.ndarray, knn_idx: np.ndarray,
                knn_sim: np.ndarray, spec: dict | None = None, knn_cos: np.ndarray | None = None) -> ProposalBatch:
    """Node inputs and adjacency of a batch of proposals.

    Parameters
    ----------
    sizes : (B,) int
        Number of members of each proposal.
    members : (n,) int64
        Face ids, concatenated; each proposal's ids sorted ascending.
    feats : (n, d) float32
        Unit feature rows of ``members`` (same order).
    knn_idx, knn_sim : (n, k)
        kNN rows of ``members`` (sorted by similarity descending, self excluded,
        ``-1`` for missing neighbours).
    spec : dict, optional
        Input spec (``x``: "mean" | "raw" | "none", ``boundary``, ``structure``, ``outside``,
        ``connectivity``, ``weights``: "sim" | "prob" | "both").
        ``knn_sim`` holds the edge weights every input and the adjacency read: the
        cosine ("sim") or the learned P(same identity) ("prob", "both"). With "both",
        the boundary, structure and outside inputs are computed once more from
        ``knn_cos`` (the cosine rows) and appended.

    Returns
    -------
    ProposalBatch
    """
    spec = {**DEFAULT_SPEC, **(spec or {})}
    sizes = np.asarray(sizes, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    feats = np.asarray(feats, dtype=np.float32)
    knn_idx = np.asarray(knn_idx, dtype=np.int64)
    n, k = knn_idx.shape
    B = len(sizes)
    seg = np.repeat(np.arange(B, dtype=np.int64), sizes)
    big = int(max(members.max(initial=0), knn_idx.max(initial=0))) + 1
    mkey = seg * big + members  # ascending: seg ascending, members sorted inside
    # the n x k passes below write into their own arrays (a score task builds ~65k rows x k at a time)
    nkey = np.maximum(knn_idx, 0)
    nkey += (seg * big)[:, None]
    valid = knn_idx >= 0
    pos, inside = _inside_positions(members, seg, knn_idx, mkey, nkey, big)
    inside &= valid
    sim = np.where(valid, np.asarray(knn_sim, dtype=np.float32), np.float32(-1.0))

    # per-proposal mean feature (float64 segment sums: order-independent of the batch)
    starts = np.cumsum(sizes) - sizes
    mean = (_segment_sums(feats, sizes, starts) / sizes[:, None]).astype(np.float32)
    mnorm = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    cos_mean = np.einsum("ij,ij->i", feats, mnorm[seg])

    if spec["x"] not in ("mean", "raw", "none"):
        raise ValueError(f"input spec x must be 'mean', 'raw' or 'none', got {spec['x']!r}")
    runs = _outside_runs(nkey, valid & ~inside, big, min(10, k), B) if spec["outside"] else None
    del nkey
    weighted, s_in, n_in = _weighted_inputs(sim, knn_idx, inside, valid, seg, sizes, cos_mean, runs, spec)
    extra = []
    if spec.get("weights") == "both":
        if knn_cos is None:
            raise ValueError("input spec weights 'both' needs the cosine rows (knn_cos)")
        cos = np.where(valid, np.asarray(knn_cos, dtype=np.float32), np.float32(-1.0))
        extra = _weighted_inputs(cos, knn_idx, inside, valid, seg, sizes, cos_mean, runs, spec)[0]

    # adjacency: inside kNN pairs, both directions, weight max(cos, 0); duplicates -> max
    flat = np.flatnonzero(inside)  # 1-D takes: a 2-D fancy index (sim[r, c]) of these entries was 2-3x slower
    r = flat // k
    w_in = np.maximum(np.take(sim, flat), 0.0).astype(np.float32)
    rows, colsx, ws, conn = _inside_adjacency(r, np.take(pos, flat), w_in, sizes, starts, seg, spec["connectivity"])
    del flat, w_in
    # node inputs, column blocks in this order: feature (x), weighted inputs, connectivity, the cosine's
    # weighted inputs ("both"); written into one float32 array (was a concatenation per block)
    blocks = ([feats] if spec["x"] != "none" else []) + weighted + ([conn] if spec["connectivity"] else []) + extra
    x = np.empty((n, sum(b.shape[1] for b in blocks)), np.float32)
    at = 0
    for b in blocks:
        w = b.shape[1]
        if b is conn:
            x[:, at:at + w] = conn[seg]
        elif b is feats and spec["x"] == "mean":
            np.subtract(feats, mean[seg], out=x[:, at:at + w])
        else:
            x[:, at:at + w] = b  # float64 columns rounded to float32, as astype did
        at += w
    deg = np.bincount(rows, weights=ws, minlength=n)
    ws = (ws / deg[rows]).astype(np.float32)

    # deterministic seed: max inside degree, then inside similarity sum, then smallest id
    so = np.lexsort((members, -s_in, -n_in, seg))
    firsts = np.ones(n, dtype=bool)
    firsts[1:] = seg[so][1:] != seg[so][:-1]
    seed = so[firsts]
    return ProposalBatch(sizes=sizes, members=members, x=x, edges=(rows, colsx, ws), seed=seed, unit=feats)


# an id table costs 4 bytes per id up to the largest id of a build: used while that is at most this many times the
# build's kNN entries (the n x k int64 temporaries it holds anyway are 8 bytes per entry), a sorted search beyond
ID_TABLE_PER_ENTRY = 2


def _inside_positions(members, seg, knn_idx, mkey, nkey, big) -> tuple[np.ndarray, np.ndarray]:
    """Where each kNN entry's neighbour sits in the batch if it is a member of the row's own proposal.

    Returns ``pos`` ((n, k) int64: the member row of the neighbour in the same proposal; any value where it is not
    one) and ``inside`` ((n, k) bool; entries with id ``-1`` may be either: the caller masks them).
    ``mkey`` / ``nkey``: proposal * ``big`` + face id of the members (ascending) / the neighbours (``-1`` read as 0).

    Why a table: the sorted search of every entry's key among the members took 0.31 s of a 65k-row x 80 build
    (16 dependent, cache-missing steps per entry); a table from face id to member row is one gather (0.07 s).
    A face that is a member of two proposals of the build has no single row: its entries take the sorted search.
    The same positions either way (tested)."""
    n, k = knn_idx.shape
    if big > ID_TABLE_PER_ENTRY * max(n * k, 1) or n >= np.iinfo(np.int32).max:
        pos = np.searchsorted(mkey, nkey)
        np.minimum(pos, n - 1, out=pos)  # only the inside entries' positions are read later: those are < n already
        return pos, mkey[pos] == nkey
    rows = np.arange(n, dtype=np.int32)
    table = np.full(big, -1, np.int32)
    table[members] = rows
    shared = members[table[members] != rows]  # faces in two proposals (which row the table kept is unspecified)
    table[shared] = -2
    pos = table[np.maximum(knn_idx, 0)].astype(np.int64)
    inside = seg[np.maximum(pos, 0)] == seg[:, None]
    inside &= pos >= 0
    if len(shared):
        r, c = np.nonzero(pos == -2)
        p = np.minimum(np.searchsorted(mkey, nkey[r, c]), n - 1)
        pos[r, c] = p
        inside[r, c] = mkey[p] == nkey[r, c]
    return pos, inside


def _weighted_inputs(sim, knn_idx, inside, valid, seg, sizes, cos_mean, runs, spec) -> tuple[list, np.ndarray, np.ndarray]:
    """Boundary, structure and outside columns from one edge-weight array; also the inside sums and counts.

    ``runs``: ``_outside_runs`` of the batch (None without outside inputs).
    """
    n, k = knn_idx.shape
    B = len(sizes)
    n_in = inside.sum(1)
    n_valid = np.maximum(valid.sum(1), 1)
    s_in = np.where(inside, sim, 0.0).sum(1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_in = np.where(n_in > 0, s_in / np.maximum(n_in, 1), 0.0)
        best_in = np.where(n_in > 0, np.where(inside, sim, -np.inf).max(1), 0.0)
        out = valid & ~inside
        n_out = out.sum(1)
        last = sim[np.arange(n), np.maximum(valid.sum(1) - 1, 0)]
        # no neighbour outside within k: the best outside similarity is at most the k-th one
        best_out = np.where(n_out > 0, np.where(out, sim, -np.inf).max(1), last)
        mean_out = np.where(n_out > 0, np.where(out, sim, 0.0).sum(1, dtype=np.float64) / np.maximum(n_out, 1), last)
        out_strong = (out & (sim >= mean_in[:, None])).sum(1) / n_valid
    k10 = min(10, k)
    in_share10 = inside[:, :k10].sum(1) / np.maximum(valid[:, :k10].sum(1), 1)
    cols = []
    if spec["boundary"]:
        cols.append(np.stack([n_in / n_valid, in_share10, best_out, best_out - best_in, mean_out, out_strong], 1))
    if spec["structure"]:
        size_n = sizes[seg]
        cols.append(np.stack([best_in, mean_in, cos_mean, n_in / np.maximum(size_n - 1, 1),
                              np.log(size_n) / math.log(512.0), sim[:, 0]], 1))
    if spec["outside"]:
        mean_in_p = np.bincount(seg, weights=s_in, minlength=B) / np.maximum(np.bincount(seg, weights=n_in, minlength=B), 1)
        cols.append(_outside_estimates(runs, sim, sizes, mean_in_p)[seg])
    return cols, s_in, n_in


def _outside_runs(nkey, out, big, k10, B) -> tuple:
    """The (proposal, outside face) pairs of a batch, grouped: what ``_outside_estimates`` shares between weights.

    ``nkey``: (n, k) proposal * big + neighbour id of every kNN entry. Returns the
    pairs' kNN entries (flat index into the (n, k) arrays, and the column ``c``) in grouped order, the start of each group
    ``first``, its proposal ``p`` and the three weight-free counts ((B, 3): distinct
    outside faces, those in a first-10 neighbour, those reached twice). Grouped by one
    sort per batch of (key, position) packed in an int64 where they fit (a plain
    sort; an argsort of the keys took 4x as long), in any order within a group:
    only maxima, any-of and counts are read.
    """
    k = nkey.shape[1]
    flat = np.flatnonzero(out)
    key = nkey.ravel()[flat]  # (proposal, outside face)
    shift = max(1, int(out.size).bit_length())
    if len(key) and int(key.max()).bit_length() + shift <= 63:
        packed = np.sort((key << shift) | flat)
        key, flat = packed >> shift, packed & ((1 << shift) - 1)
    else:
        order = np.argsort(key)
        key, flat = key[order], flat[order]
    c = flat % k
    d = np.zeros((B, 3))
    if not len(key):
        return flat, c, np.zeros(0, np.int64), np.zeros(0, np.int64), d
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # runs of one (proposal, face) in the sorted keys
    count = np.diff(np.r_[first, len(key)])
    p = key[first] // big
    d[:, 0] = np.bincount(p, minlength=B)
    d[:, 1] = np.bincount(p, weights=np.logical_or.reduceat(c < k10, first), minlength=B)
    d[:, 2] = np.bincount(p, weights=count >= 2, minlength=B)
    return flat, c, first, p, d


def _outside_estimates(runs, sim, sizes, mean_in) -> np.ndarray:
    """(B, 4) ``|P| / (|P| + D)`` for the four counts D of distinct outside faces (see ``OUTSIDE``).

    Only P's own members' rows enter, so a proposal's values do not depend on the batch.
    """
    flat, _, first, p, d3 = runs
    B = len(sizes)
    d = np.zeros((B, 4))
    d[:, :3] = d3
    if len(first):
        best = np.maximum.reduceat(np.take(sim, flat), first)  # the outside face's best similarity to a member
        d[:, 3] = np.bincount(p, weights=best >= mean_in[p], minlength=B)
    size = sizes.astype(np.float64)[:, None]
    return (size / (size + d)).astype(np.float32)


def _segment_sums(values: np.ndarray, sizes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(B, d) float64 sums of each proposal's rows, added in member order.

    The order ``np.add.at`` adds in (so the bits are those of earlier releases), one
    vectorised step per member position over the proposals that long: O(n d), where
    ``np.add.at`` took 1.6 s on 177k x 256 rows (1M store, one score task).
    """
    out = np.zeros((len(sizes), values.shape[1]), dtype=np.float64)
    order = np.argsort(-sizes, kind="stable")
    longest = -np.sort(-sizes)
    for j in range(int(longest[0]) if len(sizes) else 0):
        act = order[:np.searchsorted(-longest, -j, side="left")]  # the proposals with more than j members
        out[act] += values[starts[act] + j]
    return out


def _inside_adjacency(r, col, w, sizes, starts, seg, connectivity: bool, cells: int = 1 << 23):
    """Deduplicated inside adjacency of a batch, and each proposal's algebraic connectivity.

    ``(r, col, w)``: the inside kNN pairs (``r`` ascending) and weights max(sim, 0).
    Returns ``rows, cols, ws``: those pairs in both directions plus self loops of weight
    1, one entry per (row, col) holding the largest weight, sorted by (row, col); and
    ``conn`` ((B, 2) float32, see below; ones when ``connectivity`` is False).

    Why dense blocks: the pairs are scattered into each proposal's |P| x |P| block (a
    chunk of proposals with at most ``cells`` block entries at a time), so the
    maximum per pair is a scatter and the (row, col) order is the blocks' memory order,
    where a lexsort of the pairs took 8.4 s of a 20 s score task (1M store, 9.5M
    pairs). The padded scorer and ``lambda_2`` pay |P|^2 per proposal anyway.

    ``conn``: lambda_2 of the normalised Laplacian I - D^-1/2 A D^-1/2 of each
    proposal's inside graph (A: the block without self loops), and lambda_2 * sqrt(|P|).
    Two identities joined by a few edges have a small one. Proposals under 3 faces get
    (1, 1); one with a vertex without inside weight gets (0, 0). Proposals of one size
    share one stacked ``eigvalsh`` call (LAPACK runs on each matrix alone, one thread:
    the same bits as one call per proposal, whatever the batch or the worker's threads).
    """
    from threadpoolctl import threadpool_limits

    B = len(sizes)
    sizes = sizes.astype(np.int64)
    n = int(sizes.sum())
    m2 = np.cumsum(sizes * sizes)
    ebound = np.searchsorted(r, np.append(starts, n)).astype(np.int64)
    conn = np.ones((B, 2), np.float64)
    out_r, out_c, out_w = [], [], []
    a = 0
    while a < B:
        before = m2[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(m2, before + cells, side="right")))
        boff = np.concatenate([[0], m2[a:b] - before])
        block = np.full(int(boff[-1]), -1.0, np.float32)  # -1: no edge
        e0, e1 = ebound[a], ebound[b]
        per = np.diff(ebound[a:b + 1])  # the pairs are grouped by proposal: repeats, not gathers
        lr, lc = r[e0:e1] - np.repeat(starts[a:b], per), col[e0:e1] - np.repeat(starts[a:b], per)
        base, m = np.repeat(boff[:-1], per), np.repeat(sizes[a:b], per)
        np.maximum.at(block, base + lr * m + lc, w[e0:e1])  # forward first: ties keep its entry
        np.maximum.at(block, base + lc * m + lr, w[e0:e1])
        ln = np.arange(int(sizes[a:b].sum())) - np.repeat(starts[a:b] - starts[a], sizes[a:b])
        np.maximum.at(block, np.repeat(boff[:-1], sizes[a:b]) + ln * (np.repeat(sizes[a:b], sizes[a:b]) + 1),
                      np.float32(1.0))
        present = block >= 0
        at = np.flatnonzero(present)
        cnt = np.add.reduceat(present, boff[:-1], dtype=np.int64)  # every block has >= 1 cell
        rem = at - np.repeat(boff[:-1], cnt)
        mm = np.repeat(sizes[a:b], cnt)
        lr = (rem / mm).astype(np.int64)  # exact: rem < 2^53 and a quotient is never within 1/|P| of the next integer
        s0 = np.repeat(starts[a:b], cnt)
        out_r.append(s0 + lr)
        out_c.append(s0 + rem - lr * mm)
        out_w.append(block[at])
        if connectivity:
            with threadpool_limits(1, user_api="blas"):
                _block_connectivity(block, boff, sizes[a:b], conn[a:b])
        a = b
    cat = (lambda parts, dt: (parts[0] if len(parts) == 1 else np.concatenate(parts)) if parts else np.zeros(0, dt))
    return cat(out_r, np.int64), cat(out_c, np.int64), cat(out_w, np.float32), conn.astype(np.float32)


# proposals of at least this many faces get lambda_2 from Lanczos, not a full eigvalsh. Measured on the 1M
# built-in run's proposals (one thread): eigvalsh 0.32 s for 40 of 300-525 faces against Lanczos' 52.7 s,
# 0.02-0.06 s for 702-1,029 faces against 12-40 s (where lambda_2 is near 0, as for two identities
# joined, ARPACK does not converge and the full solver answered anyway); it was 256, and the last score
# task at 1M spent 67 of its 91 CPU-s there.
SPARSE_LAMBDA2_MIN = 4096
LANCZOS_MAXITER = 1000  # restarts before the full solver answers (a near-zero lambda_2 never converged)


def _block_connectivity(block, boff, sizes, out) -> None:
    """Fill ``out`` ((b, 2) float64) with lambda_2, lambda_2 * sqrt(|P|) of proposals of size >= 3 (see above)."""
    for m in np.unique(sizes[sizes >= 3]):
        m = int(m)
        ps = np.flatnonzero(sizes == m)
        A = block[boff[ps][:, None] + np.arange(m * m)].reshape(len(ps), m, m)
        A = np.where(A >= 0, A, np.float32(0.0)).astype(np.float64)
        A[:, np.arange(m), np.arange(m)] = 0.0
        d = A.sum(2)
        ok = (d > 0).all(1)
        out[ps[~ok]] = 0.0
        if not ok.any():
            continue
        di = 1.0 / np.sqrt(d[ok])
        if m >= SPARSE_LAMBDA2_MIN:
            lam2 = np.array([_lambda2_lanczos(a * x[:, None] * x[None, :]) for a, x in zip(A[ok], di)])
        else:
            lam2 = np.linalg.eigvalsh(np.eye(m) - di[:, :, None] * A[ok] * di[:, None, :])[:, 1]
        out[ps[ok], 0] = lam2
        out[ps[ok], 1] = lam2 * math.sqrt(m)


def _lambda2_lanczos(na: np.ndarray) -> float:
    """lambda_2 of I - ``na`` (``na`` = D^-1/2 A D^-1/2, dense, symmetric) as 1 - the second largest eigenvalue of
    ``na``, by ARPACK's Lanczos on its sparse form (a seeded start vector: the same result every run).

    Why: the full ``eigvalsh`` is O(|P|^3) and took 165 of a 247 CPU-s score task on planted lists (proposals of
    up to 1,976 faces); Lanczos needs a few hundred products with a matrix of |P| x k entries. Measured on the
    40 largest such proposals (265-1,960 faces): 91 s against 2.9 s, every lambda_2 equal after the float32
    rounding the inputs get. Where ARPACK does not converge the full solver answers.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    m = len(na)
    try:
        # a seeded random start: a symmetric one (all ones) never sees an antisymmetric eigenvector (a chain's
        # lambda_2), and the same seed every call keeps the result a function of the proposal
        v0 = np.random.default_rng(m).standard_normal(m)
        mu = eigsh(csr_matrix(na), k=2, which="LA", v0=v0, tol=0, ncv=min(m - 1, 40), maxiter=LANCZOS_MAXITER,
                   return_eigenvectors=False)
        return float(1.0 - mu.min())
    except ArpackNoConvergence:
        return float(np.linalg.eigvalsh(np.eye(m) - na)[1])


def seed_inputs(batch: ProposalBatch, seed: np.ndarray) -> np.ndarray:
    """GCN-S extra node inputs for seed vertices ``seed`` (concatenated indices): indicator, cos to seed."""
    seg = batch.seg
    ind = np.zeros(len(seg), np.float32)
    ind[seed] = 1.0
    cos = np.einsum("ij,ij->i", batch.unit, batch.unit[seed[seg]]).astype(np.float32)
    return np.stack([ind, cos], 1)


# -- batch layouts (torch) ---------------------------------------------------------
def padded_adjacency(batch: ProposalBatch, n_pad: int | None = None, n_prop: int | None = None):
    """``(seg, local, A, M)``: each node's proposal and place in it, the (n_prop, n_pad, n_pad) adjacency and the
    (n_prop, n_pad) node mask of a batch padded to ``n_pad`` nodes and ``n_prop`` proposals (default: its own)."""
    n_pad = int(n_pad or batch.sizes.max(initial=1))
    n_prop = int(n_prop or len(batch.sizes))
    seg = batch.seg
    local = np.arange(len(seg)) - batch.starts[seg]
    r, c, w = batch.edges
    A = torch.zeros(n_prop, n_pad, n_pad)
    A[seg[r], local[r], local[c]] = torch.from_numpy(w)
    M = torch.zeros(n_prop, n_pad, dtype=torch.bool)
    M[seg, local] = True
    return seg, local, A, M


class Padded:
    """Dense layout: x (B, n, f), adjacency (B, n, n), mask (B, n)."""

    def __init__(self, x, adj, mask):
        self.x, self.adj, self.mask = x, adj, mask
        self.count = mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)

    @classmethod
    def from_batch(cls, batch: ProposalBatch, x: np.ndarray | None = None, n_pad: int | None = None,
                   n_prop: int | None = None) -> "Padded":
        """``n_pad``/``n_prop``: pad nodes / proposals to fixed sizes (extra proposals are empty)."""
        x = batch.x if x is None else x
        seg, local, A, M = padded_adjacency(batch, n_pad, n_prop)
        X = torch.zeros(*M.shape, x.shape[1])
        X[seg, local] = torch.from_numpy(x)
        return cls(X, A, M)

    def agg(self, h):
        return torch.bmm(self.adj, h)

    def drop(self, h, p):
        keep = torch.bernoulli(torch.full(h.shape[:2] + (1,), 1.0 - p))
        return h * keep / (1.0 - p)

    def pool(self, h):
        m = self.mask.unsqueeze(-1)
        mean = (h * m).sum(1) / self.count
        mx = h.masked_fill(~m, float("-inf")).amax(1)
        mx = torch.where(self.mask.any(1, keepdim=True), mx, torch.zeros_like(mx))  # empty filler proposals
        return torch.cat([mean, mx], 1)

    def broadcast(self, g):
        return g.unsqueeze(1).expand(-1, self.x.shape[1], -1)

    def nodes(self, h):
        return h[self.mask]


class Packed(Padded):
    """Inference layout: the dense (B, n, n) adjacency of :class:`Padded`, the node states packed: the real nodes in
    batch order, then zero rows up to a multiple of ``PACKED_ROWS``. The linear maps run on those rows; the
    aggregation scatters the real ones into the padded shape, multiplies by the adjacency and gathers back.

    Why: proposals are padded to their size bucket, and 1.67x as many rows as real nodes went through every
    linear map at 1M faces (8.79M padded rows for 5.28M members). A real node's state is the same as in
    :class:`Padded` (a padded row never reaches a real one: its adjacency columns are 0, and the pooling masks
    it); a linear map's row does not depend on the other rows of its call once the call has a few rows (torch's
    CPU GEMM answered calls of 1-3 rows through another path, whose last bits differ: hence the multiple, tested
    against :class:`Padded`). Inference only (no dropout)."""

    def __init__(self, x, adj, mask, flat):
        super().__init__(x, adj, mask)
        self.flat = flat
        self.seg = torch.div(flat, mask.shape[1], rounding_mode="floor")
        self.n = len(flat)

    @classmethod
    def from_batch(cls, batch: ProposalBatch, x: np.ndarray | None = None, n_pad: int | None = None,
                   n_prop: int | None = None) -> "Packed":
        x = batch.x if x is None else x
        seg, local, A, M = padded_adjacency(batch, n_pad, n_prop)
        X = torch.zeros(-(-max(len(seg), 1) // PACKED_ROWS) * PACKED_ROWS, x.shape[1])
        X[:len(seg)] = torch.from_numpy(x)
        return cls(X, A, M, torch.from_numpy(seg * M.shape[1] + local))

    def _padded(self, h):
        out = h.new_zeros(self.mask.numel(), h.shape[1])
        out[self.flat] = h[:self.n]
        return out.view(*self.mask.shape, h.shape[1])

    def agg(self, h):
        out = torch.zeros_like(h)
        out[:self.n] = torch.bmm(self.adj, self._padded(h)).view(-1, h.shape[1])[self.flat]
        return out

    def drop(self, h, p):
        raise NotImplementedError("the packed layout is for inference; train with the padded or block layout")

    def pool(self, h):
        return super().pool(self._padded(h))

    def broadcast(self, g):
        out = g.new_zeros(len(self.x), g.shape[1])
        out[:self.n] = g[self.seg]
        return out

    def nodes(self, h):
        return h[:self.n]


class Block:
    """Block-diagonal layout: x (n, f), sparse adjacency (n, n), segment ids (n,)."""

    def __init__(self, x, adj, seg, n_prop):
        self.x, self.adj, self.seg, self.n_prop = x, adj, seg, n_prop
        self.count = torch.bincount(seg, minlength=n_prop).clamp(min=1).to(x.dtype).unsqueeze(1)

    @classmethod
    def from_batch(cls, batch: ProposalBatch, x: np.ndarray | None = None) -> "Block":
        x = batch.x if x is None else x
        r, c, w = batch.edges
        n = len(batch.members)
        idx = torch.from_numpy(np.stack([r, c]).astype(np.int64))
        with warnings.catch_warnings():  # torch's "sparse CSR is beta" / invariant-check notices
            warnings.simplefilter("ignore", UserWarning)
            A = torch.sparse_coo_tensor(idx, torch.from_numpy(w), (n, n)).coalesce().to_sparse_csr()
        return cls(torch.from_numpy(np.ascontiguousarray(x)), A, torch.from_numpy(batch.seg), len(batch.sizes))

    def agg(self, h):
        return self.adj @ h

    def drop(self, h, p):
        keep = torch.bernoulli(torch.full((h.shape[0], 1), 1.0 - p))
        return h * keep / (1.0 - p)

    def pool(self, h):
        idx = self.seg.unsqueeze(1).expand_as(h)
        mean = torch.zeros(self.n_prop, h.shape[1]).index_add_(0, self.seg, h) / self.count
        mx = torch.zeros(self.n_prop, h.shape[1]).scatter_reduce_(0, idx, h, "amax", include_self=False)
        return torch.cat([mean, mx], 1)

    def broadcast(self, g):
        return g[self.seg]

    def nodes(self, h):
        return h


# -- models ----------------------------------------------------------------------
class GraphConv(nn.Module):
    """H <- ReLU(H W_self + Â H W_nb + b): the vertex keeps its own state beside the neighbourhood mean.

    Equal to ``[H, Â H] W``, but the (narrow) projection is aggregated instead of
    the (wide) input: Â(H W) costs n² x dout instead of n² x din per proposal.
    """

    def __init__(self, din: int, dout: int):
        super().__init__()
        self.self_lin = nn.Linear(din, dout)
        self.nb_lin = nn.Linear(din, dout, bias=False)

    def forward(self, h, g):
        return torch.relu(self.self_lin(h) + g.agg(self.nb_lin(h)))


class Trunk(nn.Module):
    def __init__(self, in_dim: int, hidden, dropout: float):
        super().__init__()
        dims = [in_dim, *hidden]
        self.convs = nn.ModuleList(GraphConv(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = float(dropout)

    def forward(self, h, g):
        for i, conv in enumerate(self.convs):
            if self.training and self.dropout > 0 and i > 0:  # whole node rows dropped
                h = g.drop(h, self.dropout)
            h = conv(h, g)
        return h


class GCND(nn.Module):
    """Proposal scorer: trunk, mean||max pooling over nodes, heads for IoU and IoP (sigmoid)."""

    def __init__(self, in_dim: int, hidden=(512, 64), dropout: float = 0.5):
        super().__init__()
        self.trunk = Trunk(in_dim, hidden, dropout)
        self.head = nn.Sequential(nn.Linear(2 * hidden[-1], hidden[-1]), nn.ReLU(), nn.Linear(hidden[-1], 2))

    def forward(self, g) -> torch.Tensor:
        """(B, 2) = sigmoid([IoU, IoP]) per proposal."""
        h = self.trunk(g.x, g)
        return torch.sigmoid(self.head(g.pool(h)))


class GCNDEnsemble(nn.Module):
    """GCN-D models averaged: member i was trained on its own identity split and seed.

    Why: on LFW the test pairwise F of single GCN-D models trained with different
    seeds ranged over 0.972-0.990 (the order of a few nested proposals of large
    identities decides it); the average of 4 members ranks them more reliably.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, g) -> torch.Tensor:
        """(B, 2): the members' mean prediction."""
        return torch.stack([m(g) for m in self.members]).mean(0)


class GCNS(nn.Module):
    """Proposal segmenter: input ‖ seed inputs, per-node 2-way log-probabilities."""

    def __init__(self, in_dim: int, hidden=(512, 64), dropout: float = 0.5):
        super().__init__()
        self.trunk = Trunk(in_dim, hidden, dropout)
        h = hidden[-1]
        self.head = nn.Sequential(nn.Linear(h + 2 * h, h), nn.ReLU(), nn.Linear(h, 2))

    def forward(self, g) -> torch.Tensor:
        """Log-probabilities (nodes, 2) in concatenated node order."""
        h = self.trunk(g.x, g)
        z = torch.cat([h, g.broadcast(g.pool(h))], -1)
        return torch.log_softmax(self.head(g.nodes(z)), -1)


# -- deterministic inference ---------------------------------------------------------
def bucket_of(size: int) -> int:
    for b in BUCKETS:
        if size <= b:
            return b
    return int(math.ceil(size / 256) * 256)


def props_per_forward(n_pad: int, node_budget: int = 4096) -> int:
    """Fixed number of proposals per forward call for a bucket (so shapes never vary)."""
    return max(1, node_budget // n_pad)


def _edge_bounds(rows: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """(B+1,) offsets of each proposal's edges, given edges sorted by row and its first node ``starts``."""
    return np.searchsorted(rows, np.append(starts, n)).astype(np.int64)


def edge_offsets(batch: ProposalBatch) -> np.ndarray:
    """(B+1,) offsets of each proposal's edges (edges are sorted by row, rows grouped by proposal)."""
    return _edge_bounds(batch.edges[0], batch.starts, len(batch.members))


def subbatch(batch: ProposalBatch, idx: np.ndarray, eoff: np.ndarray | None = None) -> ProposalBatch:
    """Proposals ``idx`` of ``batch`` (in that order) as their own batch (cost O(their nodes + edges))."""
    idx = np.asarray(idx, dtype=np.int64)
    starts, sizes = batch.starts, batch.sizes
    eoff = edge_offsets(batch) if eoff is None else eoff
    new_sizes = sizes[idx]
    new_starts = np.concatenate([[0], np.cumsum(new_sizes)[:-1]]).astype(np.int64)
    node_shift = np.repeat(starts[idx] - new_starts, new_sizes)
    nodes = np.arange(int(new_sizes.sum()), dtype=np.int64) + node_shift
    ne = eoff[idx + 1] - eoff[idx]
    e_new_starts = np.concatenate([[0], np.cumsum(ne)[:-1]]).astype(np.int64)
    eidx = np.arange(int(ne.sum()), dtype=np.int64) + np.repeat(eoff[idx] - e_new_starts, ne)
    shift = np.repeat(starts[idx] - new_starts, ne)
    r, c, w = batch.edges
    seed = new_starts + (batch.seed[idx] - starts[idx])
    return ProposalBatch(sizes=new_sizes, members=batch.members[nodes], x=batch.x[nodes],
                         edges=(r[eidx] - shift, c[eidx] - shift, w[eidx]), seed=seed, unit=batch.unit[nodes])


def concat_batches(parts: list[ProposalBatch]) -> ProposalBatch:
    """One batch from several (node indices shifted)."""
    shifts = np.concatenate([[0], np.cumsum([len(p.members) for p in parts])[:-1]]).astype(np.int64)
    return ProposalBatch(
        sizes=np.concatenate([p.sizes for p in parts]), members=np.concatenate([p.members for p in parts]),
        x=np.concatenate([p.x for p in parts]),
        edges=tuple(np.concatenate([p.edges[j] + (s if j < 2 else 0) for p, s in zip(parts, shifts)]) for j in range(3)),
        seed=np.concatenate([p.seed + s for p, s in zip(parts, shifts)]), unit=np.concatenate([p.unit for p in parts]))


@torch.no_grad()
def score_batch(model_d: GCND, batch: ProposalBatch, model_s: GCNS | None = None, iop_range=(0.3, 0.7),
                keep_prob: float = 0.5, node_budget: int = 4096) -> dict[str, np.ndarray]:
    """Predicted IoU/IoP of every proposal, and GCN-S membership where IoP is in ``iop_range``.

    Proposals are grouped by size bucket and run through forward calls of fixed adjacency
    shape (``props_per_forward`` proposals x bucket nodes, in batch order, empty proposals as
    filler; the linear maps on the real nodes, :class:`Packed`). A proposal's outputs are bitwise a function of its forward's proposals and
    its slot there, not of the rest of ``batch``: the slot can change the last bit
    (measured at 1M faces with the 64 -> 2 head: 1 proposal in 4,096 moved by one ulp
    when its batch changed), so callers that need bits independent of the batching fix
    the batches (the score stage scores fixed blocks of proposals).

    Returns
    -------
    dict
        ``iou``, ``iop`` (B float32); ``keep`` (n bool, per member; all True where
        GCN-S did not run); ``segmented`` (B bool: GCN-S ran); ``p_member`` (n float32,
        GCN-S probability of membership, NaN where it did not run).
    """
    model_d.eval()
    B = len(batch.sizes)
    iou = np.zeros(B, np.float32)
    iop = np.zeros(B, np.float32)
    keep = np.ones(len(batch.members), dtype=bool)
    p_mem = np.full(len(batch.members), np.nan, dtype=np.float32)
    buckets = np.array([bucket_of(int(s)) for s in batch.sizes], dtype=np.int64)
    eoff = edge_offsets(batch)
    groups = []
    for b in np.unique(buckets):
        ids = np.flatnonzero(buckets == b)
        per = props_per_forward(int(b), node_budget)
        for i in range(0, len(ids), per):
            groups.append((int(b), per, ids[i:i + per]))
    for n_pad, per, ids in groups:
        sub = subbatch(batch, ids, eoff)
        out = model_d(Packed.from_batch(sub, n_pad=n_pad, n_prop=per))[: len(ids)].numpy()
        iou[ids], iop[ids] = out[:, 0], out[:, 1]
    segmented = (iop >= iop_range[0]) & (iop <= iop_range[1])
    if model_s is not None and segmented.any():
        model_s.eval()
        starts = batch.starts
        for n_pad, per, ids in groups:
            ids = ids[segmented[ids]]
            if not len(ids):
                continue
            sub = subbatch(batch, ids, eoff)
            xs = np.concatenate([sub.x, seed_inputs(sub, sub.seed)], 1)
            logp = model_s(Packed.from_batch(sub, x=xs, n_pad=n_pad, n_prop=per)).numpy()
            p_member = np.exp(logp[: len(sub.members), 1])
            k = p_member > keep_prob
            k[sub.seed] = True  # the seed defines the identity: never pruned
            nodes = np.concatenate([np.arange(starts[i], starts[i] + batch.sizes[i]) for i in ids])
            keep[nodes] = k
            p_mem[nodes] = p_member
    return {"iou": iou, "iop": iop, "keep": keep, "segmented": segmented, "p_member": p_mem}


# -- training ----------------------------------------------------------------------
def build_batches(offsets: np.ndarray, members: np.ndarray, rows_of, spec: dict | None = None,
                  chunk: int = 2000) -> ProposalBatch:
    """Build one batch for all proposals of a CSR, ``chunk`` proposals at a time.

    ``rows_of(ids)`` returns ``(feats, knn_idx, knn_sim)`` for an array of face ids, plus the
    cosine rows as a fourth item for ``weights = "both"`` (the caller decides where rows
    come from: memory or a store).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    parts = []
    for a in range(0, len(offsets) - 1, chunk):
        b = min(a + chunk, len(offsets) - 1)
        mem = np.asarray(members[offsets[a]:offsets[b]], dtype=np.int64)
        rows = rows_of(mem)
        parts.append(build_batch(np.diff(offsets[a:b + 1]), mem, *rows[:3], spec, knn_cos=rows[3] if len(rows) > 3 else None))
    return concat_batches(parts)


def spearman(a, b) -> float:
    """Spearman rank correlation of two score vectors (0.0 when fewer than 3 values or either is constant)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _batches(ids: np.ndarray, sizes: np.ndarray, batch_size: int, rng: np.random.Generator, layout: str):
    """Training mini-batches: random for the block layout; size-sorted chunks (then shuffled) for padded."""
    ids = rng.permutation(ids)
    if layout == "padded":  # little padding waste: neighbours in size share a batch
        ids = ids[np.argsort(sizes[ids], kind="stable")]
        chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        return [chunks[j] for j in rng.permutation(len(chunks))]
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


def _layout(sub: ProposalBatch, layout: str, x=None):
    return Padded.from_batch(sub, x=x) if layout == "padded" else Block.from_batch(sub, x=x)


@torch.no_grad()
def predict_d(model: GCND, batch: ProposalBatch, ids: np.ndarray, eoff=None, layout: str = "block",
              per: int = 256) -> np.ndarray:
    """(len(ids), 2) predictions (eval mode; for validation, not the deterministic scorer)."""
    model.eval()
    out = [model(_layout(subbatch(batch, ids[i:i + per], eoff), layout)).numpy() for i in range(0, len(ids), per)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def fit_gcnd(batch: ProposalBatch, targets: np.ndarray, train_ids: np.ndarray, val_ids: np.ndarray,
             hidden=(512, 64), dropout: float = 0.5, epochs: int = 30, lr: float = 1e-3, batch_size: int = 32,
             weight_decay: float = 1e-4, seed: int = 0, layout: str = "block", log=None, size_weight: float = 0.0):
    """Train GCN-D (IoU, IoP heads, MSE) and keep the epoch with the best validation Spearman(IoU).

    ``size_weight``: each proposal's squared error is weighted by ``size ** size_weight``
    (normalised to mean 1 over the training proposals). Pairwise F is dominated by
    large identities, and unweighted MSE, fitted mostly on the many small
    proposals, under-predicts the IoU of large ones (measured on the synthetic
    test split: bias -0.07 at 50-200 faces, -0.13 above 200), so dedup prefers
    their fragments.

    Returns
    -------
    model : GCND (best epoch's weights, eval mode)
    history : list of per-epoch dicts (loss, val_mse, val_spearman_iou, val_spearman_iop)
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GCND(batch.x.shape[1], tuple(hidden), dropout)
    eoff = edge_offsets(batch)
    y = torch.from_numpy(np.asarray(targets, np.float32))
    wts = batch.sizes.astype(np.float64) ** float(size_weight)
    wts = torch.from_numpy((wts / max(wts[np.asarray(train_ids, np.int64)].mean(), 1e-12)).astype(np.float32))

    def batch_loss(ids):
        pred = model(_layout(subbatch(batch, ids, eoff), layout))
        return (wts[ids, None] * (pred - y[ids]) ** 2).mean(), len(ids)

    def validate(rec):
        p = predict_d(model, batch, np.asarray(val_ids), eoff, layout)
        t = y[val_ids].numpy()
        rec.update(val_mse=float(((p - t) ** 2).mean()), val_spearman_iou=spearman(p[:, 0], t[:, 0]),
                   val_spearman_iop=spearman(p[:, 1], t[:, 1]))
        return rec["val_spearman_iou"] + 0.5 * rec["val_spearman_iop"]

    return _train_best_epoch(model, batch, train_ids, val_ids, batch_loss, validate, rng, epochs=epochs, lr=lr,
                             weight_decay=weight_decay, batch_size=batch_size, layout=layout, name="GCN-D", log=log)


def _train_best_epoch(model, batch: ProposalBatch, train_ids, val_ids, batch_loss, validate, rng, epochs: int,
                      lr: float, weight_decay: float, batch_size: int, layout: str, name: str, log=None):
    """The training loop GCN-D and GCN-S share: AdamW + cosine decay, keep the best validation epoch.

    ``batch_loss(ids) -> (loss, count)`` is one step's loss over proposals ``ids``;
    ``validate(rec) -> score`` adds validation metrics to the epoch record and
    returns the score to maximise (without validation proposals: minus the loss).
    Returns (model with the best epoch's weights, in eval mode; per-epoch history).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    best, best_state, history = -np.inf, None, []
    for ep in range(epochs):
        model.train()
        tot, cnt = 0.0, 0
        for ids in _batches(np.asarray(train_ids), batch.sizes, batch_size, rng, layout):
            loss, count = batch_loss(ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * count
            cnt += count
        sched.step()
        rec = {"epoch": ep + 1, "loss": tot / max(cnt, 1)}
        score = validate(rec) if len(val_ids) else -rec["loss"]
        history.append(rec)
        if log:
            log(f"{name} epoch {ep + 1}/{epochs} " + " ".join(f"{k}={v:.4f}" for k, v in rec.items() if k != "epoch"))
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def _seg_targets(sub: ProposalBatch, node_labels: np.ndarray, seed: np.ndarray) -> np.ndarray:
    seg = sub.seg
    return (node_labels == node_labels[seed[seg]]).astype(np.int64)


@torch.no_grad()
def eval_gcns(model: GCNS, batch: ProposalBatch, node_labels: np.ndarray, ids: np.ndarray, eoff=None,
              layout: str = "block", per: int = 256) -> dict:
    """Node accuracy with the deterministic seed (all proposals; and only impure ones)."""
    model.eval()
    eoff = edge_offsets(batch) if eoff is None else eoff
    correct = total = ic = it = 0
    for i in range(0, len(ids), per):
        sub_ids = ids[i:i + per]
        sub = subbatch(batch, sub_ids, eoff)
        nl = _sub_labels(batch, node_labels, sub_ids)
        y = _seg_targets(sub, nl, sub.seed)
        xs = np.concatenate([sub.x, seed_inputs(sub, sub.seed)], 1)
        pred = model(_layout(sub, layout, xs)).argmax(1).numpy()
        ok = pred == y
        correct += int(ok.sum())
        total += len(y)
        seg = sub.seg
        impure = np.bincount(seg, weights=1 - y, minlength=len(sub.sizes)) > 0
        ic += int(ok[impure[seg]].sum())
        it += int(impure[seg].sum())
    return {"node_acc": correct / max(total, 1), "node_acc_impure": ic / max(it, 1)}


def _sub_labels(batch: ProposalBatch, node_labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    starts, sizes = batch.starts, batch.sizes
    return np.concatenate([node_labels[starts[i]:starts[i] + sizes[i]] for i in idx])


def fit_gcns(batch: ProposalBatch, node_labels: np.ndarray, train_ids: np.ndarray, val_ids: np.ndarray,
             hidden=(512, 64), dropout: float = 0.5, epochs: int = 30, lr: float = 1e-3, batch_size: int = 32,
             weight_decay: float = 1e-4, seed: int = 0, layout: str = "block", log=None):
    """Train GCN-S: random seed vertex per proposal and epoch, target = same label as the seed (NLL).

    Keeps the epoch with the best validation node accuracy on impure proposals
    (pure ones are trivially all-positive).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    model = GCNS(batch.x.shape[1] + 2, tuple(hidden), dropout)
    eoff = edge_offsets(batch)

    def batch_loss(ids):
        sub = subbatch(batch, ids, eoff)
        seed_v = sub.starts + (rng.random(len(ids)) * sub.sizes).astype(np.int64)
        y = torch.from_numpy(_seg_targets(sub, _sub_labels(batch, node_labels, ids), seed_v))
        xs = np.concatenate([sub.x, seed_inputs(sub, seed_v)], 1)
        return torch.nn.functional.nll_loss(model(_layout(sub, layout, xs)), y), len(y)

    def validate(rec):
        rec.update(eval_gcns(model, batch, node_labels, np.asarray(val_ids), eoff, layout))
        return rec["node_acc_impure"] + rec["node_acc"]

    return _train_best_epoch(model, batch, train_ids, val_ids, batch_loss, validate, rng, epochs=epochs, lr=lr,
                             weight_decay=weight_decay, batch_size=batch_size, layout=layout, name="GCN-S", log=log)
