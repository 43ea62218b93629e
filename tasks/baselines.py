"""Parameter grids for the label-chosen baselines, placed on the data's own similarity scale.

The baselines the learned method is compared with (one similarity threshold; kNN +
Infomap with an edge floor ``min_sim``) each have one parameter, chosen *with the
test labels*. A grid written for one face model mis-tunes them on another: SFace's
kNN cosines span about 0.25-0.85 on LFW, dlib's about 0.89-0.98, so a 0.20-0.95 threshold
grid gives dlib seven points below its peak (0.957) and an Infomap grid of {0.3, ..., 0.7}
none at all (pairwise F 0.036 instead of 0.960). Here a grid spans
the quantiles of the data's kNN similarities, its step is the finer of a fixed
absolute step and a fixed share of that span (so a compressed scale gets as many
points as a wide one), and a sweep whose best point sits on an edge extends the grid
on that side until the peak is inside or a hard limit is reached.

Pure numpy: the pipeline layer evaluates the grid points (``facecluster.pipeline.baselines``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .thresholds import edge_floor

# The span of a grid: these quantiles of the listed kNN similarities (self and padding
# excluded). Below the 1st percentile a threshold or edge floor keeps (nearly) every
# kNN edge, so the sweep cannot change there; the top 0.1% are near-duplicates.
SPAN_QUANTILES = (0.01, 0.999)
# Steps: never coarser than these (0.01 for the threshold as before; the issue's <= 0.02
# for Infomap, whose runs cost seconds each), and at least this many points over the span.
THRESHOLD_STEP, THRESHOLD_POINTS = 0.01, 50
INFOMAP_STEP, INFOMAP_POINTS = 0.02, 25
# A peak on an edge: extend by this many steps on that side, then look again.
EXTEND_STEPS = 10
_NICE = (5.0, 2.0, 1.0)  # steps are 1, 2 or 5 times a power of ten: the grid points stay readable


def listed_edges(sim: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """Which kNN entries are listed edges (padding: id -1, or a non-finite / < -1.5 value), as a bool array."""
    s = np.asarray(sim)
    ok = np.isfinite(s) & (s > -1.5)
    if index is not None:
        ok &= np.asarray(index) >= 0
    return ok


def valid_sims(sim: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """The listed kNN similarities as a flat float64 array (:func:`listed_edges`)."""
    return np.asarray(sim, np.float64)[listed_edges(sim, index)]


def nice_step(span: float, max_step: float, min_points: int) -> float:
    """The largest step of the 1-2-5 series that is <= ``max_step`` and <= ``span / min_points``.

    Why a share of the span: the peak's resolution should be the same *relative to the
    data's scale* on every face model; dlib's kNN cosines span 0.11 where SFace's span
    0.8, and a 0.01 step gives dlib ~11 points.
    """
    target = min(float(max_step), max(float(span), 1e-12) / max(1, int(min_points)))
    exp = np.floor(np.log10(target))
    # 10 ** exp <= target, so the last mantissa (1) always fits
    step = next(m * 10.0 ** exp for m in _NICE if m * 10.0 ** exp <= target * (1 + 1e-9))
    return float(round(step, 12))


def similarity_grid(sims: np.ndarray, max_step: float, min_points: int, lo_limit: float = -1.0,
                    hi_limit: float = 1.0, quantiles: tuple[float, float] = SPAN_QUANTILES) -> tuple[np.ndarray, float]:
    """A grid over the data's kNN-similarity span, and its step.

    Parameters
    ----------
    sims : flat array of listed kNN similarities (``valid_sims``; a row sample is enough).
    max_step, min_points : see :func:`nice_step`.
    lo_limit, hi_limit : the parameter's hard limits (e.g. the graph's edge floor for a
        threshold cut of the stored forest); the grid is clipped to them.
    quantiles : the span's lower and upper quantile of ``sims``.

    Returns
    -------
    grid : sorted float array (multiples of the step, rounded to 6 decimals)
    step : float
    """
    s = np.asarray(sims, np.float64)
    if s.size == 0:
        raise ValueError("no kNN similarity to place a grid on")
    lo, hi = (float(v) for v in np.quantile(s, quantiles))
    lo, hi = max(lo, lo_limit), min(hi, hi_limit)
    if hi < lo:  # the whole span lies below the limit: one point at it
        lo = hi = lo_limit
    step = nice_step(hi - lo, max_step, min_points)
    k0, k1 = int(np.ceil(lo / step - 1e-9)), int(np.floor(hi / step + 1e-9))
    grid = np.round(np.arange(k0, max(k0, k1) + 1) * step, 6)
    return grid, step


@dataclass
class Sweep:
    """A label-chosen parameter and the curve it was chosen from.

    Attributes
    ----------
    best : the parameter with the highest score (the lowest such on ties).
    curve : list of (parameter, score, extra...) tuples over every evaluated point, sorted.
    step : the grid's step.
    peak_inside : the best point has an evaluated neighbour on both sides.
    note : why it is not inside (a hard limit was reached), else "".
    result : whatever the evaluator returned for the best point (e.g. its labels).
    """

    best: float
    curve: list
    step: float
    peak_inside: bool
    note: str = ""
    result: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"best": self.best, "step": self.step, "peak_inside": self.peak_inside, "note": self.note,
                "grid": [self.curve[0][0], self.curve[-1][0]], "points": len(self.curve), "curve": self.curve}


def sweep(evaluate: Callable[[Sequence[float]], list[tuple]], grid: np.ndarray, step: float, lo_limit: float = -1.0,
          hi_limit: float = 1.0, extend_steps: int = EXTEND_STEPS, name: str = "parameter") -> Sweep:
    """Evaluate a grid, extending it while the best point sits on an edge that can move.

    Parameters
    ----------
    evaluate : callable(values) -> list of (score, extra_tuple, result), one per value,
        in order (the pipeline evaluates a batch in parallel). ``score`` is maximised.
    grid, step : from :func:`similarity_grid`.
    lo_limit, hi_limit : the grid never extends past these.
    extend_steps : points added on an edge per extension.
    name : the parameter's name, for the note.

    Returns
    -------
    Sweep
    """
    done: dict[float, tuple] = {}
    todo = [float(v) for v in grid]
    while todo:
        for v, out in zip(todo, evaluate(todo)):
            done[v] = out
        keys = sorted(done)
        scores = np.array([done[k][0] for k in keys])
        i = int(np.argmax(scores))  # first maximum: the lowest parameter on ties
        todo = []
        if i == 0 and keys[0] - step >= lo_limit - 1e-9:
            todo = [round(keys[0] - j * step, 6) for j in range(1, extend_steps + 1) if keys[0] - j * step >= lo_limit - 1e-9]
        elif i == len(keys) - 1 and keys[-1] + step <= hi_limit + 1e-9:
            todo = [round(keys[-1] + j * step, 6) for j in range(1, extend_steps + 1) if keys[-1] + j * step <= hi_limit + 1e-9]
    inside = 0 < i < len(keys) - 1
    note = ""
    if not inside:
        side, limit = ("lowest", lo_limit) if i == 0 else ("highest", hi_limit)
        note = f"best {name} {keys[i]:g} is the {side} point allowed (limit {limit:g}): the peak may lie beyond it"
    curve = [(k, float(done[k][0]), *done[k][1]) for k in keys]
    return Sweep(best=keys[i], curve=curve, step=step, peak_inside=inside, note=note, result=done[keys[i]][2])


# Label-free rules for Infomap's edge floor, from the data's Otsu anchor ``a``
# (tasks.thresholds.auto_threshold) and its kNN similarities. All are measured and
# reported by `bench quality`; AUTO_MIN_SIM names the one its row uses.
def _rule_otsu(anchor: float, sims: np.ndarray) -> float:
    return float(anchor)


def _rule_edge_floor(anchor: float, sims: np.ndarray) -> float:
    return edge_floor(anchor)


def _rule_median(anchor: float, sims: np.ndarray) -> float:
    return float(np.median(sims))


MIN_SIM_RULES: dict[str, Callable[[float, np.ndarray], float]] = {
    "otsu": _rule_otsu,  # the anchor itself: the split between genuine and impostor kNN pairs
    "edge_floor": _rule_edge_floor,  # 1 - 1.5 (1 - anchor): the graph stage's default edge floor
    "knn_median": _rule_median,  # the median listed kNN similarity (no Otsu at all)
}
AUTO_MIN_SIM = "otsu"

# ``--method infomap`` on the cosine without ``--min-sim``, where a model records a level for it (the general
# model's ``edges.infomap_level``, chosen on generated worlds in its training): the floor is the cosine at which
# the model's edge probability crosses that level -- the median cosine of the sampled kNN edges whose P lies
# within PROB_BAND of it. Why not Otsu's anchor alone: it splits the cosine histogram wherever its two modes
# are, which on a face model with a compressed scale (dlib: every kNN cosine in 0.89-0.98) or on large
# identities sits far from Infomap's best floor (pairwise F 0.49 against 0.96 chosen with labels); the scorer
# reads each edge on the run's own scale, so "where P crosses the level" moves with the face model.
PROB_BAND = 0.05
# Fewer sampled edges than this within the band: no crossing is read (the caller falls back to Otsu's anchor).
MIN_BAND_EDGES = 50


def prob_level_min_sim(sims: np.ndarray, probs: np.ndarray, level: float, band: float = PROB_BAND,
                       min_edges: int = MIN_BAND_EDGES) -> tuple[float | None, int]:
    """The cosine where the edge probability crosses ``level``: the median of ``sims`` over the pairs whose
    ``probs`` lie within ``band`` of it (``sims`` and ``probs`` aligned, one value per listed kNN edge).

    Returns ``(min_sim, edges in the band)``; ``min_sim`` is None when the band holds fewer than ``min_edges``.
    """
    s = np.asarray(sims, np.float64).ravel()
    p = np.asarray(probs, np.float64).ravel()
    if s.shape != p.shape:
        raise ValueError(f"sims and probs differ in length ({len(s)} and {len(p)}): one value per kNN edge each")
    sel = np.abs(p - float(level)) <= band
    count = int(sel.sum())
    if count < min_edges:
        return None, count
    return round(float(np.median(s[sel])), 6), count


def auto_min_sim(anchor: float, sims: np.ndarray, rule: str = AUTO_MIN_SIM) -> float:
    """Infomap's edge floor from the data alone (no labels), by one of :data:`MIN_SIM_RULES`."""
    if rule not in MIN_SIM_RULES:
        raise ValueError(f"unknown min_sim rule {rule!r}; choose one of {', '.join(MIN_SIM_RULES)}")
    return round(float(MIN_SIM_RULES[rule](anchor, np.asarray(sims, np.float64))), 6)
