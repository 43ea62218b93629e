"""Array helpers where numpy's own is slow for this package's sizes (kernels, no Dask)."""

from __future__ import annotations

import numpy as np


def unique_sorted(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` for integer arrays: the sorted distinct values, by one sort and a mask.

    Why: numpy 2.x's plain ``np.unique`` hashes before it sorts; measured on 17M int64 keys here
    (numpy 2.4.6) 22.5 s against 1.2 s for this (``np.sort`` then the first of each run).
    """
    s = np.sort(np.asarray(x).ravel())
    if len(s) < 2:
        return s
    first = np.empty(len(s), bool)
    first[0] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    return s[first]


def descending_key(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the descending order of the float32 ``values`` (-0.0 as 0.0;
    no NaN): sorting (group, key) as one uint64 replaces a three-key ``np.lexsort``."""
    u = (np.asarray(values, np.float32) + np.float32(0)).view(np.uint32)  # + 0: -0.0 becomes 0.0
    ascending = np.where(u >> np.uint32(31), ~u, u | np.uint32(0x80000000))
    return ~ascending
