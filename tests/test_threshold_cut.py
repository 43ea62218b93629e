"""Issue 14, `--method threshold` without `--th`: components of the kNN edges with P(same identity) >= the cut the
general model recorded in training, on real LocalCluster workers and real run stores."""

from __future__ import annotations

import numpy as np
import pytest

import facecluster
from facecluster.pipeline.model_files import GENERAL_MODEL_DIR, edge_meta, read_model_config
from facecluster.pipeline.store import RunStore
from facecluster.tasks.components import threshold_components
from facecluster.tasks.edges import FLOOR_GRID, components_at
from facecluster.tasks.metrics import pairwise_f

CFG = {"knn": {"k": 20}}


def _cli(argv, capsys):
    from facecluster.pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def faces():
    from facecluster.tasks.synth import make_faces

    return make_faces(1500, 48, seed=4)


def test_the_general_model_records_its_components_cut():
    """The cut is one level of the communities grid, chosen by the recorded out-of-fold curve's best mean
    pairwise + BCubed F (what `facecluster train --general` writes)."""
    meta = read_model_config(GENERAL_MODEL_DIR)
    cut = meta["edges"]["metrics"]["cut"]
    assert meta["edges"]["cut"] == cut["level"] and cut["level"] in FLOOR_GRID
    best = max(cut["curve"], key=lambda c: c["pairwise_f"] + c["bcubed_f"])
    assert best["level"] == cut["level"] and [c["level"] for c in cut["curve"]] == list(FLOOR_GRID)


def test_cli_threshold_without_th_cuts_the_general_model_s_probabilities(faces, tmp_path, local_client, capsys):
    """The CLI names the rule and the model; `clusters` are exactly the components of the stored edge
    probabilities at the model's cut (neither the cosine graph at its Otsu anchor nor another level)."""
    x, y = faces
    np.save(tmp_path / "f.npy", x)
    run = tmp_path / "run.zarr"
    sched = ["--scheduler", local_client.scheduler.address]
    assert _cli(["ingest", tmp_path / "f.npy", "-o", run], capsys)[0] == 0
    code, out, err = _cli(["cluster", run, "--method", "threshold", *sched], capsys)
    assert code == 0, err
    meta = edge_meta(GENERAL_MODEL_DIR)
    assert [ln for ln in err.splitlines() if ln.startswith(f"threshold (no --th): components of kNN edges with "
                                                           f"P(same identity) >= {meta['cut']:g}, the cut the general model")]
    # the scorer's own P ([edges] adapt "auto" adapts the learned method's P only) at the model's own cut
    store = RunStore.open(str(run))
    assert "adaptation" not in store.record("edges")["summary"]
    cut = meta["cut"]
    assert out.startswith(f"threshold P(same identity) >= {cut:g} (P(same identity) >= {cut:g}, the cut the general model")
    assert "adapted" not in out
    rec = store.record("clusters")
    assert rec["params"]["weights"] == "edges/prob" and rec["params"]["th"] == cut and rec["inputs"] == ["edges"]
    index, prob = store.array("knn/index")[:], store.array("edges/prob")[:]
    labels = store.array("clusters")[:]
    assert np.array_equal(labels, components_at(index, prob, cut))
    lower = components_at(index, prob, max(v for v in FLOOR_GRID if v < cut))
    assert not np.array_equal(labels, lower)  # the level matters on these faces: the test sees a wrong one


def test_adapt_true_cuts_the_adapted_probabilities_at_the_adapted_cut(faces, tmp_path, local_client):
    """[edges] adapt = true (not the default for this method): the run's P is adapted and the cut is the one the
    model chose on adapted out-of-fold P (``adapt_levels``), and the summary says so."""
    x, _ = faces
    fc = facecluster.FaceClusterer(method="threshold", config={**CFG, "edges": {"adapt": True}}, client=local_client,
                                   store=tmp_path / "run.zarr")
    labels = fc.fit_predict(x)
    store = RunStore.open(fc.run_.url)
    assert store.record("edges")["summary"]["adaptation"] is not None
    cut = edge_meta(GENERAL_MODEL_DIR)["adapt_levels"]["cut"]
    assert fc.summary_["th"] == cut and "on P adapted to each run" in fc.summary_["threshold"]["source"]
    assert np.array_equal(labels, components_at(store.array("knn/index")[:], store.array("edges/prob")[:], cut))


def test_th_keeps_the_cosine_cut(faces, tmp_path, local_client):
    """--th: the components of the kNN graph at that cosine, no edge scorer run."""
    x, _ = faces
    fc = facecluster.FaceClusterer(method="threshold", th=0.6, config=CFG, client=local_client, store=tmp_path / "r.zarr")
    labels = fc.fit_predict(x)
    store = RunStore.open(fc.run_.url)
    assert store.record("clusters")["params"]["th"] == 0.6 and "weights" not in store.record("clusters")["params"]
    assert not store.has("edges/prob")
    index, sim = store.array("knn/index")[:], store.array("knn/sim")[:]
    assert np.array_equal(labels, components_at(index, sim, 0.6))


def test_cut_does_not_depend_on_chunk_size_or_worker_count(faces, tmp_path, local_client, single_worker_client):
    x, _ = faces
    out = []
    for rows, client in ((128, local_client), (1000, single_worker_client)):
        fc = facecluster.FaceClusterer(method="threshold", config={**CFG, "ingest": {"chunk_rows": rows}}, client=client,
                                       store=tmp_path / f"run{rows}.zarr")
        out.append(fc.fit_predict(x))
    assert np.array_equal(out[0], out[1])


def test_max_size_splits_the_probability_components(faces, tmp_path, local_client):
    """Algorithm 1 on the probability forest: every piece lies inside one component at the cut, and a piece
    above max_size is held together by edges at P = 1 (float32), the one level no ladder step can pass."""
    x, _ = faces
    fc = facecluster.FaceClusterer(method="threshold", max_size=5, config=CFG, client=local_client,
                                   store=tmp_path / "run.zarr")
    labels = fc.fit_predict(x)
    store = RunStore.open(fc.run_.url)
    index, prob = store.array("knn/index")[:], store.array("edges/prob")[:]
    whole = components_at(index, prob, edge_meta(GENERAL_MODEL_DIR)["cut"])
    assert pairwise_f(whole, labels)[0] == 1.0  # every piece lies inside one component at the cut
    assert np.bincount(labels).max() < np.bincount(whole).max()
    at_one = components_at(index, prob, 1.0)
    big = np.flatnonzero(np.bincount(labels)[labels] > 5)
    assert pairwise_f(labels[big], at_one[big]) == (1.0, 1.0, 1.0)


def test_components_at_is_threshold_components_of_the_undirected_edges():
    """An edge listed from one end only counts; from both ends, once with its larger P."""
    index = np.array([[1, 2], [0, -1], [3, 0], [2, -1]])
    prob = np.array([[0.99, 0.2], [0.99, 0.0], [0.97, 0.2], [0.5, 0.0]], np.float32)
    assert components_at(index, prob, 0.98).tolist() == [0, 0, 1, 2]
    assert components_at(index, prob, 0.9).tolist() == [0, 0, 1, 1]
    assert threshold_components(4, np.array([0, 0, 2]), np.array([1, 2, 3]), np.array([0.99, 0.2, 0.97]), 0.9).tolist() \
        == [0, 0, 1, 1]
