"""A clustering against ground truth: the labels of a run store or label files, and the metrics table.

Used by ``facecluster evaluate``, ``facecluster demo`` and ``bench quality``; the metrics
themselves are :func:`facecluster.tasks.metrics.evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BadInput


def _is_run_store(p: Path) -> bool:
    return p.is_dir() and ((p / "zarr.json").exists() or p.suffix == ".zarr")


def _read_label_file(path: Path, what: str) -> np.ndarray:
    from facecluster.tasks.io import read_labels

    try:
        return read_labels(path, option=what)
    except ValueError as e:
        raise BadInput(f"{what}: {e}") from None


def load_labels(target: str | Path, gt: str | Path | None = None, pred_array: str = "clusters") -> tuple[np.ndarray, np.ndarray, dict]:
    """Predicted and ground-truth labels for ``target`` (a run store or a label file).

    Parameters
    ----------
    target : path
        A run store (predictions from its ``pred_array`` array, gt from its ``labels``
        array unless ``gt`` is given) or a ``.npy`` / ``.meta`` label file.
    gt : path, optional
        Ground-truth label file (``.npy`` / ``.meta``).
    pred_array : str
        Array of the run store holding the predicted cluster ids.

    Returns
    -------
    (gt, pred, sources) : int64 arrays and a dict naming where each came from.

    Raises
    ------
    BadInput
        Missing ground truth, unreadable files, or lengths that differ.
    """
    from .store import RunStore

    p = Path(target)
    if not p.exists():
        raise BadInput(f"{p}: no such file or run store; give a run store (RUN.zarr) or a .npy/.meta label file")
    if _is_run_store(p):
        store = RunStore.open(p, mode="r")
        if not store.has(pred_array):
            raise BadInput(f"{p}: run store has no {pred_array!r} array; run `facecluster cluster {p}` first "
                           "or name another array with --pred-array")
        # results computed from other data (re-ingested since) or left incomplete are refused, not scored
        store.require_fresh_array(pred_array, f"re-run `facecluster cluster {p}` before evaluating {pred_array!r}")
        pred = np.asarray(store.array(pred_array)[:], dtype=np.int64)
        pred_src = f"{p}:{pred_array}"
        if gt is not None:
            truth = _read_label_file(Path(gt), "--gt")
            gt_src = str(gt)
        elif store.has("labels"):
            truth = np.asarray(store.array("labels")[:], dtype=np.int64)
            gt_src = f"{p}:labels"
        else:
            raise BadInput(f"{p}: run store has no ground-truth 'labels'; pass --gt LABELS.npy|.meta "
                           "(or ingest with --labels)")
    else:
        pred = _read_label_file(p, "predictions")
        pred_src = str(p)
        if gt is None:
            raise BadInput(f"{p}: a label file needs ground truth to compare with; pass --gt LABELS.npy|.meta")
        truth = _read_label_file(Path(gt), "--gt")
        gt_src = str(gt)
    if truth.shape[0] != pred.shape[0]:
        raise BadInput(f"ground truth {gt_src} has {truth.shape[0]} labels but predictions {pred_src} have "
                       f"{pred.shape[0]}; both must label the same faces in the same order")
    if truth.shape[0] == 0:
        raise BadInput(f"{pred_src}: no labels to evaluate (0 faces)")
    return truth, pred, {"predictions": pred_src, "ground_truth": gt_src}


def format_table(results: dict) -> str:
    """A plain-text table of the demo's methods (rich renders it in the CLI)."""
    head = f"{'method':<58} {'pairwise P':>10} {'R':>6} {'F':>6}  {'BCubed P':>8} {'R':>6} {'F':>6}  {'NMI':>6} {'clusters':>8}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        lines.append(f"{name:<58} {m['pairwise_precision']:>10.4f} {m['pairwise_recall']:>6.4f} {m['pairwise_f']:>6.4f}  "
                     f"{m['bcubed_precision']:>8.4f} {m['bcubed_recall']:>6.4f} {m['bcubed_f']:>6.4f}  {m['nmi']:>6.4f} "
                     f"{m['n_clusters']:>8d}")
    return "\n".join(lines)
