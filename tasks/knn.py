"""Cosine kNN kernels on one block: faiss search, exact re-scoring, top-k merges, IVF shards.

Everything here works on plain numpy arrays and faiss objects for ONE block of
queries against ONE block (or shard) of the database; the pipeline wires blocks
together (``pipeline/stages/knn.py``).

Determinism contract
--------------------
Results must not depend on how rows are chunked. faiss computes similarities in
float32 through BLAS (or SIMD loops for small batches); the rounding of a dot
product depends on the block shapes and on the BLAS kernel, so raw faiss values
(and therefore rankings near the k-th neighbour) change with the chunking. The
kernels here therefore

1. over-fetch ``k + margin`` candidates with faiss,
2. re-score every candidate exactly: float64 dot products of the stored float32
   rows, rounded once to float32 (a function of the two rows only),
3. sort by (similarity descending, neighbour id ascending) and truncate,
4. *certify* the candidate set: faiss's error on a dot product is bounded by
   ``tol`` (``d * 2**-23 * |q| * |x|``, twice the textbook bound); a row faiss did
   not return has an exact similarity <= (last fetched faiss value + tol). If the
   re-scored k-th similarity is strictly above that, no unfetched row can enter
   the top k. Queries that fail the test (many near-ties, duplicates) are searched
   again with twice as many candidates, until certified or the block is exhausted.

So every output row is the exact top-k under a total order, and merging blocks
with :func:`merge_topk` (associative, commutative) gives the same arrays for any
chunking, worker count or BLAS kernel. :func:`knn_bf16` finds the candidates with a
bfloat16 GEMM instead of faiss and certifies them with a bound on the bfloat16 error
(see "reduced precision" below): same arrays again.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import numpy as np

from .arrays import sorted_prefix_lengths

log = logging.getLogger(__name__)

PAD_ID = -1
PAD_SIM = -np.inf
#: queries re-scored per numpy batch (bounds the float64 gather temporary: 256 x kk x d x 8 bytes)
RESCORE_BATCH = 256


# -- threads -------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    """Use ``n`` OpenMP threads for faiss in the calling thread (= the Dask worker's threads)."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(max(1, int(n)))
    import sys

    if "torch" in sys.modules:  # the bfloat16 kernel's GEMM (never imports torch just for this)
        sys.modules["torch"].set_num_threads(max(1, int(n)))
    # numpy's BLAS runs the GEMMs of the list-major IVF search (IvfLists.search)
    threadpool_limits(max(1, int(n)), user_api="blas")


def blas_info() -> dict:
    """The BLAS libraries loaded in this process and the OpenBLAS kernel ('architecture') of each."""
    from threadpoolctl import threadpool_info

    out = {}
    for info in threadpool_info():
        if info.get("internal_api") == "openblas":
            lib = "faiss" if "faiss" in info.get("filepath", "") else info.get("prefix", "openblas")
            out[lib] = {"architecture": info.get("architecture"), "version": info.get("version"),
                        "threads": info.get("num_threads")}
    return out


# -- sorting and merging ---------------------------------------------------------------------
def _pad(sim: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n, m = sim.shape
    if m >= k:
        return sim, idx
    ps = np.full((n, k - m), PAD_SIM, dtype=np.float32)
    pi = np.full((n, k - m), PAD_ID, dtype=np.int64)
    return np.concatenate([sim, ps], axis=1), np.concatenate([idx, pi], axis=1)


def sort_topk(sim: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: sort by (sim descending, id ascending), keep ``k`` columns, pad with (-inf, -1).

    Padding entries (id -1, sim -inf) sort last. The order is total on (sim, id), which
    is what makes merges independent of chunking.
    """
    sim = np.asarray(sim, dtype=np.float32)
    idx = np.asarray(idx, dtype=np.int64)
    if sim.shape[1] == 0:
        return _pad(sim, idx, k)
    # lexsort: last key is primary. Pads (-inf) go last; among real entries id breaks ties.
    order = np.lexsort((idx, -sim), axis=-1)[:, :k]
    s = np.take_along_axis(sim, order, axis=1)
    i = np.take_along_axis(idx, order, axis=1)
    return _pad(s, i, k)


def merge_topk(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of two top-k lists of the same queries (associative and commutative).

    Parameters
    ----------
    a, b : (sim [n, ka] float32, idx [n, ka] int64)
        Candidate lists, e.g. of the same query rows against two database blocks.
    k : int
        Columns kept.

    Returns
    -------
    (sim [n, k] float32, idx [n, k] int64), sorted by sim descending then id ascending.
    """
    return merge_topk_many([a, b], k)


def merge_topk_many(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """n-ary :func:`merge_topk` (one node of a tree reduction with fan-in ``len(parts)``)."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_topk_many needs at least one part")
    sim = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts], axis=1)
    idx = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts], axis=1)
    return sort_topk(sim, idx, k)


def reverse_entries(q0: int, sim: np.ndarray, idx: np.ndarray, bounds: Sequence[int]):
    """The kNN lists of rows ``q0, q0 + 1, ...`` turned around: row i listing j at similarity s makes i a
    candidate of row j at s (the same pair, the same value: :func:`rescore` is a function of the two rows).

    Returns (dst, src, sim, counts): the entries grouped by target block ``[bounds[b], bounds[b + 1])`` (in
    block order, stable within a block) and how many fall in each block."""
    idx = np.asarray(idx, dtype=np.int64)
    valid = idx >= 0
    src = np.broadcast_to(np.arange(q0, q0 + len(idx), dtype=np.int64)[:, None], idx.shape)[valid]
    dst = idx[valid]
    s = np.asarray(sim, dtype=np.float32)[valid]
    bounds = np.asarray(bounds, dtype=np.int64)
    block = np.searchsorted(bounds, dst, side="right") - 1
    # a stable sort of small integers is a radix sort in numpy (0.05 s for 5M entries, against 0.7 s by target row)
    order = np.argsort(block.astype(np.int16 if len(bounds) < 2**15 else np.int32), kind="stable")
    counts = np.bincount(block, minlength=len(bounds) - 1)[:len(bounds) - 1]
    return dst[order], src[order], s[order], counts


def _beaten_by(sim: np.ndarray, idx: np.ndarray, row: np.ndarray, s: np.ndarray, i: np.ndarray) -> np.ndarray:
    """For each candidate (row, similarity s, id i): how many entries of its row beat it in the order (similarity
    descending, id ascending). The rows are sorted in that order (pads, -inf / -1, last), so the entries that beat
    it are a prefix (:func:`facecluster.tasks.arrays.sorted_prefix_lengths`: 7 reads at k = 80)."""
    k = sim.shape[1]
    flat_s, flat_i = sim.ravel(), idx.ravel()
    base = row * k - 1  # a prefix of length c ends at flat entry base + c: 1-D takes (2-D fancy indexing is ~2x slower)

    def beats(c):
        at = base + c
        sv, iv = flat_s.take(at), flat_i.take(at)
        return (sv > s) | ((sv == s) & (iv < i) & (iv >= 0))

    return sorted_prefix_lengths(k, len(row), beats)


def add_reverse(q0: int, sim: np.ndarray, idx: np.ndarray, rdst: np.ndarray, rsrc: np.ndarray, rsim: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each row's top-k of its own list (sorted as :func:`sort_topk` leaves it) joined with its reverse
    candidates (``rsrc`` at ``rsim`` for row ``rdst``, global ids; rows ``q0 ...``): by (sim descending, id
    ascending), an id already in the list once. Returns (sim, idx, entries added).

    Why: an IVF search misses a neighbour j of i when j's list is not among i's probes, but i is often among
    j's, so j's search found the pair: the transpose of the kNN graph recovers it for no multiply-add.
    How, with no sort of the rows: each candidate's place among its row's entries (:func:`_beaten_by`; the
    entry at that place is the candidate itself when its id is already listed), its rank among the row's
    other new candidates, and each old entry moved down by the new candidates that beat it."""
    sim = np.asarray(sim, dtype=np.float32)
    idx = np.asarray(idx, dtype=np.int64)
    n = len(idx)
    row = np.asarray(rdst, dtype=np.int64) - q0
    rsrc = np.asarray(rsrc, dtype=np.int64)
    rsim = np.asarray(rsim, dtype=np.float32)
    # only a candidate at or above the row's k-th similarity can enter (-inf where the row is short)
    keep = rsim >= sim[row, k - 1]
    row, rsrc, rsim = row[keep], rsrc[keep], rsim[keep]
    pos = _beaten_by(sim, idx, row, rsim, rsrc)
    at = np.minimum(pos, k - 1)
    new = (pos < k) & (idx[row, at] != rsrc)
    row, rsrc, rsim, pos = row[new], rsrc[new], rsim[new], pos[new]
    if not len(row):
        return sim.copy(), idx.copy(), 0
    order = np.lexsort((rsrc, -rsim, row))
    row, rsrc, rsim, pos = row[order], rsrc[order], rsim[order], pos[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row)  # among the row's new candidates
    # old entry c moves down by the new candidates placed at or before it
    shift = np.cumsum(np.bincount(row * (k + 1) + pos, minlength=n * (k + 1)).reshape(n, k + 1)[:, :k], axis=1)
    out_s = np.full((n, k), PAD_SIM, dtype=np.float32)
    out_i = np.full((n, k), PAD_ID, dtype=np.int64)
    dest = np.arange(k)[None, :] + shift
    stay = dest < k
    rows_old = np.broadcast_to(np.arange(n)[:, None], (n, k))
    out_s[rows_old[stay], dest[stay]] = sim[stay]
    out_i[rows_old[stay], dest[stay]] = idx[stay]
    place = pos + rank
    enter = place < k
    out_s[row[enter], place[enter]] = rsim[enter]
    out_i[row[enter], place[enter]] = rsrc[enter]
    return out_s, out_i, int(enter.sum())


def brute_force_knn(x: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference oracle: exact float64 cosine kNN with numpy (self excluded, id tie-break). Small N only."""
    x = np.asarray(x)
    n = len(x)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    x64 = x.astype(np.float64)
    s = (x64 @ x64.T).astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    idx = np.broadcast_to(ids, (n, n)).copy()
    idx[np.arange(n), np.arange(n)] = PAD_ID
    return sort_topk(s, idx, k)


# -- exact re-scoring and certification -------------------------------------------------------
def rescore(q: np.ndarray, rows: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Exact similarities of queries ``q`` with ``rows[local]`` (float64 sums, rounded once to float32).

    ``local`` is [nq, m] row numbers into ``rows`` (-1 = no candidate -> -inf). The value
    of a pair depends on the two rows only, never on the batch it was computed in.
    """
    nq, m = local.shape
    out = np.full((nq, m), PAD_SIM, dtype=np.float32)
    if nq == 0 or m == 0:
        return out
    valid = local >= 0
    safe = np.where(valid, local, 0)
    step = max(1, RESCORE_BATCH * 96 // max(m, 1))
    # one gather buffer for every batch (a fresh ~25 MB one per batch is a fresh mmap under the
    # Dask workers' MALLOC_TRIM_THRESHOLD_, and its page faults)
    buf = np.empty((min(step, nq), m, rows.shape[1]), dtype=rows.dtype)
    for s in range(0, nq, step):
        e = min(nq, s + step)
        # positions in range already: "clip" skips numpy's bounds check (2.4x faster measured)
        g = np.take(rows, safe[s:e], axis=0, out=buf[:e - s], mode="clip")
        # float64 accumulation of float32 products, rounded once: the float32 result is a
        # function of the pair (any float64 summation order rounds to the same float32
        # except within ~1e-16 of a rounding boundary). einsum casts on the fly (fastest measured).
        out[s:e] = np.einsum("bd,bmd->bm", q[s:e], g, dtype=np.float64)
    out[~valid] = PAD_SIM
    return out


def _tolerance(q: np.ndarray, rows: np.ndarray) -> float:
    """Bound on |faiss float32 dot - exact dot| for any pair (twice d * u * |q| * |x|)."""
    if len(q) == 0 or len(rows) == 0:
        return 0.0
    return _float32_tolerance(q, float(_row_norms(rows).max()))


def _float32_tolerance(q: np.ndarray, row_norm_max: float) -> float:
    """:func:`_tolerance` given the rows' largest norm (held by a database group)."""
    if len(q) == 0:
        return 0.0
    d = q.shape[1]
    qn = float(_row_norms(q).max())
    return d * 2.0 ** -23 * qn * row_norm_max + 1e-7


#: search(positions into q, kk) -> (raw sims [n, kk] float32, local row numbers [n, kk] int64, -1 = none),
#: optionally a third array upper [n] float64: a bound on the exact similarity of every row not returned
#: (replaces "last raw value + tol"; +inf = no bound, the query is searched again with 2 * kk)
Searcher = Callable[[np.ndarray, int], tuple]


def certified_topk(search: Searcher, q: np.ndarray, q_ids: np.ndarray, rows: np.ndarray, row_ids: np.ndarray,
                   k: int, margin: int = 16, n_candidates: int | None = None,
                   tol: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact, chunking-independent top-k of ``q`` among a searcher's candidates.

    Parameters
    ----------
    search : callable(sel, kk) -> (D [len(sel), kk] float32, L [len(sel), kk] int64)
        faiss-like search of the queries ``q[sel]`` returning raw similarities and
        *local* row numbers into ``rows`` (-1 when fewer than kk candidates).
    q, q_ids : queries [nq, d] float32 and their global ids (self = same id, excluded).
    rows, row_ids : the searched rows [nb, d] float32 and their global ids.
    k : neighbours kept. margin : extra candidates fetched in the first round.
    n_candidates : int or [nq] ints, size of each query's candidate universe
        (default ``len(rows)``): once kk reaches it the query is certified trivially.
    tol : bound on the searcher's similarity error (default: :func:`_tolerance`).

    Returns
    -------
    sim [nq, k] float32, idx [nq, k] int64 (global ids; pads -inf / -1).
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    q_ids = np.asarray(q_ids, dtype=np.int64)
    row_ids = np.asarray(row_ids, dtype=np.int64)
    nq = len(q)
    out_s = np.full((nq, k), PAD_SIM, dtype=np.float32)
    out_i = np.full((nq, k), PAD_ID, dtype=np.int64)
    if nq == 0 or len(rows) == 0:
        return out_s, out_i
    universe = np.broadcast_to(np.asarray(len(rows) if n_candidates is None else n_candidates, dtype=np.int64), (nq,))
    if tol is None:
        tol = _tolerance(q, rows)
    todo = np.flatnonzero(universe > 0)
    kk = k + margin + 1  # +1: self may be among the candidates
    while len(todo):
        kk_now = int(min(kk, universe[todo].max()))
        found = search(todo, kk_now)
        D, L = found[0], found[1]
        # a searcher may state its own bound per query (exact sim of any row it did not return)
        upper = found[2] if len(found) > 2 else None
        L = np.asarray(L, dtype=np.int64)
        gid = np.where(L >= 0, row_ids[np.where(L >= 0, L, 0)], PAD_ID)
        self_hit = gid == q_ids[todo, None]
        L = np.where(self_hit, -1, L)
        gid = np.where(self_hit, PAD_ID, gid)
        s = rescore(q[todo], rows, L)
        s_sorted, i_sorted = sort_topk(s, gid, k)
        if upper is None:
            # last raw value the search returned: every unfetched candidate is <= it + tol
            D = np.asarray(D, dtype=np.float64)
            last = np.where(np.isfinite(D), D, np.inf).min(axis=1)
            upper = last + tol
        # float32 rounding of the bound: round up, so "exact > bound" stays a proof
        bound = np.nextafter(np.asarray(upper, dtype=np.float64).astype(np.float32), np.float32(np.inf))
        ok = (universe[todo] <= kk_now) | (s_sorted[:, k - 1] > bound)
        done = todo[ok]
        out_s[done] = s_sorted[ok]
        out_i[done] = i_sorted[ok]
        todo = todo[~ok]
        if len(todo):
            log.debug("certified_topk: %d queries re-searched with %d candidates", len(todo), 2 * kk_now)
        kk = 2 * kk_now
    return out_s, out_i


# -- exact blocks ------------------------------------------------------------------------------
def flat_index(db: np.ndarray):
    """A faiss IndexFlatIP holding ``db`` (float32 [nb, d])."""
    import faiss

    db = np.ascontiguousarray(db, dtype=np.float32)
    index = faiss.IndexFlatIP(db.shape[1])
    if len(db):
        index.add(db)
    return index


def flat_rows(index) -> np.ndarray:
    """The rows stored in an IndexFlat, as a numpy view (no copy)."""
    import faiss

    n, d = index.ntotal, index.d
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


def knn_flat(index, q: np.ndarray, q_ids: np.ndarray, db_ids: np.ndarray, k: int, margin: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_block` on a prebuilt :func:`flat_index` (reuse one index for many query blocks)."""
    rows = flat_rows(index)

    q = np.ascontiguousarray(q, dtype=np.float32)

    def search(sel, kk):
        return index.search(q if len(sel) == len(q) else np.ascontiguousarray(q[sel]), kk)

    return certified_topk(search, q, q_ids, rows, db_ids, k, margin)


def knn_block(q: np.ndarray, q_ids: np.ndarray, db: np.ndarray, db_ids: np.ndarray, k: int,
              margin: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of query rows against one database block (faiss IndexFlatIP).

    Parameters
    ----------
    q : [nq, d] float32 queries (unit rows for cosine). q_ids : [nq] int64 their global ids.
    db : [nb, d] float32 database block. db_ids : [nb] int64 its global ids.
    k : neighbours per query. The entry whose id equals the query's id is removed
        wherever it ranks (self exclusion); rows with fewer than k candidates are
        padded with id -1 and sim -inf.
    margin : extra candidates fetched before exact re-scoring (see module docstring).

    Returns
    -------
    sim [nq, k] float32 (exact dot products rounded to float32), idx [nq, k] int64,
    sorted by sim descending then id ascending.
    """
    return knn_flat(flat_index(db), q, q_ids, db_ids, k, margin)


# -- reduced precision: bfloat16 candidates, exact re-scoring ---------------------------------
# The GEMM that finds candidates runs in bfloat16 (torch; oneDNN uses AMX or AVX512-BF16 where the
# CPU has them), the candidates are re-scored exactly (:func:`rescore`) and certified as above with a
# bound on the bfloat16 error, so the output is identical to the float32 kernel's. The bound, for a
# query q and a row y with bfloat16 roundings q~, y~ and residuals r_q = q - q~, r_y = y - y~
# (computed exactly in float32):
#   |q.y - q~.y~| = |q~.r_y + r_q.y~ + r_q.r_y| <= |q~||r_y| + |r_q||y~| + |r_q||r_y|   (Cauchy-Schwarz)
#   float32 accumulation of the (exact) bf16 products, any order: <= gamma_d |q~||y~|, gamma_d = d u/(1 - d u)
#   the GEMM's bfloat16 output D (round to nearest): |D - acc| <= 2^-8 |D|
# so every row the search did not return has an exact similarity <= last + 2^-8 |last| + e(q), last =
# the smallest value returned. For unit rows e(q) is ~4e-3 (the residual norms are measured, not the
# worst case 2^-8 |x|). Queries whose k-th exact similarity is not above that are searched again with
# twice the candidates (bfloat16 up to BF16_MAX_CANDIDATES, then the float32 kernel, faiss), so the
# result never depends on the bound being tight, only on it holding.
BF16_GROUP = 32  #: largest group in the two-stage selection (group maxima, then the best groups' members)
BF16_TILE = 128  #: queries per GEMM tile (measured 64-512 at 100k rows: 128-256 best)
_BF16_OUT_U = 2.0 ** -8
_F32_U = 2.0 ** -24


def cpu_features() -> dict:
    """The instruction sets the reduced-precision kernels rely on: /proc/cpuinfo flags and torch's capability."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        import torch

        cap = str(torch.backends.cpu.get_cpu_capability())
        mkldnn_bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    except Exception:  # noqa: BLE001 - torch missing or too old: no reduced-precision kernel
        cap, mkldnn_bf16 = None, False
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "amx_int8": "amx_int8" in flags,
            "torch_capability": cap, "mkldnn_bf16": mkldnn_bf16}


def _gemm_speedup(m: int = 256, n: int = 8192, d: int = 256, reps: int = 4) -> float:
    """float32 GEMM time / bfloat16 GEMM time here (best of ``reps``, interleaved, so that another
    process's load hits both alike)."""
    import time

    import torch

    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((m, d), dtype=np.float32)
    b32 = rng.standard_normal((d, n), dtype=np.float32)
    a16, b16 = torch.from_numpy(a32).to(torch.bfloat16), torch.from_numpy(b32).to(torch.bfloat16)
    best = {"f32": float("inf"), "bf16": float("inf")}
    for i in range(reps + 1):
        for name, f in (("f32", lambda: a32 @ b32), ("bf16", lambda: torch.mm(a16, b16))):
            t = time.perf_counter()
            f()
            if i:  # the first round warms up
                best[name] = min(best[name], time.perf_counter() - t)
    return best["f32"] / best["bf16"]


_PRECISION_CACHE: dict = {}


def choose_precision(setting: str = "auto") -> dict:
    """The precision of the candidate GEMM for the exact kernel in this process.

    "float32": faiss (today's kernel). "bfloat16": torch bfloat16 candidates. "auto": bfloat16 where
    the CPU has native bfloat16 dot products (``avx512_bf16`` or ``amx_bf16``: elsewhere torch emulates
    them) and a bfloat16 GEMM measures at least 1.2x numpy's float32 GEMM here (a ~50 ms calibration,
    once per process), else float32. Either way the neighbours and similarities are identical.
    Returns ``{"precision", "reason", "gemm_speedup", "cpu"}``.
    """
    if setting not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {setting!r}")
    if setting in _PRECISION_CACHE:
        return _PRECISION_CACHE[setting]
    cpu = cpu_features()
    out = {"precision": "float32", "reason": "", "gemm_speedup": None, "cpu": cpu}
    if setting == "float32":
        out["reason"] = "configured"
    elif cpu["torch_capability"] is None:
        out["reason"] = "torch unavailable"
    elif setting == "bfloat16":
        out.update(precision="bfloat16", reason="configured")
    elif not (cpu["avx512_bf16"] or cpu["amx_bf16"]):
        out["reason"] = "no avx512_bf16/amx_bf16 on this CPU"
    else:
        try:
            ratio = _gemm_speedup()
        except Exception as e:  # noqa: BLE001
            ratio, out["reason"] = 0.0, f"bfloat16 GEMM failed: {e}"
        out["gemm_speedup"] = round(ratio, 2)
        if ratio >= 1.2:
            out.update(precision="bfloat16", reason=f"bfloat16 GEMM {ratio:.1f}x float32 here")
        elif not out["reason"]:
            out["reason"] = f"bfloat16 GEMM only {ratio:.1f}x float32 here"
    log.info("knn kernel: %s candidates (%s; cpu %s)", out["precision"], out["reason"], cpu)
    _PRECISION_CACHE[setting] = out
    return out


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def _bf16_split(x: np.ndarray):
    """(bfloat16 tensor of x, |x~| per row, |x - x~| per row); the residual is exact in float32."""
    import torch

    xb = torch.from_numpy(x).to(torch.bfloat16)
    xr = xb.to(torch.float32).numpy()
    return xb, _row_norms(xr), _row_norms(x - xr)


SPLIT_ROWS = 1 << 16  #: rows per slice when a database's bfloat16 copy is made


class Bf16Flat:
    """A database block for :func:`knn_bf16`: the float32 rows (re-scoring, fallback) plus their
    bfloat16 copy, transposed and padded to ``group`` x ``n_groups`` columns."""

    def __init__(self, rows: np.ndarray, group: int | None = None):
        import torch

        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        nb, d = self.rows.shape
        if group is None:
            # selection work per query ~ nb / g group maxima + kk * g members: least near g = sqrt(nb / kk)
            # (kk ~ 128); measured at 16k rows: g = 8 / 16 / 32 -> 0.97 / 0.90 / 0.98 s per 8k queries
            group = int(min(BF16_GROUP, max(4, 2 ** round(np.log2(max(1.0, np.sqrt(nb / 128.0)))))))
        self.nb, self.d, self.group = nb, d, int(group)
        self.n_groups = -(-nb // self.group)
        self.xt = torch.zeros((d, self.n_groups * self.group), dtype=torch.bfloat16)
        self.norm_max = self.res_max = 0.0  # max |y~|, max |y - y~|
        # in slices: the whole-block float32 temporaries of the split were 3x the rows (4 GB peak at 1M faces)
        for a in range(0, nb, SPLIT_ROWS):
            xb, bn, rn = _bf16_split(self.rows[a:a + SPLIT_ROWS])
            self.xt[:, a:a + len(xb)] = xb.T
            self.norm_max = max(self.norm_max, float(bn.max()))
            self.res_max = max(self.res_max, float(rn.max()))
        self.row_norm_max = float(_row_norms(self.rows).max()) if nb else 0.0  # max |y|, for the float32 bound
        self.first_width: dict[int, int] = {}  # k -> knn_bf16's first-round width, learned over its calls

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + 2 * self.xt.numel()

    def search(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """bfloat16 candidates of ``q``: (D [n, kk] float32 bfloat16 values, L [n, kk] int64, upper [n]).

        ``upper`` bounds the exact similarity of every row not in L (module comment above); +inf
        where the selection cannot vouch for its candidates (the kk-th best is negative: the int16
        shortcut below orders non-negative values only), so that query goes to the float32 kernel.
        """
        import torch

        q = np.ascontiguousarray(q, dtype=np.float32)
        n, nb, g, ng = len(q), self.nb, self.group, self.n_groups
        kk = int(min(kk, nb))
        D = np.full((n, kk), PAD_SIM, dtype=np.float32)
        L = np.full((n, kk), PAD_ID, dtype=np.int64)
        upper = np.full(n, np.inf)
        if n == 0 or kk == 0:
            return D, L, upper
        qb, qn, qr = _bf16_split(q)
        d = self.d
        gamma = d * _F32_U / (1 - d * _F32_U)
        err = qn * self.res_max + qr * self.norm_max + qr * self.res_max + gamma * qn * self.norm_max + 1e-6
        kg = min(kk, ng)
        kc = min(kk, kg * g)
        ok = np.zeros(n, dtype=bool)
        # buffers reused by every tile: Dask workers run with MALLOC_TRIM_THRESHOLD_ set, which pins
        # glibc's mmap threshold at 128 KiB, so a fresh 13 MB tile per iteration was a fresh mmap and
        # its page faults (measured: 5.4 s instead of 3.7 s for 16k queries x 100k rows)
        tile = min(BF16_TILE, n)
        buf_s = torch.empty((tile, ng * g), dtype=torch.bfloat16)
        buf_m = torch.empty((tile, ng), dtype=torch.int16)
        buf_gv, buf_gi = torch.empty((tile, kg), dtype=torch.int16), torch.empty((tile, kg), dtype=torch.int64)
        buf_cand = torch.empty((tile, g, kg), dtype=torch.int16)
        buf_v, buf_j = torch.empty((tile, kc), dtype=torch.int16), torch.empty((tile, kc), dtype=torch.int64)
        buf_loc = torch.empty((tile, kc), dtype=torch.int64)
        for a in range(0, n, tile):
            b = min(n, a + tile)
            t = b - a
            # bfloat16 bit patterns as int16 order non-negative values like the floats (negatives sort
            # below them, in reverse): max and top-k on int16 are fast where bfloat16 ones are not
            torch.mm(qb[a:b], self.xt, out=buf_s[:t])
            s = buf_s[:t].view(torch.int16)
            if ng * g > nb:
                s[:, nb:] = -32768  # padding columns: below every real value's key except -0.0
            # group i = columns {i, i + ng, i + 2 ng, ...}: its maximum is a vertical max of g
            # contiguous rows of the tile (4x faster measured than reducing contiguous groups)
            torch.amax(s.view(t, g, ng), 1, out=buf_m[:t])
            gv, gi = torch.topk(buf_m[:t], kg, dim=1, sorted=False, out=(buf_gv[:t], buf_gi[:t]))  # the kg best groups
            # the members of those groups: member m of group gi is column gi + m * ng
            cand = torch.gather(s.view(t, g, ng), 2, gi.unsqueeze(1).expand(t, g, kg), out=buf_cand[:t])
            v, j = torch.topk(cand.view(t, g * kg), kc, dim=1, sorted=False, out=(buf_v[:t], buf_j[:t]))
            loc = torch.gather(gi, 1, j % kg, out=buf_loc[:t]).add_(torch.div(j, kg, rounding_mode="floor") * ng)
            # every group left out has maximum <= the kg-th group maximum <= the kc-th value kept, and
            # int16 order is float order there when both are >= +0.0
            ok[a:b] = ((gv.min(1).values >= 0) & (v.min(1).values >= 0)).numpy()
            D[a:b, :kc] = v.view(torch.bfloat16).to(torch.float32).numpy()
            L[a:b, :kc] = loc.numpy()
        last = D.min(axis=1).astype(np.float64)
        upper = np.where(ok, last + _BF16_OUT_U * np.abs(last) + err, np.inf)
        L[~ok] = PAD_ID
        return D, L, upper

    def search_float32(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """faiss float32 search over the same rows (the widening / fallback path), with its bound."""
        import faiss

        kk = int(min(kk, self.nb))
        q = np.ascontiguousarray(q, dtype=np.float32)
        D, L = faiss.knn(q, self.rows, kk, faiss.METRIC_INNER_PRODUCT)
        tol = _float32_tolerance(q, self.row_norm_max)  # _tolerance(q, rows) without re-reading every row
        Dd = np.asarray(D, dtype=np.float64)
        last = np.where(np.isfinite(Dd), Dd, np.inf).min(axis=1) if kk else np.full(len(q), -np.inf)
        return D, np.asarray(L, dtype=np.int64), last + tol


#: the bfloat16 search widens a query's candidates (2x per round) up to this many, then float32 takes over
BF16_MAX_CANDIDATES = 1024


#: queries per certified batch of :func:`knn_bf16`; the first round's width adapts between batches
BF16_BATCH = 2048


def _next_width(kk: int, failed: float, k: int) -> int:
    """The next batch's first-round width, from the share of this batch's queries a first round of ``kk``
    did not certify. A failed query costs a second GEMM and twice the re-scoring (~3x the extra
    candidates that would have certified it), so the target is a few percent. Measured at k = 80,
    16k queries, share failed by first-round width: built-in 100k faces 97 38%, 113 2.4%, 129 0.1%;
    LFW x SFace 97 31%, 113 0.2%; LFW x dlib (cosines 0.95-1) 145 82%, 209 23%, 273 1.8%, 337 0.05%."""
    if failed > 0.25:
        kk = int(np.ceil(kk * 1.5))
    elif failed > 0.05:
        kk = int(np.ceil(kk * 1.2))
    elif failed < 0.005:
        kk = int(kk * 0.95)
    return int(min(BF16_MAX_CANDIDATES, max(k + 9, kk)))


def knn_bf16(db: Bf16Flat, q: np.ndarray, q_ids: np.ndarray, db_ids: np.ndarray, k: int,
             margin: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_flat` with bfloat16 candidates: identical neighbours and similarities.

    First round: ``k + margin + 1`` bfloat16 candidates per query, re-scored exactly; the queries the
    bfloat16 bound cannot certify are searched again with twice as many (:func:`certified_topk`),
    in bfloat16 up to :data:`BF16_MAX_CANDIDATES`, then in float32 (faiss); queries the bfloat16
    selection cannot vouch for at all (negative k-th similarities) go to float32 at once. Blocks
    of at most that many rows are returned whole (nothing to select).

    The queries go in batches of :data:`BF16_BATCH`; after each, the first round's width moves
    towards the one that certifies nearly every query (:func:`_next_width`: the bound is ~5e-3, so
    dense similarity scales need far more candidates than ``margin``), and ``db`` keeps it for the
    next call. Only the speed depends on it: every width gives the same certified arrays.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    q_ids = np.asarray(q_ids, dtype=np.int64)
    out_s = np.full((len(q), k), PAD_SIM, dtype=np.float32)
    out_i = np.full((len(q), k), PAD_ID, dtype=np.int64)
    kk1 = db.first_width.get(k, k + margin + 1)
    for a in range(0, len(q), BF16_BATCH):
        qb = q[a:a + BF16_BATCH]
        f32 = np.zeros(len(qb), dtype=bool)  # queries handed to the float32 kernel
        widths = []

        def search(sel, kk):
            n = len(sel)
            widths.append(n)
            if kk >= db.nb:  # every row is a candidate: no search, no bound needed
                return (np.zeros((n, db.nb), np.float32), np.broadcast_to(np.arange(db.nb, dtype=np.int64), (n, db.nb)),
                        np.full(n, -np.inf))
            qs = qb if n == len(qb) else qb[sel]
            if kk > BF16_MAX_CANDIDATES:
                return db.search_float32(qs, kk)
            D, L, upper = db.search(qs, kk)
            lost = np.flatnonzero(np.isinf(upper) & ~f32[sel])  # first time unvouched: float32 from now on
            f32[sel[lost]] = True
            again = np.flatnonzero(f32[sel])
            if len(again):
                D[again], L[again], upper[again] = db.search_float32(qs[again], kk)
            return D, L, upper

        # tol=0: every round's searcher states its own bound (the third value), so none is computed here
        out_s[a:a + len(qb)], out_i[a:a + len(qb)] = certified_topk(search, qb, q_ids[a:a + len(qb)], db.rows, db_ids,
                                                                    k, max(0, kk1 - k - 1), tol=0.0)
        if len(widths) and kk1 < db.nb:
            kk1 = _next_width(kk1, (widths[1] if len(widths) > 1 else 0) / len(qb), k)
    db.first_width[k] = kk1
    return out_s, out_i


# -- IVF ---------------------------------------------------------------------------------------
def default_nlist(n: int, factor: float = 8.0) -> int:
    """IVF lists for ``n`` database rows: ``factor * sqrt(n)`` (4-16 is the usual range)."""
    return max(1, int(round(factor * np.sqrt(max(n, 1)))))


def train_ivf(sample: np.ndarray, nlist: int, seed: int = 1234, niter: int = 10, threads: int = 1) -> np.ndarray:
    """Train an empty IndexIVFFlat (inner product, spherical k-means) on ``sample``; serialised bytes.

    The quantizer is trained once; every shard deserialises the same bytes, so all
    shards agree on the lists and searching them with one nprobe then merging equals
    searching a single index holding every row.

    ``threads``: faiss's and BLAS's threads for the training, whatever the caller's (restored after).
    A fixed count, never the worker's: with OpenBLAS's Haswell kernel the centroids differ between
    1 and 2 threads (the SkylakeX kernel gives the same bytes), so a quantizer trained with the
    worker's threads would make the lists depend on how the workers were started.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    d = sample.shape[1]
    nlist = int(min(nlist, len(sample)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # unit vectors: centroids on the sphere
    index.cp.niter = int(niter)
    index.cp.seed = int(seed)
    index.cp.max_points_per_centroid = max(1, -(-len(sample) // nlist))  # use the whole sample, no warning
    # The sample size is a cost choice ([knn] train_size: 200k rows for 8,000 lists at 1M faces)
    # and nprobe is then tuned against exact search, so faiss's "please provide at least 39
    # points per centroid" warning (it only warns) would tell a user nothing actionable.
    index.cp.min_points_per_centroid = max(1, min(39, len(sample) // max(nlist, 1)))
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    try:
        with threadpool_limits(int(threads), user_api="blas"):
            index.train(sample)
    finally:
        faiss.omp_set_num_threads(before)
    index.own_fields = True
    quantizer.this.disown()
    return faiss.serialize_index(index)


def load_ivf(trained: np.ndarray):
    """Deserialise a trained IVF index (empty or not)."""
    import faiss

    return faiss.deserialize_index(np.asarray(trained, dtype=np.uint8))


def ivf_centroids(index) -> np.ndarray:
    """The IVF quantizer's centroids [nlist, d] float32."""
    import faiss

    quant = faiss.downcast_index(index.quantizer)
    return faiss.rev_swig_ptr(quant.get_xb(), quant.ntotal * quant.d).reshape(quant.ntotal, quant.d).copy()


def ivf_assign(index, x: np.ndarray, nprobe: int, margin: int = 8, precision: str = "float32") -> np.ndarray:
    """The ``nprobe`` lists of each row of ``x`` (exact, chunking-independent: see module doc).

    Lists are ranked by exact centroid similarity then list id, so the probed lists of a
    query (and the list a database row is added to, ``nprobe=1``) do not depend on the
    batch the row came in. ``precision="bfloat16"``: the candidates from :func:`knn_bf16`,
    the same lists (measured at 1M faces, 8,000 lists, 16k rows: nprobe 1 0.63-0.66 s ->
    0.32-0.38 s; nprobe 136 1.7 s either way, the exact re-scoring of the candidates dominates).
    """
    cent = ivf_centroids(index)
    ids = np.arange(len(cent), dtype=np.int64)
    nprobe = min(nprobe, len(cent))
    # q_ids = -2: never equal to a list id, so nothing is excluded
    no_self = np.full(len(x), -2, dtype=np.int64)
    if precision == "bfloat16":
        return knn_bf16(Bf16Flat(cent), x, no_self, ids, nprobe, margin)[1]
    return knn_flat(flat_index(cent), x, no_self, ids, nprobe, margin)[1]


def ivf_probes(index, x: np.ndarray, nprobe: int, margin: int = 8, nearest: bool = False):
    """The same *set* of ``nprobe`` lists per row as :func:`ivf_assign`, nearest first by float32 similarity.

    A search's result depends only on which lists it probes (the candidates are their union, re-scored
    exactly), so only the set has to be exact, and only the lists near the ``nprobe``-th can be in doubt.
    With ``t`` the ``nprobe``-th float32 similarity and ``tol`` faiss's error bound: a list above
    ``t + 2 tol`` is in the set (fewer than ``nprobe`` lists can beat it), one below ``t - 2 tol`` is out
    (``nprobe`` lists surely beat it), and only those between are re-scored exactly and ranked (similarity,
    then list id) for the places left. Rows whose last fetched list is not below ``t - 2 tol`` (an
    unfetched list could be in doubt) are searched again with twice as many. At 1M faces, 8,000 lists,
    136 probes, :func:`ivf_assign` re-scored ~176 centroids per query, most of a search task's assignment.
    The order within the set (which only sets the order the lists are searched in) may differ.

    ``nearest=True``: returns (probes, lists) where ``lists`` [n] is each row's nearest list exactly as
    ``ivf_assign(index, x, 1)[:, 0]`` gives it (the list a database row joins), from the same float32 search:
    the lists within ``2 tol`` of the first similarity, re-scored exactly and ranked (similarity, then id), hold
    it (the kNN stage takes a face's list and its probes in one pass over the centroids instead of two).
    """
    cent = ivf_centroids(index)
    nlist = len(cent)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    nprobe = int(min(nprobe, nlist))
    out = np.full((n, nprobe), PAD_ID, dtype=np.int64)
    first = np.full(n, PAD_ID, dtype=np.int64)
    if n == 0 or nprobe == 0:
        return (out, first) if nearest else out
    quant = flat_index(cent)
    tol = _float32_tolerance(x, float(_row_norms(cent).max()))
    todo, kk = np.arange(n), nprobe + int(margin)
    while len(todo):
        kk = int(min(kk, nlist))
        D, L = quant.search(x[todo], kk)
        D = np.asarray(D, dtype=np.float64)
        L = np.asarray(L, dtype=np.int64)
        t = D[:, nprobe - 1:nprobe]
        ok = np.ones(len(todo), bool) if kk >= nlist else D[:, -1] < t[:, 0] - 2 * tol
        rows, D, L, t = todo[ok], D[ok], L[ok], t[ok]
        todo, kk = todo[~ok], 2 * kk
        if not len(rows):
            continue
        n_in = (D > t + 2 * tol).sum(1)  # a prefix: D is sorted descending
        band = (D >= t - 2 * tol) & ~(D > t + 2 * tol)
        width = int(band.sum(1).max())
        pick = np.argsort(~band, axis=1, kind="stable")[:, :width]  # the band's columns first, in order
        in_band = np.take_along_axis(band, pick, axis=1)
        local = np.where(in_band, np.take_along_axis(L, pick, axis=1), PAD_ID)
        ex, ids = sort_topk(rescore(x[rows], cent, local), local, width)
        need = nprobe - n_in
        cols = np.arange(max(L.shape[1], width))
        both = np.concatenate([np.where(cols[None, :L.shape[1]] < n_in[:, None], L, PAD_ID),
                               np.where(cols[None, :width] < need[:, None], ids, PAD_ID)], axis=1)
        out[rows] = both[both >= 0].reshape(len(rows), nprobe)
        if nearest:
            # the exact best list has float32 similarity >= D[:, 0] - 2 tol (and every list tied with it), a prefix
            # of D inside what was fetched (its last column is below t - 2 tol <= D[:, 0] - 2 tol)
            top = D >= D[:, :1] - 2 * tol
            w1 = int(top.sum(1).max())
            cand = np.where(top[:, :w1], L[:, :w1], PAD_ID)
            first[rows] = sort_topk(rescore(x[rows], cent, cand), cand, 1)[1][:, 0]
    return (out, first) if nearest else out


def probes_needed(probes: np.ndarray, lists: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each exact neighbour of each query, the nprobe from which an IVF search finds it.

    ``probes`` [m, P]: each query's lists ranked exactly, nearest first (:func:`ivf_assign`; -1 pads are
    skipped); ``lists`` [m, k]: the list holding each of the query's exact top-k neighbours (-1: no neighbour).
    Returns [m, k] int64: 1 + the rank of that list among the query's probes, ``P + 1`` where it is not among
    them (or there is no neighbour).

    Why this is the search's recall and not an estimate of it: a search with ``nprobe`` p takes the exact
    top-k (similarity, then id) of the rows in the query's first p lists, so a neighbour of the exact top-k
    over all rows is in that result exactly when its list is among those p (any subset holding it keeps it
    in its top-k; a row outside them is no candidate). The recall of every nprobe is then a count, with no
    search (the stage's tune searched 13 nprobes of 2,000 queries: 45 s of one worker at 1M faces).
    """
    probes = np.asarray(probes, dtype=np.int64)
    lists = np.asarray(lists, dtype=np.int64)
    m, p = probes.shape
    out = np.full(lists.shape, p + 1, dtype=np.int64)
    if m == 0 or p == 0 or lists.size == 0:
        return out
    nlist = int(max(probes.max(), lists.max())) + 1
    ranks = np.arange(1, p + 1, dtype=np.int32)
    for a in range(0, m, chunk):
        b = min(a + chunk, m)
        rank = np.full((b - a, nlist + 1), p + 1, dtype=np.int32)  # column nlist: the -1 pads of both inputs
        pr = np.where(probes[a:b] >= 0, probes[a:b], nlist)
        rank[np.arange(b - a)[:, None], pr] = ranks
        rank[:, nlist] = p + 1
        ls = np.where(lists[a:b] >= 0, lists[a:b], nlist)
        out[a:b] = rank[np.arange(b - a)[:, None], ls]
    return out


def ivf_shard(trained: np.ndarray, db: np.ndarray, db_local_ids: np.ndarray, assign: np.ndarray | None = None):
    """A shard: the trained (empty) IVF index plus ``db`` rows under ids ``db_local_ids``.

    ``assign`` ([nb] list per row, from :func:`ivf_assign` with nprobe=1) places rows
    deterministically; computed here when not given.
    """
    index = load_ivf(trained)
    db = np.ascontiguousarray(db, dtype=np.float32)
    if assign is None:
        assign = ivf_assign(index, db, 1)[:, 0]
    import faiss

    assign = np.ascontiguousarray(assign, dtype=np.int64).reshape(-1)
    ids = np.ascontiguousarray(db_local_ids, dtype=np.int64)
    if len(db):
        index.add_core(len(db), faiss.swig_ptr(db), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
    return index


def knn_ivf(shard, rows: np.ndarray, row_ids: np.ndarray, q: np.ndarray, q_ids: np.ndarray,
            probes: np.ndarray, k: int, margin: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of queries among the rows of one IVF shard lying in the queries' probed lists.

    ``shard`` holds ``rows`` under local ids 0..nb-1 (see :func:`ivf_shard`); ``probes``
    [nq, nprobe] are the probed lists (:func:`ivf_assign`). The candidate universe of a
    query is the union of its probed lists, so shards searched with the same probes and
    merged with :func:`merge_topk` equal one index holding all rows.

    faiss's own IVF-Flat scan: the stage uses :func:`knn_ivf_lists` (same results, 3.4x
    faster at 1M); this stays as the reference the tests hold it to.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    probes = np.ascontiguousarray(probes, dtype=np.int64)
    shard.nprobe = int(probes.shape[1])
    sizes = np.array([shard.invlists.list_size(int(i)) for i in range(shard.nlist)], dtype=np.int64)
    n_cand = sizes[probes].sum(axis=1) if probes.size else np.zeros(len(q), dtype=np.int64)

    def search(sel, kk):
        return shard.search_preassigned(np.ascontiguousarray(q[sel]), kk, probes[sel], None)

    return certified_topk(search, q, q_ids, rows, row_ids, k, margin, n_candidates=n_cand)


# -- IVF, list-major ---------------------------------------------------------------------------
# faiss's IVF-Flat scans each query's probed lists one query at a time: every (query, row)
# pair reads the row from memory (1 KiB at d=256), so at 1M faces it ran at ~60 ns per pair
# against ~8 ns per pair for exact BLAS search (measured) and probing 10% of the lists gave
# only ~1.1-1.9x. Here the loop is inverted: rows are stored sorted by list, the (query,
# probed list) pairs are grouped by list, and each list is multiplied with all the queries
# that probe it in one GEMM (the list stays in cache). The candidates of a query are still
# exactly its probed lists, so the result does not depend on which queries share a block.

# Probe ranks in the first pass of IvfLists.search (each query's nearest lists); a caller sizing query
# blocks needs it: a list is visited by about n_queries * IVF_FIRST_PROBES / nlist queries in that pass.
IVF_FIRST_PROBES = 4


class IvfLists:
    """Database rows grouped by IVF list: ``rows`` sorted by list, ``ids`` their global ids,
    ``offsets`` [nlist + 1] so list ``j`` is ``rows[offsets[j]:offsets[j + 1]]``."""

    def __init__(self, rows: np.ndarray | Iterable[np.ndarray], row_ids: np.ndarray, lists: np.ndarray, nlist: int):
        """``rows``: the rows [n, d], or consecutive slices of them, placed one at a time (so that a
        caller reading them from a store never holds them twice: at 1M faces the unsorted copy was
        1 GB of a knn worker's 4 GB peak)."""
        lists = np.asarray(lists, dtype=np.int64).reshape(-1)
        if len(lists) and (lists.min() < 0 or lists.max() >= nlist):
            raise ValueError(f"list ids must lie in [0, {nlist})")
        order = np.argsort(lists, kind="stable")
        where = np.empty_like(order)
        where[order] = np.arange(len(order), dtype=np.int64)
        placed, at = None, 0
        for part in ([rows] if isinstance(rows, np.ndarray) else rows):
            part = np.asarray(part, dtype=np.float32)
            if placed is None:
                placed = np.empty((len(lists),) + part.shape[1:], dtype=np.float32)
            if at + len(part) > len(lists):
                raise ValueError(f"{len(lists)} list assignments for more rows")
            placed[where[at:at + len(part)]] = part
            at += len(part)
        if at != len(lists):
            raise ValueError(f"{len(lists)} list assignments for {at} rows")
        self.rows = placed if placed is not None else np.zeros((0, 0), np.float32)  # no slices: no rows
        self.ids = np.asarray(row_ids, dtype=np.int64)[order]
        self.sizes = np.bincount(lists, minlength=nlist).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.nlist = int(nlist)
        # max |row|, for the float32 error bound: once here, not once per query block (it read
        # every row: 5% of a 4,096-query search at 1M faces, measured)
        self.row_norm_max = float(_row_norms(self.rows).max()) if len(self.rows) else 0.0

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.ids.nbytes + self.offsets.nbytes

    def candidates(self, probes: np.ndarray) -> np.ndarray:
        """Size of each query's candidate universe (rows in its probed lists)."""
        probes = np.asarray(probes, dtype=np.int64)
        return np.where(probes >= 0, self.sizes[np.maximum(probes, 0)], 0).sum(axis=1)

    def search(self, q: np.ndarray, probes: np.ndarray, kk: int, first: int = IVF_FIRST_PROBES,
               growth: int = 4, block_floats: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``kk`` raw float32 similarities of ``q`` among the rows of each query's probed lists.

        Returns (D [nq, kk] float32 descending, L [nq, kk] int64 positions into ``rows``; -1/-inf
        pads). Pairs are processed in passes over the probe ranks: each query's ``first`` nearest
        lists, then ranks growing ``growth``-fold (first..4·first, 4·first..16·first, ...), so the
        nearest lists fill a query's top-kk first and the far ones bring few entries. Each (list, the
        queries probing it) GEMM block goes straight into one min-heap of ``kk`` entries per query
        (faiss's ``ResultHeap.add_result_subset``: a value enters when it is above the query's kk-th
        best so far, the heap's top). Every row not returned is <= the last value returned (it was <=
        the heap's top when it was rejected or evicted, and the tops only rise): the bound that
        :func:`certified_topk` reads. A block is a list's rows at most ``block_floats`` //
        queries at a time (default :data:`SEARCH_BLOCK_FLOATS`; only memory depends on it).

        0.7.6 kept a buffer of 4·kk slots per query behind a lower bound of the kk-th best, raised after
        each pass and shrunk by partitions: at 1M faces, 133 probes, 16,384 queries, one thread, the
        comparisons, hit bookkeeping and shrinks were 3.7 of the search's 10.3 s, ~570 hits per query
        for 97 kept (the GEMMs 5.2 s); with the heaps the search took 7.4-7.8 s against 9.4-9.9 s
        (alternated in one process, the same candidate sets; ``/work/exp/s32/heap.py``).
        """
        import faiss

        q = np.ascontiguousarray(q, dtype=np.float32)
        probes = np.asarray(probes, dtype=np.int64)
        nq = len(q)
        kk = int(kk)
        if nq == 0 or kk == 0:
            return np.full((nq, kk), PAD_SIM, dtype=np.float32), np.full((nq, kk), PAD_ID, dtype=np.int64)
        heaps = faiss.ResultHeap(nq, kk, keep_max=True)
        positions = np.arange(len(self.rows), dtype=np.int64)
        block = int(block_floats or SEARCH_BLOCK_FLOATS)
        cuts = [0]
        while cuts[-1] < probes.shape[1]:
            cuts.append(max(int(first), 1, cuts[-1] * int(max(2, growth))))
        for stage in (slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])):
            for lst, qs in probe_groups(probes[:, stage]):
                lo, hi = int(self.offsets[lst]), int(self.offsets[lst + 1])
                if lo == hi:  # an empty list: no query rows to gather
                    continue
                qx = q[qs]
                width = max(1, block // len(qs))
                for a in range(lo, hi, width):
                    b = min(a + width, hi)
                    heaps.add_result_subset(qs, qx @ self.rows[a:b].T, positions[a:b])
        heaps.finalize()
        D, L = heaps.D, heaps.I
        D[L < 0] = PAD_SIM  # unfilled slots: faiss's neutral value (-FLT_MAX) and id -1, last
        return D, L


#: floats of one GEMM block of :meth:`IvfLists.search` (32 MiB): a list's rows against the queries probing it,
#: split by columns only where a list is probed by many queries
SEARCH_BLOCK_FLOATS = 1 << 23


def search_bytes_per_query(kk: int) -> int:
    """Bytes per query of :meth:`IvfLists.search`'s heaps for ``kk`` candidates (a caller sizing its memory)."""
    return 12 * int(kk)


def probe_groups(probes: np.ndarray):
    """Yield (list id, positions of the queries probing it) for every probed list, in list order (-1 pads
    skipped; a list's queries in ascending order)."""
    probes = np.asarray(probes, dtype=np.int64)
    qi = np.repeat(np.arange(len(probes), dtype=np.int64), probes.shape[1] if probes.ndim == 2 else 0)
    li = probes.reshape(-1)
    order = np.argsort(li, kind="stable")
    qi, li = qi[order], li[order]
    valid = li >= 0
    qi, li = qi[valid], li[valid]
    cuts = np.flatnonzero(np.diff(li)) + 1
    for s0, s1 in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(li)]]).tolist()):
        yield int(li[s0]), qi[s0:s1]


def knn_ivf_lists(lists: IvfLists, q: np.ndarray, q_ids: np.ndarray, probes: np.ndarray, k: int,
                  margin: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of queries among the rows of their probed lists in one :class:`IvfLists` group.

    Exact re-scoring and certification as everywhere (module doc), so groups searched with
    the same probes and merged with :func:`merge_topk` equal one group holding every row,
    and equal :func:`knn_ivf` on the same lists.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    probes = np.ascontiguousarray(probes, dtype=np.int64)

    def search(sel, kk):
        return lists.search(q[sel], probes[sel], kk)

    tol = _float32_tolerance(q, lists.row_norm_max)
    return certified_topk(search, q, q_ids, lists.rows, lists.ids, k, margin, n_candidates=lists.candidates(probes),
                          tol=tol)
