"""kNN lists with a planted identity structure, made without any search (for ``facecluster bench scale``).

``bench scale`` measures how the stages *after* kNN grow from 10^6 to 10^7 faces; an exact or IVF search of
10^7 faces is days of this machine, so the lists are generated directly. What the later stages see is what
they see on real lists: each row sorted by similarity (descending, then id), self excluded, the same pair
with the same similarity from both ends, identities scattered over the ids (so a chunk's neighbours live in
every chunk, as after a real ingest), look-alike identities that share neighbours, and a tail of impostors.

The model (every value a pure function of the face ids, so a row's list does not depend on the chunk or task
that makes it):

* identities hold consecutive *positions* ``[starts[c], starts[c] + sizes[c])``; a face's id is
  ``(a * position + b) mod n`` (``a`` coprime to ``n``): a bijection that scatters each identity over the ids;
* a face's candidates: the next ``k`` members of its identity (cyclically, all of them when it has fewer),
  and ``k`` faces drawn (by a hash of the face and the slot) from the positions within ``window`` of its
  identity, which hold its look-alikes (neighbouring identities);
* a pair's similarity is a hash of the unordered pair: same identity ``0.45 + 0.45 u``, other ``0.05 + 0.5 u^2``
  (``u`` uniform in [0, 1)), so genuine and impostor similarities overlap a little, as on real faces.
"""

from __future__ import annotations

import math

import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _uniform(x: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 from a uint64 hash (its top 53 bits)."""
    return (_splitmix(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Planted:
    """The planted structure of ``n`` faces: identity sizes and the id scattering.

    Parameters
    ----------
    sizes : (C,) int identity sizes, summing to n.
    seed : int, part of every hash.
    window : positions either side of an identity from which its look-alikes are drawn.
    """

    def __init__(self, sizes: np.ndarray, seed: int = 0, window: int = 512):
        self.sizes = np.asarray(sizes, np.int64)
        self.n = int(self.sizes.sum())
        if self.n < 2 or (self.sizes < 1).any() or self.n >= 2**31:
            raise ValueError("need 2 <= n < 2^31 faces and identity sizes >= 1")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.seed = int(seed)
        self.window = int(window)
        a = (int(0.6180339887 * self.n) | 1) % self.n or 1
        while math.gcd(a, self.n) != 1:
            a += 1
        self.a, self.b = a, (7919 * (self.seed + 1)) % self.n
        self.a_inv = pow(self.a, -1, self.n)

    # n < 2^31: a product of two values below n fits int64
    def id_of(self, pos: np.ndarray) -> np.ndarray:
        return (np.asarray(pos, np.int64) % self.n * self.a + self.b) % self.n

    def pos_of(self, ids: np.ndarray) -> np.ndarray:
        return ((np.asarray(ids, np.int64) - self.b) % self.n * self.a_inv) % self.n

    def identity(self, ids: np.ndarray) -> np.ndarray:
        """Identity of each face."""
        return np.searchsorted(self.starts, self.pos_of(ids), side="right") - 1

    def similarity(self, i: np.ndarray, j: np.ndarray, same: np.ndarray | None = None) -> np.ndarray:
        """The planted similarity of pairs (symmetric), float32; ``same``: whether each pair shares an identity
        (computed when not given)."""
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        lo, hi = np.minimum(i, j).astype(np.uint64), np.maximum(i, j).astype(np.uint64)
        with np.errstate(over="ignore"):
            u = _uniform(lo * np.uint64(self.n) + hi + np.uint64(self.seed) * _MIX1)
        if same is None:
            same = self.identity(i) == self.identity(j)
        return np.where(same, 0.45 + 0.45 * u, 0.05 + 0.5 * u * u).astype(np.float32)

    def knn(self, r0: int, r1: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """kNN lists of faces [r0, r1): (index (R, k) int64, sim (R, k) float32), sorted as the kNN stage sorts
        (similarity descending, then id ascending), padded with -1 / -inf."""
        ids = np.arange(r0, r1, dtype=np.int64)
        pos = self.pos_of(ids)
        c = np.searchsorted(self.starts, pos, side="right") - 1
        s0, sz = self.starts[c][:, None], self.sizes[c][:, None]
        slot = np.arange(k, dtype=np.int64)[None, :]
        # the next k members of the identity, cyclically (fewer when it is smaller)
        same_pos = s0 + (pos[:, None] - s0 + 1 + slot) % sz
        same_ok = slot < sz - 1
        # k look-alikes or impostors from the window around the identity, by a hash of (face, slot)
        span = sz + 2 * self.window
        with np.errstate(over="ignore"):
            h = _splitmix(ids.astype(np.uint64)[:, None] * np.uint64(2 * k + 1) + slot.astype(np.uint64)
                          + np.uint64(self.seed + 1) * _MIX2)
        other_pos = (s0 - self.window + (h % span.astype(np.uint64)).astype(np.int64)) % self.n
        other_ok = (other_pos < s0) | (other_pos >= s0 + sz)
        cand = self.id_of(np.concatenate([same_pos, other_pos], axis=1))
        ok = np.concatenate([same_ok, other_ok], axis=1)
        same = np.concatenate([np.ones_like(same_ok), np.zeros_like(other_ok)], axis=1)  # by construction
        cand = np.where(ok, cand, -1)
        # one entry per distinct neighbour (two slots may draw the same face)
        by_id = np.argsort(cand, axis=1, kind="stable")
        cand, same = np.take_along_axis(cand, by_id, 1), np.take_along_axis(same, by_id, 1)
        dup = np.zeros_like(ok)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        cand = np.where(dup | (cand < 0), -1, cand)
        rows = np.broadcast_to(ids[:, None], cand.shape)
        sim = np.where(cand >= 0, self.similarity(rows, np.where(cand >= 0, cand, 0), same), -np.inf).astype(np.float32)
        # one int64 key per entry (similarity descending, then id ascending; ids < 2^31): one argsort
        bits = sim.view(np.int32)
        monotone = (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)  # increasing with sim
        key = ((np.int64(2**31 - 1) - monotone) << 31) | np.where(cand >= 0, cand, 2**31 - 1)
        order = np.argsort(key, axis=1)[:, :k]
        return np.take_along_axis(cand, order, 1), np.take_along_axis(sim, order, 1)


def features(r0: int, r1: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit features of faces [r0, r1) (the later stages only read them; a hash of the id per value)."""
    ids = np.arange(r0, r1, dtype=np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]
    x = (_uniform(ids + np.uint64(seed) * _MIX1) - 0.5).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
