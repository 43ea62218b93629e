"""Stage "graph" on a real LocalCluster: the stored forest is chunk- and worker-invariant and its cuts
equal scipy's connected components of the thresholded kNN graph."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from facecluster.pipeline.config import Config
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
    cfg = Config.from_dict({"proposals": {"fan_in": 2, "min_edge_sim": -1.0}})  # every edge: cuts at any tau
    forests = []
    for i, (r, client) in enumerate([(300, single_worker_client), (37, local_client), (64, single_worker_client)]):
        store = make_run(tmp_path / f"r{i}.zarr", feats, k, r)
        summary = run_graph(store, cfg, client)
        assert summary["chunks"] == -(-300 // r)
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
