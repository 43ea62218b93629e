"""`facecluster cluster RUN.zarr --method ...`: one cluster id per face, written to ``clusters``.

Methods are registered in :data:`METHODS` (name -> function(store, cfg, client, options) -> summary);
``threshold`` is the baseline: the components of the kNN graph at one similarity
threshold (optionally split by Algorithm 1), computed on the graph's maximum spanning forest.
"""

from __future__ import annotations

import click

from ._common import config_option, dask_options, pass_config
from .proposals import ensure_graph


def cluster_threshold(store, cfg, client, options: dict) -> dict:
    """``--method threshold``: components of the forest at ``--th`` (auto when unset)."""
    from ..stages.proposals import run_threshold_clusters

    ensure_graph(store, cfg, client)
    th = options.get("th")
    floor = store.record("graph")["summary"].get("min_edge_sim")
    if th is not None and floor is not None and th < floor and cfg.proposals.min_edge_sim is None:
        # An explicit threshold under the automatic edge floor: rebuild the graph down to it
        # rather than fail (an explicit [proposals] min_edge_sim is respected and checked).
        import dataclasses

        cfg = dataclasses.replace(cfg, proposals=dataclasses.replace(cfg.proposals, min_edge_sim=float(th)))
        ensure_graph(store, cfg, client)
    return run_threshold_clusters(store, options.get("th"), cfg, client, max_size=options.get("max_size"),
                                  force=options.get("force", False))


def format_threshold(summary: dict) -> str:
    th = summary.get("threshold", {})
    return (f"threshold {summary['th']:.4f} ({th.get('source', 'explicit')}): {summary['n_clusters']} clusters, "
            f"{summary['n_singletons']} singletons, largest {summary['largest']} faces")


# method name -> (runner, formatter). Other methods (the learned GCN path) register here.
METHODS = {"threshold": (cluster_threshold, format_threshold)}
DEFAULT_METHOD = "threshold"


@click.command("cluster")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(sorted(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help="Clustering method.")
@click.option("--th", type=float, default=None,
              help="threshold method: similarity threshold (default: derived from the data's kNN similarities).")
@click.option("--max-size", type=int, default=None,
              help="threshold method: split components larger than this with Algorithm 1 (default: no split).")
@click.option("--force", is_flag=True, help="Recompute even if the stored result is up to date.")
@config_option
@dask_options
@pass_config()
def command(run, method, th, max_size, force, cfg):
    """Cluster the faces of RUN; writes `clusters` (every face labelled).

    \b
    Examples:
      facecluster cluster run.zarr --method threshold            # automatic threshold
      facecluster cluster run.zarr --method threshold --th 0.6
    """
    from ..cluster import connect
    from ..store import RunStore

    runner, fmt = METHODS[method]
    store = RunStore.open(run)
    with connect(cfg.dask) as client:
        summary = runner(store, cfg, client, {"th": th, "max_size": max_size, "force": force})
    click.echo(fmt(summary))
