"""The learned affinity: P(same identity) for every kNN edge, from inputs free of the face model's scale.

Face models put cosines on very different scales (SFace: genuine pairs around
0.72, impostors 0.33; dlib: 0.96 and 0.92), so a similarity threshold learned on
one model means nothing on another. Every input here is either a rank, a position
of the cosine inside one end's own neighbour list, or the cosine mapped through
the data's own distribution of kNN similarities (its empirical CDF and its
median first / last neighbour similarity, :func:`sim_stats`):

* where ``s = cos(i, j)`` sits in the data (global CDF; scaled between the data's
  median last- and first-neighbour similarity),
* where ``s`` sits in i's list and in j's list (scaled between that row's first and
  last similarity; z-score in the row),
* the rank of j in i's list and of i in j's (the rank j's list would give i: the
  lists are sorted, so it is the count of j's similarities above ``s``; k when i
  would not be listed),
* each end's local density (mean of its first 10 similarities) and crowding (its
  k-th similarity), scaled as above (NDDe-like),
* shared neighbours: ``|({i} u N_m(i)) n ({j} u N_m(j))| / (m + 1)``.

Inputs come in (min, max) pairs over the two ends, so an edge listed from both
sides gets the same inputs, hence the same probability, from either side.

A row block needs its own kNN rows and the rows of its neighbours (their
similarities and first ``m`` ids): never the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .components import components, distinct_positions, knn_edges
from .arrays import sorted_prefix_lengths
from .baselines import listed_edges, prob_level_min_sim, valid_sims
from .merge import MERGE_GRID, MERGE_WORST_LOSS, merge_by_affinity
from .metrics import bcubed_f, pairwise_f
from .peers import infomap_clusters, knn_edge_list
from .thresholds import TooFewSimilarities, auto_threshold

QUANTILE_GRID = np.linspace(0.0, 1.0, 201)
SNN_M = 10  # neighbours compared for the shared-neighbour input (cost: R * k * m^2 compares per block)
DENSITY_M = 10
INPUT_NAMES = ("cdf", "global", "local_min", "local_max", "z_min", "z_max", "rank_min", "rank_max",
               "density_min", "density_max", "crowd_min", "crowd_max", "top1_min", "top1_max", "snn")
N_INPUTS = len(INPUT_NAMES)
_EPS = 1e-6


def quantile_interp(v: np.ndarray, q, values) -> np.ndarray:
    """Piecewise-linear map of ``v`` through quantiles ``q`` (ascending) onto ``values``: with ``values`` the
    quantile levels, the sample CDF. The abscissae are made strictly increasing for interp (equal quantiles: a
    plateau of identical values)."""
    q = np.asarray(q, np.float64)
    return np.interp(v, q + np.arange(len(q)) * 1e-12, values)


@dataclass(frozen=True)
class SimStats:
    """The data's distribution of kNN similarities (from a row sample): the scale every input is read on.

    Attributes
    ----------
    quantiles : (201,) similarity quantiles at ``QUANTILE_GRID`` (the empirical CDF).
    top1, last : median first- and last-neighbour similarity of the sampled rows.
    """

    quantiles: np.ndarray
    top1: float
    last: float

    def to_dict(self) -> dict:
        return {"quantiles": [float(v) for v in self.quantiles], "top1": float(self.top1), "last": float(self.last)}

    @classmethod
    def from_dict(cls, d: dict) -> "SimStats":
        return cls(np.asarray(d["quantiles"], np.float64), float(d["top1"]), float(d["last"]))

    def cdf(self, s: np.ndarray) -> np.ndarray:
        return quantile_interp(s, self.quantiles, QUANTILE_GRID).astype(np.float32)

    def scale(self, s: np.ndarray) -> np.ndarray:
        return ((s - self.last) / max(self.top1 - self.last, _EPS)).astype(np.float32)


def sim_stats(index: np.ndarray, sim: np.ndarray) -> SimStats:
    """:class:`SimStats` of a sample of kNN rows (padding: index < 0)."""
    sim = np.asarray(sim, np.float64)
    ok = np.asarray(index) >= 0
    vals = sim[ok]
    if len(vals) == 0:
        raise ValueError("no kNN similarity to derive the data's scale from")
    has = ok.any(1)
    last = np.where(ok, sim, np.inf).min(1)[has]
    top1 = sim[has, 0]
    return SimStats(np.quantile(vals, QUANTILE_GRID), float(np.median(top1)), float(np.median(last)))


ROW_SUMMARY = ("top", "last", "mean", "std", "dens")


def row_summaries(index: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """Per-row summaries of kNN rows: (R, len(ROW_SUMMARY)) float64, NaN for a row with no valid edge.

    Columns: first, last, mean and std of the valid similarities (index >= 0 and a finite
    similarity) and the density (mean of the first DENSITY_M). Each row's values depend on
    that row alone, so the edges stage computes them once per row, chunk-wise, and a task
    gathers its neighbours' summaries instead of recomputing them from their whole rows.
    """
    sim = np.asarray(sim)
    valid = (np.asarray(index) >= 0) & np.isfinite(sim)
    cnt = np.maximum(valid.sum(1), 1)
    s = np.where(valid, sim, 0.0).astype(np.float64)
    mean = s.sum(1) / cnt
    var = (np.where(valid, (sim - mean[:, None]) ** 2, 0.0)).sum(1) / cnt
    top = np.where(valid[:, 0], sim[:, 0], np.nan) if sim.shape[1] else np.full(len(sim), np.nan)
    last = np.where(valid, sim, np.inf).min(1) if sim.shape[1] else np.full(len(sim), np.inf)
    last = np.where(np.isfinite(last), last, np.nan)
    m = min(DENSITY_M, sim.shape[1])
    dcnt = np.maximum(valid[:, :m].sum(1), 1)
    dens = np.where(valid[:, :m], sim[:, :m], 0.0).sum(1) / dcnt
    return np.stack([top, last, mean, np.sqrt(var), dens], 1).astype(np.float64)


def _summary_columns(summary: np.ndarray) -> dict:
    cols = {key: summary[:, c] for c, key in enumerate(ROW_SUMMARY)}
    # first and last are similarities (float32 in the store): the inputs take their difference in float32
    cols["top"], cols["last"] = cols["top"].astype(np.float32), cols["last"].astype(np.float32)
    return cols


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(a, b), np.maximum(a, b)


def edge_inputs(row_ids: np.ndarray, index: np.ndarray, sim: np.ndarray, nbr_pos: np.ndarray,
                nbr_sim: np.ndarray, nbr_index: np.ndarray, stats: SimStats, nbr_summary: np.ndarray | None = None,
                block: int = 1024) -> np.ndarray:
    """Inputs of every kNN edge of a row block: (R, k, N_INPUTS) float32 (NaN rows where index < 0).

    Parameters
    ----------
    row_ids : (R,) global ids of the rows.
    index, sim : (R, k) the rows' kNN lists (sorted by similarity, padding index -1).
    nbr_pos : (R, k) row of ``nbr_sim`` / ``nbr_index`` holding neighbour ``index[r, c]`` (-1 for padding).
    nbr_sim : (U, k) kNN similarities of the distinct neighbours, non-finite (-inf or NaN) at padding.
    nbr_index : (U, >= SNN_M) their first neighbour ids.
    stats : the data's similarity scale (:func:`sim_stats`).
    nbr_summary : (U, len(ROW_SUMMARY)) :func:`row_summaries` of the neighbours' rows (computed from
        ``nbr_sim`` when not given; the same values either way).
    block : rows per vectorised step (memory ~ block * k * max(k, m^2) bytes).
    """
    index = np.asarray(index)
    sim = np.asarray(sim, np.float32)
    r_n, k = index.shape
    out = np.full((r_n, k, N_INPUTS), np.nan, np.float32)
    if r_n == 0 or k == 0:
        return out
    if nbr_summary is None:  # padding: the store fills knn/sim with -inf
        nbr_summary = row_summaries(np.where(np.isfinite(nbr_sim), 0, -1), nbr_sim)
    u_sum = _summary_columns(np.asarray(nbr_summary, np.float64))
    row_valid = index >= 0
    r_sum = _summary_columns(row_summaries(index, np.where(row_valid, sim, -np.inf)))
    m = min(SNN_M, k, nbr_index.shape[1])
    # ids as int32 where they fit (any run under 2^31 faces): the shared-neighbour compares read half the bytes
    top_id = max(int(np.max(row_ids, initial=0)), int(index.max(initial=0)), int(np.max(nbr_index, initial=0)))
    id_t = np.int32 if top_id < 2**31 else np.int64
    first_ids = np.ascontiguousarray(nbr_index[:, :m], id_t)
    sorted_rows = _rows_non_increasing(nbr_sim)
    for a in range(0, r_n, block):
        b = min(a + block, r_n)
        idx, s, ok = index[a:b], sim[a:b].astype(np.float64), row_valid[a:b]
        pos = np.where(ok, nbr_pos[a:b], 0)
        feats = out[a:b]
        # ends' summaries, broadcast to edges
        ri = {key: v[a:b, None] for key, v in r_sum.items()}
        rj = {key: v[pos] for key, v in u_sum.items()}
        local = [(s - e["last"]) / np.maximum(e["top"] - e["last"], _EPS) for e in (ri, rj)]
        zs = [(s - e["mean"]) / np.maximum(e["std"], _EPS) for e in (ri, rj)]
        rank_i = np.broadcast_to(np.arange(k, dtype=np.float64)[None, :], s.shape)
        if sorted_rows:
            rank_j = _count_above_sorted(nbr_sim, pos, s).astype(np.float64)
        else:
            js = nbr_sim[pos]  # (B, k, k) the neighbours' own similarity rows (NaN > s is False)
            rank_j = _count_last(js > s[:, :, None]).astype(np.float64)
        ends = [(stats.scale(np.broadcast_to(ri[key], s.shape)), stats.scale(rj[key])) for key in ("dens", "last", "top")]
        cols = [stats.cdf(s), stats.scale(s), *_pair(*local), *_pair(*zs), *_pair(rank_i / k, rank_j / k),
                *(v for pair in ends for v in _pair(*pair))]
        # shared neighbours: {i} u N_m(i) against {j} u N_m(j), counted as j's id, then j's first m ids, against
        # i's set (two counts of disjoint comparisons: the same total as one over {j} u N_m(j), without building it)
        own = np.concatenate([np.asarray(row_ids[a:b], id_t)[:, None], idx[:, :m].astype(id_t)], 1)
        own = np.where(own >= 0, own, id_t(-3))  # padding never matches padding
        # only the first m ids of each neighbour's row are gathered (gathering whole rows, then slicing, was 2x)
        theirs = first_ids[pos]
        shared = _count_last(np.where(ok, idx, -2).astype(id_t)[:, :, None] == own[:, None, :])
        shared += _count_last((theirs[:, :, :, None] == own[:, None, None, :]).reshape(*theirs.shape[:2], -1))
        cols.append(shared / (m + 1.0))
        feats[...] = np.stack([np.asarray(c, np.float32) for c in cols], -1)
        feats[~ok] = np.nan
    return out


def _rows_non_increasing(sim: np.ndarray) -> bool:
    """Whether every row of ``sim`` is non-increasing (a NaN anywhere: no): what :func:`_count_above_sorted` needs.
    The kNN stage writes its rows so (padding -inf at the end); anything else takes the full count."""
    sim = np.asarray(sim)
    return sim.shape[1] < 2 or bool((sim[:, 1:] <= sim[:, :-1]).all())


def _count_above_sorted(rows: np.ndarray, pos: np.ndarray, s: np.ndarray) -> np.ndarray:
    """For each entry of ``s`` (B, k) float64: how many values of row ``pos`` of ``rows`` (U, k), non-increasing
    (:func:`_rows_non_increasing`), exceed it — ``(rows[pos] > s[..., None])`` counted — by a binary search.

    Why: gathering each edge's whole neighbour row (B x k x k) and comparing it took a third of the edge inputs'
    time; the search reads ~log2(k) values per edge. The entries above ``s`` are a prefix of the row; the
    search lifts the prefix length by powers of two, a candidate past the row testing its last entry (true only
    when every entry is above ``s``: then the count is k either way). The same counts (tested).
    """
    k = rows.shape[1]
    flat = np.asarray(rows).reshape(-1)
    index_t = np.int32 if flat.size < 2**31 else np.int64
    base = (np.asarray(pos, np.int64) * k - 1).astype(index_t)  # a prefix of length c ends at entry base + c
    return sorted_prefix_lengths(k, np.shape(s), lambda c: np.take(flat, base + c) > s, index_t)


def _count_last(hits: np.ndarray) -> np.ndarray:
    """The True entries along the last axis of a boolean array (exact counts).

    Why not ``.sum(-1)``: a boolean sum widens every entry to int64; summed as bytes into a byte
    accumulator where the count cannot reach 256, it is ~20% faster on the (rows, k, k) and (rows, k, m (m + 1))
    arrays of ``edge_inputs`` (the same counts).
    """
    if hits.shape[-1] < 256:
        return hits.view(np.uint8).sum(-1, dtype=np.uint8)
    return hits.sum(-1)


def sample_stride(n: int, max_rows: int = 20_000) -> int:
    """Stride of the row sample the data's similarity scale is read from (1: every row, up to ``max_rows``)."""
    return max(1, -(-n // max_rows))


def sample_rows(n: int, max_rows: int = 20_000) -> np.ndarray:
    """The stride sample of rows the data's similarity scale is read from (every row up to ``max_rows``)."""
    return np.arange(0, n, sample_stride(n, max_rows))


def run_edge_inputs(index: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, SimStats]:
    """Inputs of every edge of an in-memory run (training): the same computation as the edges stage's tasks."""
    index = np.asarray(index)
    rows = sample_rows(len(index))
    stats = sim_stats(index[rows], sim[rows])
    uniq, pos = gather_positions(index)
    summary = row_summaries(index, sim)
    x = edge_inputs(np.arange(len(index)), index, sim, pos, np.asarray(sim)[uniq], index[uniq, :SNN_M], stats,
                    nbr_summary=summary[uniq])
    return x, stats


def gather_positions(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct neighbour ids of a row block and, per edge, the row of that id among them (-1: padding)."""
    flat = np.asarray(index).reshape(-1)
    ok = flat >= 0
    uniq, inv = distinct_positions(flat[ok])
    pos = np.full(flat.shape, -1, np.int64)
    pos[ok] = inv
    return uniq, pos.reshape(np.shape(index))


# -- the scorer ---------------------------------------------------------------------------------
class EdgeScorer(nn.Module):
    """MLP from an edge's inputs to the logit of P(same identity); input standardisation inside."""

    def __init__(self, n_in: int = N_INPUTS, hidden=(64, 64)):
        super().__init__()
        self.register_buffer("mu", torch.zeros(n_in))
        self.register_buffer("sd", torch.ones(n_in))
        layers, d = [], n_in
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mu) / self.sd).squeeze(-1)


PREDICT_TILE = 4096


def predict_edges(model: EdgeScorer, inputs: np.ndarray, tile: int = PREDICT_TILE) -> np.ndarray:
    """P(same identity) of edges with inputs (..., N_INPUTS); NaN inputs (padding) give 0.

    Every forward pass has exactly ``tile`` rows (the last one zero-padded): BLAS takes
    another code path for a remainder of rows, whose last bit differs, so without
    fixed shapes an edge's probability would depend on how the rows were chunked.
    """
    shape = inputs.shape[:-1]
    x = inputs.reshape(-1, inputs.shape[-1])
    ok = np.isfinite(x).all(1)
    out = np.zeros(len(x), np.float32)
    rows = np.flatnonzero(ok)
    buf = np.zeros((tile, x.shape[1]), np.float32)
    with torch.no_grad():
        for a in range(0, len(rows), tile):
            r = rows[a:a + tile]
            buf[:len(r)] = x[r]
            buf[len(r):] = 0.0
            out[r] = torch.sigmoid(model(torch.from_numpy(buf))).numpy()[:len(r)]
    return out.reshape(shape)


# -- per-run adaptation: the scorer's confident edges teach a linear model on the run's own inputs ------
# Why: the general model's scorer learned on generated worlds, where relative inputs (ranks, local
# scales, shared neighbours) beat the cosine; real face models make the cosine decisive, and there
# the scorer ranks the kNN edges worse than the raw cosine (ROC-AUC LFW x SFace 0.9959 against
# 0.9987, LFW x dlib 0.9816 against 0.9885). A logistic model fit on the run's own edges, labelled by
# the scorer where it is confident (P >= ADAPT_HI: same, P <= ADAPT_LO: not), learns which inputs
# separate this run's identities; the rank average of its score and the scorer's P, mapped onto the
# scorer's own distribution of P (the same quantiles), replaces P, and the model's levels for adapted
# runs (``adapt_levels``) are chosen in training on the worlds' out-of-fold P adapted the same way.
# Self-training: no label is read.
ADAPT_HI, ADAPT_LO = 0.9, 0.1
ADAPT_PER_CLASS = 50_000  #: pseudo-labelled edges per class the fit uses, at most (a seeded draw)
ADAPT_MIN_PER_CLASS = 100  #: fewer confident edges in either class: no adaptation
ADAPT_LEVELS = 1001  #: quantile levels of the maps (linear score and P to their ranks, the rank average onto P)
ADAPT_L2 = 1e-4


def fit_adaptation(inputs: np.ndarray, prob: np.ndarray, hi: float = ADAPT_HI, lo: float = ADAPT_LO,
                   per_class: int = ADAPT_PER_CLASS, seed: int = 0) -> dict | None:
    """The adaptation of a run (a JSON-able dict for :func:`adapted_prob`) from a sample of its edges'
    ``inputs`` (E, N_INPUTS) and their scorer ``prob`` (E,); None where either pseudo-label class has fewer
    than :data:`ADAPT_MIN_PER_CLASS` edges.

    The fit: inputs standardised by the sample's mean and deviation, L2-regularised logistic regression by
    L-BFGS in float64 on one torch thread (the same weights whatever the caller's threads). The maps: the
    sample's linear scores, P and their rank average (:func:`_blend_score`) at :data:`ADAPT_LEVELS` quantile levels.
    """
    x = np.asarray(inputs, np.float64).reshape(-1, np.shape(inputs)[-1])
    p = np.asarray(prob, np.float64).reshape(-1)
    ok = np.isfinite(x).all(1) & np.isfinite(p)
    x, p = x[ok], p[ok]
    pos, neg = np.flatnonzero(p >= hi), np.flatnonzero(p <= lo)
    if min(len(pos), len(neg)) < ADAPT_MIN_PER_CLASS:
        return None
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(pos, min(len(pos), int(per_class)), replace=False))
    neg = np.sort(rng.choice(neg, min(len(neg), int(per_class)), replace=False))
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    xs = torch.from_numpy((x[np.concatenate([pos, neg])] - mu) / sd)
    y = torch.from_numpy(np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wb = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([wb], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(xs @ wb[:-1] + wb[-1], y) + ADAPT_L2 * (wb[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    wb = wb.detach().numpy()
    ad = {"mu": mu.tolist(), "sd": sd.tolist(), "w": wb[:-1].tolist(), "b": float(wb[-1])}
    levels = np.linspace(0.0, 1.0, ADAPT_LEVELS)
    z = _linear_score(x, ad)
    ad["z_q"] = np.quantile(z, levels).tolist()
    ad["p_q"] = np.quantile(p, levels).tolist()
    ad["b_q"] = np.quantile(_blend_score(p, z, ad), levels).tolist()
    ad["pseudo_labels"] = [int(len(pos)), int(len(neg))]
    return ad


def _blend_score(p: np.ndarray, z: np.ndarray, ad: dict) -> np.ndarray:
    """An edge's place among the run's scorer P plus its place among the adapted linear scores (a rank average:
    the scorer's own ranking is kept where the run's inputs do not overrule it)."""
    levels = np.linspace(0.0, 1.0, len(ad["p_q"]))
    return quantile_interp(np.asarray(p, np.float64), ad["p_q"], levels) + quantile_interp(z, ad["z_q"], levels)


def _linear_score(x: np.ndarray, ad: dict) -> np.ndarray:
    """The adaptation's linear score of input rows (float64; each row's value depends on that row alone:
    an elementwise product and a row sum, not a BLAS product whose blocking follows the batch)."""
    xs = (np.asarray(x, np.float64) - np.asarray(ad["mu"])) / np.asarray(ad["sd"])
    return (xs * np.asarray(ad["w"])).sum(1) + ad["b"]


def adapted_prob(inputs: np.ndarray, ad: dict, prob: np.ndarray) -> np.ndarray:
    """The run's adapted P of edges with ``inputs`` (..., N_INPUTS) and scorer P ``prob`` (...): the rank average
    of the scorer's P and the adaptation's linear score (:func:`_blend_score`), mapped through its quantiles
    onto P's (monotone in both); NaN inputs (padding) give 0, as :func:`predict_edges`.

    Why the average and not the linear score alone: alone it lifted LFW x dlib's pairwise F and lowered its
    BCubed F (its edges at the floor: precision 0.953 -> 0.929); the average kept both up on every set
    measured, with the levels chosen on it in training (the model's ``adapt_levels``)."""
    shape = inputs.shape[:-1]
    x = inputs.reshape(-1, inputs.shape[-1])
    p = np.asarray(prob).reshape(-1)
    ok = np.isfinite(x).all(1)
    out = np.zeros(len(x), np.float32)
    b = _blend_score(p[ok], _linear_score(x[ok], ad), ad)
    out[ok] = quantile_interp(b, ad["b_q"], np.asarray(ad["p_q"], np.float64))
    return out.reshape(shape)


def face_balanced_weights(src: np.ndarray, same: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Loss weight of every edge such that each face's same-identity edges weigh alike in total.

    An identity of s faces has s - 1 same-identity kNN edges per face, so with every edge
    counted once the loss is ruled by the large identities: the scorer learned that a
    genuine edge lives in a dense, crowded neighbourhood and under-rated the lone edge of
    a two-face identity (LFW x SFace test half: 79% of the same-identity edges of
    two-face identities above P 0.98, against 99.5% for identities of 100+ faces). Here
    a face's genuine edges share the weight of the mean face's genuine edges (BCubed F
    counts faces, not pairs); other-identity edges keep weight 1. Weights are scaled to
    mean 1 over the valid edges.

    Parameters
    ----------
    src : (E,) the face each edge leaves.
    same : (E,) bool, both ends share an identity.
    valid : (E,) bool, a real edge (not padding).
    """
    src = np.asarray(src, np.int64)
    valid = np.asarray(valid, bool)
    genuine = np.asarray(same, bool) & valid
    per_face = np.bincount(src[genuine], minlength=int(src.max(initial=-1)) + 1)
    w = np.ones(len(src), np.float64)
    if genuine.any():
        w[genuine] = per_face[per_face > 0].mean() / per_face[src[genuine]]
    w[~valid] = 0.0
    if valid.any():
        w /= w[valid].mean()  # >= 1 / max(per-face count) > 0: every valid weight is positive
    return w.astype(np.float32)


def fit_edge_scorer(inputs: np.ndarray, same: np.ndarray, train: np.ndarray, val: np.ndarray, hidden=(64, 64),
                    epochs: int = 6, lr: float = 1e-3, batch_size: int = 4096, seed: int = 0, log=None,
                    weight: np.ndarray | None = None):
    """Train an :class:`EdgeScorer` with binary cross-entropy; keep the epoch with the best validation loss.

    Parameters
    ----------
    inputs : (E, N_INPUTS) edge inputs (finite rows only).
    same : (E,) 1 where both ends share an identity.
    train, val : edge ids (val: edges leaving faces of identities held out of training).
    weight : (E,) loss weight per edge (e.g. :func:`face_balanced_weights`); None: every
        edge counts once, the classes keep the data's own balance and the output is a
        calibrated probability of the edge population.

    Returns
    -------
    (model in eval mode, history: per-epoch train / validation loss)
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(inputs, np.float32))
    y = torch.from_numpy(np.asarray(same, np.float32))
    model = EdgeScorer(x.shape[1], hidden)
    xt = x[torch.from_numpy(np.asarray(train))]
    model.mu.copy_(xt.mean(0))
    model.sd.copy_(xt.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    w = torch.from_numpy(np.asarray(weight, np.float32)) if weight is not None else torch.ones(len(y))

    def bce(logit, target, wt):
        return (nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none") * wt).sum() / wt.sum()

    vt = torch.from_numpy(np.asarray(val))
    best, best_state, history = np.inf, None, []
    for ep in range(epochs):
        model.train()
        tot = 0.0
        order = np.asarray(train)[rng.permutation(len(train))]
        for a in range(0, len(order), batch_size):
            b = torch.from_numpy(order[a:a + batch_size])
            loss = bce(model(x[b]), y[b], w[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(b)
        model.eval()
        with torch.no_grad():
            vloss = float(bce(model(x[vt]), y[vt], w[vt])) if len(vt) else tot / max(len(order), 1)
        rec = {"epoch": ep + 1, "loss": tot / max(len(order), 1), "val_loss": vloss}
        history.append(rec)
        if log:
            log(f"edge scorer epoch {ep + 1}/{epochs} loss={rec['loss']:.4f} val_loss={vloss:.4f}")
        if vloss < best:
            best, best_state = vloss, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def roc_auc(p: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve of scores ``p`` for labels ``same`` (ties averaged)."""
    from scipy.stats import rankdata

    same = np.asarray(same, bool)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(p)
    return float((r[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def calibration(p: np.ndarray, same: np.ndarray, bins: int = 10) -> list[dict]:
    """Per probability bin: edges, mean predicted probability, observed same-identity rate."""
    p = np.asarray(p, np.float64)
    b = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    out = []
    for i in range(bins):
        m = b == i
        out.append({"bin": [i / bins, (i + 1) / bins], "edges": int(m.sum()),
                    "predicted": float(p[m].mean()) if m.any() else None,
                    "observed": float(np.asarray(same)[m].mean()) if m.any() else None})
    return out


# -- levels chosen on validation identities -----------------------------------------------------
# Probability grids: P(same identity) means the same on any face model, so the grids are fixed in
# probability and only the choice among them is learned (on the labelled set's validation identities).
FLOOR_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
ATTACH_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def best_claimed_neighbour(index: np.ndarray, prob: np.ndarray, claimed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the most probable neighbour whose face is claimed (-1: none) and that probability.

    ``claimed`` is (R, k): whether each listed neighbour belongs to a cluster a
    proposal made (attaching to another unclaimed face would chain singletons).
    Ties go to the earlier (more similar) neighbour.
    """
    p = np.where((np.asarray(index) >= 0) & claimed, prob, -1.0)
    col = np.argmax(p, 1) if p.shape[1] else np.zeros(len(p), np.int64)
    best = p[np.arange(len(p)), col] if p.shape[1] else np.full(len(p), -1.0)
    target = np.where(best >= 0, np.asarray(index)[np.arange(len(p)), col] if p.shape[1] else -1, -1)
    return target.astype(np.int64), best.astype(np.float32)


def attach(labels: np.ndarray, unclaimed: np.ndarray, target: np.ndarray, p: np.ndarray, level: float) -> np.ndarray:
    """``labels`` with each unclaimed face whose best claimed neighbour has P >= ``level`` moved to its cluster."""
    out = np.array(labels, copy=True)
    move = unclaimed & (target >= 0) & (p >= level)
    out[move] = labels[target[move]]
    return out


def choose_levels(index: np.ndarray, prob: np.ndarray, labels: np.ndarray, faces: np.ndarray,
                  floor_grid=FLOOR_GRID, attach_grid=ATTACH_GRID, merge_grid=MERGE_GRID) -> dict:
    """The communities floor, the merge level and the attach level with the best pairwise + BCubed F on ``faces``.

    Infomap runs on the whole run's graph of edges with P >= floor, and F is measured
    on ``faces`` only (the validation identities' faces, whose edges the scorer never
    trained on). Why the whole graph: on the validation identities' subgraph alone
    (a fifth of the faces) impostors are rare, every floor looks alike (LFW: validation
    pairwise F 0.99 from floor 0.3 to 0.95) and the lowest floors won, while on the
    test half the best floor was ~0.9; the other identities' faces are the distractors
    a real run has. Faces left alone are then attached to their most probable claimed
    neighbour at each candidate level (``None``: never attach).
    """
    return choose_levels_over([(index, prob, labels, faces)], floor_grid, attach_grid, merge_grid)


def components_at(index: np.ndarray, prob: np.ndarray, level: float) -> np.ndarray:
    """Connected components of the kNN edges with P >= ``level`` (an edge listed from both ends counts once,
    with its larger P; the scorer gives both ends the same P), canonical labels (int64)."""
    src, dst, _ = knn_edges(index, prob, 0, level)
    return components(len(index), src, dst)


def choose_cut_over(runs, grid=FLOOR_GRID) -> dict:
    """The P level whose connected components have the best *mean* pairwise + BCubed F over ``runs``, a list
    of ``(index, prob, labels)`` (out-of-fold probabilities, every face counted): the cut of
    ``--method threshold`` in probability space, chosen as :func:`choose_levels_over` chooses the communities
    floor (same grid, same criterion).

    Why its own level and not the communities floor: a component joins two identities through a single edge
    at or above the level, where Infomap weighs the flow between them, so the cut that suits components lies
    higher (measured on held-out real sets; the level itself is chosen here, on generated worlds only).
    """
    runs = [(np.asarray(i), np.asarray(p), np.asarray(lab)) for i, p, lab in runs]
    curve, best = [], None
    for level in grid:
        cls = [components_at(index, prob, level) for index, prob, _ in runs]
        pw = float(np.mean([float(pairwise_f(lab, cl)[2]) for (_, _, lab), cl in zip(runs, cls)]))
        bc = float(np.mean([float(bcubed_f(lab, cl)[2]) for (_, _, lab), cl in zip(runs, cls)]))
        curve.append({"level": level, "pairwise_f": pw, "bcubed_f": bc})
        if best is None or pw + bc > best[0] + 1e-9:
            best = (pw + bc, level)
    return {"level": best[1], "score": best[0], "curve": curve}


#: P levels tried for the cosine floor of ``--method infomap`` (:func:`choose_infomap_level_over`); finer at the
#: top, where the crossing moves fastest in cosine
INFOMAP_LEVEL_GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975)


def edge_pairs(index: np.ndarray, sim: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The listed kNN edges' cosines and probabilities, aligned and flat (padding excluded, as :func:`valid_sims`)."""
    ok = listed_edges(sim, index)
    return np.asarray(sim, np.float64)[ok], np.asarray(prob, np.float64)[ok]


def infomap_min_sim(index: np.ndarray, sim: np.ndarray, prob: np.ndarray, level: float | None) -> tuple[float, dict]:
    """kNN + Infomap's cosine floor for a run: where ``prob`` crosses ``level``
    (:func:`facecluster.tasks.baselines.prob_level_min_sim`), or Otsu's anchor of the cosines where no level is
    given or too few edges lie near it. Returns the floor and where it came from."""
    if level is not None:
        sims, probs = edge_pairs(index, sim, prob)
        value, count = prob_level_min_sim(sims, probs, level)
        if value is not None:
            return value, {"rule": "prob_level", "level": float(level), "band_edges": count}
        fallback = {"rule": "otsu", "level": float(level), "band_edges": count}
    else:
        fallback = {"rule": "otsu"}
    return round(float(auto_threshold(valid_sims(sim, index))), 6), fallback


def choose_infomap_level_over(runs, grid=INFOMAP_LEVEL_GRID) -> dict:
    """The P level whose cosine crossing, used as kNN + Infomap's ``min_sim`` on the cosine graph, has the best
    *mean* pairwise + BCubed F over ``runs``, a list of ``(index, sim, prob, labels)`` (out-of-fold
    probabilities, every face counted; each run's graph clustered on its own, as one Infomap run).

    The level ``--method infomap`` reads its automatic ``min_sim`` off (:func:`infomap_min_sim`). Otsu's anchor of
    the same cosines is the curve's first point (level None): it is what a run falls back to.
    """
    runs = [(np.asarray(i), np.asarray(s), np.asarray(p), np.asarray(lab)) for i, s, p, lab in runs]
    curve, best = [], None
    for level in (None, *grid):
        pws, bcs, floors = [], [], []
        for index, sim, prob, lab in runs:
            try:
                t, _ = infomap_min_sim(index, sim, prob, level)
            except TooFewSimilarities:  # a run too small for Otsu's anchor: left out of this level's mean
                continue
            cl = infomap_clusters(len(lab), *knn_edge_list(index, sim, t))
            pws.append(float(pairwise_f(lab, cl)[2]))
            bcs.append(float(bcubed_f(lab, cl)[2]))
            floors.append(t)
        if not pws:
            continue
        pw, bc = float(np.mean(pws)), float(np.mean(bcs))
        curve.append({"level": level, "pairwise_f": pw, "bcubed_f": bc, "min_pairwise_f": float(np.min(pws)),
                      "min_sims": floors})
        if best is None or pw + bc > best[0] + 1e-9:
            best = (pw + bc, level)
    return {"level": best[1] if best else None, "score": best[0] if best else None, "curve": curve}


def choose_levels_over(runs, floor_grid=FLOOR_GRID, attach_grid=ATTACH_GRID, merge_grid=MERGE_GRID) -> dict:
    """:func:`choose_levels` over several runs at once: the floor, merge level and attach level with the best
    *mean* pairwise + BCubed F over ``runs``, a list of ``(index, prob, labels, faces)`` (each run's graph is
    clustered on its own; the curves hold the means). One run: exactly :func:`choose_levels`.

    In that order: the floor's communities, merged by the affinity between them
    (:func:`facecluster.tasks.merge.merge_by_affinity`) at the best level of ``merge_grid`` that costs no run
    more than ``MERGE_WORST_LOSS`` pairwise or BCubed F against no merge (a level that lifts the mean by
    hurting some worlds is the change that helps one set and hurts another), then the faces left alone
    attached. ``merge_grid``'s None (no merge) is always a candidate.
    """
    runs = [(np.asarray(i), np.asarray(p), np.asarray(lab), np.sort(np.asarray(f, np.int64))) for i, p, lab, f in runs]

    def per_run(cls):
        pw = np.array([float(pairwise_f(lab[f], cl[f])[2]) for (_, _, lab, f), cl in zip(runs, cls)])
        bc = np.array([float(bcubed_f(lab[f], cl[f])[2]) for (_, _, lab, f), cl in zip(runs, cls)])
        return pw, bc

    def score(cls):
        pw, bc = per_run(cls)
        return float(np.mean(pw)), float(np.mean(bc))

    curve, best = [], None
    for fl in floor_grid:
        cls = [infomap_clusters(len(lab), *knn_edge_list(index, prob, fl)) for index, prob, lab, _ in runs]
        runs_pw, runs_bc = per_run(cls)
        pw, bc = float(np.mean(runs_pw)), float(np.mean(runs_bc))
        curve.append({"floor": fl, "pairwise_f": pw, "bcubed_f": bc})
        if best is None or pw + bc > best[0] + 1e-9:
            best = (pw + bc, fl, cls, runs_pw, runs_bc)
    _, floor, cls, base_pw, base_bc = best
    top, merge, chosen = float(base_pw.mean() + base_bc.mean()), None, (cls, base_pw, base_bc)
    merge_curve = [{"level": None, "pairwise_f": float(base_pw.mean()), "bcubed_f": float(base_bc.mean()),
                    "worst_loss": 0.0}]
    for lv in (x for x in merge_grid if x is not None):
        merged = [merge_by_affinity(index, prob, cl, lv) for (index, prob, _, _), cl in zip(runs, cls)]
        pw, bc = per_run(merged)
        worst = float(max(np.max(base_pw - pw), np.max(base_bc - bc)))
        merge_curve.append({"level": lv, "pairwise_f": float(pw.mean()), "bcubed_f": float(bc.mean()),
                            "worst_loss": worst})
        if worst <= MERGE_WORST_LOSS and pw.mean() + bc.mean() > top + 1e-9:
            top, merge, chosen = float(pw.mean() + bc.mean()), lv, (merged, pw, bc)
    cls, runs_pw, runs_bc = chosen
    found = []
    for (index, prob, _, _), cl in zip(runs, cls):
        unclaimed = np.bincount(cl)[cl] == 1
        claimed = np.where(index >= 0, ~unclaimed[np.maximum(index, 0)], False)
        found.append((unclaimed, *best_claimed_neighbour(index, prob, claimed)))
    pw, bc = float(np.mean(runs_pw)), float(np.mean(runs_bc))
    attach_curve, level, top = [{"level": None, "pairwise_f": pw, "bcubed_f": bc}], None, pw + bc
    for lv in attach_grid:
        pw, bc = score([attach(cl, *f, lv) for cl, f in zip(cls, found)])
        attach_curve.append({"level": lv, "pairwise_f": pw, "bcubed_f": bc})
        if pw + bc > top + 1e-9:
            top, level = pw + bc, lv
    return {"floor": floor, "merge": merge, "attach": level, "score": top, "floor_curve": curve,
            "merge_curve": merge_curve, "attach_curve": attach_curve,
            "val_faces": int(sum(len(f) for *_, f in runs)),
            "val_unclaimed": int(sum(int(u[f].sum()) for (*_, f), (u, *_) in zip(runs, found)))}
