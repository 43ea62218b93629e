"""`facecluster demo` and `facecluster cluster --model` end to end through the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from facecluster.pipeline.store import RunStore

EXE = os.path.join(os.path.dirname(sys.executable), "facecluster")
ENV = {**os.environ, "FACECLUSTER_PROGRESS": "0"}
METHODS = ("threshold (best", "GCN-D", "GCN-D + GCN-S", "learned output (")


@pytest.mark.slow
def test_demo_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "demo"
    cfg = tmp_path / "small.toml"
    cfg.write_text("[gcn]\nepochs = 3\nhidden = [32, 16]\n[dask]\nn_workers = 2\n")
    args = [EXE, "demo", "-n", "2400", "-o", str(out), "--config", str(cfg)]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in METHODS:
        assert name in r.stdout
    summary = json.loads((out / "demo.json").read_text())
    results = summary["results"]
    assert {"GCN-D", "GCN-D + GCN-S"} <= set(results)
    store = RunStore.open(out / "test.zarr")
    labels, clusters = store.array("labels")[:], store.array("clusters")[:]
    assert clusters.shape == labels.shape and clusters.min() == 0
    learned = next(v for k, v in results.items() if k.startswith("learned output ("))
    assert len(np.unique(clusters)) == learned["n_clusters"]
    # a score per face labelled by a proposal; NaN exactly for faces no proposal claimed
    score = store.array("clusters_score")[:]
    assert np.isfinite(score).any() and np.all((score[np.isfinite(score)] >= 0) & (score[np.isfinite(score)] <= 1))
    for name, m in results.items():
        assert 0.0 <= m["pairwise_f"] <= 1.0 and m["n"] == len(labels), name
    # a second run reuses everything: every cluster stage skipped, same labels
    r2 = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "model up to date (skipped)" in r2.stderr
    for stage in ("knn", "edges", "communities", "graph", "proposals", "score", "dedup"):
        assert f"{stage:<10} skipped (up to date)" in r2.stderr
    np.testing.assert_array_equal(RunStore.open(out / "test.zarr").array("clusters")[:], clusters)

    # the learned path through `facecluster cluster --model` on the same store: up to date, same labels
    r3 = subprocess.run([EXE, "cluster", str(out / "test.zarr"), "--model", str(out / "model"), "--workers", "1",
                         "--config", str(cfg)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "skipped (up to date): knn, edges, communities, graph, proposals, score, dedup" in r3.stdout
    np.testing.assert_array_equal(RunStore.open(out / "test.zarr").array("clusters")[:], clusters)


def test_cluster_gcn_model_is_checked_before_any_stage(tmp_path):
    """A --model that is not a model directory is one line before anything runs (without --model the
    learned method runs the general model shipped in the package: tests/test_general.py)."""
    from facecluster.pipeline.stages.ingest import run_ingest

    feats = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    run_ingest(tmp_path / "f.npy", tmp_path / "r.zarr")
    r = subprocess.run([EXE, "cluster", str(tmp_path / "r.zarr"), "--model", str(tmp_path / "nomodel")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and "not a facecluster model directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert len(r.stderr.strip().splitlines()) == 1
