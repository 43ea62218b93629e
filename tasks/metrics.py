"""Clustering quality against ground truth: pairwise F, BCubed F, NMI.

Everything is computed from the sparse contingency table (one ``np.unique`` over
the (gt, pred) label pairs), so the cost is O(N log N) time and O(N) memory: no
N x N pair matrix, no Python loop over faces. With ``n_ij = |G_i ∩ C_j|``,
``a_i = |G_i|`` (ground-truth class sizes) and ``b_j = |C_j|`` (predicted cluster
sizes)::

    pairwise P = Σ n_ij(n_ij − 1) / Σ b_j(b_j − 1)
    pairwise R = Σ n_ij(n_ij − 1) / Σ a_i(a_i − 1)
    BCubed   P = (1/N) Σ n_ij² / b_j
    BCubed   R = (1/N) Σ n_ij² / a_i
    F = 2PR / (P + R)   (0 when P + R = 0)
    NMI = MI / ((H(gt) + H(pred)) / 2)   (scikit-learn's default "arithmetic" normalisation)

Edge-case conventions (documented because the formulas are 0/0 there):

* pairwise precision when every predicted cluster is a singleton (no predicted
  same-cluster pair): **1.0** — no predicted pair is wrong. Pairwise recall when
  every ground-truth class is a singleton: **1.0** — no true pair is missed. So
  all-singleton predictions against a gt with pairs score P = 1, R = 0, F = 0, and
  all-singletons against all-singletons score F = 1. (This is the limit scikit-learn's
  ``pair_confusion_matrix`` implies: its false-positive / false-negative cells are 0.)
* NMI follows scikit-learn exactly: 1.0 when both labelings have a single cluster,
  0.0 when the mutual information is 0 otherwise.

Labels may be any integers (negative too; e.g. -1 is just another label), or any
other dtype ``np.unique`` can sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Contingency", "contingency", "pairwise_f", "bcubed_f", "nmi", "evaluate", "f_score"]


@dataclass(frozen=True)
class Contingency:
    """Sparse contingency table of two labelings.

    Attributes
    ----------
    n : int
        Number of faces N.
    nij : numpy.ndarray
        Non-zero cell counts (int64), one per distinct (gt, pred) pair.
    ai : numpy.ndarray
        Size of the gt class of each cell (int64, aligned with ``nij``).
    bj : numpy.ndarray
        Size of the predicted cluster of each cell (int64, aligned with ``nij``).
    gt_sizes : numpy.ndarray
        Size of every ground-truth class (int64).
    pred_sizes : numpy.ndarray
        Size of every predicted cluster (int64).
    """

    n: int
    nij: np.ndarray
    ai: np.ndarray
    bj: np.ndarray
    gt_sizes: np.ndarray
    pred_sizes: np.ndarray


def _as_labels(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        if a.ndim == 2 and 1 in a.shape:
            a = a.reshape(-1)
        else:
            raise ValueError(f"{name} must be a 1-D array of labels, got shape {a.shape}")
    return a


def contingency(gt, pred) -> Contingency:
    """Build the sparse contingency table of ``gt`` vs ``pred``.

    Parameters
    ----------
    gt, pred : array-like, shape (N,)
        Ground-truth and predicted labels (any integers, any order).

    Returns
    -------
    Contingency

    Raises
    ------
    ValueError
        If the lengths differ, the arrays are not 1-D, or N = 0.
    """
    g = _as_labels(gt, "gt")
    p = _as_labels(pred, "pred")
    if g.shape[0] != p.shape[0]:
        raise ValueError(f"gt has {g.shape[0]} labels but pred has {p.shape[0]}; both must label the same faces")
    if g.shape[0] == 0:
        raise ValueError("no labels to evaluate (N = 0)")
    # dense codes 0..G-1 / 0..C-1; inverse indices come back int64 (np.intp)
    _, gi, gs = np.unique(g, return_inverse=True, return_counts=True)
    _, pi, ps = np.unique(p, return_inverse=True, return_counts=True)
    gi = gi.reshape(-1).astype(np.int64, copy=False)
    pi = pi.reshape(-1).astype(np.int64, copy=False)
    n_pred = np.int64(ps.shape[0])
    # G * C <= N^2 < 2^63 for any N below 3e9: the pair code cannot overflow
    codes, counts = np.unique(gi * n_pred + pi, return_counts=True)
    row = codes // n_pred
    col = codes - row * n_pred
    gs = gs.astype(np.int64)
    ps = ps.astype(np.int64)
    return Contingency(n=int(g.shape[0]), nij=counts.astype(np.int64), ai=gs[row], bj=ps[col],
                       gt_sizes=gs, pred_sizes=ps)


def f_score(p: float, r: float) -> float:
    """Harmonic mean ``2PR/(P+R)``; 0 when ``P + R == 0``."""
    return 0.0 if p + r == 0 else float(2.0 * p * r / (p + r))


def _pairwise(t: Contingency) -> tuple[float, float, float]:
    # integer sums: exact for any N a run can hold (Σ n² <= N² < 2^63)
    tp = int(np.sum(t.nij * (t.nij - 1)))
    pred_pairs = int(np.sum(t.pred_sizes * (t.pred_sizes - 1)))
    gt_pairs = int(np.sum(t.gt_sizes * (t.gt_sizes - 1)))
    precision = 1.0 if pred_pairs == 0 else tp / pred_pairs
    recall = 1.0 if gt_pairs == 0 else tp / gt_pairs
    return precision, recall, f_score(precision, recall)


def _bcubed(t: Contingency) -> tuple[float, float, float]:
    sq = t.nij.astype(np.float64) ** 2
    precision = float(np.sum(sq / t.bj) / t.n)
    recall = float(np.sum(sq / t.ai) / t.n)
    return precision, recall, f_score(precision, recall)


def _entropy(sizes: np.ndarray, n: int) -> float:
    if sizes.shape[0] <= 1:
        return 0.0
    s = sizes.astype(np.float64)
    return float(-np.sum((s / n) * (np.log(s) - np.log(n))))


def _nmi(t: Contingency) -> float:
    n_g, n_c = t.gt_sizes.shape[0], t.pred_sizes.shape[0]
    if n_g == n_c == 1:
        return 1.0  # neither labeling splits the data: identical
    if n_g == 1 or n_c == 1:
        return 0.0  # one side has zero entropy, so MI = 0
    n = float(t.n)
    nij = t.nij.astype(np.float64)
    outer = t.ai.astype(np.float64) * t.bj.astype(np.float64)
    # same term order as scikit-learn, so that tiny terms cancel the same way
    terms = (nij / n) * (np.log(nij) - np.log(n)) + (nij / n) * (-np.log(outer) + 2.0 * np.log(n))
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    mi = float(max(np.sum(terms), 0.0))
    if mi == 0.0:
        return 0.0
    norm = 0.5 * (_entropy(t.gt_sizes, t.n) + _entropy(t.pred_sizes, t.n))
    return float(mi / norm)


def pairwise_f(gt, pred) -> tuple[float, float, float]:
    """Pairwise precision, recall and F-score.

    Parameters
    ----------
    gt, pred : array-like, shape (N,)
        Ground-truth and predicted labels.

    Returns
    -------
    (precision, recall, f) : tuple of float
        Precision is 1.0 when no two faces share a predicted cluster, recall is 1.0
        when no two faces share a gt class (see module docstring).
    """
    return _pairwise(contingency(gt, pred))


def bcubed_f(gt, pred) -> tuple[float, float, float]:
    """BCubed precision, recall and F-score (every face weighted equally).

    Parameters
    ----------
    gt, pred : array-like, shape (N,)

    Returns
    -------
    (precision, recall, f) : tuple of float
    """
    return _bcubed(contingency(gt, pred))


def nmi(gt, pred) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (as scikit-learn's default).

    Parameters
    ----------
    gt, pred : array-like, shape (N,)

    Returns
    -------
    float
    """
    return _nmi(contingency(gt, pred))


def _cluster_stats(sizes: np.ndarray) -> dict:
    return {"n_clusters": int(sizes.shape[0]), "n_singletons": int(np.sum(sizes == 1)),
            "max_size": int(sizes.max()), "mean_size": float(sizes.mean())}


def evaluate(gt, pred) -> dict:
    """All metrics of ``pred`` against ``gt`` in one pass over the contingency table.

    Parameters
    ----------
    gt, pred : array-like, shape (N,)

    Returns
    -------
    dict
        ``n``, ``pairwise_precision``, ``pairwise_recall``, ``pairwise_f``,
        ``bcubed_precision``, ``bcubed_recall``, ``bcubed_f``, ``nmi``,
        ``n_clusters``, ``n_singletons``, ``max_cluster``, ``mean_cluster``
        (predicted), and ``gt_n_clusters``, ``gt_n_singletons``,
        ``gt_max_cluster``, ``gt_mean_cluster`` (ground truth). Plain Python
        scalars, JSON-serialisable.
    """
    t = contingency(gt, pred)
    pp, pr, pf = _pairwise(t)
    bp, br, bf = _bcubed(t)
    ps = _cluster_stats(t.pred_sizes)
    gs = _cluster_stats(t.gt_sizes)
    return {
        "n": t.n,
        "pairwise_precision": pp, "pairwise_recall": pr, "pairwise_f": pf,
        "bcubed_precision": bp, "bcubed_recall": br, "bcubed_f": bf,
        "nmi": _nmi(t),
        "n_clusters": ps["n_clusters"], "n_singletons": ps["n_singletons"],
        "max_cluster": ps["max_size"], "mean_cluster": ps["mean_size"],
        "gt_n_clusters": gs["n_clusters"], "gt_n_singletons": gs["n_singletons"],
        "gt_max_cluster": gs["max_size"], "gt_mean_cluster": gs["mean_size"],
    }
