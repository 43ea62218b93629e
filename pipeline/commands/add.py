"""`facecluster add RUN NEW_FEATURES`: add faces to a clustered run (see :mod:`facecluster.pipeline.additions`)."""

from __future__ import annotations

import click

from ._common import config_option, dask_options, pass_config


@click.command("add")
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("new_features", type=click.Path())
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="Identity labels of the new faces (.npy or .meta), stored beside the run's labels.")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="The model the run was clustered with (learned method).")
@config_option
@dask_options
@pass_config()
def command(run, new_features, labels, model, cfg):
    """Add the faces of NEW_FEATURES to the clustered RUN; re-clusters only what they touch.

    The new faces get kNN lists against every face, the old lists they enter are updated, and the
    faces connected to them are re-clustered with the run's own thresholds; every other cluster keeps
    its id. Re-running after a crash resumes; re-running a finished add does nothing.

    \b
    Examples:
      facecluster add run.zarr new_faces.npy --model model/    # a run clustered by the learned method
      facecluster add run.zarr new_faces.npy                   # a run clustered with --method threshold
    """
    from ..additions import finish_add, prepare_add
    from ..cluster import connect
    from ..store import RunStore

    store = RunStore.open(run)
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    with store.writing("add"):
        add = prepare_add(store, new_features, cfg, model_dir=model, labels=labels, echo=echo)  # bad input: before
        if add.skipped is not None:                                                             # a cluster starts
            s = add.skipped
        else:
            with connect(cfg.dask) as client:
                s = finish_add(store, add, cfg, client, model_dir=model, echo=echo)
    if s.get("skipped"):
        click.echo(f"add: up to date ({s['n_new']} faces of {new_features} already added)")
        return
    click.echo(f"add: {s['n_new']} faces added to {s['n_old']} ({s['method']}); {s['reclustered']} faces re-clustered; "
               f"{s['n_clusters']} clusters, {s['old_cluster_ids_kept']} of {s['old_clusters']} old cluster ids kept; "
               f"{s['seconds']['total']:.1f}s")
