"""The Python API (issue 15, item 1): ``FaceClusterer``, ``facecluster.train``, ``facecluster.open_run``.

The API calls the functions the CLI calls, so on the same data and configuration it must give
the CLI's labels exactly: with its own LocalCluster, with a passed-in ``Client``, from a NumPy
array, a Dask array, a Zarr array or a file path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import facecluster
from facecluster.pipeline.errors import BadInput


def _cli(*args: str, cwd: Path) -> str:
    exe = Path(sys.executable).with_name("facecluster")
    p = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"facecluster {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def cli_runs(small_model, local_client):
    """The test split clustered by the CLI (ingest + cluster): threshold on the CLI's own LocalCluster (2
    workers), learned and infomap without and with the model on the session's LocalCluster through
    ``--scheduler`` (``out["stdout"]``: each command's output line).

    One ingest, copied per method (a run store is a folder; ingest's output does not depend on the method):
    the CLI's process and cluster start-ups were most of this fixture's time."""
    tmp = small_model["tmp"] / "cli"
    tmp.mkdir()
    feats, labels = small_model["test"]
    np.save(tmp / "X.npy", feats)
    np.save(tmp / "y.npy", labels)
    cfg = str(small_model["config"])
    out = {"stdout": {}}
    model = ["--model", str(small_model["model"])]
    _cli("ingest", "X.npy", "--labels", "y.npy", "-o", "ingested.zarr", "--config", cfg, cwd=tmp)
    shared = ["--scheduler", local_client.scheduler.address]
    for name, method, extra, where in (("threshold", "threshold", [], ["--workers", "2"]),
                                       ("gcn", "gcn", model, shared), ("infomap", "infomap", [], shared),
                                       ("infomap-model", "infomap", model, shared)):
        run = tmp / f"{name}.zarr"
        shutil.copytree(tmp / "ingested.zarr", run)
        out["stdout"][name] = _cli("cluster", str(run), "--method", method, *extra, "--config", cfg, *where, cwd=tmp)
        out[name] = facecluster.open_run(run)
    out["X.npy"] = tmp / "X.npy"
    return out


def test_train_writes_a_model(small_model):
    d = Path(small_model["model"])
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "edges.pt", "gcnd.pt", "gcns.pt"]
    meta = json.loads((d / "config.json").read_text())
    assert meta["dim"] == 32 and meta["knn"]["k"] == 20 and meta["hidden"] == [16, 8]


def test_threshold_numpy_array_matches_the_cli(small_model, cli_runs):
    """NumPy array in, the API's own LocalCluster (as the CLI starts): the CLI's labels."""
    X, y = small_model["test"]
    fc = facecluster.FaceClusterer(method="threshold", config=small_model["config"])
    labels = fc.fit_predict(X)
    expected = cli_runs["threshold"].labels
    assert labels.dtype == np.int64 and labels.shape == (len(X),)
    np.testing.assert_array_equal(labels, expected)
    assert fc.scores_ is None  # the threshold method stores no per-face score
    assert fc.run_.url.endswith("run.zarr") and fc.summary_["n_clusters"] == len(np.unique(expected))
    assert facecluster.open_run(fc.run_.url).labels.tolist() == labels.tolist()


def test_infomap_without_and_with_a_model_matches_the_cli(small_model, cli_runs, local_client):
    """``--method infomap`` needs no model (cosine, automatic min_sim) and takes one (its edge probabilities);
    the CLI prints the largest component; ``FaceClusterer(method="infomap")`` gives the CLI's labels."""
    X, y = small_model["test"]
    for name, model in (("infomap", None), ("infomap-model", small_model["model"])):
        line = cli_runs["stdout"][name].strip()
        weights = "P(same identity)" if model else "cosine"
        assert line.startswith(f"infomap on {weights} >= ") and "largest component" in line, line
        fc = facecluster.FaceClusterer(method="infomap", model=model, config=small_model["config"], client=local_client)
        np.testing.assert_array_equal(fc.fit_predict(X), cli_runs[name].labels)
        assert fc.scores_ is None and fc.summary_["weights"] == ("learned" if model else "cosine")
        assert f"largest component {fc.summary_['largest_component']} faces" in line
        assert fc.run_.evaluate(y)["pairwise_f"] > 0.3
    assert not np.array_equal(cli_runs["infomap"].labels, cli_runs["infomap-model"].labels)


def test_learned_numpy_array_with_a_client_matches_the_cli(small_model, cli_runs, local_client):
    X, _ = small_model["test"]
    fc = facecluster.FaceClusterer(model=small_model["model"], config=small_model["config"], client=local_client)
    labels = fc.fit_predict(X)
    cli = cli_runs["gcn"]
    np.testing.assert_array_equal(labels, cli.labels)
    np.testing.assert_array_equal(fc.scores_, cli.scores)  # NaN where no proposal claimed the face, in both
    assert fc.scores_.dtype == np.float32 and np.nanmax(fc.scores_) <= 1.0 and np.isfinite(fc.scores_).any()
    stages = set(fc.summary_["stages"])
    assert {"knn", "edges", "communities", "proposals", "score", "dedup"} <= stages
    # the graph feeds the super-vertex proposals, which a model whose output is its communities does not need
    source = json.loads((Path(small_model["model"]) / "config.json").read_text())["output"]["source"]
    assert ("graph" in stages) == (source == "proposals")
    assert set(fc.run_.stages()) >= {"ingest", "knn", "score", "dedup"}


def test_learned_dask_array_matches_the_cli(small_model, cli_runs, local_client):
    import dask.array as da

    X, y = small_model["test"]
    dX = da.from_array(X, chunks=(500, X.shape[1])) * 1.0  # a graph, computed block by block
    fc = facecluster.FaceClusterer(model=small_model["model"], method="gcn", config=small_model["config"],
                                   client=local_client)
    np.testing.assert_array_equal(fc.fit_predict(dX, y), cli_runs["gcn"].labels)
    m = fc.run_.evaluate()  # y was stored with the run
    assert m == cli_runs["gcn"].evaluate(y) and m["pairwise_f"] > 0.5


def test_path_and_zarr_inputs_and_a_named_store(small_model, cli_runs, local_client, tmp_path):
    import zarr

    X, y = small_model["test"]
    expected = cli_runs["threshold"].labels
    kw = dict(method="threshold", config=small_model["config"], client=local_client)
    np.testing.assert_array_equal(facecluster.FaceClusterer(**kw).fit_predict(cli_runs["X.npy"]), expected)
    z = zarr.create_array(str(tmp_path / "feats.zarr"), shape=X.shape, chunks=(300, X.shape[1]), dtype=X.dtype)
    z[:] = X
    named = tmp_path / "named.zarr"
    fc = facecluster.FaceClusterer(store=named, **kw).fit(zarr.open_array(str(tmp_path / "feats.zarr"), mode="r"), y)
    np.testing.assert_array_equal(fc.labels_, expected)
    run = facecluster.open_run(named)  # the named store stays
    np.testing.assert_array_equal(run.labels, expected)
    assert run.n_faces == len(X) and run.evaluate()["n"] == len(X)


def test_dropped_rows_are_labelled_minus_one(small_model, local_client):
    X, _ = small_model["test"]
    X = X[:400].copy()
    X[7] = np.nan
    with pytest.raises(ValueError, match=r"X: row 7 contains NaN.*drop_invalid"):
        facecluster.FaceClusterer(method="threshold", client=local_client).fit(X)
    fc = facecluster.FaceClusterer(method="threshold", client=local_client, k=10,
                                   config={"ingest": {"drop_invalid": True}}).fit(X)
    assert fc.labels_.shape == (400,) and fc.labels_[7] == -1 and (np.delete(fc.labels_, 7) >= 0).all()


@pytest.mark.parametrize("kwargs, X, match", [
    (dict(method="nope"), None, r"method='nope': choose one of gcn, infomap, learned, threshold"),
    (dict(method="threshold", min_sim=0.5), None, r"min_sim is a parameter of method='infomap', not of method='threshold'"),
    (dict(method="infomap", min_sim=1.5), None, r"--min-sim 1.5 is not a cosine similarity"),
    (dict(model="no/such/model"), None, r"no such model directory"),
    (dict(method="threshold", k=0), None, r"k must be a positive integer"),
    (dict(model="no/such/model", max_size=50), None, r"no such model directory"),
    (dict(method="gcn", model=".", th=0.5), None, r"th is a parameter of method='threshold', not of method='gcn'"),
    (dict(method="threshold", config={"knn": {"kk": 3}}), None, r"knn.kk: unknown setting"),
    (dict(method="threshold"), np.zeros(10), r"X must be a 2-D array"),
    (dict(method="threshold"), np.array([["a", "b"], ["c", "d"]]), r"X has dtype <U1"),
    (dict(method="threshold"), "no/such/feats.npy", r"no/such/feats.npy"),
])
def test_bad_input_is_a_value_error_naming_it(small_model, kwargs, X, match):
    X = small_model["test"][0][:50] if X is None else X
    with pytest.raises(ValueError, match=match):
        facecluster.FaceClusterer(**kwargs).fit(X)


def test_bad_labels_model_and_run(small_model, tmp_path):
    X, y = small_model["test"]
    with pytest.raises(ValueError, match=r"labels must have exactly one entry per input row"):
        facecluster.FaceClusterer(method="threshold").fit(X, y[:-1])
    with pytest.raises(ValueError, match=r"trained on 32-d features but .* has 16-d features"):
        facecluster.FaceClusterer(model=small_model["model"]).fit(X[:, :16])
    with pytest.raises(ValueError, match=r"train needs y"):
        facecluster.train(X, None, out=tmp_path / "m")
    with pytest.raises(ValueError, match=r"cannot open the run store"):
        facecluster.open_run(tmp_path / "nothing.zarr")
    assert issubclass(BadInput, ValueError)
