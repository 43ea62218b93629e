"""`facecluster bench` commands run end to end on tiny inputs (the console script, as a user runs it).

They check that every benchmark produces its result fields, not timings (never asserted:
shared machines are noisy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _bench(tmp_path, *args):
    exe = shutil.which("facecluster") or sys.executable
    cmd = [exe, "bench", *args] if exe.endswith("facecluster") else [exe, "-m", "pipeline", "bench", *args]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_bench_knn_exact_ratio_and_list_major_ivf(tmp_path):
    out = _bench(tmp_path, "knn", "--n", "6000", "--dim", "32", "--k", "10", "--chunk-rows", "1024",
                 "--skip", "memory", "--skip", "blas", "--ivf-n", "8000", "--out", "knn.json")
    r = json.loads((tmp_path / "knn.json").read_text())
    assert r["exact_single_process"]["neighbour_agreement"] > 0.99
    assert r["exact_ratio"] > 0
    ivf = r["ivf"]
    assert ivf["mode"] == "ivf" and ivf["nprobe"] >= 1 and ivf["edge_recall"] >= 0.97
    assert ivf["speedup_search"] > 0 and ivf["tune_curve"][-1]["edge_recall"] == ivf["edge_recall"]
    big = r["ivf_large"]  # IVF alone at the larger N, against extrapolated exact and plain faiss
    assert big["n"] == 8000 and big["edge_recall"] >= 0.97
    assert big["exact_seconds_extrapolated"] > 0 and big["faiss_flat_seconds_extrapolated"] > 0
    assert big["speedup_total_vs_faiss_flat"] > 0
    assert "exact ratio distributed / single-process" in out.stdout


def test_bench_cluster_reports_every_stage_and_worker_memory(tmp_path):
    out = _bench(tmp_path, "cluster", "--n", "3000", "--train-n", "1500", "--dim", "32", "--epochs", "1",
                 "--workdir", "w", "--out", "cluster.json")
    r = json.loads((tmp_path / "cluster.json").read_text())
    assert list(r["stage_seconds"]) == ["knn", "graph", "proposals", "score", "dedup"]
    assert r["score"]["n_proposals"] > 0 and r["score"]["proposals_per_s_per_worker"] > 0
    for stage, mem in r["memory_by_stage"].items():
        assert len(mem["peak_rss_mib_per_worker"]) == 2 and min(mem["peak_rss_mib_per_worker"]) > 0, stage
    assert "proposals/s/worker" in out.stdout
