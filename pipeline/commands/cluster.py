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


def cluster_gcn(store, cfg, client, options: dict) -> dict:
    """``--method gcn`` (default): knn -> graph -> proposals -> GCN-D -> GCN-S -> dedup."""
    from ..run import run_cluster

    model = options["model"]
    report = run_cluster(store, cfg, client, model, echo=lambda s: click.echo(s, err=True),
                         force=options.get("force", False))
    return {**report["dedup"]["summary"], "stages": report}


def format_gcn(summary: dict) -> str:
    ran = [name for name, r in summary["stages"].items() if r["ran"]]
    skipped = [name for name, r in summary["stages"].items() if not r["ran"]]
    attached = (f", {summary['attached']} faces attached to their most probable neighbour's cluster at "
                f"P >= {summary['attach_level']}" if summary.get("attach_level") is not None else "")
    return (f"gcn: {summary['n_clusters']} clusters ({summary['proposal_clusters']} from proposals, "
            f"{summary['pruned_clusters']} of GCN-S-pruned faces, {summary['singletons_uncovered']} singletons{attached}); "
            f"stages run: {', '.join(ran) or 'none'}; skipped (up to date): {', '.join(skipped) or 'none'}")


# method name -> (runner, formatter)
METHODS = {"gcn": (cluster_gcn, format_gcn), "threshold": (cluster_threshold, format_threshold)}
DEFAULT_METHOD = "gcn"


@click.command("cluster")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(sorted(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help="Clustering method.")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="gcn method: model directory written by `facecluster train`.")
@click.option("--th", type=float, default=None,
              help="threshold method: similarity threshold (default: derived from the data's kNN similarities).")
@click.option("--max-size", type=int, default=None,
              help="threshold method: split components larger than this with Algorithm 1 (default: no split).")
@click.option("--force", is_flag=True, help="Recompute even if the stored result is up to date.")
@config_option
@dask_options
@pass_config()
def command(run, method, model, th, max_size, force, cfg):
    """Cluster the faces of RUN; writes `clusters` (every face labelled).

    The default (gcn) runs the learned chain; stages whose inputs and parameters
    are unchanged are skipped, so re-running after a crash resumes.

    \b
    Examples:
      facecluster cluster run.zarr --model model/                 # learned: GCN-D + GCN-S
      facecluster cluster run.zarr --model model/ --scheduler tcp://host:8786
      facecluster cluster run.zarr --method threshold            # automatic threshold
      facecluster cluster run.zarr --method threshold --th 0.6
    """
    from ..cluster import connect
    from ..store import RunStore

    runner, fmt = METHODS[method]
    store = RunStore.open(run)
    if method == "gcn":  # bad model input fails before a cluster is started
        from ..train import load_models

        if not model:
            from ..errors import BadInput

            raise BadInput(f"{run}: the learned method needs a model: pass --model DIR (train one with "
                           "`facecluster train LABELLED_RUN.zarr --out DIR`), or use --method threshold")
        # the weights are loaded too (small): a bad or unsafe file fails before kNN runs, not after
        load_models(model, store.array("features").shape[1], store.url)
        from ..model_files import edge_meta, load_edge_scorer

        if edge_meta(model) is not None:
            load_edge_scorer(model)
    # one writer for the whole command (a second `cluster` must not delete our _tmp arrays);
    # leftovers of a killed run are removed whichever method runs now
    with store.writing("cluster"), connect(cfg.dask) as client:
        store.clean_tmp()
        summary = runner(store, cfg, client, {"th": th, "max_size": max_size, "force": force, "model": model})
    click.echo(fmt(summary))
