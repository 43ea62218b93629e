"""Proposals (Algorithm 2), automatic thresholds and the threshold clustering, on real run stores and a real
LocalCluster."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from facecluster.pipeline.commands.proposals import format_summary
from facecluster.pipeline.config import Config
from facecluster.pipeline.errors import BadInput
from facecluster.pipeline.stages.graph import read_forest, run_graph
from facecluster.pipeline.stages.proposals import read_proposals, run_proposals, run_threshold_clusters
from facecluster.pipeline.store import RunStore
from facecluster.tasks.components import super_vertices, threshold_components
from facecluster.tasks.proposals import from_csr, to_csr
from facecluster.tasks.thresholds import auto_threshold, make_settings

from conftest import LFW
from test_graph import clustered_features, make_run


def faiss_knn(feats: np.ndarray, k: int):
    """Exact kNN with faiss (self excluded, rows sorted by (sim desc, id asc)) for the larger sets."""
    import faiss

    index = faiss.IndexFlatIP(feats.shape[1])
    index.add(feats)
    sim, idx = index.search(feats, k + 1)
    sim = np.where(idx == np.arange(len(feats))[:, None], -np.inf, sim)
    order = np.lexsort((idx, -sim), axis=1)[:, :k]
    return np.take_along_axis(idx, order, 1).astype(np.int64), np.take_along_axis(sim, order, 1).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 1000), max_size=8), max_size=10))
def test_csr_round_trip(groups):
    offsets, members = to_csr(groups)
    assert offsets.dtype == np.int64 and members.dtype == np.int64 and offsets[0] == 0
    assert [g.tolist() for g in from_csr(offsets, members)] == groups


def test_make_settings_presets_and_explicit():
    assert len(make_settings("fast", 0.6, 0.05, 300)) == 2
    assert len(make_settings("default", 0.6, 0.05, 300)) == 8
    assert len(make_settings("thorough", 0.6, 0.05, 300)) == 20
    th0 = sorted({s["th0"] for s in make_settings("default", 0.6, 0.05, 300)})
    np.testing.assert_allclose(th0, [0.6, 0.65, 0.7, 0.75])  # the reference's MS1M settings at anchor 0.6
    s = make_settings("fast", 0.6, 0.05, 300, thresholds=[0.8, 0.7])
    assert [x["th0"] for x in s] == [0.7, 0.8] and s[0]["sv_th"] == pytest.approx(1 - 1.5 * 0.3)
    # whole-component cuts: one level, max_size = whole_size, around the anchor
    s = make_settings("default", 0.6, 0.05, 300, whole_size=2000)
    whole = [x for x in s if x["max_size"] == 2000]
    assert len(s) == 8 + len(whole) and len(whole) == 5 and all(x["levels"] == 1 for x in whole)
    np.testing.assert_allclose(sorted(x["th0"] for x in whole), [0.6, 0.625, 0.65, 0.675, 0.7])
    assert len(make_settings("default", 0.6, 0.05, 300, whole_size=300)) == 8  # not above max_size: none
    # scale-adaptive: anchors near 1 keep every threshold below 1
    assert all(0.97 <= x["th0"] < 1 for x in make_settings("thorough", 0.97, 0.05, 300))


@pytest.mark.slow
def test_proposals_stage_invariance_and_structure(tmp_path, local_client, single_worker_client):
    feats, _ = clustered_features(400, d=16, n_ids=15, spread=0.7, seed=3)
    cfg = Config.from_dict({"proposals": {"preset": "fast", "max_size": 25, "levels": 3}})
    outs = []
    for i, (r, client) in enumerate([(400, single_worker_client), (57, local_client)]):
        store = make_run(tmp_path / f"p{i}.zarr", feats, 8, r)
        run_graph(store, cfg, client)
        summary = run_proposals(store, cfg, client)
        outs.append(read_proposals(store))
    for key in ("offsets", "members", "setting", "level"):
        np.testing.assert_array_equal(outs[0][key], outs[1][key])
    p = outs[0]
    assert p["offsets"].dtype == np.int64 and p["members"].dtype == np.int64
    assert p["setting"].dtype == np.int32 and p["level"].dtype == np.int32
    groups = from_csr(p["offsets"], p["members"])
    assert len(groups) == summary["n_proposals"] > 0
    assert summary["per_level"].get("1", 0) > 0  # higher levels produce proposals on this data
    assert len({g.tobytes() for g in groups}) == len(groups)  # duplicates removed
    for g in groups:
        assert np.all(np.diff(g) > 0) and cfg.proposals.min_size <= len(g) <= cfg.proposals.whole_size
    key = list(zip(p["setting"].tolist(), p["level"].tolist(), [int(g[0]) for g in groups]))
    assert key == sorted(key)  # ordered by (setting, level, smallest member)
    # each level-(i+1) proposal is a union of whole level-i groups; level 1 of level-0 super-vertices
    forest = read_forest(store)
    for s in summary["settings"]:
        sv, _ = super_vertices(400, *forest, s["th0"], s["step"], s["max_size"])
        assert np.bincount(sv).max() <= s["max_size"]
        for g, st_, lv in zip(groups, p["setting"], p["level"]):
            if st_ != s["id"]:
                continue
            labs = np.unique(sv[g])
            assert np.isin(np.flatnonzero(np.isin(sv, labs)), g).all()
            if lv == 0:
                assert len(labs) == 1
            elif lv == 1:
                assert len(labs) >= 2


@pytest.mark.slow
def test_explicit_thresholds_warn_and_fail(tmp_path, local_client, caplog):
    feats, _ = clustered_features(200, seed=4)
    store = make_run(tmp_path / "w.zarr", feats, 6, 64)
    run_graph(store, Config(), local_client)
    floor = store.record("graph")["summary"]["min_edge_sim"]
    low = Config.from_dict({"proposals": {"preset": "fast", "thresholds": [floor - 0.05], "levels": 1}})
    with pytest.raises(BadInput, match="below the graph's edge floor"):  # its cut would miss dropped edges
        run_proposals(store, low, local_client)
    with pytest.raises(BadInput, match="below the graph's edge floor"):
        run_threshold_clusters(store, floor - 0.05, Config(), local_client)
    run_graph(store, Config.from_dict({"proposals": {"min_edge_sim": -1.0}}), local_client)  # keep every edge
    cfg = Config.from_dict({"proposals": {"preset": "fast", "thresholds": [0.5, 0.99999], "levels": 1}})
    summary = run_proposals(store, cfg, local_client)
    # the split setting and the whole-component cut at 0.99999 both yield nothing
    assert len(summary["warnings"]) == 2 and all("th0=0.99999" in w for w in summary["warnings"])
    assert "yields no proposal" in caplog.text
    cfg = Config.from_dict({"proposals": {"preset": "fast", "thresholds": [0.99998, 0.99999], "levels": 1}})
    with pytest.raises(BadInput, match="no proposal from any"):
        run_proposals(store, cfg, local_client)
    assert not store.is_complete("proposals")


@pytest.mark.slow
def test_auto_thresholds_on_synthetic(tmp_path, local_client):
    from facecluster.tasks.synth import make_faces

    feats, labels = make_faces(3000, dim=64, seed=0)
    store = make_run(tmp_path / "s.zarr", feats.astype(np.float32), 20, 1024, knn=faiss_knn)
    run_graph(store, Config(), local_client)
    summary = run_proposals(store, Config.from_dict({"proposals": {"preset": "fast"}}), local_client)
    assert summary["n_proposals"] > 50 and not summary["warnings"]
    assert summary["threshold"]["source"].startswith("auto")
    text = format_summary(summary)  # what `facecluster proposals` prints
    assert f"{summary['n_proposals']} proposals" in text and len(text.splitlines()) == 2 + len(summary["settings"]) + 1
    assert len(summary["settings"]) == 2 + 2  # fast: 2 split settings + 2 whole-component cuts
    res = run_threshold_clusters(store, None, Config(), local_client)
    clusters = store.array("clusters")[:]
    assert len(clusters) == 3000 and clusters.min() == 0 and res["n_clusters"] == clusters.max() + 1
    assert res["th"] == pytest.approx(summary["threshold"]["anchor"])


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not LFW.exists(), reason="LFW/SFace features not available")
def test_auto_thresholds_on_lfw(tmp_path, local_client):
    feats = np.load(LFW / "features.npy").astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    store = make_run(tmp_path / "lfw.zarr", feats, 20, 4096, knn=faiss_knn)
    anchor = auto_threshold(store.array("knn/sim")[:])
    assert 0.45 < anchor < 0.65  # best single thresholds on this set: 0.54 (BCubed F), 0.63 (pairwise F)
    run_graph(store, Config(), local_client)
    summary = run_proposals(store, Config.from_dict({"proposals": {"preset": "fast"}}), local_client)
    assert summary["n_proposals"] > 100 and not summary["warnings"]


@pytest.mark.slow
def test_threshold_clusters_equal_forest_cut(tmp_path, local_client):
    feats, _ = clustered_features(150, seed=5)
    store = make_run(tmp_path / "t.zarr", feats, 5, 40)
    run_graph(store, Config.from_dict({"proposals": {"min_edge_sim": -1.0}}), local_client)
    run_threshold_clusters(store, 0.6, Config(), local_client)
    np.testing.assert_array_equal(store.array("clusters")[:], threshold_components(150, *read_forest(store), 0.6))
    run_threshold_clusters(store, 0.6, Config(), local_client, max_size=10)
    labels = store.array("clusters")[:]
    assert np.bincount(labels).max() <= 10
    assert store.record("clusters")["params"]["method"] == "threshold"


@pytest.mark.slow
def test_cli_threshold(tmp_path):
    feats, _ = clustered_features(120, seed=6)
    store = make_run(tmp_path / "c.zarr", feats, 5, 50)
    env = {**os.environ, "FACECLUSTER_PROGRESS": "0"}
    exe = os.path.join(os.path.dirname(sys.executable), "facecluster")
    out = subprocess.run([exe, "cluster", store.url, "--method", "threshold", "--th", "0.6", "--workers", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clusters" in out.stdout and "singletons" in out.stdout
    labels = RunStore.open(store.url).array("clusters")[:]
    np.testing.assert_array_equal(labels, threshold_components(120, *read_forest(RunStore.open(store.url)), 0.6))
    out = subprocess.run([exe, "cluster", str(tmp_path / "missing.zarr"), "--method", "threshold"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "no such run store" in out.stderr


def test_small_knn_ivf_path_equals_faiss_ivf_and_finds_near_neighbours():
    """Above ``exact_max`` rows the level graph is IVF searched list-major: the same neighbours as
    faiss's IVF on the same lists (nprobe 16), self excluded, sorted, and close to exact."""
    from facecluster.tasks.knn import brute_force_knn, ivf_assign, ivf_shard, knn_ivf, load_ivf, train_ivf
    from facecluster.tasks.proposals import small_knn
    from facecluster.tasks.synth import make_faces

    x, _ = make_faces(3000, dim=32, seed=2)
    k = 4
    idx, sim = small_knn(x, k, exact_max=1000, seed=7)
    assert idx.shape == (3000, k) and sim.dtype == np.float32
    assert not (idx == np.arange(3000)[:, None]).any()
    assert (np.diff(sim, axis=1) <= 0).all()
    # reference: faiss IndexIVFFlat on the same trained lists
    nlist = int(4 * np.sqrt(3000))
    rng = np.random.default_rng(7)
    sample = x[np.sort(rng.choice(3000, size=min(3000, 64 * nlist), replace=False))]
    trained = train_ivf(sample, nlist, 7)
    index = load_ivf(trained)
    ids = np.arange(3000, dtype=np.int64)
    ref_s, ref_i = knn_ivf(ivf_shard(trained, x, ids), x, ids, x, ids, ivf_assign(index, x, 16), k)
    assert np.array_equal(idx, np.where(np.isfinite(ref_s), ref_i, -1))
    ex_s, ex_i = brute_force_knn(x, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, ex_i)])
    assert recall > 0.9, recall
    again = small_knn(x, k, exact_max=1000, seed=7, threads=2)
    assert np.array_equal(again[0], idx) and np.array_equal(again[1], sim)


def test_small_knn_query_blocks_do_not_change_results(monkeypatch):
    import facecluster.tasks.proposals as P
    from facecluster.tasks.synth import make_faces

    x, _ = make_faces(3000, dim=32, seed=2)
    whole = P.small_knn(x, 4, exact_max=1000, seed=7)
    monkeypatch.setattr(P, "QUERY_BLOCK", 700)
    blocked = P.small_knn(x, 4, exact_max=1000, seed=7)
    assert np.array_equal(whole[0], blocked[0]) and np.array_equal(whole[1], blocked[1])


def test_settings_sharing_a_cut_run_together_as_they_would_alone(tmp_path, local_client):
    """The stage runs settings with one cut_key (same level-0 cut, differing sv_max_size / sv_th) in one
    task that computes the cut, the sums and the level-1 kNN once: each setting's levels must equal
    what it gives when run alone."""
    from facecluster.pipeline.stages.proposals import cut_key, resolve_settings, settings_task

    feats, _ = clustered_features(600, d=16, n_ids=20, spread=0.7, seed=4)
    cfg = Config.from_dict({"proposals": {"preset": "default", "max_size": 25, "levels": 3}})
    store = make_run(tmp_path / "g.zarr", feats, 8, 128)
    run_graph(store, cfg, local_client)
    settings, _ = resolve_settings(store, cfg, local_client)
    groups = {}
    for s in settings:
        groups.setdefault(cut_key(s), []).append(s)
    shared = [g for g in groups.values() if len(g) > 1]
    assert shared and all(g[0]["levels"] == 3 for g in shared)
    for g in shared:
        together = settings_task(store.url, g, 2, 500)
        assert len({s["sv_max_size"] for s in g}) == len(g)
        for s, res in zip(g, together):
            alone = settings_task(store.url, [s], 2, 500)[0]
            assert [lv for lv, _, _ in res["levels"]] == [lv for lv, _, _ in alone["levels"]]
            for (_, o1, m1), (_, o2, m2) in zip(res["levels"], alone["levels"]):
                np.testing.assert_array_equal(o1, o2)
                np.testing.assert_array_equal(m1, m2)
    with pytest.raises(ValueError, match="cut_key"):
        settings_task(store.url, [settings[0], settings[1]], 2, 500)


def test_level_knn_from_the_face_graph_in_the_stage_equals_one_process(tmp_path, local_client, monkeypatch):
    """Above EXACT_MAX super-vertices a cut's level-1 kNN comes from the faces' kNN lists (small EXACT_MAX here):
    the stored proposals equal those of every group's settings run in one process, and that kNN equals the
    kernel's on the faces' lists read whole."""
    from facecluster.pipeline.stages.proposals import combine_task, cut_key, cut_sums, cut_task, resolve_settings, settings_task
    from facecluster.tasks import proposals as tp

    feats, _ = clustered_features(3000, d=16, n_ids=120, spread=0.7, seed=5)
    cfg = Config.from_dict({"proposals": {"preset": "fast", "max_size": 25, "levels": 3}})
    store = make_run(tmp_path / "b.zarr", feats, 8, 700)
    run_graph(store, cfg, local_client)
    settings, _ = resolve_settings(store, cfg, local_client)
    multi = [s for s in settings if s["levels"] > 1]
    state = cut_task(store.url, [multi[0]], 2, cfg.proposals.max_proposal_size)
    assert state["n_groups"] > 400 and "knn1" not in state  # exact, in the levels task
    with store.stage("sums-check", {}, inputs=[]) as w:  # the sums through a scratch array: the same float64 values
        on_disk = cut_task(store.url, [multi[0]], 2, cfg.proposals.max_proposal_size,
                           w.scratch_space("sums", (len(feats), feats.shape[1]), (512, feats.shape[1]), np.float64))
        assert on_disk["sums0"] is None
        np.testing.assert_array_equal(cut_sums(store.url, on_disk), state["sums0"])
    monkeypatch.setattr(tp, "EXACT_MAX", 200)
    state = cut_task(store.url, [multi[0]], 2, cfg.proposals.max_proposal_size)
    stats = {}
    whole = tp.face_graph_knn(state["labels"], tp.unit_means(state["sums0"]), multi[0]["sv_k"],
                              [(0, store.array("knn/index")[:, :tp.GRAPH_NEIGHBOURS])], stats)
    for got, want in zip(state["knn1"], whole):  # read chunk by chunk (700 rows) in the task
        np.testing.assert_array_equal(got, want)
    assert state["level1_pairs"] == stats["pairs"] > state["n_groups"]
    summary = run_proposals(store, cfg, local_client)  # each multi-level cut's sums go through a scratch array on disk
    # the similarities each multi-level cut computed, for bench's work-bound; none where the cut is one level
    pairs = {row["id"]: row["level1_pairs"] for row in summary["settings"]}
    assert pairs[multi[0]["id"]] == stats["pairs"]
    assert all((pairs[s["id"]] is None) == (s["levels"] == 1) for s in settings)
    assert not [p for p in (tmp_path / "b.zarr" / "_tmp").rglob("*") if "__scratch__" in p.name]  # none left behind
    got = read_proposals(store)
    groups = {}
    for s in settings:
        groups.setdefault(cut_key(s), []).append(s)
    res = {}
    for g in groups.values():
        for s, r in zip(g, settings_task(store.url, g, cfg.proposals.min_size, cfg.proposals.max_proposal_size)):
            res[s["id"]] = r
    want = combine_task(settings, [res[s["id"]] for s in settings])
    for key in ("offsets", "members", "setting", "level"):
        np.testing.assert_array_equal(got[key], want[key])


@settings(max_examples=80, deadline=None)
@given(n_faces=st.integers(1, 60), n_groups=st.integers(1, 12), k_lists=st.integers(1, 6), k=st.integers(1, 5),
       chunk=st.integers(1, 70), ties=st.booleans(), seed=st.integers(0, 10_000))
def test_face_graph_knn_equals_candidate_oracle(n_faces, n_groups, k_lists, k, chunk, ties, seed):
    """The level-1 kNN from the face graph against a plain oracle: a node's candidates are the nodes its faces
    list and the nodes whose faces list its faces; its top k by the similarity of the unit means, ties by id;
    then one round of neighbours' neighbours; padding -1 / 0; whatever the chunking of the lists."""
    from facecluster.tasks import proposals as tp

    rng = np.random.default_rng(seed)
    n_groups = min(n_groups, n_faces)
    labels = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, n_faces - n_groups)])
    nb = rng.integers(-1, n_faces, (n_faces, k_lists))  # -1: padding
    sums = rng.integers(-2, 3, (n_groups, 3)).astype(np.float64) if ties else rng.standard_normal((n_groups, 3))
    means = tp.unit_means(sums)
    kk = max(0, min(k, n_groups - 1))
    idx, sim = tp.face_graph_knn(labels, means, k, [(a, nb[a:a + chunk]) for a in range(0, n_faces, chunk)])
    assert idx.shape == (n_groups, kk) and sim.shape == (n_groups, kk)
    cand = [set() for _ in range(n_groups)]
    for i in range(n_faces):
        for j in nb[i]:
            if j >= 0 and labels[j] != labels[i]:
                cand[labels[i]].add(int(labels[j]))
                cand[labels[j]].add(int(labels[i]))
    ii, jj = np.meshgrid(np.arange(n_groups), np.arange(n_groups), indexing="ij")
    exact = np.einsum("ij,ij->i", means[ii.ravel()], means[jj.ravel()]).reshape(n_groups, n_groups)  # the kernel's bits
    rank = (lambda a, c: sorted(c, key=lambda b: (-exact[a, b], b))[:kk])
    first = [rank(a, cand[a]) for a in range(n_groups)]
    # one refinement round: a node's candidates are its neighbours and their neighbours (and every node that
    # listed it, or was listed by one of its neighbours, through the pair being undirected)
    pairs = set()
    for a in range(n_groups):
        for b in first[a]:
            pairs.add((min(a, b), max(a, b)))
            for c in first[b]:
                if c != a:
                    pairs.add((min(a, c), max(a, c)))
    cand2 = [set() for _ in range(n_groups)]
    for a, b in pairs:
        cand2[a].add(b)
        cand2[b].add(a)
    for a in range(n_groups):
        ranked = rank(a, cand2[a])
        assert idx[a].tolist() == ranked + [-1] * (kk - len(ranked))
        np.testing.assert_allclose(sim[a, :len(ranked)], exact[a, ranked], atol=1e-6)
        assert (sim[a, len(ranked):] == 0).all()


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 40), n_pairs=st.integers(0, 200), k=st.integers(0, 5), select=st.integers(1, 50),
       seed=st.integers(0, 10_000))
def test_candidate_knn_in_blocks_of_nodes_equals_one_block(n, n_pairs, k, select, seed):
    """The top k of each node selected block by block (a few pairs per block) equals one block of every pair."""
    from facecluster.tasks import proposals as tp
    from facecluster.tasks.arrays import unique_sorted

    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, n_pairs), rng.integers(0, n, n_pairs)
    ok = a != b
    keys = unique_sorted(np.minimum(a, b)[ok] * n + np.maximum(a, b)[ok])
    means = tp.unit_means(rng.integers(-2, 3, (n, 3)).astype(np.float64))  # small ints: many equal similarities
    whole = tp.candidate_knn(keys, means, k, select_pairs=10 ** 9)
    blocked = tp.candidate_knn(keys, means, k, select_pairs=select)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_array_equal(whole[1], blocked[1])


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 30), n_pairs=st.integers(0, 150), k=st.integers(0, 5), select=st.integers(1, 10 ** 9),
       seed=st.integers(0, 10_000))
def test_candidate_knn_equals_ranking_each_nodes_candidates(n, n_pairs, k, select, seed):
    """Each node's top k among its candidate pairs (both ends' lists) ranked by (similarity desc, id asc), against
    a per-node sort; small-integer means make many similarities equal, so the id order of ties is exercised."""
    from facecluster.tasks import proposals as tp
    from facecluster.tasks.arrays import unique_sorted

    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, n_pairs), rng.integers(0, n, n_pairs)
    ok = a != b
    keys = unique_sorted(np.minimum(a, b)[ok] * n + np.maximum(a, b)[ok])
    means = tp.unit_means(rng.integers(-1, 2, (n, 3)).astype(np.float64))
    idx, sim = tp.candidate_knn(keys, means, k, select_pairs=select)
    cand = [[] for _ in range(n)]
    for key in keys.tolist():
        lo, hi = divmod(key, n)
        s = np.float32(np.einsum("ij,ij->i", means[[lo]], means[[hi]])[0])  # the kernel's bits
        cand[lo].append((-s, hi))
        cand[hi].append((-s, lo))
    for u in range(n):
        top = sorted(cand[u])[:k]
        assert idx[u].tolist() == [j for _, j in top] + [-1] * (k - len(top))
        assert sim[u].tolist() == [float(-s) for s, _ in top] + [0.0] * (k - len(top))


@settings(max_examples=100, deadline=None)
@given(x=st.lists(st.integers(-2**40, 2**40), max_size=200))
def test_unique_sorted_equals_numpy_unique(x):
    from facecluster.tasks.arrays import unique_sorted

    a = np.asarray(x, np.int64)
    np.testing.assert_array_equal(unique_sorted(a), np.unique(a))


@settings(max_examples=100, deadline=None)
@given(v=st.lists(st.floats(width=32, allow_nan=False), max_size=100))
def test_descending_key_orders_floats_descending(v):
    from facecluster.tasks.arrays import descending_key

    v = np.asarray(v, np.float32)
    order = np.argsort(descending_key(v), kind="stable")
    assert (v[order][:-1] >= v[order][1:]).all()
    key = descending_key(v)
    for i in range(len(v)):  # equal floats (0.0 and -0.0 included) get equal keys
        assert ((key == key[i]) == (v == v[i])).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), n_groups=st.integers(1, 40), d=st.integers(1, 6), chunk=st.integers(1, 120),
       seed=st.integers(0, 10_000))
def test_add_group_sums_in_place_equals_row_order_oracle(n, n_groups, d, chunk, seed):
    """The cut's streamed group sums, touching only a chunk's groups, equal adding each chunk's rows to their group
    in row order (the bits the dense per-chunk product gave)."""
    from facecluster.tasks.proposals import add_group_sums

    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, n_groups, n)
    got = np.zeros((n_groups, d))
    want = np.zeros((n_groups, d))
    for a in range(0, n, chunk):
        add_group_sums(got, feats[a:a + chunk], labels[a:a + chunk])
        part = np.zeros((n_groups, d))
        for i in range(a, min(n, a + chunk)):
            part[labels[i]] += feats[i].astype(np.float64)
        present = np.unique(labels[a:a + chunk])
        want[present] += part[present]
    assert got.tobytes() == want.tobytes()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 70), st.integers(1, 5), st.integers(1, 9), st.integers(0, 2 ** 32 - 1))
def test_unit_means_in_steps_equal_the_whole_quotient(n, d, step, seed):
    """Unit means made a few rows at a time (the proposals cut's memory) are the whole-array quotient's float32
    bits, zero rows (norm 0) included."""
    from facecluster.tasks import proposals as tp

    rng = np.random.default_rng(seed)
    sums = rng.standard_normal((n, d)) * 10.0 ** rng.integers(-3, 4, (n, 1))
    sums[rng.random(n) < 0.2] = 0.0
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    old = tp.UNIT_MEANS_ROWS
    tp.UNIT_MEANS_ROWS = step
    try:
        got = tp.unit_means(sums)
    finally:
        tp.UNIT_MEANS_ROWS = old
    assert got.dtype == np.float32 and got.shape == sums.shape
    np.testing.assert_array_equal(got, (sums / norm).astype(np.float32))
