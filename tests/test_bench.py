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
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow


def _bench(tmp_path, *args):
    exe = shutil.which("facecluster") or sys.executable
    cmd = [exe, "bench", *args] if exe.endswith("facecluster") else [exe, "-m", "facecluster", "bench", *args]
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
    # the configured kernel (auto: bfloat16 candidates where the CPU has them) and today's float32
    # kernel ran on the same store in the same run: identical outputs
    assert r["identical_to_float32_kernel"] is True and r["exact_ratio_float32_kernel"] > 0
    assert r["exact_distributed"]["precision"] and r["exact_distributed_float32"]["precision"] == ["float32"]
    ivf = r["ivf"]
    assert ivf["mode"] == "ivf" and ivf["nprobe"] >= 1 and ivf["edge_recall"] >= 0.97
    assert ivf["speedup_search"] > 0 and [c["edge_recall"] for c in ivf["tune_curve"] if c["nprobe"] == ivf["nprobe"]] == [ivf["edge_recall"]]
    big = r["ivf_large"]  # IVF alone at the larger N, against extrapolated exact and plain faiss
    assert big["n"] == 8000 and big["edge_recall"] >= 0.97
    assert big["exact_seconds_extrapolated"] > 0 and big["faiss_flat_seconds_extrapolated"] > 0
    assert big["speedup_total_vs_faiss_flat"] > 0
    assert "exact ratio distributed / single-process" in out.stdout
    # the ratio's ceiling on this machine: the kernel's GEMM alone, in its own precision, measured in this run
    c = r["exact_ceiling"]
    assert c["precision"] == ("bfloat16" if "bfloat16" in r["exact_distributed"]["precision"] else "float32")
    assert c["gemm_flop_per_s"] > 0 and c["gemm_seconds"] == pytest.approx(2.0 * 6000**2 * 32 / c["gemm_flop_per_s"], rel=1e-3)
    assert c["faiss_seconds"] == pytest.approx(r["exact_single_process"]["seconds"], abs=1e-3)
    assert c["ratio"] == pytest.approx(c["faiss_seconds"] / c["gemm_seconds"], rel=2e-3)
    assert c["gemm_share"] == pytest.approx(c["gemm_seconds"] / r["exact_distributed"]["search_seconds"], rel=2e-3)
    assert "ceiling: the " in out.stdout


def test_blas_comparison_skips_the_kernels_this_cpu_cannot_run(tmp_path):
    """A kernel forced on a CPU without its instructions dies of SIGILL (``bench knn`` on an AVX2-only machine lost
    every result to SkylakeX): such a row says it was not run and why; the others run and agree."""
    import numpy as np

    from facecluster.pipeline.benchmarks.knn import blas_comparison
    from facecluster.pipeline.cluster import coretype_missing_flags, cpu_flags

    assert coretype_missing_flags("SkylakeX", {"avx2", "fma", "pni"}) == ["avx512bw", "avx512f", "avx512vl"]
    assert coretype_missing_flags("Haswell", {"avx2", "fma", "pni"}) == []
    assert coretype_missing_flags("unset", set()) == []  # not a kernel: nothing to check
    x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    no_avx512 = cpu_flags() - {"avx512f"}  # this machine as if it had no AVX-512
    rows = blas_comparison(x, 64, 5, tmp_path, coretypes=("auto", "SkylakeX", "Prescott"), flags=no_avx512)
    assert [r["setting"] for r in rows][1:] == ["SkylakeX", "Prescott"]
    assert rows[1]["skipped"].startswith("this CPU lacks") and "avx512f" in rows[1]["skipped"] and "seconds" not in rows[1]
    ran = [r for r in rows if "skipped" not in r]
    assert len(ran) == 2 and len({r["digest"] for r in ran}) == 1 and all(r["seconds"] > 0 for r in ran)


def test_bench_cluster_reports_every_stage_and_worker_memory(tmp_path):
    out = _bench(tmp_path, "cluster", "--n", "3000", "--train-n", "1500", "--dim", "32", "--epochs", "1",
                 "--workdir", "w", "--out", "cluster.json")
    r = json.loads((tmp_path / "cluster.json").read_text())
    full = ["knn", "edges", "communities", "graph", "proposals", "score", "dedup"]
    # a model whose output is its communities runs without the graph stage (run.stage_runners)
    assert r["model_output"] in ("proposals", "communities") and r["model"] == "trained in this run"
    assert list(r["stage_seconds"]) == (full if r["model_output"] == "proposals" else [s for s in full if s != "graph"])
    assert r["score"]["n_proposals"] > 0 and r["score"]["proposals_per_s_per_worker"] > 0
    for stage, mem in r["memory_by_stage"].items():
        assert len(mem["peak_rss_mib_per_worker"]) == 2 and min(mem["peak_rss_mib_per_worker"]) > 0, stage
    assert "proposals/s/worker" in out.stdout
    assert r["gemm_flop_per_s"] > 0 and abs(sum(r["stage_share"].values()) - 1) < 0.01
    bound = r["work_bound_seconds"]
    assert all(bound[s] > 0 for s in ("knn", "edges", "proposals", "score"))
    assert bound["graph"] is None and bound["dedup"] is None
    for stage, busy in r["busy_share_per_worker"].items():  # every worker listed, computing within the stage's time
        assert len(busy) == 2 and all(0 <= b <= 1.05 for b in busy.values()), stage
    assert max(r["busy_share_per_worker"]["score"].values()) > 0
    assert "work-bound" in out.stdout and "busy per worker" in out.stdout
    # issue 16's yardstick, measured in the same run: one-process faiss on a query sample, extrapolated
    fs = r["faiss_flat"]
    assert fs["queries"] == 3000 and fs["threads"] == 2 and fs["seconds_extrapolated"] > 0
    assert r["total_vs_faiss_flat"] == pytest.approx(r["total_seconds"] / fs["seconds_extrapolated"], rel=1e-2)
    assert "x one-process faiss IndexFlatIP" in out.stdout


def test_bench_cluster_runs_the_general_model_s_chain(tmp_path):
    """`--model general`: no training split, the shipped model's chain (its output is its communities: no graph
    stage), its total against the same faiss yardstick."""
    out = _bench(tmp_path, "cluster", "--n", "3000", "--dim", "32", "--model", "general", "--workdir", "w",
                 "--out", "cluster.json")
    r = json.loads((tmp_path / "cluster.json").read_text())
    assert r["model"] == "general" and r["model_output"] == "communities" and r["train_n"] is None
    assert list(r["stage_seconds"]) == ["knn", "edges", "communities", "proposals", "score", "dedup"]
    assert not (tmp_path / "w" / "train.zarr").exists() and "train_seconds_incl_stages" not in r
    assert r["score"]["n_proposals"] > 0 and r["total_vs_faiss_flat"] > 0
    assert "model general (output: communities)" in out.stdout


def test_bench_infomap_compares_distributed_and_single_process_partitions(tmp_path):
    out = _bench(tmp_path, "infomap", "--n", "4000", "--dim", "32", "--k", "10", "--chunk-rows", "1000",
                 "--store", "bi.zarr", "--out", "infomap.json")
    r = json.loads((tmp_path / "infomap.json").read_text())
    d, single = r["distributed"], r["single_process"]
    assert d["largest_component"] >= d["largest"] and d["tasks"] >= 1 and len(d["peak_rss_mib_per_worker"]) == 2
    assert single["edges"] > 0 and single["peak_rss_mib"] > 0
    assert r["distributed_vs_single"]["pairwise_f"] > 0.9  # the same graph, batches of whole components
    assert 0 < d["vs_labels"]["pairwise_f"] <= 1 and 0 < single["vs_labels"]["pairwise_f"] <= 1
    assert "distributed vs single process" in out.stdout


def test_bench_scale_times_every_stage_after_knn_at_each_size(tmp_path):
    _bench(tmp_path, "scale", "--sizes", "3000,6000", "--k", "10", "--chunk-rows", "1000", "--out", "scale.json")
    r = json.loads((tmp_path / "scale.json").read_text())
    stages = {"edges", "communities", "graph", "proposals", "score", "dedup"}
    for n in ("3000", "6000"):
        got = r["by_size"][n]["stages"]
        assert set(got) == stages
        assert all(v["us_per_face"] > 0 and len(v["peak_rss_mib_per_worker"]) == 2 and v["driver_peak_rss_mib"] > 0
                   for v in got.values())
    assert set(r["growth"]) == stages and all(g["time_per_face_growth"] > 0 for g in r["growth"].values())
    assert not (tmp_path / "bench-scale" / "scale-3000.zarr").exists()  # stores removed unless --keep


def test_split_by_identity_is_disjoint_deterministic_and_keeps_row_order():
    import numpy as np

    from facecluster.pipeline.benchmarks.quality import split_by_identity

    labels = np.random.default_rng(3).integers(0, 50, 400)
    tr, te = split_by_identity(labels, 0.5, 0)
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(400))
    assert not set(labels[tr]) & set(labels[te])
    assert len(set(labels[tr])) == int(len(set(labels)) * 0.5)
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
    tr2, te2 = split_by_identity(labels, 0.5, 0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert not np.array_equal(split_by_identity(labels, 0.5, 1)[0], tr)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=200), st.integers(1, 4), st.integers(0, 6), st.integers(0, 99))
def test_resample_sizes_against_a_per_identity_oracle(labels, lo, extra, seed):
    import numpy as np

    from facecluster.pipeline.benchmarks.quality import resample_sizes

    labels = np.asarray(labels)
    hi = lo + extra
    rows = resample_sizes(labels, lo, hi, seed)
    assert np.all(np.diff(rows) > 0) and (len(rows) == 0 or rows.max() < len(labels))
    for ident in np.unique(labels):
        mine, kept = np.flatnonzero(labels == ident), rows[labels[rows] == ident]
        if len(mine) < lo:
            assert len(kept) == 0
        elif len(mine) <= hi:
            assert np.array_equal(kept, mine)
        else:
            assert len(kept) == hi and set(kept) <= set(mine)
    assert np.array_equal(rows, resample_sizes(labels, lo, hi, seed))


def test_bench_quality_test_sizes_resamples_the_test_identities_only(tmp_path):
    """`--test-sizes 3-10`: every test identity has 3-10 faces; the training split is untouched."""
    import numpy as np

    from facecluster.pipeline.store import RunStore

    _bench(tmp_path, "quality", "--baselines-only", "--n", "1600", "--dim", "32", "--test-sizes", "3-10",
           "--workdir", "w", "--out", "q.json")
    r = json.loads((tmp_path / "q.json").read_text())
    te = RunStore.open(str(tmp_path / "w" / "test.zarr")).array("labels")[:]
    full = np.load(tmp_path / "w" / "data" / "test" / "labels.npy")
    sizes = np.unique(te, return_counts=True)[1]
    assert r["test_sizes"] == [3, 10] and r["n_test"] == len(te) < len(full)
    assert sizes.min() >= 3 and sizes.max() <= 10
    assert set(te.tolist()) == {v for v, c in zip(*np.unique(full, return_counts=True)) if c >= 3}
    bad = subprocess.run([sys.executable, "-m", "facecluster", "bench", "quality", "--test-sizes", "9-3",
                          "--baselines-only", "--workdir", "w2"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "--test-sizes" in bad.stderr


def test_bench_quality_own_labelled_features_over_seeds(tmp_path):
    import numpy as np

    from facecluster.pipeline.store import RunStore
    from facecluster.tasks.metrics import evaluate
    from facecluster.tasks.synth import make_faces

    feats, labels = make_faces(3000, dim=32, seed=4)
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "l.npy", labels)
    (tmp_path / "tiny.toml").write_text('[knn]\nk = 20\n[proposals]\npreset = "fast"\n'
                                        '[gcn]\nhidden = [16, 8]\nepochs = 2\nsize_weight = [0.0]\n')
    out = _bench(tmp_path, "quality", "--features", "f.npy", "--labels", "l.npy", "--seeds", "0,1",
                 "--config", "tiny.toml", "--workdir", "w", "--out", "q.json")
    r = json.loads((tmp_path / "q.json").read_text())
    tr = RunStore.open(str(tmp_path / "w" / "train.zarr")).array("labels")[:]
    te = RunStore.open(str(tmp_path / "w" / "test.zarr")).array("labels")[:]
    assert r["n_train"] + r["n_test"] == 3000 and len(te) == r["n_test"]
    assert not set(tr.tolist()) & set(te.tolist())
    assert [row["seed"] for row in r["by_seed"]] == [0, 1]
    names = list(r["baselines"])
    assert names[0].startswith("threshold (best th=")
    for row in r["by_seed"]:  # every seed has its own edge scorer, communities and proposals
        assert 0.5 < row["edge_scorer"]["auc"] <= 1 and len(row["edge_scorer"]["calibration"]) == 10
        assert 0 < row["communities"]["pairwise_f"] <= 1 and 0 < row["dedup by true IoU"]["pairwise_f"] <= 1
        assert row["edges"]["floor"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
    assert "edge scorer on the test edges: ROC-AUC" in out.stdout
    for m in ("learned (the model's output)", "GCN-D", "GCN-D + GCN-S", "communities"):
        f = [row[m]["pairwise_f"] for row in r["by_seed"]]
        assert all(0 < v <= 1 for v in f)
        assert abs(r["summary"][m]["pairwise_f"]["mean"] - sum(f) / 2) < 1e-12
    # the last seed's row is what its stores hold
    store = RunStore.open(str(tmp_path / "w" / "test.zarr"))
    assert evaluate(te, store.array("clusters")[:]) == r["by_seed"][-1]["learned (the model's output)"]
    for row in r["by_seed"]:  # the output the model chose on its validation faces, and what it was measured on
        chosen = row["output"]
        assert chosen["source"] in ("proposals", "communities") and chosen["val_faces"] > 0
        better = chosen["val_pairwise_f_communities"] + chosen["val_bcubed_f_communities"] > (
            chosen["val_pairwise_f_dedup"] + chosen["val_bcubed_f_dedup"] + 1e-9)
        assert chosen["source"] == ("communities" if better else "proposals")
        if chosen["source"] == "proposals":
            assert row["learned (the model's output)"] == row["GCN-D + GCN-S"]
    bar = r["baselines"][names[0]]["pairwise_f"]
    assert r["seeds_above_threshold_pairwise"] == sum(row["learned (the model's output)"]["pairwise_f"] > bar
                                                      for row in r["by_seed"])
    assert "over 2 seeds" in out.stdout
    assert "Traceback" not in out.stderr and "CommClosedError" not in out.stderr  # a clean shutdown
    # held-out scorer metrics of the last seed: recomputed here from the stores with scipy
    from scipy.stats import spearmanr

    from facecluster.tasks.targets import proposal_targets

    t = proposal_targets(store.array("proposals/offsets")[:], store.array("proposals/members")[:], te)
    h = r["by_seed"][-1]["held_out"]
    assert abs(h["spearman_iou"] - spearmanr(store.array("score/iou")[:], t["iou"]).statistic) < 1e-9
    assert abs(h["spearman_iop"] - spearmanr(store.array("score/iop")[:], t["iop"]).statistic) < 1e-9
    assert h["proposals"] == len(t["iou"]) and h["impure_proposals"] == int((t["iop"] < 1).sum()) > 0
    assert 0.0 <= h["gcns_node_acc_impure"] <= 1.0 and 0.0 <= h["gcns_node_acc"] <= 1.0  # a 2-epoch GCN-S: any value
    acc = [row["held_out"]["gcns_node_acc"] for row in r["by_seed"]]
    assert abs(r["summary"]["held_out"]["gcns_node_acc"]["mean"] - sum(acc) / 2) < 1e-12
    assert "held-out proposals, mean (min-max) over seeds: Spearman(pred, true IoU)" in out.stdout
    assert 0 < r["held_out_ceiling"]["spearman_iop"] < 1.0 and "ceiling without ties" in out.stdout


def test_spearman_ceiling_is_what_ties_allow():
    import numpy as np
    from scipy.stats import spearmanr

    from facecluster.pipeline.benchmarks.quality import spearman_ceiling

    distinct = np.linspace(0, 1, 50)
    assert abs(spearman_ceiling(distinct) - 1.0) < 1e-12
    tied = np.concatenate([np.linspace(0.2, 0.9, 10), np.ones(90)])  # 90% pure proposals
    c = spearman_ceiling(tied)
    # any tie-free prediction ranks the 90 tied ones somehow; ordering them arbitrarily is the best it can do
    arbitrary = np.concatenate([np.linspace(0.2, 0.9, 10), 1.0 + np.arange(90) / 1000])
    assert abs(c - spearmanr(tied, arbitrary).statistic) < 1e-9
    assert abs(c - np.sqrt(1 - 0.9 ** 3)) < 0.01  # about sqrt(1 - share of ties ** 3)


def test_bench_quality_features_without_labels_is_bad_input(tmp_path):
    import numpy as np

    np.save(tmp_path / "f.npy", np.eye(8, dtype=np.float32))
    exe = shutil.which("facecluster")
    cmd = [exe, "bench", "quality", "--features", "f.npy", "--workdir", "w"] if exe else \
        [sys.executable, "-m", "facecluster", "bench", "quality", "--features", "f.npy", "--workdir", "w"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "f.npy" in out.stderr and "--labels" in out.stderr


def test_bench_quality_evaluates_a_given_model_without_training(tmp_path):
    """`--model general`: the shipped model on a built-in variant at a dimension it never saw, beside the
    label-chosen baselines and the automatic threshold (`--method threshold` without --th); nothing trained."""
    _bench(tmp_path, "quality", "--model", "general", "--variant", "sizes", "--n", "1600", "--dim", "48",
           "--workdir", "w", "--out", "q.json")
    r = json.loads((tmp_path / "q.json").read_text())
    assert r["train_source"].startswith("none: the given model") and not (tmp_path / "w" / "train.zarr").exists()
    assert any(name.startswith("threshold (automatic P >= ") for name in r["baselines"])
    (row,) = r["by_seed"]
    assert 0 < row["learned (the model's output)"]["pairwise_f"] <= 1 and row["output"]["source"] == "communities"
