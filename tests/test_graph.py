"""Stage "graph" on a real LocalCluster: the stored forest is chunk- and worker-invariant and its cuts
equal scipy's connected components of the thresholded kNN graph."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from hypothesis import given, strategies as st

from facecluster.pipeline.config import Config
from facecluster.pipeline.forest import FOREST_EDGES_RANGE, forest_budget, forest_tasks, merge_groups, row_chunks
from facecluster.pipeline.stages.graph import read_forest, run_graph
from facecluster.pipeline.store import RunStore
from facecluster.tasks.components import canonical_labels, threshold_components


def brute_knn(feats: np.ndarray, k: int):
    """Exact cosine kNN, self excluded, rows sorted by (sim desc, id asc); -1 padding when k >= N."""
    n = len(feats)
    s = feats @ feats.T
    np.fill_diagonal(s, -np.inf)
    ids = np.broadcast_to(np.arange(n), (n, n))
    order = np.lexsort((ids, -s), axis=1)[:, :k]
    sim = np.take_along_axis(s, order, 1).astype(np.float32)
    idx = order.astype(np.int64)
    if k > n - 1:
        idx[:, n - 1:] = -1
        sim[:, n - 1:] = 0
    return idx, sim


def clustered_features(n: int, d: int = 16, n_ids: int = 12, spread: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, d))
    labels = rng.integers(0, n_ids, size=n)
    f = centres[labels] + spread * rng.normal(size=(n, d))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f.astype(np.float32), labels.astype(np.int64)


def make_run(path, feats: np.ndarray, k: int, r: int, labels=None, knn=None) -> RunStore:
    """A run store with real "ingest" and "knn" stages in chunks of ``r`` rows.

    ``knn(feats, k) -> (index, sim)`` builds the lists (default: brute-force numpy).
    """
    store = RunStore.create(path)
    n, d = feats.shape
    with store.stage("ingest", {"n": n, "chunk_rows": r}) as w:
        w.write_array("features", feats, chunks=(r, d))
        if labels is not None:
            w.write_array("labels", labels, chunks=(r,))
        w.summary.update(n=n, dim=d, chunk_rows=r)
    idx, sim = (knn or brute_knn)(feats, k)
    with store.stage("knn", {"k": k}, inputs=["ingest"]) as w:
        w.write_array("knn/index", idx, chunks=(r, k))
        w.write_array("knn/sim", sim, chunks=(r, k))
    return store


def scipy_cc_at(idx, sim, tau):
    n, k = idx.shape
    rows = np.repeat(np.arange(n), k)
    nb = idx.ravel()
    keep = (nb >= 0) & (sim.ravel() >= np.float32(tau))
    g = sp.coo_matrix((np.ones(keep.sum()), (rows[keep], nb[keep])), shape=(n, n))
    return canonical_labels(connected_components(g, directed=False)[1])


@pytest.mark.slow
def test_forest_invariant_to_chunks_and_workers(tmp_path, local_client, single_worker_client):
    feats, _ = clustered_features(300, seed=1)
    k = 6
    forests = []
    # forest_edges: one chunk per task and merges of 2 forests (1); 2 chunks per task (768 = 2 x 64 rows x 6) and
    # merges of up to fan_in; the default (every chunk in one task)
    # (37 rows, 2 workers, the largest budget: 2 tasks, one per worker thread, and one merge)
    for i, (r, client, budget, tasks) in enumerate([(300, single_worker_client, 1 << 24, 1), (37, local_client, 1, 9),
                                                     (64, single_worker_client, 768, 3), (37, local_client, 1 << 24, 2)]):
        cfg = Config.from_dict({"proposals": {"fan_in": 3, "min_edge_sim": -1.0,  # every edge: cuts at any tau
                                              "forest_edges": budget}})
        store = make_run(tmp_path / f"r{i}.zarr", feats, k, r)
        summary = run_graph(store, cfg, client)
        assert summary["chunks"] == -(-300 // r) and summary["forest_tasks"] == tasks
        forests.append(read_forest(store))
    for f in forests[1:]:
        for a, b in zip(forests[0], f):
            np.testing.assert_array_equal(a, b)
    src, dst, s = forests[0]
    assert src.dtype == np.int64 and s.dtype == np.float32 and np.all(src < dst) and len(src) <= 299
    idx, sim = brute_knn(feats, k)
    for tau in (0.2, 0.5, 0.7, 0.9):
        np.testing.assert_array_equal(threshold_components(300, src, dst, s, tau), scipy_cc_at(idx, sim, tau))


@pytest.mark.slow
def test_forest_tree_frees_each_forest_once_merged(tmp_path, local_client):
    """The merges are submitted with the forest tasks and the driver lets go of each forest once it is done,
    so a forest its merge has consumed leaves the workers' memory (held until the stage's end, every forest of
    a 10M-face run stayed on the workers at once: 7.5 GB each). The same forest as one task gives."""
    import time

    from facecluster.pipeline.forest import chunk_forest_task, tree_reduce
    from facecluster.pipeline.progress import wait_futures
    from facecluster.tasks.components import chunk_forest

    feats, _ = clustered_features(240, seed=3)
    k, r = 6, 20
    store = make_run(tmp_path / "r.zarr", feats, k, r)
    ranges = row_chunks(240, r)
    futs = [local_client.submit(chunk_forest_task, store.url, a, b, -1.0, key=f"leaf-{a}") for a, b in ranges]
    leaves = {f.key for f in futs}
    final = tree_reduce(local_client, futs, [(b - a) * k for a, b in ranges], 2, 10**9, 240, "m")
    wait_futures(futs, "leaves", gather=False, release=True)
    assert futs == []
    got = final.result()
    held = leaves
    for _ in range(100):  # the scheduler hears of dropped references asynchronously
        held = leaves & {key for keys in local_client.has_what().values() for key in keys}
        if not held:
            break
        time.sleep(0.1)
    assert not held, f"forests still held after their merges: {sorted(held)}"
    idx = store.array("knn/index")[:]
    sim = store.array("knn/sim")[:]
    for a, b in zip(got, chunk_forest(idx, sim, 0, -1.0)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_graph_min_edge_sim_and_padding_and_resume(tmp_path, local_client):
    feats, _ = clustered_features(20, seed=2)
    store = make_run(tmp_path / "r.zarr", feats, 25, 7)  # k > N - 1: padded with -1
    cfg = Config.from_dict({"proposals": {"min_edge_sim": 0.5}})
    run_graph(store, cfg, local_client)
    src, dst, s = read_forest(store)
    assert np.all(s >= np.float32(0.5))
    idx, sim = brute_knn(feats, 25)
    np.testing.assert_array_equal(threshold_components(20, src, dst, s, 0.5), scipy_cc_at(idx, sim, 0.5))
    finished = store.record("graph")["finished"]
    run_graph(store, cfg, local_client)  # unchanged inputs and params: skipped
    assert store.record("graph")["finished"] == finished


@given(n=st.integers(0, 5_000), r=st.integers(1, 700), k=st.integers(1, 40), budget=st.integers(1, 200_000),
       slots=st.integers(1, 5))
def test_forest_tasks_are_whole_chunks_within_the_budget(n, r, k, budget, slots):
    ranges = forest_tasks(n, r, k, budget, slots)
    chunks = row_chunks(n, r)
    per = max(1, budget // (r * k))  # chunks a task may read: its entries within the budget, or one chunk
    fewest = -(-len(chunks) // per)  # the fewest tasks that fit
    # ... rounded up to a multiple of the cluster's threads while there are chunks for it
    assert len(ranges) == min(len(chunks), -(-fewest // slots) * slots)
    if not n:
        return
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:]))
    for a, b in ranges:
        assert a % r == 0 and (b == n or b % r == 0)  # whole chunks
        assert 1 <= -(-(b - a) // r) <= per


def test_forest_budget_follows_the_smallest_workers_memory():
    lo, hi = FOREST_EDGES_RANGE
    budgets = [forest_budget(int(g * 2**30)) for g in (0.5, 2, 4, 8, 11, 16, 24, 64, 1024)]
    assert budgets == sorted(budgets) and all(lo <= b <= hi and b & (b - 1) == 0 for b in budgets)  # powers of two
    assert budgets[0] == lo and budgets[-1] == hi
    # its peak (~114 bytes an edge) stays within 40% of the worker's memory wherever the range allows
    assert all(b * 114 <= 0.4 * g * 2**30 for b, g in zip(budgets, (0.5, 2, 4, 8, 11, 16, 24, 64, 1024)) if b > lo)
    assert forest_budget(int(4 * 2**30)) == 1 << 23 and forest_budget(int(11 * 2**30)) == 1 << 25
    assert forest_budget(None) == 1 << 24 and forest_budget(0) == 1 << 24  # no limit stated
    assert forest_budget(int(4 * 2**30), setting=12345) == 12345  # [proposals] forest_edges wins


@given(sizes=st.lists(st.integers(0, 1_000), max_size=30), fan_in=st.integers(2, 6), budget=st.integers(0, 3_000))
def test_merge_groups_cover_in_order_within_fan_in_and_budget(sizes, fan_in, budget):
    groups = merge_groups(sizes, fan_in, budget)
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(sizes)))
    for a, b in groups:
        assert b - a <= fan_in
        assert b - a <= 2 or sum(sizes[a:b]) <= budget  # two forests always, more only within the budget
        if b < len(sizes) and b - a < fan_in and (b - a < 2 or sum(sizes[a:b + 1]) <= budget):
            raise AssertionError("a group stopped before it had to")


def test_forest_heap_reuse_stays_within_a_share_of_the_workers_memory():
    """The freed heap the forest's tasks keep (their malloc thresholds) is 10% of the smallest worker's memory
    limit, at most the stages' 1 GiB: with the forest budget's 40%, a task's peak stays within half the limit."""
    from facecluster.pipeline.cluster import HEAP_REUSE_THRESHOLD
    from facecluster.pipeline.forest import (FOREST_BYTES_PER_EDGE, FOREST_HEAP_SHARE, FOREST_MEMORY_SHARE,
                                             forest_heap_bytes, smallest_memory_limit)

    assert forest_heap_bytes(None) == forest_heap_bytes(0) == HEAP_REUSE_THRESHOLD
    assert forest_heap_bytes(4 * 2**30) == int(0.4 * 2**30) and forest_heap_bytes(64 * 2**30) == HEAP_REUSE_THRESHOLD
    for gib in (0.5, 2, 4, 8, 11, 16, 64):
        limit = int(gib * 2**30)
        peak = forest_budget(limit) * FOREST_BYTES_PER_EDGE + forest_heap_bytes(limit)
        assert peak <= (FOREST_MEMORY_SHARE + FOREST_HEAP_SHARE) * limit or forest_budget(limit) == FOREST_EDGES_RANGE[0]
    assert smallest_memory_limit([{"memory_limit": 8}, {"memory_limit": 5}]) == 5
    assert smallest_memory_limit([{"memory_limit": 8}, {"memory_limit": None}]) is None
    assert smallest_memory_limit([]) is None
