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
* a face's list is its exact top ``k`` among its *band*: the faces at its identity's positions and within
  ``window`` positions either side, which hold its look-alikes (neighbouring identities);
* a pair's similarity is the cosine of the two faces' *latent vectors* (``LATENT`` dimensions): a face's is
  its identity's centre plus its own Gaussian noise (a face-dependent spread, as faces of unequal quality),
  normalised, and the identity centres are an AR(1) chain over the identity order, so identities close in
  position (each other's window) are look-alikes of graded similarity. A similarity is a geometry, not a
  hash of the pair: shared neighbours, local density and rank structure behave as on real faces.

Why a geometry (0.7): the first version drew each pair's similarity independently (same identity
``0.45 + 0.45 u``, other ``0.05 + 0.5 u^2``). Its lists had no neighbourhood structure, so the edge scorer's
relative inputs read noise: on 50,000 planted faces 21% of the edges with P >= 0.95 joined two identities and
the components at P >= 0.85 held 49,957 faces, which made the communities stage one million-face Infomap
problem per floor at 1M (README, "bench scale"). A geometry alone did not fix it while the impostors were
drawn at random from the window (20% still): every face of a window then listed the same random sample, and
shared neighbours looked like an identity. With the exact band search, 20,000 faces: 6.7% (adapted P), the
largest component at P >= 0.85 4,673 faces, the communities' pairwise F 0.82 (0.15 before).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter

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


def _gaussian(x: np.ndarray) -> np.ndarray:
    """Standard normal float64 from uint64 keys (Box-Muller on two hashes of each key)."""
    with np.errstate(over="ignore"):
        u1 = _uniform(x * np.uint64(2) + np.uint64(1))
        u2 = _uniform(x * np.uint64(2) + np.uint64(2))
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


LATENT = 32  #: dimensions of the latent vectors the similarities are cosines of
SPREAD = 0.6  #: a face's noise norm relative to its unit identity centre, times its quality factor (0.75-1.25)
FAMILY = 0.4  #: AR(1) correlation of consecutive identity centres (the look-alikes of the window)
BLOCK_CANDIDATES = 1 << 17  #: (row, candidate) pairs of one block of knn(): ~34 MB of latent products


class Planted:
    """The planted structure of ``n`` faces: identity sizes, the id scattering and the latent geometry.

    Parameters
    ----------
    sizes : (C,) int identity sizes, summing to n.
    seed : int, part of every hash.
    window : positions either side of an identity from which its look-alikes are drawn.
    """

    def __init__(self, sizes: np.ndarray, seed: int = 0, window: int = 128):
        self.sizes = np.asarray(sizes, np.int64)
        self.n = int(self.sizes.sum())
        if self.n < 2 or (self.sizes < 1).any() or self.n >= 2**31:
            raise ValueError("need 2 <= n < 2^31 faces and identity sizes >= 1")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.seed = int(seed)
        self.window = int(window)
        # identity centres: a stationary AR(1) chain in identity order (unit variance per coordinate), normalised;
        # float32 keeps the object small where it is sent to every worker (10^6 identities: 128 MB in float64)
        with np.errstate(over="ignore"):
            keys = (np.arange(len(self.sizes), dtype=np.uint64)[:, None] * np.uint64(LATENT)
                    + np.arange(LATENT, dtype=np.uint64)[None, :] + np.uint64(self.seed + 7) * _MIX2)
            g = _gaussian(keys)
        g[1:] *= math.sqrt(1.0 - FAMILY ** 2)
        centres = lfilter([1.0], [1.0, -FAMILY], g, axis=0)
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
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

    def latent(self, ids: np.ndarray) -> np.ndarray:
        """Unit latent vectors of faces (float64, (len(ids), LATENT)): the identity centre plus the face's noise."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        with np.errstate(over="ignore"):
            key = ids.astype(np.uint64) + np.uint64(self.seed + 3) * _MIX1
            noise = _gaussian(key[:, None] * np.uint64(LATENT + 1) + np.arange(LATENT, dtype=np.uint64)[None, :])
            quality = 0.75 + 0.5 * _uniform(key * np.uint64(LATENT + 1) + np.uint64(LATENT))
        z = self.centres[self.identity(ids)].astype(np.float64) + noise * (SPREAD * quality / math.sqrt(LATENT))[:, None]
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def similarity(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The planted similarity of pairs: the cosine of their latent vectors, float32. Symmetric to the bit:
        the products are the same numbers from either end and are summed in one order."""
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        return (self.latent(i) * self.latent(j)).sum(1).astype(np.float32).reshape(i.shape)

    def features(self, r0: int, r1: int, dim: int) -> np.ndarray:
        """Unit features of faces [r0, r1): their latent vectors, zero-padded to ``dim`` (>= LATENT), so the
        features' cosines are the lists' similarities."""
        if dim < LATENT:
            raise ValueError(f"planted features need dim >= {LATENT}, got {dim}")
        x = np.zeros((r1 - r0, dim), np.float32)
        x[:, :LATENT] = self.latent(np.arange(r0, r1, dtype=np.int64))
        return x

    def knn(self, r0: int, r1: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """kNN lists of faces [r0, r1): (index (R, k) int64, sim (R, k) float32), sorted as the kNN stage sorts
        (similarity descending, then id ascending), padded with -1 / -inf.

        Exact within a face's *band*: every face at the positions of its identity and ``window`` positions either
        side (its look-alikes: the AR(1) centres make identities beyond the band unrelated). Rows go in blocks of
        neighbouring positions (sorted by position, so their bands overlap and the latent vectors of the block's
        positions are made once: 65,536 rows at 1M faces 23.4 -> 5.2 s, at 3M 30.3 -> 9.9 s, the same lists), ``BLOCK_CANDIDATES`` (row, candidate)
        pairs a block at most, each row's band padded to the block's widest.
        """
        ids = np.arange(r0, r1, dtype=np.int64)
        pos = self.pos_of(ids)
        c = np.searchsorted(self.starts, pos, side="right") - 1
        first, length = self.starts[c] - self.window, self.sizes[c] + 2 * self.window
        length = np.minimum(length, self.n)  # a band never wraps onto itself
        out_i = np.full((len(ids), k), -1, np.int64)
        out_s = np.full((len(ids), k), -np.inf, np.float32)
        order = np.argsort(pos, kind="stable")
        longest = BLOCK_CANDIDATES // max(1, int(length.min())) + 1 if len(ids) else 1  # most rows a block can take
        start = 0
        while start < len(order):
            widest = np.maximum.accumulate(length[order[start:start + longest]])
            rows = max(1, int((np.arange(1, len(widest) + 1) * widest <= BLOCK_CANDIDATES).sum()))
            blk, width = order[start:start + rows], int(widest[rows - 1])
            start += rows
            slot = np.arange(width, dtype=np.int64)[None, :]
            at = first[blk, None] + slot  # band positions (unwrapped: id_of takes them mod n)
            lo = int(first[blk].min())
            span = self.latent(self.id_of(np.arange(lo, int(at.max()) + 1, dtype=np.int64)))
            cand = self.id_of(at)
            cand = np.where((slot < length[blk, None]) & (cand != ids[blk, None]), cand, -1)
            zr = self.latent(ids[blk])
            sim = np.where(cand >= 0, (span[at - lo] * zr[:, None, :]).sum(2), -np.inf).astype(np.float32)
            # one int64 key per entry (similarity descending, then id ascending; ids < 2^31): one argpartition
            bits = sim.view(np.int32)
            monotone = (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)  # increasing with sim
            key = ((np.int64(2**31 - 1) - monotone) << 31) | np.where(cand >= 0, cand, 2**31 - 1)
            kk = min(k, width)
            top = np.argpartition(key, kk - 1, axis=1)[:, :kk] if kk < width else np.broadcast_to(slot, key.shape)
            top = np.take_along_axis(top, np.argsort(np.take_along_axis(key, top, 1), axis=1), 1)
            out_i[blk, :kk], out_s[blk, :kk] = np.take_along_axis(cand, top, 1), np.take_along_axis(sim, top, 1)
        return out_i, out_s
