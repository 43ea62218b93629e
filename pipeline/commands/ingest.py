"""`facecluster ingest FEATS [--labels L] -o RUN.zarr`."""

from __future__ import annotations

import click

from ._common import config_option, pass_config

FLAG_KEYS = {
    "chunk_rows": "ingest.chunk_rows",
    "dim": "ingest.dim",
    "column": "ingest.column",
    "label_column": "ingest.label_column",
    "drop_invalid": "ingest.drop_invalid",
}


@click.command("ingest")
@click.argument("feats", type=click.Path(dir_okay=True, file_okay=True))
@click.option("--labels", "labels", type=click.Path(dir_okay=False), default=None,
              help="Ground-truth labels: .npy (1-D integers) or .meta (one integer per line), one per input row.")
@click.option("-o", "--out", required=True, metavar="RUN.zarr", help="Run store to create (or to update if it exists).")
@click.option("--chunk-rows", type=int, default=None, help="Rows per chunk of `features` (R; default 16384).")
@click.option("--dim", type=int, default=None, help="Feature dimension of a raw .bin (else N comes from the .meta / --labels).")
@click.option("--column", default=None, help="Parquet feature column (list<float>), or .npz / Zarr-group array name.")
@click.option("--label-column", default=None, help="Parquet label column (default: an integer column 'label'/'labels').")
@click.option("--drop-invalid", is_flag=True, default=None,
              help="Skip NaN/inf, all-zero and wrong-length rows instead of failing (input_rows keeps the mapping).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run store at -o.")
@config_option
@pass_config(FLAG_KEYS)
def command(feats, labels, out, overwrite, cfg):
    """Validate, L2-normalise and store FEATS (and labels) in the run store RUN.zarr.

    FEATS: .npy, .npz (array 'features'/'feats'/first 2-D), raw float32 .bin (N from a .meta
    of the same stem, --labels or --dim), .zarr (2-D array, or a group's 'features'),
    .parquet (a list/fixed-size-list column). The input is read in row blocks (files larger
    than memory work) and never modified. Bad rows (NaN/inf, all zeros, wrong length) stop
    the ingest with exit code 2 and a message naming the file and row, unless
    --drop-invalid is given. Re-running with the same input and options is a no-op.

    \b
    Examples:
      facecluster ingest feats.npy --labels labels.meta -o run.zarr
      facecluster ingest part1_test.bin --labels part1_test.meta -o run.zarr --chunk-rows 32768
      facecluster ingest feats.bin --dim 256 -o run.zarr
      facecluster ingest faces.parquet --column embedding --label-column person -o run.zarr
      facecluster ingest feats.npy -o run.zarr --drop-invalid --overwrite
    """
    from ..stages.ingest import run_ingest

    s = run_ingest(feats, out, labels=labels, cfg=cfg.ingest, overwrite=overwrite)
    n_chunks = -(-s["n"] // s["chunk_rows"])
    dropped = ", ".join(f"{k} {v}" for k, v in s.get("dropped", {}).items()) or "none"
    status = "up to date (skipped)" if s.get("skipped") else f"{s['seconds']:.2f}s"
    click.echo(f"ingest: {out}: N={s['n']} d={s['dim']} chunks={n_chunks}x{s['chunk_rows']} rows "
               f"labels={'yes' if s.get('has_labels') else 'no'} dropped={s.get('n_dropped', 0)} ({dropped}); {status}")
