"""`facecluster cluster RUN.zarr --method ...`: one cluster id per face, written to ``clusters``.

The methods live in :mod:`facecluster.pipeline.methods` (shared with the Python API); this
module parses the flags and prints each method's summary line.
"""

from __future__ import annotations

import click

from ..methods import DEFAULT_METHOD, METHODS
from ._common import config_option, dask_options, pass_config


def format_threshold(summary: dict) -> str:
    th = summary.get("threshold", {})
    cut = f"P(same identity) >= {summary['th']:g}" if summary.get("weights") == "learned" else f"{summary['th']:.4f}"
    return (f"threshold {cut} ({th.get('source', 'explicit')}): {summary['n_clusters']} clusters, "
            f"{summary['n_singletons']} singletons, largest {summary['largest']} faces")


def format_gcn(summary: dict) -> str:
    ran = [name for name, r in summary["stages"].items() if r["ran"]]
    skipped = [name for name, r in summary["stages"].items() if not r["ran"]]
    attached = (f", {summary['attached']} faces attached to their most probable neighbour's cluster at "
                f"P >= {summary['attach_level']}" if summary.get("attach_level") is not None else "")
    return (f"gcn: {summary['n_clusters']} clusters ({summary['proposal_clusters']} from proposals, "
            f"{summary['pruned_clusters']} of GCN-S-pruned faces, {summary['singletons_uncovered']} singletons{attached}); "
            f"stages run: {', '.join(ran) or 'none'}; skipped (up to date): {', '.join(skipped) or 'none'}")


def format_infomap(summary: dict) -> str:
    info = summary.get("min_sim_info", {})
    weights = "P(same identity)" if summary["weights"] == "learned" else "cosine"
    return (f"infomap on {weights} >= {summary['min_sim']:.4f} ({info.get('source', 'explicit')}): "
            f"{summary['n_clusters']} clusters, {summary['n_singletons']} singletons, largest {summary['largest']} faces; "
            f"largest component {summary['largest_component']} faces (one task), {summary['components_multi']} "
            f"components of >= 2 faces in {summary['tasks']} tasks")


# method name -> its summary line
FORMATS = {"gcn": format_gcn, "threshold": format_threshold, "infomap": format_infomap}


@click.command("cluster")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(sorted(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help="Clustering method.")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="gcn method: model directory written by `facecluster train` (default: the general model shipped with "
                   "facecluster, trained on generated faces only). infomap method (optional): weigh "
                   "edges by its edge scorer's probabilities, at its floor.")
@click.option("--th", type=float, default=None,
              help="threshold method: cosine similarity threshold (default: no cosine cut; components of the kNN "
                   "edges with P(same identity) >= the cut the shipped general model chose in training).")
@click.option("--max-size", type=int, default=None,
              help="threshold method: split components larger than this with Algorithm 1 (default: no split).")
@click.option("--min-sim", type=float, default=None,
              help="infomap method: the edge floor (default: from the data, no labels: the cosine where the shipped general "
                   "model's P(same identity) crosses the level it chose in training; Otsu's anchor of the kNN similarities "
                   "where no edge's P is near it; with --model, the model's floor).")
@click.option("--force", is_flag=True, help="Recompute even if the stored result is up to date.")
@config_option
@dask_options
@pass_config()
def command(run, method, model, th, max_size, min_sim, force, cfg):
    """Cluster the faces of RUN; writes `clusters` (every face labelled).

    The default (gcn) runs the learned chain; stages whose inputs and parameters
    are unchanged are skipped, so re-running after a crash resumes.

    \b
    Examples:
      facecluster cluster run.zarr                                # learned, the shipped general model
      facecluster cluster run.zarr --model model/                 # learned, your own model
      facecluster cluster run.zarr --model model/ --scheduler tcp://host:8786
      facecluster cluster run.zarr --method threshold            # automatic: P(same identity) >= the general model's cut
      facecluster cluster run.zarr --method threshold --th 0.6
      facecluster cluster run.zarr --method infomap              # no labels: cosine, min_sim read off the general model
      facecluster cluster run.zarr --method infomap --model model/   # on the learned affinity
    """
    from ..cluster import connect
    from ..methods import check_method, model_for, run_method
    from ..store import RunStore

    store = RunStore.open(run)
    model, used = model_for(method, model, th)  # the learned method (and threshold without --th): the general model
    check_method(store, method, model, min_sim)
    # one writer for the whole command (a second `cluster` must not delete our _tmp arrays), taken
    # before the cluster starts; leftovers of a killed run are removed whichever method runs now
    if used:
        click.echo(used, err=True)
    with store.writing("cluster"), connect(cfg.dask) as client:
        summary = run_method(store, cfg, client, method, {"th": th, "max_size": max_size, "min_sim": min_sim, "force": force,
                                                        "model": model},
                             echo=lambda s: click.echo(s, err=True))
    click.echo(FORMATS[method](summary))
