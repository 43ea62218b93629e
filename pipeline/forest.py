"""The maximum spanning forest of stored kNN lists, distributed (used by the graph and communities stages).

One task per row chunk reduces that chunk's undirected edges to its spanning
forest (memory bounded by the chunk); a tree of forest merges with an explicit
fan-in (MSF(A u B) = MSF(MSF(A) u MSF(B))) gives one forest of <= N-1 edges. The
edge weight is any array shaped like ``knn/index``: ``knn/sim`` (the cosine
graph) or ``edges/prob`` (the learned affinity). The forest is unique (ties
broken by edge ids), so it does not depend on chunk size or worker count.
"""

from __future__ import annotations

import uuid

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


def tree_reduce(client, futures: list, fan_in: int, name: str = "graph-merge"):
    """Reduce futures of forests by ``fan_in`` at a time until one is left; returns its future."""
    token = uuid.uuid4().hex[:8]
    level = 0
    while len(futures) > 1:
        futures = [client.submit(merge_task, *futures[i:i + fan_in], key=f"{name}-{level}-{i // fan_in}-{token}")
                   for i in range(0, len(futures), fan_in)]
        level += 1
    return futures[0]


def row_chunks(n: int, r: int) -> list[tuple[int, int]]:
    return [(a, min(a + r, n)) for a in range(0, n, r)]


def spanning_forest(client, url: str, n: int, r: int, min_sim: float | None, fan_in: int, weights: str = "knn/sim",
                    name: str = "graph"):
    """(src, dst, weight) of the MSF of the stored kNN lists weighted by ``weights`` (edges >= ``min_sim``)."""
    chunks = row_chunks(n, r)
    token = uuid.uuid4().hex[:8]
    futs = [client.submit(chunk_forest_task, url, a, b, min_sim, weights, key=f"{name}-chunk-{a}-{b}-{token}")
            for a, b in chunks]
    wait_futures(futs, name, gather=False)
    if not futs:
        from facecluster.tasks.components import empty_forest

        return empty_forest()
    final = tree_reduce(client, futs, fan_in, name=f"{name}-merge")
    wait_futures([final], f"{name}-merge", gather=False)
    return final.result()
