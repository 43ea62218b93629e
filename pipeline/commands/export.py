"""`facecluster export RUN.zarr --format meta|npy|parquet|csv [-o PATH]`."""

from __future__ import annotations

import click

from ..export import FORMATS


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format (default: from the -o extension, else meta).")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (default: RUN.clusters.FORMAT next to the run store).")
@click.option("--array", default="clusters", show_default=True,
              help="Clustering array of the run to export (e.g. another method's result).")
def command(run, fmt, out, array):
    """Write the cluster id of every face of RUN to a file.

    \b
    meta     one cluster id per line, line i = face i (the reference implementation's format)
    npy      1-D int64 array, index i = face i
    parquet  columns face_id, cluster_id, input_row, score
    csv      same columns as parquet
    score = predicted IoU of the proposal that gave the face its cluster (empty for
    faces no proposal claimed); present only when the run stored it. The file is
    written under a temporary name and renamed when complete.

    \b
    Examples:
      facecluster export run.zarr --format meta -o clusters.meta
      facecluster export run.zarr --format parquet          # -> run.clusters.parquet
      facecluster export run.zarr -o clusters.csv           # format from the extension
    """
    from ..errors import BadInput
    from ..export import export_clusters

    if fmt is None:
        ext = out.rsplit(".", 1)[-1].lower() if out and "." in out else None
        if ext is not None and ext not in FORMATS:
            raise BadInput(f"{out}: cannot tell the format from the extension .{ext}; pass --format {'|'.join(FORMATS)}")
        fmt = ext or "meta"
    res = export_clusters(run, fmt, out, array=array)
    click.echo(f"wrote {res.path} ({res.format}: {res.n_faces} faces, {res.n_clusters} clusters; "
               f"columns {', '.join(res.columns)})")
    for note in res.notes:
        click.echo(f"note: {note}")
