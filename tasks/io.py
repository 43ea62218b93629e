"""Input readers and the row-block validator (pure kernels: numpy/pyarrow, no Dask, no store).

Feature files are read as *row blocks* so a file larger than memory can be streamed:
every ``iter_*_blocks`` reader yields ``(row0, block)`` with ``block`` a 2-D array of
consecutive rows starting at input row ``row0``. Labels are small (8 bytes per face)
and are read whole.

Formats of the reference implementation:

* ``.bin``  raw little-endian float32, row-major, no header; N comes from the label
  file (``.meta``) of the same stem or from an explicit dimension.
* ``.meta`` one integer label per line (a trailing blank line is allowed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


# -- labels ------------------------------------------------------------------------
def read_labels(path: str | os.PathLike, option: str = "--labels") -> np.ndarray:
    """Read integer labels from ``.npy`` (1-D integer array) or ``.meta`` (one per line).

    Parameters
    ----------
    path : str or path-like
        ``.npy`` file holding a 1-D integer array, or a text ``.meta`` file with one
        integer per line (the reference implementation's format; blank trailing
        lines are allowed).

    Returns
    -------
    numpy.ndarray
        1-D ``int64`` array of labels.

    Raises
    ------
    ValueError
        One-line message naming the file, the offending line/shape and the fix.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.exists():
        raise ValueError(f"{p}: label file not found; check the path given to {option}")
    if suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # bad header, pickled object array, ...
            raise ValueError(f"{p}: not a readable .npy array ({e}); save labels with numpy.save(path, labels.astype('int64'))") from None
        if arr.ndim == 2 and 1 in arr.shape:
            arr = arr.reshape(-1)
        if arr.ndim != 1:
            raise ValueError(f"{p}: labels must be a 1-D array, got shape {arr.shape}; save a 1-D integer array (one label per face)")
        if arr.dtype.kind in "iu" or arr.dtype.kind == "b":
            return np.asarray(arr, dtype=np.int64)
        if arr.dtype.kind == "f":
            a = np.asarray(arr)
            bad = ~np.isfinite(a) | (a != np.round(a))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{p}: label at row {i} is {a[i]!r}, not an integer; labels must be integer identity ids")
            return a.astype(np.int64)
        raise ValueError(f"{p}: labels have dtype {arr.dtype}, not integer; save them with labels.astype('int64')")
    if suffix in (".meta", ".txt", ".labels"):
        return _read_meta(p)
    raise ValueError(f"{p}: unknown label format {suffix or '(no extension)'!r}; use .npy (1-D integer array) or .meta (one integer per line)")


def _read_meta(p: Path) -> np.ndarray:
    with open(p, "rb") as fh:
        lines = fh.read().decode("utf-8", errors="replace").splitlines()
    # Trailing blank lines are common (files written with a final "\n\n"); blank lines
    # in the middle would shift every following label, so they are errors.
    while lines and not lines[-1].strip():
        lines.pop()
    out = np.empty(len(lines), dtype=np.int64)
    for i, line in enumerate(lines):
        s = line.strip()
        try:
            out[i] = int(s)
        except ValueError:
            shown = s if len(s) <= 40 else s[:37] + "..."
            raise ValueError(
                f"{p}: line {i + 1} is {shown!r}, not an integer label; "
                "a .meta file holds exactly one integer per line (no header, no blank lines)"
            ) from None
    return out


def write_meta(path: str | os.PathLike, labels) -> None:
    """Write labels as ``.meta`` text: one integer per line, newline-terminated.

    Parameters
    ----------
    path : str or path-like
        Output file (overwritten).
    labels : array-like of int
        1-D integer labels.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"{path}: labels must be 1-D, got shape {lab.shape}")
    if lab.size and lab.dtype.kind not in "iub":
        raise ValueError(f"{path}: labels must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64, copy=False)
    with open(path, "w", encoding="ascii") as fh:
        if lab.size:
            fh.write("\n".join(map(str, lab.tolist())))
            fh.write("\n")


# -- the row-block validator / normaliser --------------------------------------------
OK, NON_FINITE, ZERO, WRONG_DIM = 0, 1, 2, 3
REASONS = {NON_FINITE: "nan_or_inf", ZERO: "all_zero", WRONG_DIM: "wrong_dim"}


def validate_block(block, row0: int, dim: int, lengths=None):
    """Find invalid rows of one block and L2-normalise the others.

    Parameters
    ----------
    block : array-like, shape (m, d)
        Consecutive input rows (any real numeric dtype).
    row0 : int
        Input row of ``block[0]``; only used to make the function's contract
        explicit to callers that report rows (the result does not depend on it).
    dim : int
        Expected number of columns. A block with ``d != dim`` has every row invalid.
    lengths : array-like of int, shape (m,), optional
        Per-row vector lengths for ragged inputs (Parquet list columns): rows whose
        length differs from ``dim`` are invalid (their values in ``block`` are ignored).

    Returns
    -------
    normed : numpy.ndarray, shape (m, dim), float32
        ``x / ||x||`` computed in float64 then cast to float32; rows that are invalid
        are all zero. Each row depends only on that row's values, so results do not
        depend on how the input is cut into blocks.
    bad : numpy.ndarray of bool, shape (m,)
        True for invalid rows.
    reasons : numpy.ndarray of str, shape (bad.sum(),)
        ``"wrong_dim"``, ``"nan_or_inf"`` or ``"all_zero"`` for each invalid row, in
        row order (first matching reason in that order).
    """
    del row0  # the kernel is position-free; the caller adds row0 to report input rows
    x = np.asarray(block)
    if x.ndim != 2:
        raise ValueError(f"block must be 2-D, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"block must be real numeric, got dtype {x.dtype}")
    m = x.shape[0]
    code = np.zeros(m, dtype=np.int8)
    if x.shape[1] != dim:
        code[:] = WRONG_DIM
        x64 = np.zeros((m, dim), dtype=np.float64)
    else:
        x64 = x.astype(np.float64, copy=True)
    if lengths is not None:
        lengths = np.asarray(lengths)
        code[(lengths != dim) & (code == OK)] = WRONG_DIM
    wrong = code == WRONG_DIM
    x64[wrong] = 0.0
    finite = np.isfinite(x64).all(axis=1)
    code[~finite & ~wrong] = NON_FINITE
    x64[~finite] = 0.0
    nonzero = (x64 != 0).any(axis=1)
    code[~nonzero & (code == OK)] = ZERO
    good = code == OK
    # Row-wise reduction along the contiguous axis: each row's sum depends only on
    # that row, which keeps the output bitwise independent of the block size.
    norm = np.sqrt(np.einsum("ij,ij->i", x64, x64))
    # Non-zero finite rows whose squared norm over/underflows float64 (|x| > 1e154 or
    # < 1e-154): rescale by the row's max |x| first.
    odd = good & ~((norm > 0) & np.isfinite(norm))
    if odd.any():
        scale = np.abs(x64[odd]).max(axis=1, keepdims=True)
        x64[odd] /= scale
        norm[odd] = np.sqrt(np.einsum("ij,ij->i", x64[odd], x64[odd]))
    norm[~good] = 1.0
    normed = (x64 / norm[:, None]).astype(np.float32)
    bad = ~good
    reasons = np.array([REASONS[c] for c in code[bad].tolist()], dtype="<U10")
    return normed, bad, reasons


# -- feature readers -------------------------------------------------------------------
def check_feature_dtype(path, dtype, what="array") -> None:
    """Raise ValueError (naming ``path``) unless ``dtype`` is a real numeric type."""
    if np.dtype(dtype).kind not in "fiu":
        raise ValueError(
            f"{path}: the feature {what} has dtype {np.dtype(dtype)}, not numbers; "
            "store features as a 2-D float32 array (N x d)"
        )


def check_feature_shape(path, shape, what="array") -> tuple[int, int]:
    """Return ``(n, d)`` of a 2-D feature array; ValueError for other ranks, 0 rows or 0 dims."""
    if len(shape) != 2:
        raise ValueError(f"{path}: the feature {what} has shape {tuple(shape)}; expected a 2-D array (N faces x d dims)")
    n, d = int(shape[0]), int(shape[1])
    if n == 0:
        raise ValueError(f"{path}: empty file (0 rows); nothing to ingest - check the export that wrote it")
    if d == 0:
        raise ValueError(f"{path}: feature vectors have 0 dimensions (shape {tuple(shape)}); expected N x d with d > 0")
    return n, d


class FeatureReader:
    """Row-block access to an N x d feature file (base class).

    Attributes
    ----------
    path : pathlib.Path
    n, dim : int
        Rows and columns.
    dtype : numpy.dtype
        Stored element type (cast to float64 by :func:`validate_block`).
    fmt : str
        Format name (``npy``, ``npz``, ``bin``, ``parquet``, ...).
    """

    fmt = "?"

    def __init__(self, path, n: int, dim: int, dtype):
        self.path = Path(path)
        self.n = int(n)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)

    def blocks(self, rows: int):
        """Yield ``(row0, block, lengths)`` for consecutive blocks of at most ``rows`` rows.

        ``lengths`` is None except for ragged inputs (see :func:`validate_block`).
        """
        raise NotImplementedError

    def labels(self):
        """Labels stored in the feature file itself (Parquet label column), else None."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NpyReader(FeatureReader):
    """``.npy``: the header via a read-only memory map, then one positional read per block.

    Reading blocks with ``readinto`` (instead of slicing the map) keeps the process's
    resident memory at one block: mapped file pages would otherwise count towards it
    until the kernel reclaims them. Fortran-ordered files are sliced from the map.
    """

    fmt = "npy"

    def __init__(self, path):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            if "pickle" in str(e).lower() or "object" in str(e).lower():
                raise ValueError(f"{path}: the feature array holds Python objects, not numbers; save a 2-D float32 array") from None
            raise ValueError(f"{path}: not a readable .npy file ({e}); the file may be truncated - re-save it with numpy.save") from None
        except OSError as e:
            raise ValueError(f"{path}: not a readable .npy file ({e}); re-save it with numpy.save") from None
        check_feature_dtype(path, arr.dtype)
        n, d = check_feature_shape(path, arr.shape)
        super().__init__(path, n, d, arr.dtype)
        self._arr = arr
        self._offset = int(arr.offset) if arr.flags.c_contiguous else None

    def blocks(self, rows: int):
        if self._offset is None:
            for r0 in range(0, self.n, rows):
                yield r0, np.ascontiguousarray(self._arr[r0:r0 + rows]), None
            return
        yield from _read_rows(self.path, self._offset, self.n, self.dim, self.dtype, rows)

    def close(self) -> None:
        self._arr = None


def _read_rows(path, offset: int, n: int, dim: int, dtype, rows: int):
    """Yield ``(row0, block, None)`` from a row-major array stored at ``offset`` in ``path``."""
    row_bytes = dim * dtype.itemsize
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        for r0 in range(0, n, rows):
            m = min(rows, n - r0)
            block = np.empty((m, dim), dtype=dtype)
            buf = memoryview(block.reshape(-1).view(np.uint8))
            got = 0
            while got < len(buf):  # a read may return less than asked (large reads, pipes)
                k = fh.readinto(buf[got:])
                if not k:
                    break
                got += k
            if got != m * row_bytes:
                raise ValueError(f"{path}: file ends inside row {r0 + got // row_bytes} of {n}; the file is truncated - re-export it")
            yield r0, block, None


class NpzReader(FeatureReader):
    """``.npz``: member ``features``, else ``feats``, else the first 2-D member.

    Members of a zip cannot be memory-mapped, so each block is decoded from the
    member's byte stream (works for ``np.savez`` and ``np.savez_compressed``): memory
    stays bounded by the block size. Fortran-ordered members cannot be streamed by
    rows and are rejected with a fix.
    """

    fmt = "npz"
    KEYS = ("features", "feats")

    def __init__(self, path, key: str | None = None):
        import zipfile

        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e}); re-save it with numpy.savez") from None
        members = {m[:-4]: m for m in self._zip.namelist() if m.endswith(".npy")}
        if not members:
            self._zip.close()
            raise ValueError(f"{path}: empty .npz archive (no arrays); save the features with numpy.savez(path, features=X)")
        headers = {}

        def header(k):
            if k not in headers:
                with self._zip.open(members[k]) as fh:
                    headers[k] = _read_npy_header(fh, path, k)
            return headers[k]

        if key is not None:
            if key not in members:
                self._zip.close()
                raise ValueError(f"{path}: no array {key!r} in the .npz (has: {', '.join(sorted(members))}); pass --column with one of these")
            chosen = key
        else:
            chosen = next((k for k in self.KEYS if k in members), None)
            if chosen is None:
                chosen = next((k for k in members if len(header(k)[0]) == 2), None)
            if chosen is None:
                self._zip.close()
                raise ValueError(f"{path}: no 2-D array in the .npz (has: {', '.join(f'{k} {header(k)[0]}' for k in members)}); "
                                 "save the features as a 2-D array named 'features'")
        shape, fortran, dtype = header(chosen)
        try:
            check_feature_dtype(f"{path}[{chosen}]", dtype)
            n, d = check_feature_shape(f"{path}[{chosen}]", shape)
        except ValueError:
            self._zip.close()
            raise
        if fortran and n > 1 and d > 1:
            self._zip.close()
            raise ValueError(f"{path}[{chosen}]: Fortran-ordered array cannot be streamed by rows; "
                             "re-save it C-ordered (numpy.ascontiguousarray) or as .npy")
        super().__init__(path, n, d, dtype)
        self.key = chosen
        self._member = members[chosen]

    def blocks(self, rows: int):
        with self._zip.open(self._member) as fh:
            _read_npy_header(fh, self.path, self.key)
            row_bytes = self.dim * self.dtype.itemsize
            for r0 in range(0, self.n, rows):
                m = min(rows, self.n - r0)
                buf = fh.read(m * row_bytes)
                if len(buf) != m * row_bytes:
                    got = r0 + len(buf) // row_bytes
                    raise ValueError(f"{self.path}[{self.key}]: member is truncated at row {got} of {self.n}; re-save the .npz")
                yield r0, np.frombuffer(buf, dtype=self.dtype).reshape(m, self.dim), None

    def close(self) -> None:
        self._zip.close()


def _read_npy_header(fh, path, key):
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fh)
        if version == (2, 0):
            return fmt.read_array_header_2_0(fh)
        return fmt._read_array_header(fh, version)  # (3, 0): utf-8 field names
    except Exception as e:
        raise ValueError(f"{path}[{key}]: not a readable .npy member ({e}); re-save the .npz with numpy.savez") from None


def bin_shape(path, dim: int | None = None, n: int | None = None) -> tuple[int, int]:
    """Rows and dims of a raw float32 ``.bin`` from its size and ``dim`` or ``n``.

    Raises ValueError (naming the first incomplete row) when the size is not a whole
    number of rows: a truncated file or a wrong ``dim``/label count.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); nothing to ingest - check the export that wrote it")
    if size % 4:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of 4 (float32); the file is truncated - re-export it")
    values = size // 4
    if dim is not None:
        if values % dim:
            raise ValueError(
                f"{path}: {values} float32 values is not a whole number of {dim}-d rows: row {values // dim} is "
                f"incomplete (truncated file or wrong dimension); re-export the file or pass the right --dim")
        rows = values // dim
        if n is not None and rows != n:
            raise ValueError(f"{path}: holds {rows} rows of {dim} dims but the labels have {n} entries; "
                             "labels must have one entry per row (check --dim and --labels)")
        return rows, dim
    if n is None:
        raise ValueError(f"{path}: a raw .bin has no header; pass --dim D (feature dimension) or --labels "
                         f"(a .meta/.npy with one label per row), or put {Path(path).with_suffix('.meta').name} next to it")
    if n == 0 or values % n:
        raise ValueError(
            f"{path}: {values} float32 values cannot be split into {n} rows (one per label); "
            "the file is truncated or the labels belong to another file - pass --dim D to locate the first bad row")
    return n, values // n


PERIOD_SAMPLE_ROWS = 4096  # head rows inspected for a too-small --dim
PERIOD_RATIO = 20.0  # how much more the row-period groups must differ than a random grouping


def row_period(sample: np.ndarray, periods=(2, 3, 4), seed: int = 0) -> int | None:
    """The period p when rows ``i % p`` look like different distributions, else None.

    A raw .bin read with ``--dim`` = true dim / p turns every true row into p rows:
    its first, second, ... part, in turn. Embedding dimensions differ in spread, so the
    per-column spread of the rows ``i % p == g`` then differs between the groups g far
    more than between groups of a random split (of the same sizes) - on correctly read
    rows both differences are sampling noise.
    """
    x = np.asarray(sample, np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    rng = np.random.default_rng(seed)

    def dispersion(groups: np.ndarray, p: int) -> float:
        logsd = np.stack([np.log(x[groups == g].std(axis=0) + 1e-12) for g in range(p)])
        return float(logsd.var(axis=0).mean())

    for p in periods:
        if len(x) < 64 * p:
            continue
        by_row = np.arange(len(x)) % p
        d_period = dispersion(by_row, p)
        d_random = dispersion(rng.permutation(by_row), p)
        if d_period > 1e-3 and d_period > PERIOD_RATIO * d_random:
            return p
    return None


class BinReader(FeatureReader):
    """Raw little-endian float32 ``.bin`` (the reference implementation's format), read by blocks."""

    fmt = "bin"

    def __init__(self, path, dim: int | None = None, n: int | None = None):
        rows, d = bin_shape(path, dim, n)
        super().__init__(path, rows, d, np.dtype("<f4"))
        if n is None:  # N follows from --dim alone: a --dim that divides the true one goes unnoticed otherwise
            _, head, _ = next(_read_rows(self.path, 0, min(rows, PERIOD_SAMPLE_ROWS), d, self.dtype, PERIOD_SAMPLE_ROWS))
            p = row_period(head)
            if p is not None:
                raise ValueError(
                    f"{path}: with --dim {d} every {p} consecutive rows look like different parts of one vector: the "
                    f"true dimension is probably {p * d}; pass the right --dim (or --labels / a .meta to fix N)")

    def blocks(self, rows: int):
        yield from _read_rows(self.path, 0, self.n, self.dim, self.dtype, rows)


class ParquetReader(FeatureReader):
    """Parquet with the vectors in one list / fixed-size-list column, streamed by record batches.

    ``column`` defaults to the first list column of numbers. Labels come from
    ``label_column`` (default: an integer column named ``label`` or ``labels`` if
    present). Rows of a variable-length list column whose length differs from
    ``dim`` (default: the length of row 0) are reported as ``wrong_dim``.
    """

    fmt = "parquet"
    LABEL_NAMES = ("label", "labels")

    def __init__(self, path, column: str | None = None, label_column: str | None = None, dim: int | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self._pf = pq.ParquetFile(path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e}); re-export it") from None
        schema = self._pf.schema_arrow
        names = list(schema.names)

        def is_list(t):
            return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

        def numeric(t):
            return pa.types.is_floating(t) or pa.types.is_integer(t)

        if column is None:
            cands = [f.name for f in schema if is_list(f.type) and numeric(f.type.value_type)]
            if not cands:
                raise ValueError(f"{path}: no column of numeric vectors (list<float>) among {names}; "
                                 "store the features as one list column, or pass --column NAME")
            column = cands[0]
        if column not in names:
            raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(names)}); pass --column with one of these")
        t = schema.field(column).type
        if not is_list(t) or not numeric(t.value_type):
            raise ValueError(f"{path}: column {column!r} has type {t}, not a list of numbers (non-numeric column); "
                             "pass --column naming the feature-vector column (list<float32>)")
        n = self._pf.metadata.num_rows
        if n == 0:
            raise ValueError(f"{path}: empty file (0 rows); nothing to ingest - check the export that wrote it")
        if pa.types.is_fixed_size_list(t):
            d = t.list_size
            if dim is not None and dim != d:
                raise ValueError(f"{path}: column {column!r} holds {d}-d vectors but --dim is {dim}; drop --dim or fix the file")
        elif dim is not None:
            d = dim
        else:
            first = next(self._pf.iter_batches(batch_size=1, columns=[column])).column(0)
            d = 0 if first.null_count else len(first[0].values)
        if d == 0:
            raise ValueError(f"{path}: row 0 of column {column!r} is empty or null; pass --dim D to set the dimension")
        super().__init__(path, n, d, t.value_type.to_pandas_dtype())
        self.column = column
        if label_column is None:
            label_column = next((c for c in self.LABEL_NAMES if c in names and pa.types.is_integer(schema.field(c).type)), None)
        elif label_column not in names:
            raise ValueError(f"{path}: no label column {label_column!r} (columns: {', '.join(names)}); pass --label-column with one of these")
        if label_column is not None and not pa.types.is_integer(schema.field(label_column).type):
            raise ValueError(f"{path}: label column {label_column!r} has type {schema.field(label_column).type}, not integers; "
                             "labels must be integer identity ids")
        self.label_column = label_column

    def blocks(self, rows: int):
        import pyarrow.compute as pc

        r0 = 0
        for batch in self._pf.iter_batches(batch_size=rows, columns=[self.column]):
            col = batch.column(0)
            m = len(col)
            lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            flat = col.flatten().to_numpy(zero_copy_only=False)  # null elements -> NaN
            if (lengths == self.dim).all():
                block = flat.reshape(m, self.dim)
                yield r0, block, None
            else:
                block = np.full((m, self.dim), np.nan)
                ends = np.cumsum(lengths)
                for i in np.flatnonzero(lengths == self.dim):
                    block[i] = flat[ends[i] - self.dim:ends[i]]
                yield r0, block, lengths
            r0 += m

    def labels(self):
        if self.label_column is None:
            return None
        col = self._pf.read(columns=[self.label_column]).column(0)
        if col.null_count:
            import pyarrow.compute as pc

            i = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{self.path}: label column {self.label_column!r} is null at row {i}; every face needs an integer label")
        return col.to_numpy().astype(np.int64)

    def close(self) -> None:
        self._pf = None


FORMATS = {".npy": "npy", ".npz": "npz", ".bin": "bin", ".parquet": "parquet", ".pq": "parquet", ".zarr": "zarr"}


def feature_format(path) -> str:
    """Format name of a feature file from its extension (``zarr`` for Zarr directories)."""
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None and p.is_dir() and ((p / "zarr.json").exists() or (p / ".zarray").exists() or (p / ".zgroup").exists()):
        fmt = "zarr"
    if fmt is None:
        raise ValueError(f"{p}: unknown feature format {p.suffix or '(no extension)'!r}; "
                         "use .npy, .npz, .bin (raw float32 + --dim or a .meta), .zarr or .parquet")
    return fmt


def open_reader(path, dim: int | None = None, n: int | None = None, column: str | None = None,
                label_column: str | None = None) -> FeatureReader:
    """Open a non-Zarr feature file as a :class:`FeatureReader` (Zarr lives in the pipeline layer).

    Parameters
    ----------
    path : path-like
        ``.npy``, ``.npz``, ``.bin`` or ``.parquet`` file.
    dim : int, optional
        Expected dimension (required for ``.bin`` unless ``n`` is given; checked otherwise).
    n : int, optional
        Number of rows of a ``.bin`` (from its labels).
    column, label_column : str, optional
        Parquet feature / label columns; ``column`` also picks the ``.npz`` member.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file; check the FEATS path")
    fmt = feature_format(p)
    if fmt != "zarr" and p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"{p}: empty file (0 bytes); nothing to ingest - check the export that wrote it")
    if fmt == "npy":
        r = NpyReader(p)
    elif fmt == "npz":
        r = NpzReader(p, key=column)
    elif fmt == "bin":
        return BinReader(p, dim=dim, n=n)
    elif fmt == "parquet":
        return ParquetReader(p, column=column, label_column=label_column, dim=dim)
    else:
        raise ValueError(f"{p}: {fmt} inputs are opened by the pipeline layer")
    if dim is not None and r.dim != dim:
        r.close()
        raise ValueError(f"{p}: features have {r.dim} dims but --dim is {dim}; drop --dim or pass the right file")
    return r
