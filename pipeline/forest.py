"""The maximum spanning forest of stored kNN lists, distributed (used by the graph and communities stages).

One task per range of whole row chunks reduces that range's undirected edges to its
spanning forest; a tree of forest merges (MSF(A u B) = MSF(MSF(A) u MSF(B))) gives one
forest of <= N-1 edges. The edge weight is any array shaped like ``knn/index``:
``knn/sim`` (the cosine graph) or ``edges/prob`` (the learned affinity). The forest is
unique (ties broken by edge ids), so it does not depend on chunk size, task sizes or
worker count.

Sizes: a task's forest spans its rows *and every neighbour they list*, so it has up to
min(N - 1, its kNN entries) edges whatever its row count, and every merge above the
first level holds forests of ~N edges. Fewer, larger tasks therefore mean less merging:
a task reads as many whole chunks as keep its kNN entries within ``forest_edges`` (unset:
:func:`forest_budget` of the smallest worker's memory limit), and a merge takes as many
forests (2 to ``fan_in``) as keep their edges within it. At 3M planted faces (65,536-row
chunks, k = 80) one task per chunk made 46 forests of ~2.4M edges and the tree merged
~155M edges (graph 127-129 s, 3.0 GB per worker); 16 tasks of 3 chunks, ~59M (73-75 s,
2.0 GB). At 10M, 26 tasks of 6 chunks (2^25) merged in 13 merges: 306 s, at most 3,966 MiB per worker.
The whole tree is submitted at once, merges ahead of forest tasks, and each forest is freed
when its merge is done. Its tasks run with raised malloc thresholds (:func:`forest_heap_bytes`):
their arrays of hundreds of MB reuse freed heap instead of faulting in fresh zeroed pages.
"""

from __future__ import annotations

import uuid

from .cluster import HEAP_REUSE_THRESHOLD, heap_reuse, total_threads, worker_infos
from .progress import wait_futures
from .store import open_array


def chunk_forest_task(url: str, r0: int, r1: int, min_sim: float | None, weights: str = "knn/sim"):
    """Worker task: MSF of rows r0..r1 of the kNN lists, weighted by array ``weights``."""
    from facecluster.tasks.components import chunk_forest

    idx = open_array(url, "knn/index")[r0:r1]
    w = open_array(url, weights)[r0:r1]
    return chunk_forest(idx, w, r0, min_sim)


def merge_task(*forests):
    """Worker task: MSF of the union of several forests."""
    from facecluster.tasks.components import merge_forests

    return merge_forests(*forests)


def merge_groups(sizes: list[int], fan_in: int, budget: int) -> list[tuple[int, int]]:
    """One level of the merge tree: consecutive ranges of forests (``sizes``: a bound on each one's edges), each
    taking forests while they hold at most ``budget`` edges together, at least 2 and at most ``fan_in``."""
    groups, i = [], 0
    while i < len(sizes):
        j, held = i + 1, sizes[i]
        while j < len(sizes) and j - i < fan_in and (j - i < 2 or held + sizes[j] <= budget):
            held += sizes[j]
            j += 1
        groups.append((i, j))
        i = j
    return groups


def tree_reduce(client, futures: list, sizes: list[int], fan_in: int, budget: int, n: int, name: str):
    """Reduce futures of forests (``sizes``: a bound on each one's edges) by levels of :func:`merge_groups` until
    one is left; returns its future. A merged forest's bound is the sum of its inputs', at most ``n - 1``.

    A merge outranks the forest tasks still waiting (Dask ``priority``: level + 1), so it runs as soon as its
    inputs exist and they are freed (once the caller drops its own references: :func:`spanning_forest`)."""
    token = uuid.uuid4().hex[:8]
    level = 0
    while len(futures) > 1:
        groups = merge_groups(sizes, fan_in, budget)
        futures = [client.submit(merge_task, *futures[a:b], key=f"{name}-{level}-{g}-{token}", priority=level + 1)
                   if b - a > 1 else futures[a] for g, (a, b) in enumerate(groups)]
        sizes = [min(sum(sizes[a:b]), max(n - 1, 0)) for a, b in groups]
        level += 1
    return futures[0]


def row_chunks(n: int, r: int) -> list[tuple[int, int]]:
    return [(a, min(a + r, n)) for a in range(0, n, r)]


#: a forest task's or merge's peak per edge of the budget, above the worker's own 329 MiB (measured at 10M
#: planted faces: 3,342-3,966 MiB per worker at 2^25, at most 114 B an edge; the heap kept for reuse,
#: :func:`forest_heap_bytes`, comes on top: 4,874 MiB with it)
FOREST_BYTES_PER_EDGE = 114
#: share of the smallest worker's memory limit the default budget lets one forest task or merge take
FOREST_MEMORY_SHARE = 0.4  # as [knn] memory_fraction; the peak then stays under Dask's 60% spill target
FOREST_EDGES_RANGE = (1 << 22, 1 << 26)
FOREST_EDGES_NO_LIMIT = 1 << 24  #: the budget where no worker states a memory limit


def forest_budget(memory_limit: int | None, setting: int | None = None) -> int:
    """``[proposals] forest_edges``: ``setting`` when set, else the largest power of two of edges whose peak
    (:data:`FOREST_BYTES_PER_EDGE`) fits :data:`FOREST_MEMORY_SHARE` of ``memory_limit`` (the smallest worker's),
    within :data:`FOREST_EDGES_RANGE`. Only the stage's speed and memory depend on it, never its forest. At 10M
    planted faces 2^24 (51 tasks, 50 merges) took 715 worker CPU-s and 3.0 GB per worker, 2^25 (26 tasks,
    13 merges) 535-554 CPU-s and 3.9 GB: fewer forests of ~N edges to merge; an 11 GiB worker gets 2^25, 4 GiB 2^23.
    The freed heap the tasks keep for reuse (:func:`forest_heap_bytes`) comes on top of this peak."""
    if setting is not None:
        return int(setting)
    if not memory_limit:
        return FOREST_EDGES_NO_LIMIT
    edges = max(1.0, memory_limit * FOREST_MEMORY_SHARE / FOREST_BYTES_PER_EDGE)
    lo, hi = FOREST_EDGES_RANGE
    return int(min(hi, max(lo, 1 << (int(edges).bit_length() - 1))))


#: share of the smallest worker's memory limit that the forest's freed heap may keep for reuse (at most
#: ``cluster.HEAP_REUSE_THRESHOLD``): with :data:`FOREST_MEMORY_SHARE` a forest task's peak stays within half the
#: limit plus the worker's own ~330 MiB, under Dask's 60% spill target
FOREST_HEAP_SHARE = 0.1


def forest_heap_bytes(memory_limit: int | None) -> int:
    """The malloc thresholds of the forest's tasks (:func:`facecluster.pipeline.cluster.heap_reuse`): their
    arrays of up to this many bytes come from freed heap, not from fresh pages (each a page fault and a zeroed
    page: at 10M planted faces, 2^25 budget, graph 290.7 -> 221.6 s, 521 -> 406 worker CPU-s, the same forest),
    and the heap keeps up to that much freed memory between them (the peak per worker 3,991 -> 4,874 MiB there)."""
    if not memory_limit:
        return HEAP_REUSE_THRESHOLD
    return int(min(HEAP_REUSE_THRESHOLD, FOREST_HEAP_SHARE * memory_limit))


def smallest_memory_limit(workers: list[dict]) -> int | None:
    """The smallest memory limit among ``workers`` (``worker_infos``); None where one states none."""
    limits = [int(w.get("memory_limit") or 0) for w in workers]
    return min(limits) if limits and all(limits) else None


def cluster_budget(client, setting: int | None = None) -> tuple[int, int]:
    """(forest_edges, worker threads in all) for ``client``'s cluster."""
    workers = worker_infos(client)
    return forest_budget(smallest_memory_limit(workers), setting), total_threads(workers)


def forest_tasks(n: int, r: int, k: int, forest_edges: int, slots: int = 1) -> list[tuple[int, int]]:
    """Row ranges of the forest tasks: whole chunks of ``r`` rows, as many per task as keep its ``k`` entries per
    row within ``forest_edges`` (at least one chunk), the chunks spread evenly over the fewest such tasks, that
    count rounded up to a multiple of ``slots`` (the cluster's threads: 3 equal tasks on 2 workers end when 4 would)
    while there are chunks for it."""
    chunks = row_chunks(n, r)
    if not chunks:
        return []
    per = max(1, int(forest_edges) // max(1, r * k))
    tasks = -(-len(chunks) // per)
    slots = max(1, int(slots))
    tasks = min(len(chunks), -(-tasks // slots) * slots)
    cuts = [len(chunks) * t // tasks for t in range(tasks + 1)]
    return [(chunks[a][0], chunks[b - 1][1]) for a, b in zip(cuts[:-1], cuts[1:])]


def spanning_forest(client, url: str, n: int, r: int, min_sim: float | None, fan_in: int, weights: str = "knn/sim",
                    name: str = "graph", forest_edges: int | None = None):
    """(src, dst, weight) of the MSF of the stored kNN lists weighted by ``weights`` (edges >= ``min_sim``).

    ``r``: the lists' chunk rows; ``fan_in``, ``forest_edges`` (None: :func:`forest_budget` of the workers'
    memory): the tree's shape (see the module's notes)."""
    k = int(open_array(url, "knn/index").shape[1])
    workers = worker_infos(client)
    limit = smallest_memory_limit(workers)
    forest_edges, slots = forest_budget(limit, forest_edges), total_threads(workers)
    ranges = forest_tasks(n, r, k, forest_edges, slots)
    token = uuid.uuid4().hex[:8]
    if not ranges:
        from facecluster.tasks.components import empty_forest

        return empty_forest()
    with heap_reuse(client, forest_heap_bytes(limit)):
        futs = [client.submit(chunk_forest_task, url, a, b, min_sim, weights, key=f"{name}-chunk-{a}-{b}-{token}")
                for a, b in ranges]
        bounds = [min(max(n - 1, 0), (b - a) * k) for a, b in ranges]
        # the whole tree at once: merges run while forest tasks are still to come, and a forest held by nobody
        # but its merge is freed when that merge is done. Waiting for every forest first held all of them: at
        # 10M planted faces 51 forests of ~8M edges, 7.5 GB per worker
        final = tree_reduce(client, futs, bounds, fan_in, forest_edges, n, f"{name}-merge")
        wait_futures(futs, name, gather=False, release=True)
        wait_futures([final], f"{name}-merge", gather=False)
        return final.result()
