"""`facecluster demo`: the built-in dataset end to end, with baselines, in one table."""

from __future__ import annotations

import click

from ._common import config_option, dask_options, pass_config


@click.command("demo")
@click.option("-o", "--out", "out_dir", default="facecluster-demo", show_default=True, type=click.Path(file_okay=False),
              help="Working folder (data, run stores, model, demo.json). Re-running reuses what is up to date.")
@click.option("-n", "--faces", "n", default=40000, show_default=True, type=click.IntRange(min=200),
              help="Faces in the built-in dataset (half train, half test; disjoint identities).")
@click.option("--seed", default=0, show_default=True, type=int, help="Dataset seed.")
@config_option
@dask_options
@pass_config()
def command(out_dir, n, seed, cfg):
    """Run the whole method on the built-in face-like dataset and compare it with its baselines.

    synth -> ingest -> train GCN-D/GCN-S on the training split -> cluster the test
    split (knn -> graph -> proposals -> GCN-D -> GCN-S -> dedup) -> evaluate, next to
    the best single-threshold clustering (threshold chosen with the labels) and
    kNN + Infomap. Takes about 5 minutes on 2 cores (training most of it).

    \b
    Examples:
      facecluster demo
      facecluster demo -n 60000 --workers 4 -o /tmp/demo
    """
    import time

    from ..cluster import connect
    from ..demo import run_demo
    from ..evaluation import format_table

    t0 = time.perf_counter()
    with connect(cfg.dask) as client:
        summary = run_demo(out_dir, n, cfg, client, seed=seed, echo=lambda s: click.echo(s, err=True))
    click.echo("")
    click.echo(f"Test split: {summary['n_test']} faces, {summary['results']['GCN-D + GCN-S']['gt_n_clusters']} identities")
    click.echo(format_table(summary["results"]))
    click.echo(f"\nwritten: {out_dir}/demo.json, run store {out_dir}/test.zarr (clusters), model {out_dir}/model "
               f"- total {time.perf_counter() - t0:.0f}s")
