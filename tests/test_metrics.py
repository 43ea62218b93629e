"""facecluster.tasks.metrics against scikit-learn and a direct O(N^2) BCubed oracle."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix

from facecluster.tasks.metrics import bcubed_f, evaluate, nmi, pairwise_f

FACECLUSTER = os.path.join(os.path.dirname(sys.executable), "facecluster")


@st.composite
def labelings(draw, max_n=60):
    n = draw(st.integers(1, max_n))
    k_gt = draw(st.integers(1, n))
    k_pred = draw(st.integers(1, n))
    lo = draw(st.integers(-5, 5))  # negative and arbitrary label values
    gt = draw(st.lists(st.integers(lo, lo + k_gt - 1), min_size=n, max_size=n))
    pred = draw(st.lists(st.integers(lo * 1000, lo * 1000 + k_pred - 1), min_size=n, max_size=n))
    return np.array(gt, dtype=np.int64), np.array(pred, dtype=np.int64)


def _sk_pairwise(gt, pred):
    c = pair_confusion_matrix(gt, pred)
    tp, fp, fn = int(c[1, 1]), int(c[0, 1]), int(c[1, 0])
    p = 1.0 if tp + fp == 0 else tp / (tp + fp)
    r = 1.0 if tp + fn == 0 else tp / (tp + fn)
    return p, r, (0.0 if p + r == 0 else 2 * p * r / (p + r))


def _bcubed_oracle(gt, pred):
    same_g = gt[:, None] == gt[None, :]
    same_p = pred[:, None] == pred[None, :]
    both = (same_g & same_p).sum(1)
    p = float(np.mean(both / same_p.sum(1)))
    r = float(np.mean(both / same_g.sum(1)))
    return p, r, 2 * p * r / (p + r)


@settings(max_examples=200, deadline=None)
@given(labelings())
def test_pairwise_matches_sklearn_pair_confusion(lab):
    gt, pred = lab
    np.testing.assert_allclose(pairwise_f(gt, pred), _sk_pairwise(gt, pred), rtol=0, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(labelings())
def test_nmi_matches_sklearn(lab):
    gt, pred = lab
    assert abs(nmi(gt, pred) - normalized_mutual_info_score(gt, pred)) < 1e-9


@settings(max_examples=200, deadline=None)
@given(labelings())
def test_bcubed_matches_quadratic_oracle(lab):
    gt, pred = lab
    np.testing.assert_allclose(bcubed_f(gt, pred), _bcubed_oracle(gt, pred), rtol=0, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(labelings())
def test_invariant_to_relabelling_and_symmetric(lab):
    gt, pred = lab
    rng = np.random.default_rng(0)
    perm = rng.permutation(np.unique(pred).size)
    pred2 = perm[np.unique(pred, return_inverse=True)[1]] * 7 - 3
    assert evaluate(gt, pred) == pytest.approx(evaluate(gt, pred2))
    p, r, f = pairwise_f(gt, pred)
    assert pairwise_f(pred, gt) == pytest.approx((r, p, f))
    bp, br, bf = bcubed_f(gt, pred)
    assert bcubed_f(pred, gt) == pytest.approx((br, bp, bf))


def test_large_random_against_sklearn():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 3000, 200_000)
    pred = np.where(rng.random(gt.size) < 0.8, gt, rng.integers(-50, 5000, gt.size))
    np.testing.assert_allclose(pairwise_f(gt, pred), _sk_pairwise(gt, pred), atol=1e-9)
    assert abs(nmi(gt, pred) - normalized_mutual_info_score(gt, pred)) < 1e-9


def test_edge_cases():
    gt = np.array([0, 0, 1, 1, 2])
    assert pairwise_f(gt, gt) == (1.0, 1.0, 1.0)
    assert bcubed_f(gt, gt) == (1.0, 1.0, 1.0)
    assert nmi(gt, gt) == pytest.approx(1.0)
    single = np.arange(5)
    # all-singleton prediction: no predicted pair -> precision 1 by convention, recall 0
    assert pairwise_f(gt, single) == (1.0, 0.0, 0.0)
    assert pairwise_f(single, single) == (1.0, 1.0, 1.0)
    assert nmi(np.zeros(4, int), np.zeros(4, int)) == 1.0
    assert nmi(np.zeros(4, int), np.arange(4)) == 0.0
    one = np.zeros(5, int)
    p, r, f = pairwise_f(gt, one)
    assert (p, r) == (pytest.approx(4 / 20), 1.0)
    ev = evaluate(gt, single)
    assert ev["n_clusters"] == 5 and ev["n_singletons"] == 5
    assert ev["gt_n_clusters"] == 3 and ev["gt_n_singletons"] == 1 and ev["n"] == 5


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 labels but pred has 2"):
        pairwise_f([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="N = 0"):
        evaluate([], [])
    with pytest.raises(ValueError, match="1-D"):
        nmi(np.zeros((3, 3)), np.zeros((3, 3)))


# --- `facecluster evaluate` through the console script, on real files -----------------------------

def _run(*args):
    import subprocess

    return subprocess.run([FACECLUSTER, "evaluate", *map(str, args)], capture_output=True, text=True)


def test_cli_evaluate_label_files_and_run_store(tmp_path):
    import json

    from facecluster.pipeline.store import RunStore
    from facecluster.tasks.io import write_meta

    rng = np.random.default_rng(5)
    gt = rng.integers(0, 300, 4000)
    pred = np.where(rng.random(gt.size) < 0.85, gt, rng.integers(-10, 1000, gt.size))
    np.save(tmp_path / "pred.npy", pred)
    write_meta(tmp_path / "gt.meta", gt)
    expected = evaluate(gt, pred)

    r = _run(tmp_path / "pred.npy", "--gt", tmp_path / "gt.meta")
    assert r.returncode == 0, r.stderr
    assert "pairwise" in r.stdout and "BCubed" in r.stdout and "NMI" in r.stdout
    res = json.loads((tmp_path / "pred.eval.json").read_text())
    assert res["metrics"] == pytest.approx(expected)
    assert res["sources"]["ground_truth"].endswith("gt.meta")

    store = RunStore.create(tmp_path / "run.zarr")
    with store.stage("ingest", {}) as w:
        w.write_array("labels", gt)
    with store.stage("dedup", {}) as w:
        w.write_array("clusters", pred)
    r = _run(tmp_path / "run.zarr", "--json", tmp_path / "out.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out.json").read_text())["metrics"] == pytest.approx(expected)
    r = _run(tmp_path / "run.zarr")  # default JSON beside the store
    assert r.returncode == 0 and (tmp_path / "run.eval.json").exists()

    # bad input: exit 2 with a one-line message naming the file(s) and the fix
    r = _run(tmp_path / "pred.npy")
    assert r.returncode == 2 and "--gt" in r.stderr
    np.save(tmp_path / "short.npy", gt[:-1])
    r = _run(tmp_path / "pred.npy", "--gt", tmp_path / "short.npy")
    assert r.returncode == 2 and "short.npy" in r.stderr and "pred.npy" in r.stderr
    r = _run(tmp_path / "run.zarr", "--pred-array", "nope")
    assert r.returncode == 2 and "nope" in r.stderr
    bare = RunStore.create(tmp_path / "bare.zarr")
    with bare.stage("dedup", {}) as w:
        w.write_array("clusters", pred)
    r = _run(tmp_path / "bare.zarr")
    assert r.returncode == 2 and "--gt" in r.stderr and "bare.zarr" in r.stderr
