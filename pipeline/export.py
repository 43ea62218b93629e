"""Export a run's cluster ids as ``.meta``, ``.npy``, Parquet or CSV.

What each format holds (face id = row of ``features`` in the run store):

* ``meta``    one cluster id per line, line i = face i: the reference
  implementation's label format, readable by :func:`facecluster.tasks.io.read_labels`.
* ``npy``     1-D int64 array of cluster ids indexed by face id (``numpy.load``).
* ``parquet`` / ``csv``  a table with columns ``face_id``, ``cluster_id``,
  ``input_row`` (row of the original input file, when the store has
  ``input_rows``) and ``score`` (predicted IoU of the proposal that gave the face
  its cluster; empty/NaN for faces no proposal claimed), when the run stored one.

Label-per-line formats cannot carry extra columns, so ``score`` and
``input_row`` are only in the tables. Every file is written to a temporary name in
the destination folder and renamed when complete, so a crash or a full disk never
leaves a half-written export under the final name.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput
from .store import RunStore, StoreError, is_local, local_path

log = logging.getLogger(__name__)

FORMATS = ("meta", "npy", "parquet", "csv")

# Arrays in which a dedup stage may store, per face, the score (predicted IoU) of the
# proposal that claimed it. The first one present is used.
SCORE_ARRAYS = ("clusters_score", "clusters/score", "dedup/score", "score/face")


@dataclass
class ExportResult:
    """What :func:`export_clusters` wrote."""

    path: Path
    format: str
    n_faces: int
    n_clusters: int
    columns: list[str] = field(default_factory=list)
    score_array: str | None = None
    notes: list[str] = field(default_factory=list)


def owning_record(store: RunStore, array: str) -> tuple[str, dict] | None:
    """The stage record that last wrote ``array`` (``(name, record)``), or None (see :meth:`RunStore.owner`)."""
    return store.owner(array)


def load_clusters(store: RunStore, array: str = "clusters") -> np.ndarray:
    """Read a clustering (N int64) from the store, checking its stage completed.

    Raises
    ------
    BadInput
        When the array is missing or the stage that writes it did not complete.
    """
    if not store.has(array):
        raise BadInput(f"{store.url}: no {array!r} array in this run; run `facecluster cluster {store.url}` first")
    # incomplete, or computed from data/results that changed since (re-ingest, --force upstream)
    try:
        store.require_fresh_array(array, f"{array!r} is stale: re-run `facecluster cluster {store.url}`")
    except StoreError as e:
        raise BadInput(str(e)) from None
    lab = np.asarray(store.array(array)[...])
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise BadInput(f"{store.url}: {array!r} is {lab.dtype}{list(lab.shape)}, not a 1-D integer array of cluster ids; "
                       "export a clustering array (e.g. --array clusters)")
    return lab.astype(np.int64, copy=False)


def find_score(store: RunStore, n: int, array: str = "clusters") -> tuple[str | None, np.ndarray | None]:
    """Per-face score of the claiming proposal, if the stage that wrote ``array`` stored one.

    A score array written by another stage (e.g. an earlier dedup run, before the
    threshold baseline overwrote ``clusters``) does not describe the stored
    clustering and is ignored.
    """
    owner = owning_record(store, array)
    for name in SCORE_ARRAYS:
        if store.has(name):
            score_owner = owning_record(store, name)
            if owner is not None and score_owner is not None and score_owner[0] != owner[0]:
                log.info("%s: ignoring %s (written by stage %s, but %s by %s)", store.url, name, score_owner[0], array, owner[0])
                continue
            a = store.array(name)
            if a.ndim == 1 and a.shape[0] == n and a.dtype.kind == "f":
                return name, np.asarray(a[...], dtype=np.float32)
    return None, None


def default_path(run_url: str, fmt: str, array: str = "clusters") -> Path:
    """``RUN.clusters.meta`` next to ``RUN.zarr`` (``--array`` other than clusters goes in the name)."""
    if not is_local(run_url):
        raise BadInput(f"{run_url}: the run store is remote; give the export file with -o PATH")
    base = local_path(run_url.rstrip("/"))
    stem = base.name[:-5] if base.name.endswith(".zarr") else base.name
    return base.with_name(f"{stem}.{array.replace('/', '_')}.{fmt}")


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename to ``path`` (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def export_clusters(run: str | os.PathLike | RunStore, fmt: str, out: str | os.PathLike | None = None,
                    array: str = "clusters") -> ExportResult:
    """Write a run's cluster ids (plus score/input row for tables) to one file.

    Parameters
    ----------
    run : str, path-like or RunStore
        The run store (``RUN.zarr``).
    fmt : {"meta", "npy", "parquet", "csv"}
        Output format (see the module docstring for the columns of each).
    out : str or path-like, optional
        Output file; default ``RUN.<array>.<fmt>`` next to the store.
    array : str
        Clustering array to export (default ``clusters``, the pipeline's result).

    Returns
    -------
    ExportResult
        Path written, columns and notes (e.g. that no score was stored).

    Raises
    ------
    BadInput
        Unknown format, missing/stale clustering, unreadable store.
    """
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    store = RunStore.coerce(run)
    lab = load_clusters(store, array)
    n = int(lab.shape[0])
    path = Path(out) if out is not None else default_path(store.url, fmt, array)
    if path.exists() and path.is_dir():
        raise BadInput(f"{path}: is a folder; give a file name with -o, e.g. -o {path / ('clusters.' + fmt)}")
    n_clusters = int(np.unique(lab).size) if n else 0
    res = ExportResult(path=path, format=fmt, n_faces=n, n_clusters=n_clusters)

    if fmt == "meta":
        from facecluster.tasks.io import write_meta

        _atomic_write(path, lambda p: write_meta(p, lab))
        res.columns = ["cluster_id"]
        res.notes.append(".meta holds one cluster id per line (line i = face i); score/input_row are only in parquet/csv")
    elif fmt == "npy":
        def _w(p):
            with open(p, "wb") as fh:  # np.save(path) would append .npy to the temp name
                np.save(fh, lab)

        _atomic_write(path, _w)
        res.columns = ["cluster_id"]
        res.notes.append(".npy holds the cluster id of face i at index i; score/input_row are only in parquet/csv")
    else:
        import pyarrow as pa

        cols = {"face_id": pa.array(np.arange(n, dtype=np.int64)), "cluster_id": pa.array(lab)}
        if store.has("input_rows"):
            rows = np.asarray(store.array("input_rows")[...], dtype=np.int64)
            if rows.shape == (n,):
                cols["input_row"] = pa.array(rows)
        score_name, score = find_score(store, n, array)
        if score is not None:
            # NaN = the face was claimed by no proposal (a singleton): a null, not a number.
            cols["score"] = pa.array(score, mask=np.isnan(score))
            res.score_array = score_name
        else:
            res.notes.append("no per-face proposal score stored in this run (looked for "
                             f"{', '.join(SCORE_ARRAYS)}): exported without a score column")
        table = pa.table(cols)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            _atomic_write(path, lambda p: pq.write_table(table, p))
        else:
            import pyarrow.csv as pcsv

            # plain header (pyarrow quotes column names by default); all values are numbers
            opts = pcsv.WriteOptions(quoting_header="none", quoting_style="none")
            _atomic_write(path, lambda p: pcsv.write_csv(table, p, write_options=opts))
        res.columns = list(cols)
    log.info("exported %d faces / %d clusters to %s (%s)", n, n_clusters, path, ", ".join(res.columns))
    return res
