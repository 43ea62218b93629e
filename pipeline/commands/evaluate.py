"""`facecluster evaluate RUN.zarr|PRED [--gt L]`: pairwise / BCubed F and NMI against ground truth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from ..errors import BadInput
from ..evaluation import load_labels

log = logging.getLogger(__name__)


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
