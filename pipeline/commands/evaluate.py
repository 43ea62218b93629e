"""`facecluster evaluate RUN.zarr|PRED [--gt L]`: pairwise / BCubed F and NMI against ground truth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import numpy as np

from ..errors import BadInput

log = logging.getLogger(__name__)


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
    from ..store import RunStore

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


def default_json_path(target: str | Path) -> Path:
    """``RUN.zarr`` -> ``RUN.eval.json`` beside it; ``pred.npy`` -> ``pred.eval.json`` beside it."""
    p = Path(target)
    name = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.resolve().parent / f"{name}.eval.json"


def print_table(result: dict) -> None:
    """The metrics as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{result['sources']['predictions']}  vs  {result['sources']['ground_truth']}")
    t.add_column("metric")
    t.add_column("precision", justify="right")
    t.add_column("recall", justify="right")
    t.add_column("F", justify="right")
    m = result["metrics"]
    t.add_row("pairwise", f"{m['pairwise_precision']:.4f}", f"{m['pairwise_recall']:.4f}", f"[bold]{m['pairwise_f']:.4f}")
    t.add_row("BCubed", f"{m['bcubed_precision']:.4f}", f"{m['bcubed_recall']:.4f}", f"[bold]{m['bcubed_f']:.4f}")
    t.add_row("NMI", "", "", f"[bold]{m['nmi']:.4f}")
    c = Table(title=f"{m['n']} faces")
    c.add_column("")
    c.add_column("clusters", justify="right")
    c.add_column("singletons", justify="right")
    c.add_column("largest", justify="right")
    c.add_column("mean size", justify="right")
    c.add_row("predicted", str(m["n_clusters"]), str(m["n_singletons"]), str(m["max_cluster"]), f"{m['mean_cluster']:.2f}")
    c.add_row("ground truth", str(m["gt_n_clusters"]), str(m["gt_n_singletons"]), str(m["gt_max_cluster"]), f"{m['gt_mean_cluster']:.2f}")
    con = Console()
    con.print(t)
    con.print(c)


@click.command("evaluate")
@click.argument("target", metavar="RUN.zarr|PRED", type=click.Path())
@click.option("--gt", type=click.Path(dir_okay=False), default=None,
              help="Ground-truth labels (.npy/.meta). Default for a run store: its `labels` array.")
@click.option("--pred-array", default="clusters", show_default=True, help="Run-store array holding the predicted cluster ids.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the JSON result (default: <name>.eval.json beside the input).")
def command(target, gt, pred_array, json_out):
    """Pairwise and BCubed precision/recall/F, NMI, cluster counts of a clustering.

    \b
    Examples:
      facecluster evaluate run.zarr                       # clusters vs the run's labels
      facecluster evaluate pred.npy --gt labels.meta
    """
    from facecluster.tasks.metrics import evaluate

    truth, pred, sources = load_labels(target, gt, pred_array)
    result = {"sources": sources, "metrics": evaluate(truth, pred)}
    print_table(result)
    out = Path(json_out) if json_out else default_json_path(target)
    try:
        out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise BadInput(f"{out}: cannot write the JSON result ({e.strerror}); pass --json PATH somewhere writable") from None
    click.echo(f"wrote {out}")
