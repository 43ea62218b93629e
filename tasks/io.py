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
def read_labels(path: str | os.PathLike) -> np.ndarray:
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
        raise ValueError(f"{p}: label file not found; check the path given to --labels")
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
