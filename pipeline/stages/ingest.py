"""Stage ``ingest``: read, validate and L2-normalise features into a run store.

Writes ``features`` (N x d float32, chunks (R, d)), ``input_rows`` (N int64: the
input row of every stored face) and, when labels are given, ``labels`` (N int64).

The input is streamed in row blocks by one process (reading and normalising are
memory-bound; a Dask cluster would only add transfers), so memory is bounded by the
block size, not by N. Blocks are written whole chunks at a time, which keeps every
chunk written exactly once even when ``--drop-invalid`` compacts the rows.

Nothing half-written survives an error: a new store is built in a hidden sibling
directory and renamed into place only when the stage completed; in an existing
store the arrays go through the store's ``_tmp/`` mechanism.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from facecluster.tasks.io import FeatureReader, check_feature_shape, check_feature_dtype, feature_format, open_reader, read_labels, validate_block

from ..config import IngestConfig
from ..errors import BadInput
from ..store import RunStore, StoreError, file_fingerprint, is_local, local_path

log = logging.getLogger(__name__)

STAGE = "ingest"
READ_BLOCK_BYTES = 32 << 20  # float32 rows per read block (the float64 working copy is twice that)


class ZarrReader(FeatureReader):
    """A 2-D Zarr array (or the ``features`` / first 2-D array of a group), opened read-only."""

    fmt = "zarr"

    def __init__(self, path, key: str | None = None, dim: int | None = None):
        import zarr

        try:
            obj = zarr.open(store=str(path), mode="r")
        except Exception as e:
            raise ValueError(f"{path}: not a readable Zarr store ({type(e).__name__}: {e}); check the path") from None
        if isinstance(obj, zarr.Group):
            arrays = dict(obj.arrays())
            if key is None:
                key = "features" if "features" in arrays else next((k for k, a in sorted(arrays.items()) if a.ndim == 2), None)
            if key is None or key not in arrays:
                raise ValueError(f"{path}: no {'array ' + repr(key) if key else '2-D array'} in the Zarr group "
                                 f"(has: {', '.join(sorted(arrays)) or 'nothing'}); pass --column NAME or point at the array")
            obj = arrays[key]
        check_feature_dtype(path, obj.dtype)
        n, d = check_feature_shape(path, obj.shape)
        if dim is not None and d != dim:
            raise ValueError(f"{path}: features have {d} dims but --dim is {dim}; drop --dim or pass the right file")
        super().__init__(path, n, d, obj.dtype)
        self._arr = obj

    def blocks(self, rows: int):
        step = self._arr.chunks[0]
        rows = max(step, rows // step * step)  # whole source chunks per read
        for r0 in range(0, self.n, rows):
            yield r0, np.asarray(self._arr[r0:r0 + rows]), None


def open_features(src, cfg: IngestConfig, n_rows: int | None = None) -> FeatureReader:
    """Open ``src`` with the reader for its format; ValueErrors become :class:`BadInput`."""
    try:
        if feature_format(src) == "zarr":
            if not Path(src).exists() and is_local(str(src)):
                raise ValueError(f"{src}: no such file; check the FEATS path")
            return ZarrReader(src, key=cfg.column, dim=cfg.dim)
        return open_reader(src, dim=cfg.dim, n=n_rows, column=cfg.column, label_column=cfg.label_column)
    except ValueError as e:
        raise BadInput(str(e)) from None


def _bad_row_message(src, row: int, reason: str, dim: int, length=None) -> str:
    fix = "fix the export, or pass --drop-invalid to skip such rows (each kept face's input row is recorded in input_rows)"
    if reason == "nan_or_inf":
        return f"{src}: row {row} contains NaN or infinite values; {fix}"
    if reason == "all_zero":
        return f"{src}: row {row} is all zeros and cannot be L2-normalised; {fix}"
    what = f"{length} values" if length is not None else "a different length"
    return f"{src}: row {row} has {what}, expected {dim} (the dimension of row 0 or --dim); {fix}"


def _guarded(blocks):
    """Reader errors raised while streaming (a truncated .npz member) are bad input too."""
    it = iter(blocks)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except ValueError as e:
            raise BadInput(str(e)) from None
        yield item


def run_ingest(src, out_url, labels=None, cfg: IngestConfig | None = None, overwrite: bool = False) -> dict:
    """Ingest a feature file (and labels) into the run store ``out_url``.

    Parameters
    ----------
    src : path-like
        ``.npy``, ``.npz``, ``.bin`` (raw float32; N from ``labels``, ``cfg.dim`` or a
        ``.meta`` of the same stem), ``.zarr`` or ``.parquet``.
    out_url : str or path-like
        Run store to create. If it exists and is a run store (and not ``overwrite``),
        the stage runs inside it and is skipped when input and parameters are unchanged.
    labels : path-like, optional
        ``.npy`` or ``.meta`` labels, one per input row (Parquet: ``cfg.label_column``).
    cfg : IngestConfig, optional
        ``chunk_rows``, ``drop_invalid``, ``dim``, ``column``, ``label_column``.
    overwrite : bool
        Replace an existing store at ``out_url``.

    Returns
    -------
    dict
        The stage summary (n, dim, chunk_rows, source, format, has_labels, dropped,
        n_input) plus ``skipped`` and ``seconds``.

    Raises
    ------
    BadInput
        Invalid input (one line naming the file, the first bad row and the fix).
    """
    cfg = cfg or IngestConfig()
    t0 = time.perf_counter()
    src_p = Path(src)
    out = str(out_url)
    if is_local(out):
        out_p = local_path(out).absolute()
        if src_p.exists() and (src_p.resolve() == out_p.resolve() or out_p.resolve() in src_p.resolve().parents
                               or src_p.resolve() in out_p.resolve().parents):
            raise BadInput(f"{out}: the output run store overlaps the input {src}; choose another -o path (the input is never modified)")

    # -- labels and the row count of a headerless .bin ------------------------------------
    lab = None
    extra = {}
    n_hint = None
    if labels is not None:
        try:
            lab = read_labels(labels)
        except ValueError as e:
            raise BadInput(str(e)) from None
        extra["labels"] = file_fingerprint(labels)
    if src_p.suffix.lower() == ".bin" and cfg.dim is None:
        if lab is not None:
            n_hint = len(lab)
        else:
            meta = src_p.with_suffix(".meta")
            if meta.exists():
                try:
                    n_hint = len(read_labels(meta))
                except ValueError as e:
                    raise BadInput(f"{e} (used for the row count of {src_p.name}; or pass --dim)") from None
                extra["bin_rows_from"] = file_fingerprint(meta)
                log.info("%s: row count %d from %s (pass --labels %s to store them as labels)", src, n_hint, meta, meta)

    reader = open_features(src, cfg, n_hint)
    with reader:
        if lab is None:
            try:
                lab = reader.labels()
            except ValueError as e:
                raise BadInput(str(e)) from None
            label_src = f"{src}[{reader.label_column}]" if lab is not None else None
        else:
            label_src = str(labels)
        if lab is not None and len(lab) != reader.n:
            raise BadInput(f"{label_src}: {len(lab)} labels for {reader.n} feature rows in {src}; "
                           "labels must have exactly one entry per input row, in the same order")
        extra["features"] = file_fingerprint(src)
        params = {"chunk_rows": cfg.chunk_rows, "drop_invalid": cfg.drop_invalid, "dim": reader.dim,
                  "column": cfg.column, "label_column": cfg.label_column, "format": reader.fmt,
                  "has_labels": lab is not None}
        summary = _into_store(out, overwrite, reader, lab, cfg, params, extra, label_src)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _into_store(out: str, overwrite: bool, reader, lab, cfg, params, extra, label_src) -> dict:
    """Pick the store to write into (existing, fresh sibling, remote) and run the stage."""
    if not is_local(out):
        store = None
        if not overwrite:
            with contextlib.suppress(StoreError):
                store = RunStore.open(out)
        if store is not None:
            return _stage_locked(store, reader, lab, cfg, params, extra, label_src)
        store = RunStore.create(out, overwrite=overwrite)
        try:
            return _stage(store, reader, lab, cfg, params, extra, label_src)
        except BaseException:
            with contextlib.suppress(Exception):  # a freshly created remote store: remove it
                import fsspec

                fs, path = fsspec.core.url_to_fs(out)
                fs.rm(path, recursive=True)
            raise

    p = local_path(out)
    if p.exists() and not p.is_dir():
        raise BadInput(f"{out}: exists and is a file, not a run store; choose another -o path")
    populated = p.exists() and any(p.iterdir())
    if populated and not overwrite:
        try:
            store = RunStore.open(out)
        except StoreError:
            raise BadInput(f"{out}: exists and is not a facecluster run store; choose another -o path "
                           "(or --overwrite to replace it)") from None
        return _stage_locked(store, reader, lab, cfg, params, extra, label_src)
    if populated and not ((p / "zarr.json").exists() or (p / ".zgroup").exists()):
        # --overwrite deletes the old directory: refuse for anything that is not a Zarr store
        raise BadInput(f"{out}: refusing to overwrite a directory that is not a Zarr store; choose another -o path")

    # A fresh store is built next to its final place and renamed in when complete, so
    # an error (or a kill) never leaves a store that looks ingested.
    tmp = p.parent / f".{p.name}.ingest-{uuid.uuid4().hex[:8]}"
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = RunStore.create(str(tmp))
        summary = _stage(store, reader, lab, cfg, params, extra, label_src)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if p.exists():
        old = None
        with contextlib.suppress(StoreError):
            old = RunStore.open(out)
        # --overwrite must not pull a run from under a writer: the old store's lock is held for the swap
        with old.writing("ingest --overwrite") if old is not None else contextlib.nullcontext():
            trash = p.parent / f".{p.name}.old-{uuid.uuid4().hex[:8]}"
            p.rename(trash)
            tmp.rename(p)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(p)
    return summary


def _stage_locked(store: RunStore, reader, lab, cfg: IngestConfig, params: dict, extra: dict, label_src) -> dict:
    """Ingest into an existing store, holding its writer lock from the cleanup to the record."""
    with store.writing("ingest"):
        store.clean_tmp()
        return _stage(store, reader, lab, cfg, params, extra, label_src)


def _stage(store: RunStore, reader, lab, cfg: IngestConfig, params: dict, extra: dict, label_src) -> dict:
    with store.stage(STAGE, params, extra=extra) as w:
        if w is None:
            summary = dict(store.record(STAGE)["summary"])
            summary["skipped"] = True
            return summary
        n, d = reader.n, reader.dim
        R = cfg.chunk_rows
        feats = w.create_array("features", (n, d), (R, d), np.float32)
        rows_arr = w.create_array("input_rows", (n,), (R,), np.int64)
        lab_arr = w.create_array("labels", (n,), (R,), np.int64) if lab is not None else None
        R = feats.chunks[0]  # create_array caps the chunk at N
        # whole chunks per read, so each flush hands zarr several chunks to compress concurrently
        read_rows = R * max(1, READ_BLOCK_BYTES // (R * d * 4))

        dropped: Counter = Counter()
        pend_f: list[np.ndarray] = []
        pend_r: list[np.ndarray] = []
        state = {"o": 0, "pending": 0}

        def flush(final: bool) -> None:
            # write only whole chunks until the end: every chunk is written once
            m = state["pending"] if final else state["pending"] // R * R
            if m == 0:
                return
            f = np.concatenate(pend_f)
            r = np.concatenate(pend_r)
            o = state["o"]
            writer.submit(o, f[:m], r[:m])
            pend_f[:] = [f[m:]] if m < len(f) else []
            pend_r[:] = [r[m:]] if m < len(r) else []
            state["o"] = o + m
            state["pending"] -= m

        def write(o, f, r):
            feats[o:o + len(f)] = f
            rows_arr[o:o + len(r)] = r
            if lab_arr is not None:
                lab_arr[o:o + len(r)] = lab[r]

        with _progress(n, f"ingest {reader.path.name}") as advance, _Writer(write) as writer:
            for r0, block, lengths in _guarded(reader.blocks(read_rows)):
                normed, bad, reasons = validate_block(block, r0, d, lengths)
                if bad.any():
                    idx = np.flatnonzero(bad)
                    if not cfg.drop_invalid:
                        i = int(idx[0])
                        length = int(lengths[i]) if lengths is not None and reasons[0] == "wrong_dim" else (
                            block.shape[1] if reasons[0] == "wrong_dim" else None)
                        raise BadInput(_bad_row_message(reader.path, r0 + i, str(reasons[0]), d, length))
                    dropped.update(reasons.tolist())
                    keep = np.flatnonzero(~bad)
                    normed = normed[keep]
                    kept_rows = r0 + keep.astype(np.int64)
                else:
                    kept_rows = np.arange(r0, r0 + len(block), dtype=np.int64)
                if len(kept_rows):
                    pend_f.append(normed)
                    pend_r.append(kept_rows)
                    state["pending"] += len(kept_rows)
                    flush(final=False)
                advance(len(block))
            flush(final=True)

        n_out = state["o"]
        if n_out == 0:
            raise BadInput(f"{reader.path}: all {n} rows are invalid ({_fmt_counts(dropped)}); nothing left to ingest - fix the export")
        if n_out < n:
            feats.resize((n_out, d))
            rows_arr.resize((n_out,))
            if lab_arr is not None:
                lab_arr.resize((n_out,))
            log.warning("%s: dropped %d invalid rows (%s)", reader.path, n - n_out, _fmt_counts(dropped))
        w.summary.update(n=int(n_out), dim=int(d), chunk_rows=int(R), source=str(Path(reader.path).resolve()),
                         format=reader.fmt, has_labels=lab is not None, labels_source=label_src,
                         n_input=int(n), dropped=dict(sorted(dropped.items())), n_dropped=int(n - n_out))
        summary = dict(w.summary)
    summary["skipped"] = False
    return summary


class _Writer:
    """Runs zarr writes on one background thread, one write in flight, so reading and
    normalising the next block overlaps compressing and writing this one (both
    release the GIL). Errors surface on the next submit or on exit."""

    def __init__(self, fn):
        self.fn = fn
        self.pending = None

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-write")
        return self

    def submit(self, *args) -> None:
        self.wait()
        self.pending = self.pool.submit(self.fn, *args)

    def wait(self) -> None:
        if self.pending is not None:
            fut, self.pending = self.pending, None
            fut.result()

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _fmt_counts(c: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"


@contextlib.contextmanager
def _progress(total: int, label: str):
    from ..progress import progress_enabled

    if not progress_enabled():
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda k: bar.advance(task, k)
