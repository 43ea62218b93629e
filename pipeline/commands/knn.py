"""`facecluster knn RUN.zarr`: chunk-wise cosine kNN on Dask workers (exact or IVF)."""

from __future__ import annotations

import click

from ._common import config_option, dask_options, pass_config


def format_summary(s: dict) -> str:
    """One line: N, k, mode, strategy, time, queries/s (and IVF nlist/nprobe/edge recall)."""
    if s.get("skipped"):
        return f"knn: up to date (N={s.get('n')}, k={s.get('k')}, mode={s.get('mode')}), skipped"
    line = (f"knn: N={s['n']} k={s['k']} mode={s['mode']} ({s['strategy']}, db_rows={s['db_rows']}, "
            f"q_rows={s['q_rows']}, {s['tasks']} tasks, {s['workers']} workers, OpenBLAS {'/'.join(s['openblas'])}) "
            f"in {s['seconds']:.1f}s, {s['queries_per_s']:.0f} queries/s")
    if s["mode"] == "ivf":
        line += (f"; nlist={s['nlist']} nprobe={s['nprobe']} edge recall {s['edge_recall']:.4f} "
                 f"(sim >= {s['edge_th']:.3f}, {s['tune_queries']} queries)")
    return line


@click.command("knn")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("-k", "k", type=int, default=None, help="Neighbours per face, self excluded (default 80).")
@click.option("--mode", type=click.Choice(["auto", "exact", "ivf"]), default=None,
              help="exact (faiss IndexFlatIP blocks), ivf, or auto (ivf from knn.ivf_min_n faces).")
@click.option("--nprobe", type=int, default=None, help="IVF lists probed per query (default: tuned for edge recall).")
@click.option("--nlist", type=int, default=None, help="IVF lists (default nlist_factor * sqrt(N), nlist_factor 8).")
@click.option("--db-rows", type=int, default=None, help="Database rows per task (default: by worker memory).")
@click.option("--force", is_flag=True, help="Recompute even if the stored kNN is up to date.")
@config_option
@dask_options
@pass_config({"k": "knn.k", "mode": "knn.mode", "nprobe": "knn.nprobe", "nlist": "knn.nlist", "db_rows": "knn.db_rows"})
def command(run, force, cfg):
    """Cosine kNN of every face of RUN (self excluded), written to knn/index and knn/sim.

    \b
    Examples:
      facecluster knn run.zarr
      facecluster knn run.zarr -k 30 --mode ivf --nprobe 32
      facecluster knn run.zarr --scheduler tcp://HOST:8786
    """
    from ..cluster import connect
    from ..stages.knn import check_input, run_knn
    from ..store import RunStore

    store = RunStore.open(run)
    check_input(store, cfg.knn.k)  # bad input fails before a cluster starts
    with connect(cfg.dask) as client:
        summary = run_knn(store, cfg, client, force=force)
    click.echo(format_summary(summary))
