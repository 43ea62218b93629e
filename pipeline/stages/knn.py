"""Stage ``knn``: chunk-wise cosine kNN on Dask workers (faiss exact blocks or IVF shards).

Reads ``features`` (N x d float32, row chunks of R) written by ingest; writes
``knn/index`` (N x k int64) and ``knn/sim`` (N x k float32), chunks (R, k), each row
sorted by similarity descending then neighbour id ascending, self excluded.
IVF mode also writes ``knn/ivf_list`` (N int64: the inverted list of every face) and
``knn/ivf_quantizer`` (the trained quantizer, faiss's serialised bytes as uint8), so ``facecluster add``
searches new faces through the same lists with the run's nprobe.

How the work is cut
-------------------
* The database is cut into *groups* of ``db_rows`` rows (whole chunks). When the
  whole database fits the share ``knn.memory_fraction`` of the smallest worker's
  memory limit, there is one group: each worker loads the database once (worker-level
  cache) and tasks map over query blocks ("broadcast"). Otherwise every task is a
  (query block, database group) pair and a tree of merges with fan-in ``knn.fan_in``
  combines the groups' top-k lists ("blocks"); no task ever holds an N x N block and a
  worker's memory is bounded by ``db_rows``, not N.
* Query blocks are whole chunks (``q_rows``), sized so a task runs ~``task_seconds``
  (a no-op task costs milliseconds) while leaving >= 2 tasks per worker thread; IVF blocks are
  at least large enough that each list meets ``IVF_LIST_QUERIES`` queries in the search's first pass.
* Workers read features from the store by URL (nothing big is scattered from here)
  and write their output chunks straight into the stage's temporary arrays; writes
  cover whole chunks, so a recomputed task rewrites identical bytes.
* IVF: a quantizer trained once (spherical k-means on a strided sample, one task);
  nprobe tuned on a query sample for the recall of above-threshold edges against exact
  search (counted from the lists of the sample's exact neighbours, no IVF search); then
  one pass over the chunks writes every face's list (``knn/ivf_list``, so a shard is built
  by copying rows into lists) and its probed lists (a scratch array the search tasks read)
  from one search of the centroids.

The kernels (``facecluster.tasks.knn``) re-score candidates exactly and certify them, so the
arrays are identical for every chunk size, worker count, strategy and BLAS kernel.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import Callable

import numpy as np

from facecluster.tasks import knn as K
from facecluster.tasks.thresholds import auto_threshold

from ..cluster import heap_reuse, total_threads, worker_infos, worker_threads
from ..config import Config
from ..errors import BadInput
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "knn"
FEATURES = "features"
QUANTIZER = "knn/ivf_quantizer"
# measured single-core speed of IndexFlatIP search (multiply-adds/s) with an AVX-512/AVX2
# OpenBLAS kernel; used only to size tasks, never for results
FLAT_MACS_PER_S = 3.0e10
# IVF query blocks: at least this many queries per list in the search's first pass (K.IVF_FIRST_PROBES
# probes per query). The list-major search makes ~10 numpy calls per (list, pass), whatever the block's
# size; at 1M faces, 8,000 lists, 8 queries per list (16,384-query blocks) those calls were 1.7 s of a
# 7.2 s task, and the search went at 0.44 ms per query against 0.36 ms with 32 per list (65,536-query
# blocks; one thread, /work/exp/s21/ivf_lines.py; alone on 2 workers 45.3 -> 42.5 s per 131,072 queries).
IVF_LIST_QUERIES = 32
REVERSE_CHUNK = 1 << 16  #: entries per chunk of the reverse entries' scratch arrays (a target block's slice decodes little beyond itself)
DEFAULT_WORKER_MEMORY = 4 << 30

# -- worker side ---------------------------------------------------------------------------------
_CACHE: "collections.OrderedDict[tuple, tuple[object, int]]" = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
_BLAS_LOGGED = False
_KERNEL_LOGGED = False


def _cached(key: tuple, budget: int, build, estimate: Callable[[], int] | None = None):
    """A per-worker LRU cache of databases/indexes: built once per worker, not once per task.

    ``estimate`` (called on a miss only: it may read the store): the bytes the new entry will hold;
    older entries are dropped to make room for it before it is built, not after (at 1M faces the
    tune's exact database, 1.5 GB, was still held while the IVF lists were built: 4.1 GB peak on
    that worker).
    """
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key][0]
        if estimate is not None:
            _make_room(estimate(), budget)
        obj, nbytes = build()
        _make_room(nbytes, budget)
        _CACHE[key] = (obj, nbytes)
        return obj


def _make_room(nbytes: int, budget: int) -> None:
    """Drop the least recently used entries until ``nbytes`` more fit the budget (or none is left)."""
    while _CACHE and sum(b for _, b in _CACHE.values()) + nbytes > budget:
        _CACHE.popitem(last=False)


def clear_cache(keep: str | None = None) -> None:
    """Drop this worker's cached databases (frees memory after a stage), all but those of kind ``keep``
    ("ivf", "flat", "bf16") when given."""
    with _CACHE_LOCK:
        for key in [key for key in _CACHE if key[0] != keep]:
            del _CACHE[key]


def worker_blas(precision: str | None = None) -> dict:
    """Run on each worker: the OpenBLAS kernel faiss uses there and, given ``precision`` (the
    ``knn.precision`` setting), the exact mode's candidate kernel chosen there (each logged once per worker)."""
    import os

    import faiss  # noqa: F401  (loads faiss's OpenBLAS so threadpoolctl sees it)

    global _BLAS_LOGGED, _KERNEL_LOGGED
    info = {"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "libs": K.blas_info(),
            "threads": worker_threads()}
    if not _BLAS_LOGGED:
        log.info("knn worker BLAS: %s", info)
        _BLAS_LOGGED = True
    if precision is not None:
        K.set_threads(worker_threads())  # the calibration GEMMs run with the task's threads
        info["kernel"] = K.choose_precision(precision)
        if not _KERNEL_LOGGED:
            log.info("knn worker kernel: %s", info["kernel"])
            _KERNEL_LOGGED = True
    return info


def _rows(url: str, r0: int, r1: int, features: str = FEATURES) -> np.ndarray:
    return np.ascontiguousarray(open_array(url, features)[r0:r1], dtype=np.float32)


def _row_bytes(url: str, features: str = FEATURES) -> int:
    return 4 * int(open_array(url, features).shape[1])


def _flat_group(url: str, g0: int, g1: int, budget: int):
    def build():
        index = K.flat_index(_rows(url, g0, g1))
        return index, (g1 - g0) * index.d * 4

    return _cached(("flat", url, g0, g1), budget, build, lambda: (g1 - g0) * _row_bytes(url))


def _bf16_group(url: str, g0: int, g1: int, budget: int):
    def build():
        db = K.Bf16Flat(_rows(url, g0, g1))
        return db, db.nbytes

    return _cached(("bf16", url, g0, g1), budget, build, lambda: (g1 - g0) * _row_bytes(url) * 3 // 2)


def _precision(kernel: dict | None) -> str:
    """This worker's candidate GEMM for the exact kernel (``kernel`` = {"precision": setting, "margin": m})."""
    if not kernel or kernel.get("precision", "float32") == "float32":
        return "float32"
    return K.choose_precision(kernel["precision"])["precision"]


def ivf_group(url: str, g0: int, g1: int, trained: np.ndarray, list_path: str, budget: int,
              features: str = FEATURES) -> K.IvfLists:
    """Rows [g0, g1) of ``features`` grouped by their lists in ``list_path`` (cached per worker)."""
    nlist = index_of(trained).nlist  # outside build(): _cached holds _CACHE_LOCK while building

    def build():
        lists = np.asarray(open_array(url, list_path)[g0:g1], dtype=np.int64)
        arr = open_array(url, features)
        step = int(arr.chunks[0])
        # chunk by chunk into list order: the rows are never held twice
        parts = (np.asarray(arr[a:min(a + step, g1)], dtype=np.float32) for a in range(g0, g1, step))
        group = K.IvfLists(parts, np.arange(g0, g1, dtype=np.int64), lists, nlist)
        return group, group.nbytes

    key = ("ivf", url, features, g0, g1, list_path, hash(bytes(np.asarray(trained)[-4096:])))
    return _cached(key, budget, build, lambda: (g1 - g0) * (_row_bytes(url, features) + 16))


def _search(url, q0, q1, g0, g1, k, margin, budget, ivf=None, queries=None, kernel=None):
    """Top-k of query rows [q0, q1) (or the given ``queries``) against database rows [g0, g1).

    ``kernel`` ({"precision", "margin"}): the exact mode's candidate GEMM (identical results either way).
    """
    K.set_threads(worker_threads())
    if not _BLAS_LOGGED:
        worker_blas()
    if queries is None:
        q, q_ids = _rows(url, q0, q1), np.arange(q0, q1, dtype=np.int64)
    else:
        q_ids, q = queries
        q = np.ascontiguousarray(q, dtype=np.float32)
    db_ids = np.arange(g0, g1, dtype=np.int64)
    if ivf is None:
        if _precision(kernel) == "bfloat16":
            return K.knn_bf16(_bf16_group(url, g0, g1, budget), q, q_ids, db_ids, k, kernel.get("margin", margin))
        return K.knn_flat(_flat_group(url, g0, g1, budget), q, q_ids, db_ids, k, margin)
    trained, list_path, probes = ivf["trained"], ivf["list_path"], ivf["probes"]
    group = ivf_group(url, g0, g1, trained, list_path, budget)
    if queries is None and ivf.get("probes_path"):
        # written by the pass that assigned the lists (probes_lists_task): no second search of the centroids
        probes = np.asarray(open_array(url, ivf["probes_path"])[q0:q1], dtype=np.int64)
    elif isinstance(probes, int):
        probes = K.ivf_probes(index_of(trained), q, probes)  # the exact set of lists; the search needs no more
    return K.knn_ivf_lists(group, q, q_ids, probes, k, margin)


_TRAINED: dict = {}


def index_of(trained: np.ndarray):
    """The trained IVF index of serialised bytes ``trained`` (deserialised once per worker)."""
    key = hash(bytes(np.asarray(trained)[-4096:])), len(trained)
    with _CACHE_LOCK:
        if key not in _TRAINED:
            _TRAINED.clear()
            _TRAINED[key] = K.load_ivf(trained)
        return _TRAINED[key]


def _write(url, paths, q0, q1, result, rev=None) -> dict:
    """Write a query block's lists; with ``rev`` (:func:`reverse_spaces`' entry for this block), also their
    reverse entries, grouped by target block, into the block's scratch arrays."""
    sim, idx = result
    open_array(url, paths["index"], "r+")[q0:q1] = idx
    open_array(url, paths["sim"], "r+")[q0:q1] = sim
    out = {"q0": q0, "rows": q1 - q0, "padded": int((idx[:, -1] < 0).sum())}
    if rev is not None:
        dst, src, s, counts = K.reverse_entries(q0, sim, idx, rev["bounds"])
        for name, values in (("dst", dst), ("src", src), ("sim", s)):
            arr = open_array(url, rev[name], "r+")
            arr[:len(values)] = values.astype(arr.dtype)
        out["reverse"] = [int(c) for c in counts]
    return out


def reverse_spaces(writer, qblocks: list[tuple[int, int]], k: int, n: int) -> dict:
    """Per query block, scratch arrays for the reverse entries of its lists (at most (rows) x k of them, target
    rows, source rows, similarities), each block its own arrays so that no two tasks write one chunk."""
    id_dtype = np.int32 if n < 2**31 else np.int64
    bounds = [a for a, _ in qblocks] + [n]
    spaces = {}
    for q0, q1 in qblocks:
        m = (q1 - q0) * k
        chunk = (max(1, min(m, REVERSE_CHUNK)),)
        spaces[q0] = {"bounds": bounds,
                      **{name: writer.scratch_space(f"knn-reverse-{name}-{q0}", (m,), chunk, dt)
                         for name, dt in (("dst", id_dtype), ("src", id_dtype), ("sim", np.float32))}}
    return spaces


def reverse_merge_task(url, paths, a, b, k, pieces) -> dict:
    """Rows [a, b): their lists joined with the reverse entries aimed at them (``pieces``: (dst, src, sim paths,
    lo, hi) per source block), written back in place (every source block's entries were written first)."""
    parts = [[open_array(url, p[j])[lo:hi] for j in range(3)] for *p, lo, hi in pieces if hi > lo]
    idx = np.asarray(open_array(url, paths["index"])[a:b], dtype=np.int64)
    sim = np.asarray(open_array(url, paths["sim"])[a:b], dtype=np.float32)
    if parts:
        rdst, rsrc, rsim = (np.concatenate([q[j] for q in parts]) for j in range(3))
        sim, idx, added = K.add_reverse(a, sim, idx, rdst, rsrc, rsim, k)
    else:
        added = 0
    if added:
        open_array(url, paths["index"], "r+")[a:b] = idx
        open_array(url, paths["sim"], "r+")[a:b] = sim
    return {"rows": b - a, "added": added}


def _reverse_pass(client, url, paths, spaces, results, k, token) -> int:
    """After every block's search: each block's lists joined with their reverse entries (one task per block)."""
    by_q0 = {r["q0"]: r for r in results}
    blocks = sorted(by_q0)
    n = spaces[blocks[0]]["bounds"][-1]
    offsets = {q0: np.concatenate([[0], np.cumsum(by_q0[q0]["reverse"])]) for q0 in blocks}
    futs = []
    for t, a in enumerate(blocks):
        b = blocks[t + 1] if t + 1 < len(blocks) else n
        pieces = [(spaces[s]["dst"], spaces[s]["src"], spaces[s]["sim"], int(offsets[s][t]), int(offsets[s][t + 1]))
                  for s in blocks]
        futs.append(client.submit(reverse_merge_task, url, paths, a, b, k, pieces, key=f"knn-reverse-{token}-{a}",
                                  pure=False))
    return sum(r["added"] for r in wait_futures(futs, "knn-reverse"))


def search_write_task(url, paths, q0, q1, g0, g1, k, margin, budget, ivf=None, kernel=None, rev=None) -> dict:
    """One query block against the whole database (broadcast); writes its output chunks."""
    t0 = time.perf_counter()
    out = _write(url, paths, q0, q1, _search(url, q0, q1, g0, g1, k, margin, budget, ivf, kernel=kernel), rev)
    out["seconds"] = time.perf_counter() - t0
    return out


def search_task(url, q0, q1, g0, g1, k, margin, budget, ivf=None, queries=None, kernel=None):
    """One (query block, database group) pair: its top-k lists, for the merge tree."""
    return _search(url, q0, q1, g0, g1, k, margin, budget, ivf, queries, kernel)


def merge_task(k, *parts):
    """A node of the merge tree (fan-in = len(parts))."""
    return K.merge_topk_many(parts, k)


def merge_write_task(url, paths, q0, q1, k, rev, *parts) -> dict:
    """The root of a query block's merge tree: merge and write the output chunks."""
    return _write(url, paths, q0, q1, K.merge_topk_many(parts, k), rev)


def sample_task(url, r0, r1, ids) -> np.ndarray:
    """Rows ``ids`` (all inside [r0, r1)) of the features."""
    return _rows(url, r0, r1)[np.asarray(ids) - r0]


#: threads of the quantizer's training: a fixed count (the centroids can depend on it: ``train_ivf``), two
#: because the training is the only task of the cluster while it runs (the stage waits for it): at 1M faces
#: (200k rows, 8,000 lists) 53-55 s with one thread, 32-33 s with two
TRAIN_THREADS = 2


def train_task(nlist, seed, niter, *samples) -> np.ndarray:
    """Train the IVF quantizer on the gathered sample (one task, :data:`TRAIN_THREADS` threads)."""
    return K.train_ivf(np.concatenate(samples), nlist, seed=seed, niter=niter, threads=TRAIN_THREADS)


def assign_lists(trained: np.ndarray, rows: np.ndarray, precision: str = "float32") -> np.ndarray:
    """The inverted list each row joins: its nearest centroid (what a face's ``knn/ivf_list`` entry holds)."""
    return K.ivf_assign(index_of(trained), rows, 1, precision=precision)[:, 0]


def lists_task(url, r0, r1, ids, trained, kernel=None) -> np.ndarray:
    """The inverted lists of faces ``ids`` (all inside [r0, r1)): the tune's exact neighbours' lists."""
    K.set_threads(worker_threads())
    return assign_lists(trained, _rows(url, r0, r1)[np.asarray(ids) - r0], _precision(kernel))


def probes_lists_task(url, list_path, probes_path, r0, r1, trained, nprobe) -> int:
    """Faces [r0, r1): write each one's inverted list into ``knn/ivf_list`` and its ``nprobe`` probed lists into
    the scratch array ``probes_path`` (which the search tasks read), both from one search of the centroids
    (:func:`facecluster.tasks.knn.ivf_probes` with ``nearest``: the lists :func:`assign_lists` gives, the probe
    sets the search would make). At 1M faces the assignment and the search's own probes each searched all 8,000
    centroids for every face: 48 s and ~45 s of the stage on 2 workers."""
    K.set_threads(worker_threads())
    probes, lists = K.ivf_probes(index_of(trained), _rows(url, r0, r1), nprobe, nearest=True)
    arr = open_array(url, probes_path, "r+")
    arr[r0:r1] = probes.astype(arr.dtype)
    open_array(url, list_path, "r+")[r0:r1] = lists
    return r1 - r0


def _share(q_ids, qx, a, b):
    """Queries ``a:b`` of the tune's sample, as (ids, rows) for :func:`search_task`."""
    return q_ids[a:b], qx[a:b]


def probes_task(trained, x, nprobe) -> np.ndarray:
    K.set_threads(worker_threads())
    return K.ivf_assign(index_of(trained), x, nprobe)


# -- planning (driver) ------------------------------------------------------------------------------
def plan(n: int, d: int, r: int, k: int, cfg, workers: list[dict], ivf: bool, nprobe: int = 1, nlist: int = 1) -> dict:
    """Database group and query block sizes from the workers' memory and thread counts.

    Returns a dict with ``db_rows``, ``q_rows``, ``strategy`` ("broadcast" or "blocks"),
    ``budget`` (bytes of database a worker may cache) and ``threads`` (cluster total).
    """
    mems = [int(w.get("memory_limit") or 0) for w in workers] or [0]
    mem = min(m for m in mems) or DEFAULT_WORKER_MEMORY
    threads = total_threads(workers)
    budget = int(cfg.memory_fraction * mem)
    per_row = d * 4 * (2 if ivf else 1) + (16 if ivf else 0)
    if not ivf and getattr(cfg, "precision", "float32") != "float32":
        per_row += d * 2  # the bfloat16 copy beside the float32 rows (re-scoring)
    if cfg.db_rows:
        db_rows = max(r, -(-cfg.db_rows // r) * r)
    elif n * per_row <= budget:
        db_rows = n
    else:
        db_rows = max(r, budget // per_row // r * r)
        if budget // per_row < r:
            log.warning("knn: one chunk (%d rows) exceeds the database memory budget (%d bytes); using one chunk per group",
                        r, budget)
    db_rows = min(db_rows, n)
    strategy = "broadcast" if db_rows >= n else "blocks"
    # multiply-adds per query in one task
    macs = (min(db_rows, n) * nprobe / max(nlist, 1) + nlist) * d if ivf else db_rows * d
    if cfg.q_rows:
        q_rows = cfg.q_rows
    else:
        q_rows = int(cfg.task_seconds * FLAT_MACS_PER_S / max(macs, 1))
        if ivf:  # amortise the search's per-list work (IVF_LIST_QUERIES); balance and memory still cap it below
            q_rows = max(q_rows, -(-IVF_LIST_QUERIES * nlist // K.IVF_FIRST_PROBES))
            # a task's queries, probes, candidate heaps and re-scoring, in the worker memory the database
            # share leaves to its threads (the search's GEMM block, K.SEARCH_BLOCK_FLOATS, is per task)
            per_query = d * 4 + nprobe * 8 + K.search_bytes_per_query(k + cfg.margin + 1) + 3 * (k + cfg.margin) * 12
            per_thread = (mem - budget) // max((int(w.get("nthreads", 1)) for w in workers), default=1)
            q_rows = min(q_rows, max(r, per_thread // 2 // per_query))
        # enough tasks to keep every thread busy and balance at the end
        if strategy == "broadcast":
            q_rows = min(q_rows, -(-n // (4 * threads)))
        else:
            # a task's queries, candidates and output stay within the size of a database group:
            # worker memory is bounded by db_rows, not by N
            q_rows = min(q_rows, db_rows)
    q_rows = min(n, max(r, -(-q_rows // r) * r))
    return {"db_rows": int(db_rows), "q_rows": int(q_rows), "strategy": strategy, "budget": budget,
            "threads": threads, "worker_memory": mem}


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _tree(client, parts: list, k: int, fan_in: int, key: str, root):
    """Merge ``parts`` with a tree of fan-in ``fan_in``; ``root(parts)`` submits the final node."""
    level = 0
    while len(parts) > fan_in:
        parts = [client.submit(merge_task, k, *parts[i:i + fan_in], key=f"{key}-L{level}-{i // fan_in}")
                 for i in range(0, len(parts), fan_in)]
        level += 1
    return root(parts)


def check_input(store: RunStore, k: int) -> tuple[int, int, int]:
    """(N, d, rows per chunk) of an ingested run that ``k`` neighbours can be found in; BadInput otherwise
    (callers run it before starting a cluster)."""
    store.require("ingest", f"run `facecluster ingest FEATS -o {store.url}` first")
    feats = store.array(FEATURES)
    if feats.ndim != 2:
        raise BadInput(f"{store.url}: 'features' must be 2-D, has shape {feats.shape}; re-run `facecluster ingest`")
    n, d = (int(x) for x in feats.shape)
    if n < 2:
        raise BadInput(f"{store.url}: holds {n} face; clustering needs at least 2 (a single face is its own cluster)")
    if k >= n:
        raise BadInput(f"{store.url}: k={k} neighbours asked but the store holds only {n} faces; "
                       f"use -k smaller than N (at most {n - 1})")
    return n, d, int(feats.chunks[0])


def _warn_dense_k(url: str, k: int, n: int) -> None:
    if 2 * k > n:
        # every face then lists most others as neighbours: the similarity distribution the automatic
        # threshold splits is dominated by unrelated pairs (k = N - 1 put all 3,058 faces in one cluster)
        log.warning("%s: k=%d neighbours for %d faces lists most of the run as every face's neighbours; "
                    "clusters from the automatic threshold may merge unrelated faces - use -k below N/2 or --th",
                    url, k, n)


def run_knn(store: RunStore, cfg: Config, client, force: bool = False) -> dict:
    """Run the kNN stage (or skip it when up to date); returns its summary.

    Parameters
    ----------
    store : RunStore with a completed ``ingest`` stage.
    cfg : Config (section ``knn``; ``dask`` for the BLAS setting recorded).
    client : distributed.Client.
    force : recompute even when an identical result exists.

    Returns
    -------
    dict: n, k, mode, strategy, db_rows, q_rows, tasks, seconds, queries_per_s
    (IVF: nlist, nprobe, edge_th, edge_recall), worker BLAS kernels, skipped.
    """
    kc = cfg.knn
    k = kc.k
    n, d, r = check_input(store, k)
    _warn_dense_k(store.url, k, n)
    mode = kc.mode if kc.mode != "auto" else ("ivf" if n >= kc.ivf_min_n else "exact")
    params = {"k": k, "mode": mode, "margin": kc.margin}
    if mode == "ivf":
        params.update(nlist=kc.nlist or K.default_nlist(n, kc.nlist_factor), nprobe=kc.nprobe,
                      train_size=kc.train_size, train_iter=kc.train_iter, tune_queries=kc.tune_queries,
                      recall_target=kc.recall_target, edge_th=kc.edge_th)
        if kc.reverse:  # recorded only when on: a store written before the option stays up to date without it
            params["reverse"] = True
    with store.stage(STAGE, params, inputs=["ingest"], force=force) as w:
        if w is None:
            summary = dict(store.record(STAGE)["summary"])
            summary["skipped"] = True
            return summary
        t0 = time.perf_counter()
        blas = client.run(worker_blas, kc.precision if mode == "exact" else None, on_error="ignore")  # a lost worker: no line
        kernels = sorted({str(v["libs"].get("faiss", {}).get("architecture")) for v in blas.values()})
        log.info("knn: faiss OpenBLAS kernel on the workers: %s", ", ".join(kernels))
        precisions = sorted({v["kernel"]["precision"] for v in blas.values() if "kernel" in v})
        if precisions:
            reasons = sorted({v["kernel"]["reason"] for v in blas.values() if "kernel" in v})
            log.info("knn: exact kernel on the workers: %s candidates (%s)", ", ".join(precisions), "; ".join(reasons))
        if any(kn in ("Prescott", "Core2", "Katmai", "Atom") for kn in kernels):
            log.warning("knn: workers run faiss with the generic OpenBLAS kernel %s (exact search several times slower);"
                        " set dask.openblas_coretype or export OPENBLAS_CORETYPE before starting the workers", kernels)
        idx_arr = w.create_array("knn/index", (n, k), (r, k), np.int64, fill_value=-1)
        w.create_array("knn/sim", (n, k), (r, k), np.float32, fill_value=float("-inf"))
        paths = {"index": w.tmp_path("knn/index"), "sim": w.tmp_path("knn/sim")}
        r = idx_arr.chunks[0]
        workers = worker_infos(client)
        token = uuid.uuid4().hex[:8]
        summary = {"n": n, "dim": d, "k": k, "mode": mode, "chunk_rows": r, "workers": len(workers),
                   "openblas": kernels}
        if precisions:
            summary["precision"] = precisions
            summary["kernel"] = sorted({f"{v['kernel']['precision']} ({v['kernel']['reason']})"
                                        for v in blas.values() if "kernel" in v})
        ivf = None
        if mode == "ivf":
            ivf, info = _prepare_ivf(store, w, client, kc, n, d, r, token, params["nlist"])
            # the tune's exact database (1.5 GB at 1M faces) fits the budget beside the lists, but the search
            # does not need it and its tasks' buffers do: held, a knn worker peaked at 3.9 GB (65,536-query blocks)
            client.run(clear_cache, "ivf", on_error="ignore")
            summary.update(info)
            pl = plan(n, d, r, k, kc, workers, True, ivf["probes"], params["nlist"])
        else:
            pl = plan(n, d, r, k, kc, workers, False)
        summary.update({x: pl[x] for x in ("strategy", "db_rows", "q_rows")})
        t_search = time.perf_counter()
        spaces = reverse_spaces(w, _ranges(n, pl["q_rows"]), k, n) if ivf is not None and kc.reverse else None
        with heap_reuse(client):  # its GEMM blocks, heaps and re-scoring gathers reuse freed heap, not fresh pages (as in score)
            n_tasks, written = _search_all(client, store.url, paths, n, k, kc, pl, ivf, token, spaces)
        client.run(clear_cache, on_error="ignore")  # a worker lost at the end of the search has no cache left
        if spaces:
            t_rev = time.perf_counter()
            summary["reverse_added"] = _reverse_pass(client, store.url, paths, spaces, written, k, token)
            summary["reverse_seconds"] = round(time.perf_counter() - t_rev, 3)
            for path in (p for sp in spaces.values() for name, p in sp.items() if name != "bounds"):
                w.drop_scratch(path)
            n_tasks += len(spaces)
        if ivf is not None and ivf.get("sample") is not None:
            summary["edge_recall_measured"] = _measured_recall(store.url, paths, ivf["sample"])
        elapsed = time.perf_counter() - t_search
        summary.update(tasks=n_tasks, search_seconds=round(elapsed, 3), seconds=round(time.perf_counter() - t0, 3),
                       queries_per_s=round(n / max(elapsed, 1e-9), 1))
        w.summary.update(summary)
    summary["skipped"] = False
    return summary


def _search_all(client, url, paths, n, k, kc, pl, ivf, token, spaces=None) -> tuple[int, list]:
    """Every query block's lists written; returns (tasks, the blocks' write summaries). ``spaces``
    (:func:`reverse_spaces`): each block also writes its reverse entries there."""
    groups = _ranges(n, pl["db_rows"])
    qblocks = _ranges(n, pl["q_rows"])
    budget = pl["budget"]
    ivf_arg = None if ivf is None else {key: ivf[key] for key in ("trained", "list_path", "probes", "probes_path") if key in ivf}
    kernel = _kernel_arg(kc)
    spaces = spaces or {}
    futures = []
    if len(groups) == 1:
        g0, g1 = groups[0]
        for q0, q1 in qblocks:
            futures.append(client.submit(search_write_task, url, paths, q0, q1, g0, g1, k, kc.margin, budget, ivf_arg,
                                         kernel, spaces.get(q0), key=f"knn-search-{token}-{q0}", pure=False))
        return len(futures), wait_futures(futures, "knn")
    # blocks: waves of query blocks so the intermediate top-k lists stay within memory
    per_q = len(groups) * k * 12
    wave_rows = max(pl["q_rows"], int(0.25 * pl["worker_memory"] * max(1, len(worker_infos(client))) // per_q))
    n_tasks = 0
    written = []
    for w0 in range(0, n, wave_rows):
        wave = [(a, b) for a, b in qblocks if w0 <= a < w0 + wave_rows]
        parts = {qb: [] for qb in wave}
        # group-major order: every worker works through one database group at a time (cache hits)
        for g0, g1 in groups:
            for q0, q1 in wave:
                parts[(q0, q1)].append(client.submit(search_task, url, q0, q1, g0, g1, k, kc.margin, budget, ivf_arg,
                                                     None, kernel, key=f"knn-block-{token}-{q0}-{g0}", pure=False))
        roots = []
        for (q0, q1), ps in parts.items():
            roots.append(_tree(client, ps, k, kc.fan_in, f"knn-merge-{token}-{q0}",
                               lambda ps, q0=q0, q1=q1: client.submit(merge_write_task, url, paths, q0, q1, k,
                                                                       spaces.get(q0), *ps,
                                                                       key=f"knn-write-{token}-{q0}", pure=False)))
        n_tasks += sum(len(p) for p in parts.values()) + len(roots)
        written += wait_futures(roots, "knn")
    return n_tasks, written


def _kernel_arg(kc) -> dict:
    """The exact kernel's settings passed to every search task."""
    return {"precision": getattr(kc, "precision", "float32"), "margin": getattr(kc, "bf16_margin", kc.margin)}


# -- IVF preparation --------------------------------------------------------------------------------
def _ids_by_span(n: int, d: int, r: int, ids: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """``ids`` (sorted) split by ~64 MiB spans of whole feature chunks: (a, b, the ids in [a, b)) for each span
    holding any, in id order (one task reads a span's chunks once for all its ids)."""
    bounds = [a for a, _ in _ranges(n, r * max(1, (64 << 20) // (r * d * 4)))] + [n]
    cuts = np.searchsorted(ids, bounds)
    return [(a, b, ids[i:j]) for a, b, i, j in zip(bounds[:-1], bounds[1:], cuts[:-1], cuts[1:]) if j > i]


def _gather_rows(client, url: str, n: int, d: int, r: int, ids: np.ndarray, key: str) -> list:
    """Futures of the feature rows ``ids`` (sorted), read in ~64 MiB whole-chunk spans, in id order."""
    return [client.submit(sample_task, url, a, b, sel, key=f"{key}-{a}") for a, b, sel in _ids_by_span(n, d, r, ids)]


def _prepare_ivf(store, w, client, kc, n, d, r, token, nlist) -> tuple[dict, dict]:
    """Train the quantizer, tune nprobe, then one pass that assigns every face to its list and stores its
    probes; returns (ivf spec, summary).

    The tune needs no lists but those of its sample's exact neighbours (:func:`tune_nprobe`), so nprobe is known
    before the pass, which then takes each face's list and probe set from one search of the centroids."""
    t0 = time.perf_counter()
    url = store.url
    nlist = int(min(nlist, n))
    ns = int(min(n, max(kc.train_size if kc.train_size else 0, 1), max(nlist * 39, 1000)))
    sample_ids = np.unique(np.linspace(0, n - 1, ns).astype(np.int64))
    parts = _gather_rows(client, url, n, d, r, sample_ids, f"knn-ivf-sample-{token}")
    trained = client.submit(train_task, nlist, 1234, kc.train_iter, *parts, key=f"knn-ivf-train-{token}")
    wait_futures([trained], "knn-train", gather=False)
    t_train = time.perf_counter() - t0
    w.write_array(QUANTIZER, np.asarray(trained.result(), dtype=np.uint8))
    info = {"nlist": nlist, "train_rows": int(len(sample_ids)), "train_seconds": round(t_train, 2)}
    t1 = time.perf_counter()
    tune, sample = tune_nprobe(client, url, n, d, r, kc, trained, nlist, token)
    info.update(tune)
    info["tune_seconds"] = round(time.perf_counter() - t1, 2)
    nprobe = int(min(kc.nprobe or tune["nprobe"], nlist))
    if kc.nprobe is not None:
        info["nprobe"] = nprobe
    t2 = time.perf_counter()
    w.create_array("knn/ivf_list", (n,), (r,), np.int64)
    list_path = w.tmp_path("knn/ivf_list")
    probes_path = w.scratch_space("knn-probes", (n, nprobe), (r, nprobe), np.int16 if nlist <= 2**15 else np.int32)
    span = r * max(1, int(1e11 / max(nlist * d, 1)) // r)  # ~a few seconds of quantizer search per task
    futs = [client.submit(probes_lists_task, url, list_path, probes_path, a, b, trained, nprobe,
                          key=f"knn-ivf-assign-{token}-{a}")
            for a, b in _ranges(n, span)]
    wait_futures(futs, "knn-assign", gather=False)
    info["assign_seconds"] = round(time.perf_counter() - t2, 2)
    spec = {"trained": trained, "list_path": list_path, "probes": nprobe, "probes_path": probes_path, "sample": sample}
    return spec, info


def tune_nprobe(client, url, n, d, r, kc, trained, nlist, token) -> tuple[dict, dict]:
    """The smallest nprobe whose recall of above-threshold edges reaches the target (at most
    ``min(nlist, 1024)``: every list's rank is known up to there).

    An "edge" is a (query, neighbour) pair of the exact top-k list of a strided query sample with
    sim >= ``edge_th`` (default: Otsu's threshold of the sample's exact similarities, the lowest
    threshold the proposals derive the same way). The exact lists come from the same database groups
    as the main pass, the sample split over the workers. The recall of every nprobe is then counted,
    not searched (:func:`facecluster.tasks.knn.probes_needed`: a neighbour is found exactly when its
    list is among the query's first nprobe lists), so the choice is the smallest nprobe that reaches the
    target, where 0.7.5's doubling-then-bisection over 13 IVF searches of the sample landed within 1/16
    above it (at 1M built-in faces 136, 45 s of one worker). The curve in the summary: the powers of two,
    the chosen nprobe and the one below it.

    With ``reverse`` (the lists joined with the faces that list them, :func:`_reverse_pass`) an edge is also
    found when the neighbour's search finds the query: that share is estimated on a sample of the edges
    (:func:`_reverse_gain`) and added; the lists written are then checked on the sample
    (``edge_recall_measured`` in the stage summary). Returns (summary entries, the sample: its ids and exact
    above-threshold neighbours).
    """
    k = kc.k
    workers = worker_infos(client)
    pl = plan(n, d, r, k, kc, workers, True)
    m = int(min(n, kc.tune_queries))
    q_ids = np.unique(np.linspace(0, n - 1, m).astype(np.int64))
    cap = int(min(nlist, 1024))

    # the exact lists of the sample: one share of the queries per worker thread, each against every group
    t0 = time.perf_counter()
    ex_s, ex_i, qx = _exact_lists(client, url, n, d, r, kc, q_ids, pl, f"{token}-q")
    probes_all = client.submit(probes_task, trained, qx, cap, key=f"knn-tune-probes-{token}")
    t_exact = time.perf_counter() - t0
    edge_th = kc.edge_th if kc.edge_th is not None else float(auto_threshold(ex_s))
    probes_np = probes_all.result()
    # the lists of the sample's exact neighbours (the faces' lists are assigned after the tune)
    nb = ex_i >= 0
    ids = np.unique(ex_i[nb])
    found = [client.submit(lists_task, url, a, b, sel, trained, _kernel_arg(kc), key=f"knn-tune-lists-{token}-{a}")
             for a, b, sel in _ids_by_span(n, d, r, ids)]
    ids_lists = np.concatenate(wait_futures(found, "knn-tune")) if found else np.zeros(0, np.int64)
    nb_lists = np.full(ex_i.shape, -1, dtype=np.int64)
    nb_lists[nb] = ids_lists[np.searchsorted(ids, ex_i[nb])]
    needed = K.probes_needed(probes_np, nb_lists)
    edges = nb & (ex_s >= edge_th)
    n_edges = int(edges.sum())
    # found(p) for every p = 1..cap: counts of the nprobe each edge (each neighbour) needs, accumulated
    edge_found = np.cumsum(np.bincount(needed[edges], minlength=cap + 2))[1:cap + 1]
    all_found = np.cumsum(np.bincount(needed[nb], minlength=cap + 2))[1:cap + 1]
    edge_forward = edge_found / n_edges if n_edges else np.ones(cap)
    recall_k = all_found / max(1, int(nb.sum()))
    info = {}
    edge_recall = edge_forward
    if kc.reverse and n_edges:
        gain, info = _reverse_gain(client, url, n, d, r, kc, trained, q_ids, ex_s, ex_i, edges, needed, probes_np, pl,
                                   token)
        edge_recall = edge_forward + gain
    reached = np.flatnonzero(edge_recall >= kc.recall_target)
    chosen = int(reached[0]) + 1 if len(reached) else cap
    shown = sorted({*(1 << i for i in range(cap.bit_length()) if 1 << i <= cap), chosen, max(1, chosen - 1)})
    curve = [{"nprobe": p, "edge_recall": round(float(edge_recall[p - 1]), 4),
              "recall_at_k": round(float(recall_k[p - 1]), 4)} for p in shown]
    if kc.reverse:
        for c in curve:
            c["edge_recall_forward"] = round(float(edge_forward[c["nprobe"] - 1]), 4)
    for p in shown:
        log.info("knn tune: nprobe=%d edge recall %.4f (forward only %.4f) recall@%d %.4f (forward only)", p,
                 edge_recall[p - 1], edge_forward[p - 1], k, recall_k[p - 1])
    sample = {"q_ids": q_ids, "neighbours": np.where(edges, ex_i, -1)}
    return {"nprobe": chosen, "edge_th": round(edge_th, 4), "edge_recall": round(float(edge_recall[chosen - 1]), 4),
            "recall_at_k": round(float(recall_k[chosen - 1]), 4), "tune_edges": n_edges, "tune_queries": int(len(q_ids)),
            "tune_exact_seconds": round(t_exact, 3), "tune_curve": curve, **info}, sample


def _exact_lists(client, url, n, d, r, kc, q_ids, pl, token):
    """Exact top-k lists of the rows ``q_ids`` (sorted, distinct) against the whole database, one share of the
    queries per worker thread (the same database groups as the main pass): (sim, idx, the rows' future)."""
    k = kc.k
    groups = _ranges(n, pl["db_rows"])
    parts = _gather_rows(client, url, n, d, r, q_ids, f"knn-tune-sample-{token}")
    qx = client.submit(np.concatenate, parts, key=f"knn-tune-queries-{token}")
    shares = np.array_split(np.arange(len(q_ids)), max(1, min(len(q_ids), pl["threads"])))
    roots = []
    for j, share in enumerate(s for s in shares if len(s)):
        queries = client.submit(_share, q_ids, qx, share[0], share[-1] + 1, key=f"knn-tune-q-{token}-{j}")
        ps = [client.submit(search_task, url, 0, 0, g0, g1, k, kc.margin, pl["budget"], None, queries, _kernel_arg(kc),
                            key=f"knn-tune-exact-{token}-{j}-{g0}") for g0, g1 in groups]
        roots.append(_tree(client, ps, k, kc.fan_in, f"knn-tune-merge-{token}-{j}",
                           lambda ps, j=j: client.submit(merge_task, k, *ps, key=f"knn-tune-root-{token}-{j}")))
    exact = wait_futures(roots, "knn-tune")
    return np.concatenate([e[0] for e in exact]), np.concatenate([e[1] for e in exact]), qx


def _reverse_gain(client, url, n, d, r, kc, trained, q_ids, ex_s, ex_i, edges, needed, probes_np, pl, token):
    """For every nprobe p = 1..cap, the share of the sample's edges (i, j) that only the reverse entries find:
    j's search probes i's list (i's nearest, ``probes_np[:, 0]``) and keeps i in its top-k, while i's search
    does not probe j's list. Only the edges i's search misses at p = 1 can count. For all of them j's probe
    ranks are computed (one search of the centroids per j); whether i is in j's top-k is read, on up to
    ``tune_queries`` of them (strided), from j's exact list (the lists an IVF search finds are subsets of all
    rows, so this never counts an edge the search would lose), and applied as a rate to the edges that need it
    at each p. Returns (gain [cap], summary entries)."""
    cap = probes_np.shape[1]
    k = kc.k
    qi, col = np.nonzero(edges & (needed > 1))
    n_edges = int(edges.sum())
    gain = np.zeros(cap)
    if not len(qi):
        return gain, {"tune_reverse_edges": 0}
    t0 = time.perf_counter()
    js, s_ij, i_ids = ex_i[qi, col], ex_s[qi, col], q_ids[qi]
    uj, inv = np.unique(js, return_inverse=True)
    parts = _gather_rows(client, url, n, d, r, uj, f"knn-tune-j-{token}")
    jx = client.submit(np.concatenate, parts, key=f"knn-tune-jrows-{token}")
    j_probes = client.submit(probes_task, trained, jx, cap, key=f"knn-tune-jprobes-{token}").result()
    rev_need = K.probes_needed(j_probes[inv], probes_np[qi, :1])[:, 0]
    fwd_need = needed[qi, col]
    live = rev_need < fwd_need  # found by the reverse entries for p in [rev_need, fwd_need), if i stays in j's list

    def span_counts(mask):  # for every p, how many edges of ``mask`` have p in [rev_need, fwd_need)
        delta = np.bincount(rev_need[mask], minlength=cap + 2) - np.bincount(fwd_need[mask], minlength=cap + 2)
        return np.cumsum(delta)[1:cap + 1]

    pick = np.flatnonzero(live)
    pick = pick[np.unique(np.linspace(0, len(pick) - 1, min(len(pick), kc.tune_queries)).astype(np.int64))] \
        if len(pick) else pick
    kept_rate = np.ones(cap)
    kept_share = 1.0
    if len(pick):
        us, uinv = np.unique(js[pick], return_inverse=True)
        jx_s, jx_i, _ = _exact_lists(client, url, n, d, r, kc, us, pl, f"{token}-j")
        kth_s, kth_i = jx_s[uinv, k - 1], jx_i[uinv, k - 1]
        sp, ip = s_ij[pick], i_ids[pick]
        # i in j's exact top-k under (similarity descending, id ascending); a short list keeps everyone
        kept = (kth_i < 0) | (sp > kth_s) | ((sp == kth_s) & (ip <= kth_i))
        sub = np.zeros(len(qi), dtype=bool)
        sub[pick] = True
        kept_all = np.zeros(len(qi), dtype=bool)
        kept_all[pick] = kept
        n_sub, n_kept = span_counts(sub), span_counts(kept_all)
        kept_share = float(kept.mean())
        kept_rate = np.where(n_sub > 0, n_kept / np.maximum(n_sub, 1), kept_share)
    gain = span_counts(live) * kept_rate / n_edges
    return gain, {"tune_reverse_edges": int(live.sum()), "tune_reverse_checked": int(len(pick)),
                  "tune_reverse_kept": round(kept_share, 4), "tune_reverse_seconds": round(time.perf_counter() - t0, 3)}


def _measured_recall(url, paths, sample) -> float:
    """The share of the tune sample's exact above-threshold neighbours that the written lists hold."""
    q_ids, want = sample["q_ids"], sample["neighbours"]
    got = np.asarray(open_array(url, paths["index"]).oindex[q_ids, :], dtype=np.int64)
    hits = sum(int(np.isin(w[w >= 0], g).sum()) for w, g in zip(want, got))
    total = int((want >= 0).sum())
    return round(hits / total, 4) if total else 1.0
