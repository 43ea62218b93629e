"""`facecluster report RUN.zarr [-o DIR] [--gt LABELS]`."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder (default: RUN.report/ next to the run store); an earlier report there is replaced.")
@click.option("--gt", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Ground-truth labels (.npy or .meta, one per face or per input row); default: labels stored at ingest.")
def command(run, out_dir, gt):
    """Write an HTML report of RUN: index.html plus PNG plots, in one folder.

    \b
    Sections (each says "not run" when the run lacks its data):
      quality table      pairwise / BCubed P, R, F and NMI per clustering (needs ground truth)
      cluster sizes      size distribution, log-log, per clustering and the truth
      IoU / IoP          histograms of the GCN-D predictions
      proposals          count per setting and level, sizes
      kNN similarity     1st and k-th neighbour similarity
      similarity blocks  the largest clusters' cosine-similarity structure
      time per stage     from the stage records; parameters and package versions

    \b
    Examples:
      facecluster report run.zarr                     # -> run.report/index.html
      facecluster report run.zarr -o report/ --gt labels.meta
    """
    from ..report import write_report

    res = write_report(run, out_dir, gt=gt)
    click.echo(f"wrote {res.index} ({len(res.images)} plots)")
    if res.not_run:
        click.echo(f"not run (no data in this run): {', '.join(res.not_run)}")
    for name, m in res.metrics.items():
        click.echo(f"{name}: pairwise F {m['pairwise_f']:.4f}  BCubed F {m['bcubed_f']:.4f}  NMI {m['nmi']:.4f}  "
                   f"({m['n_clusters']} clusters)")
