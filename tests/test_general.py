"""The general model (issue 14 item 1): trained on generated worlds only, shipped in the package, used by
`facecluster cluster` and `FaceClusterer` when no model is given, on any feature dimension."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facecluster.pipeline.config import Config
from facecluster.pipeline.model_files import GENERAL_MODEL_DIGEST, GENERAL_MODEL_DIR, model_digest

TINY = {"knn": {"k": 10}, "proposals": {"preset": "fast"}, "edges": {"epochs": 1, "balance": "none"},
        "gcn": {"hidden": [8], "epochs": 1, "size_weight": [0.0], "score_batch": 64}}


def _cli(argv, capsys):
    from facecluster.pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_train_general_is_bit_for_bit(tmp_path, local_client):
    """Same recipe, same files: twice in one process (the recipe is the whole input; no real face)."""
    from facecluster.pipeline.general import GeneralRecipe, train_general

    recipe = GeneralRecipe(worlds=2, faces=240, seed=3, epochs=1)
    cfg = Config.from_dict(TINY)
    metas = [train_general(tmp_path / f"m{i}", cfg, local_client, recipe) for i in range(2)]
    assert model_digest(tmp_path / "m0") == model_digest(tmp_path / "m1")
    assert metas[0]["dim"] is None and metas[0]["spec"]["x"] == "none" and metas[0]["spec"]["weights"] == "prob"
    assert [w["params"]["dim"] for w in metas[0]["general"]["worlds"]] == [128, 32]
    text = json.dumps(metas[0])
    assert '"seconds"' not in text and "gcnd_seconds" not in text  # nothing timed goes into the files


def test_the_shipped_model_is_the_recipe_s_and_loads():
    """The committed files: their digest is the recorded one, their recipe and [gcn] settings are what
    `facecluster train --general` uses by default (so it reproduces them), they load, and they are small."""
    from facecluster.pipeline.general import GeneralRecipe, general_config
    from facecluster.pipeline.model_files import check_model, read_model_config

    assert model_digest(GENERAL_MODEL_DIR) == GENERAL_MODEL_DIGEST
    meta = read_model_config(GENERAL_MODEL_DIR)
    assert meta["general"]["recipe"] == GeneralRecipe().to_dict()
    assert meta["gcn"] == general_config(Config()).gcn.to_dict()
    assert meta["dim"] is None and meta["edges"]["floor"] is not None
    # the merge level is the recipe's choice (best mean among the levels no world loses more than 0.01 at)
    from facecluster.tasks.merge import MERGE_WORST_LOSS

    curve = meta["edges"]["merge_choice"]["curve"]
    allowed = [r for r in curve if r["worst_loss"] <= MERGE_WORST_LOSS]
    assert meta["edges"]["merge"] == meta["edges"]["merge_choice"]["level"] == \
        max(allowed, key=lambda r: r["pairwise_f"] + r["bcubed_f"])["level"]
    # the cosine floor level of `--method infomap`: the recipe's choice on its curve (best mean), above Otsu's
    from facecluster.tasks.edges import INFOMAP_LEVEL_GRID

    choice = meta["edges"]["infomap_choice"]
    assert [r["level"] for r in choice["curve"]] == [None, *INFOMAP_LEVEL_GRID]
    assert meta["edges"]["infomap_level"] == choice["level"] == \
        max(choice["curve"], key=lambda r: r["pairwise_f"] + r["bcubed_f"])["level"]
    # the levels of adapted runs ([edges] adapt): the recipe's choice on adapted out-of-fold P, as for the floor
    adapt = meta["edges"]["adapt_choice"]
    assert meta["edges"]["adapt_levels"] == adapt["levels"]
    assert adapt["levels"]["floor"] == max(adapt["floor_curve"], key=lambda r: r["pairwise_f"] + r["bcubed_f"])["floor"]
    allowed = [r for r in adapt["merge_curve"] if r["worst_loss"] <= MERGE_WORST_LOSS]
    assert adapt["levels"]["merge"] == max(allowed, key=lambda r: r["pairwise_f"] + r["bcubed_f"])["level"]
    # ... and the cut of `--method threshold` and the level of `--method infomap` for adapted runs, on their curves
    assert adapt["levels"]["cut"] == max(adapt["cut_curve"], key=lambda r: r["pairwise_f"] + r["bcubed_f"])["level"]
    assert [r["level"] for r in adapt["infomap_curve"]] == [None, *INFOMAP_LEVEL_GRID]
    assert adapt["levels"]["infomap_level"] == \
        max(adapt["infomap_curve"], key=lambda r: r["pairwise_f"] + r["bcubed_f"])["level"]
    for dim in (48, 64, 512):
        check_model(GENERAL_MODEL_DIR, dim)
    assert sum(f.stat().st_size for f in GENERAL_MODEL_DIR.iterdir()) <= 5 * 2**20


def test_cluster_without_model_uses_the_general_model_on_an_unseen_dimension(tmp_path, local_client, capsys):
    """48-d (no world of the recipe has 48 dimensions): the CLI says which model it used and the clusters
    are the built-in identities, well above the automatic threshold."""
    from facecluster.pipeline.store import RunStore
    from facecluster.tasks.metrics import evaluate
    from facecluster.tasks.synth import make_faces

    x, y = make_faces(1200, 48, seed=11)
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "l.npy", y)
    run = tmp_path / "run.zarr"
    sched = ["--scheduler", local_client.scheduler.address]
    assert _cli(["ingest", tmp_path / "f.npy", "--labels", tmp_path / "l.npy", "-o", run], capsys)[0] == 0
    code, out, err = _cli(["cluster", run, *sched], capsys)
    assert code == 0, err
    assert [ln for ln in err.splitlines() if ln.startswith("model: the general model shipped with facecluster")]
    learned = evaluate(y, RunStore.open(run).array("clusters")[:])
    code, _, err = _cli(["cluster", run, "--method", "threshold", *sched], capsys)
    assert code == 0, err
    threshold = evaluate(y, RunStore.open(run).array("clusters")[:])
    assert learned["pairwise_f"] > 0.7 and learned["bcubed_f"] > 0.7, learned
    assert learned["pairwise_f"] > threshold["pairwise_f"] and learned["bcubed_f"] > threshold["bcubed_f"]


def test_a_communities_output_runs_only_what_it_needs_and_labels_as_the_full_chain(tmp_path, local_client):
    """The general model's output is its communities: by default the chain skips the graph, the super-vertex
    proposals and the other communities floors, and its clusters equal the full chain's (``[edges] output_only =
    false``) face for face."""
    from facecluster.pipeline.run import run_cluster
    from facecluster.pipeline.stages.ingest import run_ingest
    from facecluster.pipeline.store import RunStore
    from facecluster.tasks.synth import make_faces

    x, y = make_faces(1500, 40, seed=3)
    np.save(tmp_path / "f.npy", x)
    model = str(GENERAL_MODEL_DIR)
    assert json.loads((GENERAL_MODEL_DIR / "config.json").read_text())["output"]["source"] == "communities"
    labels, stores = {}, {}
    for name, overrides in (("lean", {}), ("full", {"edges": {"output_only": False}})):
        run_ingest(tmp_path / "f.npy", tmp_path / f"{name}.zarr")
        store = stores[name] = RunStore.open(tmp_path / f"{name}.zarr")
        report = run_cluster(store, Config.from_dict(overrides), local_client, model)
        assert all(r["ran"] for r in report.values())
        labels[name] = store.array("clusters")[:]
    lean, full = stores["lean"], stores["full"]
    assert lean.record("graph") is None and full.record("graph")["complete"]
    floors = full.record("communities")["summary"]["floors"]
    assert lean.record("communities")["summary"]["floors"] == floors[:1] and len(floors) == 4
    lean_settings = lean.record("proposals")["summary"]["settings"]
    assert [s.get("source") for s in lean_settings] == ["communities"]
    assert any(s.get("source") != "communities" for s in full.record("proposals")["summary"]["settings"])
    assert lean.record("proposals")["summary"]["n_proposals"] < full.record("proposals")["summary"]["n_proposals"]
    assert len(np.unique(labels["full"])) < len(y) // 2  # clusters formed, not all singletons
    np.testing.assert_array_equal(labels["lean"], labels["full"])
    np.testing.assert_array_equal(np.isfinite(lean.array("clusters_score")[:]),
                                  np.isfinite(full.array("clusters_score")[:]))
