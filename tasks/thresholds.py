"""Similarity thresholds that fit the data, and the proposal settings built from them.

Face models put cosine similarities on very different scales (the best single
threshold ranges from 0.35 to 0.96 across models), so the reference's absolute
thresholds (0.6-0.75, tuned to MS1M features) give "zero clusters" elsewhere.

``auto_threshold`` is Otsu's threshold on the histogram of the kNN similarities
(every listed neighbour of a row sample): the kNN lists mix a few genuine pairs
(high similarity) with many impostors (low), and Otsu's split between the two
populations follows the model's scale. Measured with exact k=80 kNN (see the
proposals stage docs): LFW/SFace 0.525 (best BCubed-F threshold 0.535, best
pairwise 0.63); built-in synthetic 20k 0.490 (best 0.51 / 0.55); the same
synthetic faces squeezed into cosine 0.9-1 0.970 (best 0.972 / 0.975).

Proposal settings are then placed relative to that anchor in units of
``1 - threshold`` (the distance to 1 that Algorithm 1's ladder
``tau <- tau + (1 - tau) * step`` shrinks geometrically): the reference's
th0 in {0.6, 0.65, 0.7, 0.75} is ``1 - 0.4 * f`` for f in {1, 7/8, 3/4, 5/8},
and its higher-level threshold 0.4 is ``1 - 1.5 * 0.4``.
"""

from __future__ import annotations

import numpy as np

# th0 = 1 - (1 - anchor) * f: the reference's relative spread of thresholds
_F4 = (1.0, 0.875, 0.75, 0.625)
# Whole-component cuts: th0 = 1 - (1 - anchor) * f, not split at max_size (only at ``whole_size``), one level.
# Why: pairwise F is dominated by the largest identities (hundreds of faces), which the
# max_size-split settings can only offer in pieces; with these cuts in the proposal set
# dedup can pick a whole identity. Measured (dedup ranked by true IoU, synthetic 20k test):
# pairwise F 0.900 -> 0.924, above the best ground-truth threshold (0.862).
_WHOLE = (1.0, 0.9375, 0.875, 0.8125, 0.75)
PRESETS = {
    # name: (f values, (max_size factor, sv_max_size) pairs, whole-component f values)
    "fast": ((1.0, 0.75), ((1.0, 8),), (1.0, 0.875)),
    "default": (_F4, ((1.0, 4), (1.0, 8)), _WHOLE),
    "thorough": (_F4 + (0.5,), ((1.0, 4), (1.0, 8), (0.5, 4), (0.5, 8)), _WHOLE + (0.6875, 0.625)),
}
SV_TH_FACTOR = 1.5  # higher levels: 1 - 1.5 * (1 - anchor) (reference: 0.4 for anchor 0.6)


EDGE_FLOOR_FACTOR = 1.5  # graph keeps edges >= 1 - 1.5 * (1 - anchor): below every level-0 threshold


def edge_floor(anchor: float) -> float:
    """Lowest kNN similarity the graph keeps by default, for a data anchor threshold.

    Level-0 thresholds are ``>= anchor`` in every preset, so the floor sits a
    margin below the anchor (in units of ``1 - threshold``), leaving room for
    explicit thresholds somewhat under the anchor; lower ones need an explicit
    ``min_edge_sim``.
    """
    return float(1.0 - EDGE_FLOOR_FACTOR * (1.0 - anchor))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-d sample (maximises the between-class variance)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        raise ValueError("no finite similarity to derive a threshold from")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-9:
        return lo
    h, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w = h / h.sum()
    w0 = np.cumsum(w)
    m0 = np.cumsum(w * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0) ** 2 / (w0 * (1.0 - w0))
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


MIN_AUTO_SIMILARITIES = 16  # below this a histogram split is noise (N = 2, k = 1 gave one value: "merge them")


class TooFewSimilarities(ValueError):
    """Too few kNN similarities to derive a threshold from the data."""


def auto_threshold(knn_sim: np.ndarray) -> float:
    """The data's anchor threshold from a sample of kNN similarity rows (padding: non-finite or -inf).

    Parameters
    ----------
    knn_sim : (rows, k) float array of kNN similarities (a row sample is enough).

    Raises
    ------
    TooFewSimilarities
        Fewer than ``MIN_AUTO_SIMILARITIES`` finite similarities: an explicit threshold is needed.
    """
    s = np.asarray(knn_sim, np.float32).ravel()
    s = s[np.isfinite(s) & (s > -1.5)]
    if len(s) < MIN_AUTO_SIMILARITIES:
        raise TooFewSimilarities(f"only {len(s)} kNN similarities, too few to derive a threshold from the data "
                                 f"(at least {MIN_AUTO_SIMILARITIES})")
    return otsu_threshold(s)


def make_settings(preset: str, anchor: float, step: float, max_size: int, thresholds=None, sv_k: int = 3,
                  levels: int = 2, sv_th: float | None = None, whole_size: int = 0) -> list[dict]:
    """The proposal settings of a preset.

    Parameters
    ----------
    preset : "fast" (2 settings), "default" (8) or "thorough" (20), plus the
        preset's whole-component cuts when ``whole_size`` > 0.
    anchor : float
        The data's threshold (``auto_threshold``), or the lowest explicit threshold.
    step, max_size : Algorithm 1's ladder step and largest super-vertex.
    thresholds : sequence of float, optional
        Explicit level-0 thresholds; replace the preset's f values (the other
        variations of the preset are kept).
    sv_k, levels : neighbours among super-vertices, and number of levels (>= 1).
    sv_th : float, optional
        Threshold at levels >= 1 (default ``1 - 1.5 * (1 - anchor)``).
    whole_size : int
        When > ``max_size``: add one-level settings that cut the forest at the
        preset's whole-component thresholds with ``max_size = whole_size`` (plain
        connected components up to that size; with explicit ``thresholds``, at
        those thresholds). 0: none.

    Returns
    -------
    list of dict with keys id, th0, step, max_size, sv_k, sv_th, sv_max_size, levels.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fs, variants, whole_fs = PRESETS[preset]
    if thresholds:
        th0s = sorted(float(t) for t in thresholds)
        anchor = th0s[0]
        whole_th = th0s
    else:
        th0s = [1.0 - (1.0 - anchor) * f for f in fs]
        whole_th = [1.0 - (1.0 - anchor) * f for f in whole_fs]
    if sv_th is None:
        sv_th = max(-1.0, 1.0 - SV_TH_FACTOR * (1.0 - anchor))
    out = []
    for size_factor, sv_max in variants:
        for th0 in th0s:
            out.append({"id": len(out), "th0": round(float(th0), 6), "step": float(step),
                        "max_size": max(2, int(round(max_size * size_factor))), "sv_k": int(sv_k),
                        "sv_th": round(float(sv_th), 6), "sv_max_size": int(sv_max), "levels": int(levels)})
    if whole_size and int(whole_size) > max_size:
        for th0 in whole_th:
            out.append({"id": len(out), "th0": round(float(th0), 6), "step": float(step), "max_size": int(whole_size),
                        "sv_k": int(sv_k), "sv_th": round(float(sv_th), 6), "sv_max_size": 2, "levels": 1})
    return out
