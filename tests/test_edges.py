"""The learned affinity: edge inputs (scale-free, symmetric, partition-invariant), the scorer, the edges and
communities stages on real stores and LocalClusters, attach, and old models without an edge scorer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facecluster.pipeline.config import Config, IngestConfig
from facecluster.pipeline.errors import BadInput
from facecluster.pipeline.store import RunStore
from facecluster.tasks.edges import (ADAPT_MIN_PER_CLASS, INPUT_NAMES, N_INPUTS, SNN_M, adapted_prob, attach,
                                     best_claimed_neighbour, calibration, edge_inputs, fit_adaptation, gather_positions,
                                     roc_auc, row_summaries, run_edge_inputs, sim_stats)
from facecluster.tasks.synth import make_faces, make_splits


def _exact_knn(x: np.ndarray, k: int):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int64), np.take_along_axis(s, idx, 1).astype(np.float32)


@pytest.fixture(scope="module")
def small_knn():
    x, labels = make_faces(600, dim=32, seed=3)
    idx, sim = _exact_knn(x, 20)
    return idx, sim, labels


# -- inputs ----------------------------------------------------------------------------------------
def test_inputs_invariant_to_the_similarity_scale(small_knn):
    """Every input reads the data on its own scale: a positive affine map of all cosines changes nothing
    (dlib's cosines sit at 0.9-1, SFace's at 0.3-0.8)."""
    idx, sim, _ = small_knn
    a, _ = run_edge_inputs(idx, sim)
    squeezed = (0.9 + 0.1 * sim.astype(np.float64)).astype(np.float32)
    b, _ = run_edge_inputs(idx, squeezed)
    assert a.shape == (len(idx), idx.shape[1], N_INPUTS) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_inputs_are_symmetric_for_mutual_edges(small_knn):
    idx, sim, _ = small_knn
    x, _ = run_edge_inputs(idx, sim)
    n, k = idx.shape
    pos = {(i, int(j)): c for i in range(n) for c, j in enumerate(idx[i])}
    mutual = [(i, j, c) for (i, j), c in pos.items() if (j, i) in pos]
    assert len(mutual) > 100
    for i, j, c in mutual[:400]:
        np.testing.assert_allclose(x[i, c], x[j, pos[(j, i)]], atol=1e-5, err_msg=f"edge {i}-{j}")


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(1, 599), block=st.integers(1, 700))
def test_inputs_do_not_depend_on_the_row_partition(small_knn, cut, block):
    """A chunk computes its rows from its own rows plus its neighbours' rows only: any split and block
    size gives the same inputs as the whole run, with the neighbours' summaries computed from their rows
    or read from the edges stage's first pass (``row_summaries`` of every row, computed once)."""
    idx, sim, _ = small_knn
    whole, stats = run_edge_inputs(idx, sim)
    summary = row_summaries(idx, sim)
    for given_summary in (False, True):
        parts = []
        for a, b in ((0, cut), (cut, len(idx))):
            uniq, pos = gather_positions(idx[a:b])
            parts.append(edge_inputs(np.arange(a, b), idx[a:b], sim[a:b], pos, sim[uniq], idx[uniq, :SNN_M], stats,
                                     nbr_summary=summary[uniq] if given_summary else None, block=block))
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_padding_gives_nan_inputs_and_shared_neighbours_count():
    # 4 faces; face 3 lists only one neighbour
    idx = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, -1, -1]])
    sim = np.array([[0.9, 0.8, 0.1], [0.9, 0.7, 0.2], [0.8, 0.7, 0.3], [0.1, -np.inf, -np.inf]], np.float32)
    x, _ = run_edge_inputs(idx, sim)
    assert np.isnan(x[3, 1:]).all() and np.isfinite(x[3, 0]).all()
    snn = x[..., INPUT_NAMES.index("snn")]
    # {0,1,2,3} vs {1,0,2,3}: all 4 shared of m + 1 = 4 slots (m = min(SNN_M, k) = 3)
    assert snn[0, 0] == pytest.approx(1.0)
    # rank of 0 in 3's list is 0; of 3 in 0's list is 2 (of k = 3)
    r = INPUT_NAMES.index("rank_min"), INPUT_NAMES.index("rank_max")
    assert x[0, 2, r[0]] == pytest.approx(0.0) and x[0, 2, r[1]] == pytest.approx(2 / 3)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 10**6), r=st.integers(1, 40_000), k=st.integers(1, 300), threads=st.integers(1, 16),
       task_entries=st.integers(1, 1 << 24))
def test_edge_task_ranges_are_whole_chunks_within_the_entry_budget(n, r, k, threads, task_entries):
    from facecluster.pipeline.stages.edges import edge_task_ranges

    ranges = edge_task_ranges(n, r, k, threads, task_entries)
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(a % r == 0 for a, _ in ranges)  # whole chunks
    per = -(-(ranges[0][1] - ranges[0][0]) // r)  # chunks per task
    assert per == 1 or per * r * k <= task_entries
    chunks = -(-n // r)
    assert len(ranges) >= min(chunks, 2 * threads)  # every thread has work where there are chunks for it


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 40), u=st.integers(1, 12), b=st.integers(1, 9))
def test_rank_by_binary_search_equals_the_full_count(data, k, u, b):
    """How many entries of a neighbour's non-increasing row exceed s, by the binary search, against counting them
    all: ties, padding (-inf, at the end of some rows), s equal to an entry, above every entry or below all."""
    from facecluster.tasks.edges import _count_above_sorted, _rows_non_increasing
    levels = st.sampled_from([-np.inf, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0])  # few values: many ties
    rows = np.array([sorted(data.draw(st.lists(levels, min_size=k, max_size=k)), reverse=True) for _ in range(u)],
                    np.float32)
    assert _rows_non_increasing(rows)
    pos = np.array(data.draw(st.lists(st.integers(0, u - 1), min_size=b * k, max_size=b * k))).reshape(b, k)
    s = np.array(data.draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.3, 0.5, 0.75, 1.0, 2.0]),
                                    min_size=b * k, max_size=b * k))).reshape(b, k)
    np.testing.assert_array_equal(_count_above_sorted(rows, pos, s), (rows[pos] > s[..., None]).sum(-1))


def test_inputs_count_ranks_in_full_where_neighbour_rows_are_not_sorted(small_knn, monkeypatch):
    """The binary search needs each neighbour row non-increasing: the check says no for a NaN or an unsorted row,
    and the full count (the path those rows take) gives the same inputs as the search on sorted rows."""
    from facecluster.tasks import edges as E
    assert not E._rows_non_increasing(np.array([[0.9, np.nan, 0.1]], np.float32))
    assert not E._rows_non_increasing(np.array([[0.9, 0.1, 0.5]], np.float32))
    idx, sim, _ = small_knn
    searched, _ = run_edge_inputs(idx, sim)
    monkeypatch.setattr(E, "_rows_non_increasing", lambda sim: False)
    counted, _ = run_edge_inputs(idx, sim)
    np.testing.assert_array_equal(searched, counted)


# -- the per-run adaptation ---------------------------------------------------------------------------
def _noisy_scorer(idx: np.ndarray, same: np.ndarray, seed: int) -> np.ndarray:
    """A scorer that is right where it is confident and noisy in between: P from the truth blurred by a
    noise independent of the inputs (what a scorer trained on other data does on a run it has not seen); the
    noise is a function of the unordered pair, so both listings of an edge get one P, as the scorer's do."""
    i = np.broadcast_to(np.arange(len(idx))[:, None], idx.shape)
    lo, hi = np.minimum(i, idx), np.maximum(i, idx)
    u = np.modf(np.abs(np.sin(12.9898 * lo + 78.233 * hi + seed)) * 43758.5453)[0]  # uniform on [0, 1)
    logit = np.where(same, 2.0, -2.0) + 9.0 * (u - 0.5)
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def test_adaptation_learns_from_the_confident_edges_and_scores_each_row_alone(small_knn):
    idx, sim, labels = small_knn
    x, _ = run_edge_inputs(idx, sim)
    ok = idx >= 0
    same = labels[np.maximum(idx, 0)] == labels[:, None]
    p = np.where(ok, _noisy_scorer(idx, same, 0), 0.0).astype(np.float32)
    ad = fit_adaptation(x[ok], p[ok])
    assert ad is not None and min(ad["pseudo_labels"]) >= ADAPT_MIN_PER_CLASS
    assert fit_adaptation(x[ok], p[ok]) == ad  # the same weights and map every time
    json.dumps(ad)  # kept in the stage's record
    q = adapted_prob(x, ad, p)
    # the run's own inputs separate its identities better than the noisy scorer they were taught by
    assert roc_auc(q[ok], same[ok]) > roc_auc(p[ok], same[ok]) + 0.02
    # mapped onto the scorer's distribution of P: a level keeps about the share of edges it kept
    for level in (0.5, 0.85, 0.95):
        assert abs(float((q[ok] >= level).mean()) - float((p[ok] >= level).mean())) < 0.01
    assert (q[~ok] == 0).all() and q.dtype == np.float32
    # each row's value depends on that row alone: any split of the rows gives the same bits
    parts = np.concatenate([adapted_prob(x[a:b], ad, p[a:b]) for a, b in ((0, 7), (7, 300), (300, len(x)))])
    np.testing.assert_array_equal(parts, q)
    # symmetric inputs, symmetric probabilities (a mutual pair)
    i, c = next((i, c) for i in range(len(idx)) for c in range(idx.shape[1]) if i in idx[idx[i, c]])
    j = idx[i, c]
    assert q[i, c] == q[j, list(idx[j]).index(i)]
    # a scorer confident about too few edges teaches nothing
    assert fit_adaptation(x[ok][:ADAPT_MIN_PER_CLASS], np.full(ADAPT_MIN_PER_CLASS, 0.95, np.float32)) is None


def test_sim_stats_and_metrics():
    idx = np.array([[1, 2], [0, -1]])
    sim = np.array([[0.5, 0.3], [0.5, -np.inf]], np.float32)
    st_ = sim_stats(idx, sim)
    assert st_.top1 == pytest.approx(0.5) and st_.last == pytest.approx(0.4)  # medians of (0.3, 0.5)
    assert st_.quantiles[0] == pytest.approx(0.3) and st_.quantiles[-1] == pytest.approx(0.5)
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    cal = calibration(np.array([0.05, 0.05, 0.95]), np.array([0, 1, 1]))
    assert cal[0]["edges"] == 2 and cal[0]["observed"] == pytest.approx(0.5) and cal[9]["predicted"] == pytest.approx(0.95)


def test_attach_to_the_most_probable_claimed_neighbour():
    idx = np.array([[1, 2], [0, 2], [0, 1], [2, 0]])
    prob = np.array([[0.9, 0.6], [0.9, 0.2], [0.1, 0.3], [0.8, 0.7]], np.float32)
    claimed = np.array([[True, False], [False, False], [False, True], [False, False]])
    target, p = best_claimed_neighbour(idx, prob, claimed)
    assert target.tolist() == [1, -1, 1, -1] and p[0] == pytest.approx(0.9)
    labels = np.array([0, 1, 2, 3])
    out = attach(labels, np.array([True, False, True, True]), target, p, 0.5)
    assert out.tolist() == [1, 1, 2, 3]  # face 2's best claimed neighbour has P 0.3 < 0.5


def assert_matches_whole_graph(idx: np.ndarray, w: np.ndarray, floor: float, labels: np.ndarray,
                               joint: bool = False) -> None:
    """``labels`` (Infomap per connected component of the kNN graph at ``floor``, or ``joint``: one run over every
    component of >= 2 faces, split by component) against one whole-graph Infomap run.

    Exactly the kernel's partition over the whole graph; close to the whole-graph run, not bit-equal: the map
    equation's index codebook is shared by all modules of a run, so a disconnected graph's optimum is not the
    union of its components' optima (solved alone, a component is split more finely), and a whole-graph run
    may even put two disconnected components in one module (the comparison splits them by component).
    """
    from facecluster.tasks.components import canonical_labels, components
    from facecluster.tasks.metrics import bcubed_f, pairwise_f
    from facecluster.tasks.peers import infomap_by_component, infomap_clusters, knn_edge_list

    n = len(idx)
    src, dst, ew = knn_edge_list(idx, w, floor)
    comp = components(n, src, dst)
    assert len(np.unique(comp)) > 5
    nodes = np.flatnonzero(np.bincount(comp)[comp] >= 2)
    mod = np.zeros(n, np.int64)
    mod[nodes] = infomap_by_component(nodes, comp[nodes], idx[nodes], w[nodes], floor, joint=joint)
    per = canonical_labels(comp * (mod.max() + 1) + mod)
    np.testing.assert_array_equal(labels, per)
    whole, other = (canonical_labels(infomap_clusters(n, src, dst, ew, seed=seed) * (comp.max() + 1) + comp)
                    for seed in (42, 1))
    # as close as 0.95 / 0.99, or as Infomap's own search is to itself under another seed (on a graph with a
    # giant component, two whole-graph runs differ by more: pairwise / BCubed F 0.966 / 0.952 on the P graph)
    assert pairwise_f(whole, per)[2] > min(0.95, pairwise_f(whole, other)[2] - 0.02)
    assert bcubed_f(whole, per)[2] > min(0.99, bcubed_f(whole, other)[2] - 0.02)
    assert abs(len(np.unique(per)) - len(np.unique(whole))) <= max(1, 0.01 * len(np.unique(whole)))


def test_infomap_by_component_against_whole_graph_and_any_grouping():
    """Per-component runs agree with one whole-graph run, and any grouping of components gives the same modules.

    Not bit-equal to the whole-graph run (see :func:`assert_matches_whole_graph`: here one 9-face
    component is one module in the whole run and two on its own). Grouping-invariance is exact:
    each component is always solved alone.
    """
    pytest.importorskip("infomap")
    from facecluster.tasks.components import canonical_labels, components
    from facecluster.tasks.peers import infomap_by_component, knn_edge_list

    x, _ = make_faces(800, dim=32, seed=11)
    idx, sim = _exact_knn(x, 10)
    floor = float(np.quantile(sim, 0.9))
    comp = components(len(x), *knn_edge_list(idx, sim, floor)[:2])
    mod = infomap_by_component(np.arange(len(x)), comp, idx, sim, floor)
    assert_matches_whole_graph(idx, sim, floor, canonical_labels(comp * (mod.max() + 1) + mod))
    # any grouping of whole components into calls gives the same modules
    odd = np.flatnonzero(comp % 2 == 1)
    even = np.flatnonzero(comp % 2 == 0)
    split = np.zeros(len(x), np.int64)
    for nodes in (odd, even):
        split[nodes] = infomap_by_component(nodes, comp[nodes], idx[nodes], sim[nodes], floor)
    assert np.array_equal(split, mod)


def test_floor_components_cut_the_forest_as_the_infomap_tasks_read_the_edges():
    """At floor 0.7, float32(0.7) = 0.69999999 is below the floor: an edge of exactly that weight joins no two
    nodes, in the plan's components as in the task's graph (which would refuse an edge leaving its nodes)."""
    from facecluster.pipeline.stages.communities import floor_components
    from facecluster.tasks.peers import infomap_by_component

    w = np.float32(0.7)
    assert float(w) < 0.7
    forest = (np.array([0, 2, 1]), np.array([1, 3, 2]), np.array([w, 0.9, 0.95], np.float32))
    np.testing.assert_array_equal(floor_components(4, forest, 0.7), [0, 1, 1, 1])
    np.testing.assert_array_equal(floor_components(4, forest, float(w)), [0, 0, 0, 0])
    # the task for component {1, 2, 3} reads node 1's list, which holds node 0 at exactly float32(0.7)
    index = np.array([[0, 2], [1, 3], [2, -1]])
    weight = np.array([[w, 0.95], [0.95, 0.9], [0.9, 0.0]], np.float32)
    modules = infomap_by_component(np.array([1, 2, 3]), np.array([1, 1, 1]), index, weight, 0.7)
    assert modules.shape == (3,)


def test_infomap_in_a_child_process_gives_the_same_modules(monkeypatch):
    """Problems from ``CHILD_LINKS`` links on run in a child process (Infomap holds the GIL: a worker
    running it in its own thread sends no heartbeats); the modules are those of the in-process run, on the
    per-component path and the one-component path alike, and a failing child is an error naming the run."""
    pytest.importorskip("infomap")
    from facecluster.tasks import peers
    from facecluster.tasks.components import components

    x, _ = make_faces(600, dim=32, seed=5)
    idx, sim = _exact_knn(x, 10)
    for floor in (float(np.quantile(sim, 0.9)), float(sim[:, 1:].min())):  # many components; one
        comp = components(len(x), *peers.knn_edge_list(idx, sim, floor)[:2])
        nodes = np.flatnonzero(np.bincount(comp)[comp] >= 2)
        here = peers.infomap_by_component(nodes, comp[nodes], idx[nodes], sim[nodes], floor)
        calls = []
        child_run = peers.run_infomap_child
        monkeypatch.setattr(peers, "CHILD_LINKS", 0)
        monkeypatch.setattr(peers, "run_infomap_child", lambda *a, **kw: calls.append(1) or child_run(*a, **kw))
        child = peers.infomap_by_component(nodes, comp[nodes], idx[nodes], sim[nodes], floor)
        monkeypatch.undo()
        assert calls and np.array_equal(here, child)
    with pytest.raises(RuntimeError, match=r"Infomap's child process on -1 nodes failed \(exit status 1\)"):
        peers.solve_links(-1, np.zeros((1, 3)), apart=True)


def test_infomap_child_dies_with_its_parent(tmp_path):
    """A worker killed mid-task leaves no Infomap process behind (Linux: the child asks the kernel for SIGKILL
    when its parent dies)."""
    pytest.importorskip("infomap")
    psutil = pytest.importorskip("psutil")
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_DEATHSIG is Linux's")
    script = tmp_path / "parent.py"
    script.write_text(
        "import numpy as np\n"
        "from facecluster.tasks.peers import solve_links\n"
        "rng = np.random.default_rng(0)\n"
        "n = 200_000\n"  # a random graph: Infomap takes over a minute on it
        "links = np.column_stack([np.repeat(np.arange(n), 10), rng.integers(0, n, 10 * n), rng.random(10 * n)])\n"
        "solve_links(n, links.astype(np.float64), apart=True)\n")
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 120
        children = []
        while not children and time.monotonic() < deadline and parent.poll() is None:
            children = [c for c in psutil.Process(parent.pid).children()
                        if "facecluster.tasks.infomap_child" in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert children, "the parent never started Infomap's child process"
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "Infomap's child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


# -- training and the stages -----------------------------------------------------------------------
def _cfg(**edges):
    return Config.from_dict({"knn": {"k": 20}, "proposals": {"preset": "fast"},
                             "gcn": {"hidden": [16, 8], "epochs": 2, "lr": 0.003, "dropout": 0.1, "score_batch": 64},
                             "edges": {"epochs": 2, **edges}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_client):
    from facecluster.pipeline.stages.ingest import run_ingest
    from facecluster.pipeline.train import train

    tmp = tmp_path_factory.mktemp("edges")
    data = make_splits(3000, dim=32, seed=7)
    for name, (feats, labels) in data.items():
        np.save(tmp / f"{name}_f.npy", feats)
        np.save(tmp / f"{name}_l.npy", labels)
    run_ingest(tmp / "train_f.npy", str(tmp / "train.zarr"), labels=tmp / "train_l.npy", cfg=IngestConfig(chunk_rows=500))
    lines = []
    meta = train(RunStore.open(str(tmp / "train.zarr")), tmp / "model", _cfg(), local_client, echo=lines.append)
    return {"tmp": tmp, "meta": meta, "lines": lines, "model": tmp / "model"}


def _test_run(trained, name: str, chunk_rows: int) -> RunStore:
    from facecluster.pipeline.stages.ingest import run_ingest

    tmp = trained["tmp"]
    run_ingest(tmp / "test_f.npy", str(tmp / f"{name}.zarr"), labels=tmp / "test_l.npy", cfg=IngestConfig(chunk_rows=chunk_rows))
    return RunStore.open(str(tmp / f"{name}.zarr"))


def test_training_writes_the_edge_scorer_with_validated_levels(trained):
    from facecluster.pipeline.model_files import edge_meta, load_edge_scorer

    meta, d = trained["meta"], trained["model"]
    e = meta["edges"]
    assert (d / "edges.pt").exists() and edge_meta(d)["floor"] == e["floor"]
    assert e["floor"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
    # [edges] balance = "auto": both loss weightings ran out of fold and the better-scoring one was kept
    scores = e["metrics"]["balance_scores"]
    assert set(scores) == {"none", "face"} and e["balance"] == max(scores, key=scores.get)
    assert scores[e["balance"]] == e["metrics"]["levels"]["score"]
    curve = e["metrics"]["levels"]["floor_curve"]
    best = max(curve, key=lambda r: r["pairwise_f"] + r["bcubed_f"])
    assert best["floor"] == e["floor"]  # the floor is the validation optimum, not a constant
    # the merge level: the best of the merge curve among the levels that cost the run at most MERGE_WORST_LOSS
    from facecluster.tasks.merge import MERGE_GRID, MERGE_WORST_LOSS

    merges = e["metrics"]["levels"]["merge_curve"]
    assert [r["level"] for r in merges] == list(MERGE_GRID) and e["merge"] in MERGE_GRID
    allowed = [r for r in merges if r["worst_loss"] <= MERGE_WORST_LOSS]
    assert e["merge"] == max(allowed, key=lambda r: r["pairwise_f"] + r["bcubed_f"] - 1e-9 * (r["level"] is not None))["level"]
    # the scorer separates same-identity edges better than the cosine it starts from, on unseen identities
    assert e["metrics"]["val_auc"] > 0.9 and e["metrics"]["val_auc"] >= e["metrics"]["val_auc_cosine"] - 0.01
    assert meta["spec"]["weights"] == "both"
    # the training run's edges are out-of-fold: communities, proposals and GCN-D see test-like probabilities
    rec = RunStore.open(str(trained["tmp"] / "train.zarr")).record("edges")
    assert rec["params"]["out_of_fold"] is True and rec["params"]["folds"] == 2
    assert 0.75 < e["metrics"]["out_of_fold_auc"] <= 1 and len(e["metrics"]["out_of_fold_calibration"]) == 10
    load_edge_scorer(d)
    assert any(line.startswith("edge scorer: validation ROC-AUC") for line in trained["lines"])


def test_cluster_chain_is_invariant_to_chunk_size_and_workers(trained, local_client, single_worker_client):
    """knn -> edges -> communities -> ... -> dedup + attach: identical outputs for 2 workers / 500-row chunks and
    1 worker / 1,300-row chunks."""
    from facecluster.pipeline.run import run_cluster
    from facecluster.tasks.metrics import pairwise_f

    cfg = _cfg()
    a = _test_run(trained, "test_a", 500)
    b = _test_run(trained, "test_b", 1300)
    echo = []
    run_cluster(a, cfg, local_client, str(trained["model"]), echo=echo.append)
    run_cluster(b, cfg, single_worker_client, str(trained["model"]), echo=lambda s: None)
    assert [line.split()[0] for line in echo] == ["knn", "edges", "communities", "graph", "proposals", "score", "dedup"]
    for name in ("edges/prob", "communities/labels", "proposals/members", "score/iou", "clusters"):
        np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)
    prob = a.array("edges/prob")[:]
    assert prob.shape == a.array("knn/index").shape and prob.min() >= 0 and prob.max() <= 1
    # the first pass's per-row arrays: each row's summary and first ids, as the kernel computes them whole
    index = a.array("knn/index")[:]
    np.testing.assert_array_equal(a.array("edges/row_summary")[:], row_summaries(index, a.array("knn/sim")[:]))
    np.testing.assert_array_equal(a.array("edges/first_ids")[:], index[:, :SNN_M])
    summary = a.record("dedup")["summary"]
    assert summary["attach_level"] == trained["meta"]["edges"]["attach"]
    floors = a.record("communities")["summary"]["floors"]
    assert floors[0] == trained["meta"]["edges"]["floor"] and {0.5, 0.7, 0.85, 0.95} <= set(floors)
    assert a.array("communities/labels").shape == (a.array("features").shape[0], len(floors))
    settings = a.record("proposals")["summary"]["settings"]
    comm = [s for s in settings if s.get("source") == "communities"]
    assert [s["floor"] for s in comm] == floors and sum(s["proposals"] for s in comm) > 0
    assert settings[:len(comm)] == comm  # first: a member set a super-vertex setting also made counts as a community
    gt = a.array("labels")[:]
    assert pairwise_f(gt, a.array("clusters")[:])[2] > 0.5
    # a second run skips every stage
    echo.clear()
    run_cluster(a, cfg, local_client, str(trained["model"]), echo=echo.append)
    assert all("skipped" in line for line in echo)


def test_adapted_edges_stage_equals_the_kernel_for_any_chunks_and_workers(trained, local_client, single_worker_client):
    """[edges] adapt with the general model (confident where a small trained one is not): the stage fits the
    run's adaptation on its scale sample and writes the adapted P; the same bits for 2 workers / 500-row chunks
    and 1 worker / 1,300-row chunks, and as the kernels give in memory; skipped where no edge is confident."""
    import torch

    from facecluster.pipeline.model_files import GENERAL_MODEL_DIR, load_edge_scorer
    from facecluster.pipeline.stages.edges import run_edges
    from facecluster.pipeline.stages.knn import run_knn
    from facecluster.tasks.edges import predict_edges

    general = str(GENERAL_MODEL_DIR)
    cfg = Config.from_dict(_cfg().to_dict(), {"edges.adapt": True})
    a, b = _test_run(trained, "adapt_a", 500), _test_run(trained, "adapt_b", 1300)
    c = _test_run(trained, "adapt_c", 200)  # one worker, 200-row chunks: second-pass tasks of several chunks
    for store, client in ((a, local_client), (b, single_worker_client), (c, single_worker_client)):
        run_knn(store, cfg, client)
        run_edges(store, general, cfg, client)
    np.testing.assert_array_equal(a.array("edges/prob")[:], b.array("edges/prob")[:])
    np.testing.assert_array_equal(a.array("edges/prob")[:], c.array("edges/prob")[:])
    assert c.record("edges")["summary"]["tasks"] < -(-c.array("knn/index").shape[0] // 200)
    ad = a.record("edges")["summary"]["adaptation"]
    assert ad is not None and ad == b.record("edges")["summary"]["adaptation"]
    assert a.record("edges")["params"]["adapt"] is True
    idx, sim = a.array("knn/index")[:], a.array("knn/sim")[:]
    x, _ = run_edge_inputs(idx, sim)
    ok = idx >= 0
    torch.set_num_threads(1)
    p = predict_edges(load_edge_scorer(general)[0], x)
    assert fit_adaptation(x[ok], p[ok]) == ad
    np.testing.assert_array_equal(a.array("edges/prob")[:], adapted_prob(x, ad, p))
    assert not np.array_equal(a.array("edges/prob")[:], p)
    # by default ("auto") the general model, which records adapt_levels, adapts: the same stage, up to date
    assert run_edges(a, general, _cfg(), local_client)["adaptation"] == ad
    assert a.record("edges")["params"]["adapt"] is True
    # turned off: the scorer's own P, and the stage's parameters as before the option (no "adapt" key)
    run_edges(a, general, Config.from_dict(_cfg().to_dict(), {"edges.adapt": False}), local_client)
    assert "adapt" not in a.record("edges")["params"] and "adaptation" not in a.record("edges")["summary"]
    np.testing.assert_array_equal(a.array("edges/prob")[:], p)
    # "auto" with a model that records no adapt_levels (one trained on labels, as here): not adapted
    run_edges(b, str(trained["model"]), _cfg(), single_worker_client)
    assert "adapt" not in b.record("edges")["params"] and "adaptation" not in b.record("edges")["summary"]
    # a scorer confident about no edge (the small model trained here): asked for, skipped, its own P; the
    # stage's line says which
    from facecluster.pipeline.run import run_stages

    lines = []
    for store, model in ((b, str(trained["model"])), (a, general)):
        run_stages(store, cfg, local_client, {"edges": lambda st, c, cl, force=False: run_edges(st, model, c, cl, force=force)},
                   echo=lines.append, force=True)
    assert b.record("edges")["summary"]["adaptation"] is None
    assert "too few confident edges" in lines[0] and "P adapted to this run: fitted on" in lines[1]
    # the levels a run takes: for an adapted run those the model chose on adapted P, its own for a level it did not
    # record there (a model from before 0.7: no cut, no infomap level) and for a run not adapted
    from facecluster.pipeline.stages.edges import LEVEL_KEYS, run_levels

    meta = {"floor": 0.85, "merge": 0.85, "attach": None, "cut": 0.98, "infomap_level": 0.925,
            "adapt_levels": {"floor": 0.8, "merge": 0.7, "attach": 0.9, "cut": 0.95}}
    assert run_levels(meta, a) == {"floor": 0.8, "merge": 0.7, "attach": 0.9, "cut": 0.95, "infomap_level": 0.925}
    assert run_levels(meta, b) == {key: meta[key] for key in LEVEL_KEYS}


def test_model_without_edge_scorer_runs_the_old_chain_with_a_note(trained, local_client, tmp_path):
    """A model directory from before 0.2 (no edges.pt, no edges table, spec without weights) loads and runs
    knn -> graph -> proposals -> score -> dedup, and says once that re-training adds the learned affinity."""
    from facecluster.pipeline.run import run_cluster
    from facecluster.pipeline.train import train

    d = tmp_path / "old"
    old_cfg = _cfg(learn=False)  # trained as before 0.2: no edge scorer, GCN-D on cosines
    train(RunStore.open(str(trained["tmp"] / "train.zarr")), d, old_cfg, local_client, echo=lambda s: None)
    assert not (d / "edges.pt").exists()
    meta = json.loads((d / "config.json").read_text())
    assert "edges" not in meta
    del meta["spec"]["weights"]  # a 0.1.x config.json has no such key
    (d / "config.json").write_text(json.dumps(meta))
    store = _test_run(trained, "test_old", 500)
    echo = []
    run_cluster(store, _cfg(), local_client, str(d), echo=echo.append)
    notes = [line for line in echo if "no edge scorer" in line]
    assert len(notes) == 1 and "\n" not in notes[0] and "re-train" in notes[0]
    assert [line.split()[0] for line in echo if line not in notes] == ["knn", "graph", "proposals", "score", "dedup"]
    assert not store.has("edges/prob") and store.array("clusters").shape == (store.array("features").shape[0],)


def test_broken_edge_scorer_is_one_line_bad_input(trained, tmp_path):
    from facecluster.pipeline.model_files import load_edge_scorer

    d = tmp_path / "broken"
    shutil.copytree(trained["model"], d)
    (d / "edges.pt").write_bytes(b"not a torch file")
    with pytest.raises(BadInput) as e:
        load_edge_scorer(d)
    assert "\n" not in str(e.value) and "edges.pt" in str(e.value) and "re-train" in str(e.value)
    # the CLI refuses it before any stage runs (no kNN in the run store afterwards)
    import subprocess
    import sys
    from pathlib import Path

    from facecluster.pipeline.stages.ingest import run_ingest

    run_ingest(trained["tmp"] / "test_f.npy", str(tmp_path / "r.zarr"))
    exe = str(Path(sys.executable).parent / "facecluster")
    r = subprocess.run([exe, "cluster", str(tmp_path / "r.zarr"), "--model", str(d)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "edges.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not RunStore.open(str(tmp_path / "r.zarr"), mode="r").is_complete("knn")
    (d / "edges.pt").unlink()
    with pytest.raises(BadInput, match="edges.pt is missing"):
        load_edge_scorer(d)


def test_communities_output_keeps_every_community_and_attaches(trained, local_client, tmp_path):
    """A model whose validation chose its communities as output: each community of >= 2 faces at the
    model's floor is one cluster, and only faces the communities left alone move (attach)."""
    from facecluster.pipeline.run import run_cluster

    d = tmp_path / "comm"
    shutil.copytree(trained["model"], d)
    meta = json.loads((d / "config.json").read_text())
    assert meta["output"]["source"] in ("proposals", "communities")
    meta["output"]["source"] = "communities"
    meta["edges"]["attach"] = 0.5
    meta["edges"]["merge"] = None  # the merge step has its own test
    (d / "config.json").write_text(json.dumps(meta))
    store = _test_run(trained, "test_comm", 700)
    run_cluster(store, _cfg(), local_client, str(d), echo=lambda s: None)
    comm = store.array("communities/labels")[:, 0]
    clusters = store.array("clusters")[:]
    sizes = np.bincount(comm)
    for c in np.flatnonzero(sizes >= 2):
        assert len(np.unique(clusters[comm == c])) == 1
    multi = sizes[comm] >= 2  # faces of a community: never merged with another community
    assert len(np.unique(clusters[multi])) == int((sizes >= 2).sum())
    summary = store.record("dedup")["summary"]
    assert summary["source"] == "communities" and summary["attach_level"] == 0.5
    moved = int((~multi).sum()) - int((np.bincount(clusters)[clusters[~multi]] == 1).sum())
    assert summary["attached"] == moved


def test_merge_step_on_the_cluster_chain_equals_the_kernel_for_any_chunks_and_workers(trained, local_client,
                                                                                   single_worker_client, tmp_path):
    """A model whose output is its communities, merged at its level: the clusters the dedup stage writes (one
    task per chunk of kNN rows, rounds on the driver) equal the in-memory kernel on the whole kNN lists, for 2
    workers / 500-row chunks and 1 worker / 1,300-row chunks; whole communities move, never a part."""
    from facecluster.pipeline.run import run_cluster
    from facecluster.tasks.components import canonical_labels
    from facecluster.tasks.merge import merge_by_affinity

    d = tmp_path / "merge"
    shutil.copytree(trained["model"], d)
    meta = json.loads((d / "config.json").read_text())
    meta["output"]["source"] = "communities"
    meta["edges"].update(merge=0.3, attach=None)  # 12 of 91 communities merge at 0.3 here
    (d / "config.json").write_text(json.dumps(meta))
    a, b = _test_run(trained, "merge_a", 500), _test_run(trained, "merge_b", 1300)
    run_cluster(a, _cfg(), local_client, str(d), echo=lambda s: None)
    run_cluster(b, _cfg(), single_worker_client, str(d), echo=lambda s: None)
    clusters = a.array("clusters")[:]
    np.testing.assert_array_equal(clusters, b.array("clusters")[:])
    comm = a.array("communities/labels")[:, 0]
    expected = merge_by_affinity(a.array("knn/index")[:], a.array("edges/prob")[:], comm, 0.3)
    np.testing.assert_array_equal(clusters, expected)
    summary = a.record("dedup")["summary"]
    assert summary["merge_level"] == 0.3 and summary["merges"] > 0 and summary["rounds"] >= 1
    assert summary["n_clusters"] == len(np.unique(comm)) - summary["merges"]
    for c in np.unique(comm):
        assert len(np.unique(clusters[comm == c])) == 1
    # the level in the model's config.json is the one used: without it, no merge (and the stage reruns)
    meta["edges"]["merge"] = None
    (d / "config.json").write_text(json.dumps(meta))
    run_cluster(a, _cfg(), local_client, str(d), echo=lambda s: None)
    np.testing.assert_array_equal(a.array("clusters")[:], canonical_labels(comm))
    assert "merge_level" in a.record("dedup")["summary"] and a.record("dedup")["summary"]["merge_level"] is None


def test_edge_scorer_folds_are_stratified_by_identity_size():
    """Whole identities per fold, and the identities ranked by size alternate between the folds (random folds
    once put LFW's largest identities all in one fold, and the other fold's scorer under-rated them)."""
    from facecluster.pipeline.train import size_stratified_folds

    rng = np.random.default_rng(0)
    sizes = np.concatenate([[530, 236, 121, 109], rng.integers(1, 20, 300)])
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    for seed in range(5):
        fold = size_stratified_folds(labels, 2, seed)
        for g in range(len(sizes)):
            assert len(np.unique(fold[labels == g])) == 1  # an identity is never split
        ranked = np.argsort(-sizes, kind="stable")[:4]
        assert [int(fold[labels == g][0]) for g in ranked] == [0, 1, 0, 1]
        big = np.isin(labels, np.flatnonzero(sizes >= 100))
        share = [big[fold == f].sum() / big.sum() for f in (0, 1)]
        assert min(share) > 0.3  # 236 + 109 of 996 faces in identities >= 100 (random folds: as low as 0)
    assert not np.array_equal(size_stratified_folds(labels, 2, 0), size_stratified_folds(labels, 2, 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=2, max_size=30), st.integers(2, 9), st.integers(0, 2**16))
def test_face_balanced_weights_give_every_face_the_same_genuine_weight(sizes, k, seed):
    """Oracle: per face, the weights of its same-identity edges sum to one common value; other-identity edges all
    weigh the same; padding weighs 0; the valid edges' mean weight is 1."""
    from facecluster.tasks.edges import face_balanced_weights

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n = len(labels)
    index = rng.integers(-1, n, size=(n, k))  # random lists, with padding
    valid = (index >= 0).reshape(-1)
    src = np.repeat(np.arange(n), k)
    same = (labels[src] == labels[np.maximum(index.reshape(-1), 0)]) & valid
    w = face_balanced_weights(src, same, valid)
    assert np.all(w[~valid] == 0)
    assert not valid.any() or np.isclose(w[valid].mean(), 1.0, rtol=1e-5)  # all padding (a drawn case): no mean
    totals = [w[same & (src == i)].sum() for i in range(n) if (same & (src == i)).any()]
    assert not totals or np.allclose(totals, totals[0], rtol=1e-5)
    other = valid & ~same
    if other.any():
        assert np.allclose(w[other], w[other][0], rtol=1e-6)


def test_face_balanced_scorer_rates_small_identities_higher():
    """The balanced loss exists for the lone edges of small identities (a plain loss is ruled by the large
    ones' edges): trained on the same edges, the balanced scorer's mean P on two-face identities' genuine
    edges is higher than the plain scorer's."""
    from facecluster.tasks.edges import face_balanced_weights, fit_edge_scorer, predict_edges

    rng = np.random.default_rng(0)
    sizes = np.concatenate([np.full(12, 60), np.full(150, 2), np.ones(300, np.int64)])
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.normal(size=(len(sizes), 32))
    x = centres[labels] + rng.normal(scale=0.9, size=(len(labels), 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    idx, sim = _exact_knn(x, 20)
    inputs, _ = run_edge_inputs(idx, sim)
    flat = inputs.reshape(-1, N_INPUTS)
    src = np.repeat(np.arange(len(labels)), 20)
    same = labels[src] == labels[idx.reshape(-1)]
    valid = np.ones(len(src), bool)
    edges = np.arange(len(src))
    pair = same & (np.bincount(labels)[labels[src]] == 2)
    fits = {}
    for name, w in (("plain", None), ("balanced", face_balanced_weights(src, same, valid))):
        model, _ = fit_edge_scorer(flat, same, edges, edges[:0], epochs=4, seed=0, weight=w)
        fits[name] = predict_edges(model, flat)[pair].mean()
    assert fits["balanced"] > fits["plain"] + 0.02, fits


def test_infomap_method_on_cosine_and_learned_graphs(trained, local_client, single_worker_client, tmp_path):
    """``--method infomap`` (stage "clusters"): cosine at the automatic min_sim, and P at the model's floor.

    Its batches of whole components, one Infomap run each, give the kernel's partition of the whole stored
    graph, close to one whole-graph Infomap run; identical labels for 2 workers / 500-row chunks and 1 worker /
    1,300-row chunks; a second run is skipped (resumable, digest-checked).
    """
    from facecluster.pipeline.methods import run_method
    from facecluster.pipeline.model_files import GENERAL_MODEL_DIR, model_digest
    from facecluster.pipeline.stages.graph import anchor_task
    from facecluster.pipeline.stages.infomap import model_infomap_level, resolve_min_sim
    from facecluster.tasks.baselines import auto_min_sim, prob_level_min_sim, valid_sims
    from facecluster.tasks.edges import edge_pairs

    cfg = _cfg()
    model = str(trained["model"])
    a = _test_run(trained, "im_a", 500)
    b = _test_run(trained, "im_b", 1300)
    cos_a = run_method(a, cfg, local_client, "infomap", {}, echo=lambda s: None)
    labels_a = a.array("clusters")[:]
    cos_b = run_method(b, cfg, single_worker_client, "infomap", {}, echo=lambda s: None)
    np.testing.assert_array_equal(labels_a, b.array("clusters")[:])
    assert cos_a == cos_b and cos_a["weights"] == "cosine" and cos_a["forest"] == "graph"
    # min_sim from the data: the cosine where the general model's P crosses its recorded level (every row is
    # in the sample at this size), the edges stage run with the general model and chained by the clusters
    idx, sim = a.array("knn/index")[:], a.array("knn/sim")[:]
    level = model_infomap_level(str(GENERAL_MODEL_DIR))
    assert level is not None and a.record("edges")["params"]["model_digest"] == model_digest(GENERAL_MODEL_DIR)
    expect, count = prob_level_min_sim(*edge_pairs(idx, sim, a.array("edges/prob")[:]), level)
    assert cos_a["min_sim"] == expect and cos_a["min_sim_info"]["rule"] == "prob_level"
    assert cos_a["min_sim_info"]["band_edges"] == count and "edges" in a.record("clusters")["inputs"]
    # without that level: the automatic rule on the Otsu anchor, the one `bench quality` reports; with a level no
    # sampled edge is near: the same, and the reason
    anchor = anchor_task(a.url)["anchor"]
    otsu = auto_min_sim(anchor, valid_sims(sim, idx))
    assert resolve_min_sim(a, "knn/sim", None, None) == (otsu, {"source": "auto: the 'otsu' rule on the kNN similarities",
                                                                 "rule": "otsu", "anchor": anchor})
    far = tmp_path / "far-level"
    shutil.copytree(GENERAL_MODEL_DIR, far)
    meta = json.loads((far / "config.json").read_text())
    meta["edges"]["infomap_level"] = 5.0
    (far / "config.json").write_text(json.dumps(meta))
    value, info = resolve_min_sim(a, "knn/sim", None, None, level_model=str(far))
    assert value == otsu and info["rule"] == "otsu" and "only 0 sampled kNN edges" in info["source"]
    # an explicit min_sim: the cosine graph alone (no edges stage needed), Otsu never consulted
    explicit = run_method(b, cfg, single_worker_client, "infomap", {"min_sim": otsu}, echo=lambda s: None)
    assert explicit["min_sim"] == otsu and explicit["min_sim_info"] == {"source": "explicit"}
    assert b.record("clusters")["inputs"] == ["graph"]
    assert cos_a["largest_component"] >= cos_a["largest"] and cos_a["n_clusters"] == len(np.unique(labels_a))
    assert_matches_whole_graph(idx, sim, cos_a["min_sim"], labels_a, joint=True)
    # resumable: the second run skips the stage
    finished = a.record("clusters")["finished"]
    run_method(a, cfg, local_client, "infomap", {}, echo=lambda s: None)
    assert a.record("clusters")["finished"] == finished
    # the learned affinity: P at the model's floor
    learned = run_method(a, cfg, local_client, "infomap", {"model": model}, echo=lambda s: None)
    assert learned["weights"] == "learned" and learned["min_sim"] == trained["meta"]["edges"]["floor"]
    learned_a = a.array("clusters")[:]
    run_method(b, cfg, single_worker_client, "infomap", {"model": model}, echo=lambda s: None)
    np.testing.assert_array_equal(learned_a, b.array("clusters")[:])
    assert not np.array_equal(learned_a, labels_a)
    assert_matches_whole_graph(idx, a.array("edges/prob")[:], learned["min_sim"], learned_a, joint=True)


def test_infomap_level_is_read_where_p_crosses_it_and_chosen_by_the_mean_f(small_knn):
    """:func:`choose_infomap_level_over`: level None is Otsu's anchor of the cosines (what a run falls back to);
    each level's floor is the median cosine of the edges whose P is near it (:func:`infomap_min_sim`), which for
    a P that is a logistic function of the cosine lies where that function crosses the level; the chosen level
    has the curve's best mean pairwise + BCubed F."""
    from facecluster.tasks.baselines import PROB_BAND, valid_sims
    from facecluster.tasks.edges import INFOMAP_LEVEL_GRID, choose_infomap_level_over, infomap_min_sim
    from facecluster.tasks.thresholds import auto_threshold

    idx, sim, labels = small_knn
    x2, labels2 = make_faces(500, dim=24, seed=4)
    idx2, sim2 = _exact_knn(x2, 20)
    runs, centres = [], []
    for i, s_, lab in ((idx, sim, labels), (idx2, sim2, labels2)):
        centre = float(np.median(s_))
        runs.append((i, s_, 1 / (1 + np.exp(-(s_.astype(np.float64) - centre) / 0.02)), lab))
        centres.append(centre)
    out = choose_infomap_level_over(runs)
    curve = out["curve"]
    assert [r["level"] for r in curve] == [None, *INFOMAP_LEVEL_GRID]
    assert curve[0]["min_sims"] == [round(float(auto_threshold(valid_sims(s_, i))), 6) for i, s_, _, _ in runs]
    for row in curve[1:]:
        lv = row["level"]
        assert row["min_sims"] == [infomap_min_sim(*r[:3], lv)[0] for r in runs]
        if lv + PROB_BAND < 0.96:  # higher, the band takes in every P up to 1 and the median moves up with it
            for t, c in zip(row["min_sims"], centres):
                assert abs(t - (c + 0.02 * np.log(lv / (1 - lv)))) < 0.015, (lv, t, c)
    for r in range(len(runs)):  # P monotone in the cosine: the floor rises with the level
        assert np.all(np.diff([row["min_sims"][r] for row in curve[1:]]) >= 0)
    best = max(curve, key=lambda r: r["pairwise_f"] + r["bcubed_f"])
    assert out["level"] == best["level"] and out["score"] == pytest.approx(best["pairwise_f"] + best["bcubed_f"])
    # no edge near the level: Otsu's anchor, and the count says why
    t, info = infomap_min_sim(idx, sim, np.zeros(sim.shape), 0.9)
    assert info == {"rule": "otsu", "level": 0.9, "band_edges": 0} and t == curve[0]["min_sims"][0]


def test_infomap_batches_of_components_do_not_depend_on_the_workers(trained, local_client):
    """The components are batched by a fixed node budget in component order: the packing and so the labels
    never depend on the worker count; per component (the communities stage), any packing gives the same."""
    from facecluster.pipeline.stages.communities import infomap_components
    from facecluster.pipeline.stages.graph import read_forest

    store = RunStore.open(str(trained["tmp"] / "im_a.zarr"))
    n = store.array("knn/index").shape[0]
    floor = store.record("graph")["summary"]["anchor"]["anchor"]
    forest = read_forest(store)
    def run(floors=(floor,), **kw):
        with store.stage("infomap-test", {"kw": kw, "floors": list(floors)}, inputs=["graph"], force=True) as w:
            return infomap_components(local_client, w, n, forest, list(floors), "knn/sim", "t", **kw)

    (alone_a, sa), = run(budget=60)
    (alone_b, sb), = run(budget=5000)
    assert sa["tasks"] > sb["tasks"] == 1
    np.testing.assert_array_equal(alone_a, alone_b)
    (joint_a, ja), = run(budget=60, joint=True)
    (joint_b, jb), = run(budget=60, joint=True)
    np.testing.assert_array_equal(joint_a, joint_b)
    assert ja == jb and ja["tasks"] == sa["tasks"]
    # the pass that regroups the kNN rows by task: one range of rows per chunk gives each task the rows one range
    # for the whole store gives, in the same order (a joint run's modules depend on the order of its nodes)
    assert n > 2 * store.array("knn/index").chunks[0]
    (alone_c, _), = run(budget=60, gather_entries=1)
    np.testing.assert_array_equal(alone_a, alone_c)
    (joint_c, jc), = run(budget=60, joint=True, gather_entries=1)
    np.testing.assert_array_equal(joint_a, joint_c)
    assert jc == ja
    # no edge at the floor: every face its own community, no task and no scratch left behind
    (none, sn), = run([1.5])
    np.testing.assert_array_equal(none, np.arange(n))
    assert sn["tasks"] == 0 and sn["communities"] == n
    # several floors: a task holds whole components of the lowest floor and runs every floor on them (one read of
    # its rows); each floor's labels and stats are those of that floor run alone, in any order of the floors
    floors = [floor + 0.04, floor, floor + 0.08]
    together = run(floors, budget=60)
    assert len({st["components"] for _, st in together}) == 3  # three different graphs
    # a group of one component larger than the budget runs one task per floor (its floors in one task were the
    # stage's serial tail), the others one task for every floor
    assert together[1][1]["largest_component"] > 60 and together[1][1]["tasks"] > sa["tasks"]
    for f, (labels, stats) in zip(floors, together):
        (alone, alone_stats), = run([f], budget=60)
        np.testing.assert_array_equal(labels, alone)
        assert {k: v for k, v in stats.items() if k != "tasks"} == {k: v for k, v in alone_stats.items() if k != "tasks"}


def test_infomap_tasks_start_largest_first(trained, single_worker_client):
    """The Infomap tasks carry a Dask priority of nodes x floors, so a worker starts the largest first (in
    submission order one large task could start last and leave the other workers idle); the labels are those of
    the default order."""
    from distributed import get_task_stream

    from facecluster.pipeline.stages.communities import infomap_components
    from facecluster.pipeline.stages.graph import read_forest

    store = RunStore.open(str(trained["tmp"] / "im_a.zarr"))
    n = store.array("knn/index").shape[0]
    floor = store.record("graph")["summary"]["anchor"]["anchor"]
    floors = [floor + 0.04, floor, floor + 0.08]
    with store.stage("infomap-order-test", {}, inputs=["graph"], force=True) as w, \
            get_task_stream(single_worker_client) as ts:
        got = infomap_components(single_worker_client, w, n, read_forest(store), floors, "knn/sim", "t", budget=60)
    started = sorted((s["start"], t["key"]) for t in ts.data for s in t["startstops"]
                     if s["action"] == "compute" and "-infomap-" in str(t["key"]))
    work = []
    for _, key in started:  # t-infomap-<group>-<floor index | all>-<nodes>n-<token>
        _, _, _, cols, nodes, _ = str(key).split("-")
        work.append(int(nodes[:-1]) * (len(floors) if cols == "all" else 1))
    assert len(work) > 3 and len(set(work)) > 2  # per-floor tasks of the large components and grouped small ones
    assert work == sorted(work, reverse=True), work
    for f, (labels, _) in zip(floors, got):
        with store.stage("infomap-order-test", {"f": f}, inputs=["graph"], force=True) as w:
            (alone, _), = infomap_components(single_worker_client, w, n, read_forest(store), [f], "knn/sim", "t",
                                             budget=60)
        np.testing.assert_array_equal(labels, alone)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1, width=32), st.integers(-3, 3))
def test_same_cut_keeps_what_the_float64_comparison_keeps(value, ulps):
    """The float32 cut equals comparing in float64 exactly, at and around every float32 value (no float64 copy of
    a task's weights is needed to keep what the old float64 comparison kept)."""
    from facecluster.tasks.peers import same_cut

    w = np.float32(value)
    for _ in range(abs(ulps)):
        w = np.nextafter(w, np.float32(np.inf if ulps > 0 else -np.inf))
    ws = np.array([w, np.nextafter(w, np.float32(-1)), np.nextafter(w, np.float32(2))], np.float32)
    for floor in (float(value), float(value) + 1e-12, float(value) - 1e-12, float(w)):
        np.testing.assert_array_equal(ws >= same_cut(ws.dtype, floor), ws.astype(np.float64) >= floor)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(0, 120), st.integers(0, 2**31 - 1))
def test_undirected_links_keep_each_pair_once_with_its_larger_weight(n, m, seed):
    from facecluster.tasks.peers import undirected_links

    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
    w = rng.choice([0.25, 0.5, 0.75], m)
    oracle = {}
    for a, b, x in zip(src, dst, w):
        key = (min(a, b), max(a, b))
        oracle[key] = max(oracle.get(key, -1.0), x)
    links = undirected_links(n, src, dst, w)
    assert [(int(a), int(b)) for a, b, _ in links] == sorted(oracle)  # in (low, high) order
    assert [x for *_, x in links] == [oracle[key] for key in sorted(oracle)]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 160), st.integers(0, 2**31 - 1), st.sampled_from([1, 3]))
def test_infomap_engine_gives_the_facades_modules(n, m, seed, trials):
    """The engine path (Infomap's C++ class, what its Python facade drives, without the facade's per-run option
    rendering) gives the facade's modules for any graph, seed and number of trials."""
    pytest.importorskip("infomap")
    from facecluster.tasks.peers import infomap_engine, infomap_network, run_network, undirected_links

    assert infomap_engine() is not None  # the pinned infomap has it: the stage's speed rests on it
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
    keep = src != dst
    links = undirected_links(n, src[keep], dst[keep], rng.random(m)[keep])
    s = int(rng.integers(1, 1000))  # Infomap's seeds start at 1 (0 is refused by both paths: a 1-in-1000 flake)
    engine = run_network(infomap_network(n, links, seed=s, trials=trials), n)
    facade = run_network(infomap_network(n, links, seed=s, trials=trials, engine=False), n)
    np.testing.assert_array_equal(engine, facade)


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-6, 1e6), st.integers(0, 2**31 - 1))
def test_infomap_keeps_a_two_face_component_whole(weight, seed):
    """infomap_by_component gives a two-face component one module without running Infomap: what Infomap
    itself gives for one link of any weight and any seed."""
    pytest.importorskip("infomap")
    from facecluster.tasks.peers import infomap_network, run_network, undirected_links

    links = undirected_links(2, np.array([0]), np.array([1]), np.array([weight]))
    for engine in (True, False):
        np.testing.assert_array_equal(run_network(infomap_network(2, links, seed=1 + seed % 1000, engine=engine), 2), [0, 0])


def test_infomap_by_component_equals_each_component_solved_alone():
    """Exactly the per-component oracle: each component's own edges, its own undirected links on its own node
    numbering, through Infomap's facade (the kernel prepares every component's links at once and runs the engine)."""
    pytest.importorskip("infomap")
    from facecluster.tasks.components import components
    from facecluster.tasks.peers import (infomap_by_component, infomap_network, knn_edge_list, run_network,
                                         undirected_links)

    x, _ = make_faces(900, dim=32, seed=7)
    idx, sim = _exact_knn(x, 10)
    floor = float(np.quantile(sim, 0.85))
    src, dst, w = knn_edge_list(idx, sim, floor)
    comp = components(len(x), src, dst)
    sizes = np.bincount(comp)
    assert (sizes >= 2).sum() > 20 and (sizes >= 10).any()
    nodes = np.flatnonzero(sizes[comp] >= 2)
    got = infomap_by_component(nodes, comp[nodes], idx[nodes], sim[nodes], floor)
    oracle = np.zeros(len(nodes), np.int64)
    for c in np.unique(comp[nodes]):
        members = np.flatnonzero(comp == c)
        local = {int(v): i for i, v in enumerate(members)}
        e = comp[src] == c
        links = undirected_links(len(members), [local[int(v)] for v in src[e]], [local[int(v)] for v in dst[e]], w[e])
        oracle[np.searchsorted(nodes, members)] = run_network(
            infomap_network(len(members), links, seed=42, engine=False), len(members))
    np.testing.assert_array_equal(got, oracle)
    empty = infomap_by_component(np.zeros(0, np.int64), np.zeros(0, np.int64), idx[:0], sim[:0], floor)
    assert empty.shape == (0,) and empty.dtype == np.int64
