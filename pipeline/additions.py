"""Adding faces to a clustered run: ``facecluster add RUN NEW_FEATURES`` and ``FaceClusterer.add``.

The steps (:mod:`facecluster.pipeline.stages.add` has the worker tasks):

1. the new file is ingested on its own (every check of ``ingest``: NaN/inf rows, dimension, format) into
   ``_tmp/``; a dimension other than the run's is refused;
2. the grown ``features`` / ``input_rows`` / ``labels``, the grown kNN lists (exact search: the new faces
   against every face, the old faces against the new ones, merged), and for the learned method the edge
   probabilities of every row whose inputs changed;
3. the faces to re-cluster, by method:

   * threshold: every face connected to a new face (or to an old face that lost a listed neighbour
     at or above the threshold) by an edge at or above it, closed under "member of one old cluster":
     the result is the threshold clustering of all faces at the run's threshold, exactly (tested). At
     a cut in probability (``--method threshold`` without ``--th``) the new edges are scored by the
     run's model first, every old face whose list changed is a seed, and the result is the components
     of the grown ``edges/prob`` at the run's cut, exactly (tested);
   * learned (``[add] recluster = "new"``, the default): each new face joins the cluster of its most
     probable old neighbour when P >= the model's floor and that cluster has >= 2 faces; the new faces
     that join none are re-clustered with the old singletons they reach at P >= the floor. With
     ``"touched"``: every old cluster a new face reaches at P >= the floor is re-clustered with the new
     faces (no face joins as it is);

4. those faces become a sub-run (their features, their kNN lists among themselves, their edge
   probabilities) and the method's stages run on it with the whole run's anchor and thresholds pinned;
5. ``clusters``: every face outside the re-clustered ones keeps its id (an old cluster that new faces
   joined keeps its id too); a re-clustered cluster whose members are exactly an old cluster's keeps
   that id; the others get fresh ids (after the largest id in use);
6. one journalled commit moves every array into place and writes the records: ``ingest`` / ``knn`` /
   ``edges`` describe the grown arrays, the ``add`` record owns ``clusters`` and holds the ``additions``
   log (rows, source, digest, time); the stages whose outputs predate the add (graph, proposals, score,
   ...) are marked superseded, so ``facecluster cluster`` recomputes them on every face.

Crash safety: everything before the commit is under ``_tmp/`` (removed by the next writing command: the
run is as before the add); the commit itself is finished by the next writing command. Re-running the
same add after it completed is a no-op (the log's last entry has the same source digest).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

from facecluster.tasks.additions import attach_new, keep_ids
from facecluster.tasks.arrays import unique_sorted
from facecluster.tasks.thresholds import edge_floor

from .config import Config
from .errors import BadInput
from .model_files import GENERAL_MODEL_DIR, edge_meta, model_digest
from .run import stage_runners
from .stages import add as A
from .stages.cut import WEIGHTS as CUT_WEIGHTS, run_prob_threshold_clusters
from .stages.edges import run_levels
from .stages.ingest import run_ingest
from .stages.proposals import run_threshold_clusters
from .stages.graph import run_graph
from .store import RunStore, StageWriter, digest, file_fingerprint, now_iso, record_identity

log = logging.getLogger(__name__)

STAGE = A.STAGE
SUPERSEDED = ("communities", "graph", "proposals", "score", "dedup", "clusters")


def clustering_of(store: RunStore) -> dict:
    """How the run's ``clusters`` were made: {"method", "pinned": the thresholds an add must reuse}.

    Raises
    ------
    BadInput
        The run never finished ``cluster`` (or its clustering is stale), or was clustered by a method an
        add cannot extend.
    """
    hint = f"run `facecluster cluster {store.url}` first, then add"
    for name in ("dedup", "clusters"):
        rec = store.record(name)
        if rec and not rec.get("complete") and not rec.get("superseded_by") and rec.get("status") != "invalidated":
            raise BadInput(f"{store.url}: its clustering did not finish (stage {name!r} {rec.get('status')}); "
                           f"re-run `facecluster cluster {store.url}` to finish it, then add")
    owner = store.owner("clusters")
    if owner is None:
        raise BadInput(f"{store.url}: has no clustering to add faces to; {hint}")
    name, rec = owner
    why = store.stale_reason(name)
    if why:
        raise BadInput(f"{store.url}: its clustering is not current ({why}); re-run `facecluster cluster "
                       f"{store.url}`, then add")
    if name == STAGE:
        return dict(rec["params"]["clustering"])
    graph = (store.record("graph") or {}).get("summary", {})
    pinned = {"anchor": graph.get("anchor"), "min_edge_sim": graph.get("min_edge_sim")}
    edges_digest = (store.record("edges") or {}).get("params", {}).get("model_digest")  # the model that scored edges/prob
    if name == "dedup":
        settings = (store.record("proposals") or {}).get("params", {}).get("settings", [])
        comm = store.record("communities")
        pinned.update(t_cos=min((float(s["th0"]) for s in settings), default=None),
                      t_prob=min(comm["summary"]["floors"]) if comm else None, model_digest=edges_digest)
        return {"method": "gcn", "pinned": pinned}
    method = rec["params"].get("method")
    if method == "threshold" and rec["params"].get("weights") == CUT_WEIGHTS:  # the cut in probability space
        pinned.update(th=float(rec["params"]["th"]), max_size=rec["params"].get("max_size"), t_cos=None,
                      t_prob=float(rec["params"]["th"]), auto=False, model_digest=edges_digest)
        return {"method": "threshold", "pinned": pinned}
    if method == "threshold":
        auto = (rec.get("summary", {}).get("threshold") or {}).get("source", "explicit") != "explicit"
        pinned.update(th=float(rec["params"]["th"]), max_size=rec["params"].get("max_size"),
                      t_cos=float(rec["params"]["th"]), t_prob=None, auto=auto,
                      auto_floor=(store.record("graph") or {}).get("params", {}).get("min_edge_sim") is None)
        return {"method": "threshold", "pinned": pinned}
    raise BadInput(f"{store.url}: was clustered with --method {method}; adding faces extends the learned and the "
                   f"threshold methods: re-run `facecluster cluster {store.url} --method {method}` on the grown data")


def check_add_model(store: RunStore, clustering: dict, model_dir: str | None) -> str | None:
    """The model an add runs with: the one given, or the general model when the run was clustered with it
    (``cluster`` without ``--model``, or ``--method threshold`` without ``--th``); None for the threshold
    method at a cosine threshold. BadInput when the model is missing, has no edge scorer, or is not the one
    the run was clustered with."""
    if not uses_prob(clustering):
        return None
    want = clustering["pinned"].get("model_digest")
    if not model_dir:
        shipped = model_digest(GENERAL_MODEL_DIR)
        if want and want == shipped:
            return str(GENERAL_MODEL_DIR)
        # a model given to `cluster`, or the general model of another facecluster version (its files, hence its
        # digest, change between versions): new faces scored by this version's would not match the run's P
        raise BadInput(f"{store.url}: was clustered on the edge probabilities of model {want} (a --model DIR, or the "
                       f"general model of another facecluster version; this one ships {shipped}); pass that model "
                       f"(--model DIR), or re-run `facecluster cluster {store.url}` first to re-cluster every face "
                       "with this version's general model")
    if edge_meta(model_dir) is None:
        raise BadInput(f"{model_dir}: has no edge scorer (trained before facecluster 0.2); adding faces needs one: "
                       "re-train it and re-run cluster")
    if want and model_digest(model_dir) != want:
        raise BadInput(f"{model_dir}: is not the model {store.url} was clustered with; pass that model (--model), "
                       f"or re-run `facecluster cluster {store.url} --model {model_dir}`")
    return str(model_dir)


def uses_prob(clustering: dict) -> bool:
    """Whether the run's clustering reads edge probabilities (the learned method, or the threshold method's
    cut in probability space): an add scores the new edges with the same model."""
    return clustering["method"] == "gcn" or clustering["pinned"].get("t_prob") is not None


def additions_log(store: RunStore) -> list[dict]:
    rec = store.record(STAGE)
    return list((rec or {}).get("params", {}).get("additions", [])) if rec and rec.get("complete") else []


def _source_digest(src, labels) -> tuple[dict, str]:
    if not os.path.exists(src):
        raise BadInput(f"{src}: no such file; give the path of the new faces' features (.npy, .npz, .bin, .zarr, .parquet)")
    fp = {"features": file_fingerprint(src), "labels": file_fingerprint(labels) if labels else None}
    return fp, digest(fp)


@dataclass
class Addition:
    """What :func:`prepare_add` checked and ingested, for :func:`finish_add` (or ``skipped``: nothing to do)."""

    src: str
    labels: str | None
    clustering: dict
    fingerprint: dict
    digest: str
    done: list
    new: RunStore | None = None
    summary_in: dict | None = None
    skipped: dict | None = None
    t_start: float = 0.0
    seconds: float = 0.0
    model_dir: str | None = None  # the model the add runs with (:func:`check_add_model`)


def prepare_add(store: RunStore, src, cfg: Config, model_dir: str | None = None, labels=None,
                echo: Callable[[str], None] | None = None) -> Addition:
    """Every check of an add that needs no Dask cluster, and the new file ingested under ``_tmp/``.

    Call it holding the run's writer lock (``store.writing``), then :func:`finish_add` under the same lock.

    Raises
    ------
    BadInput
        One line naming the file and the fix: the run has no current clustering, the learned method's model
        is missing or another, the file is missing, unreadable, holds NaN/inf rows or another dimension.
    """
    echo = echo or log.info
    t_start = time.perf_counter()
    with store.writing(STAGE):
        store.clean_tmp()  # finishes an interrupted commit, or drops a killed add's leftovers
        clustering = clustering_of(store)
        model_dir = check_add_model(store, clustering, model_dir)
        fp, src_digest = _source_digest(src, labels)
        done = additions_log(store)
        add = Addition(str(src), None if labels is None else str(labels), clustering, fp, src_digest, done,
                       t_start=t_start, model_dir=model_dir)
        if done and done[-1]["digest"] == src_digest and done[-1]["rows"][1] == store.array("features").shape[0]:
            echo(f"add: {src} was the last addition (rows {done[-1]['rows'][0]}..{done[-1]['rows'][1] - 1}); nothing to do")
            add.skipped = {**store.record(STAGE)["summary"], "skipped": True}
            return add
        dim = int(store.array("features").shape[1])
        new_url = f"{store.url}/_tmp/add-input-{uuid.uuid4().hex[:8]}"
        add.summary_in = run_ingest(src, new_url, labels=labels, cfg=cfg.ingest)
        add.new = RunStore.open(new_url)
        m, d = (int(s) for s in add.new.array("features").shape)
        if d != dim:
            raise BadInput(f"{src}: {d}-dimensional features, but {store.url} holds {dim}-dimensional ones; add features "
                           "of the same face model (the same dimension)")
        if m == 0:
            raise BadInput(f"{src}: holds no faces to add (after dropping invalid rows); check the file")
        add.seconds = time.perf_counter() - t_start
        return add


def finish_add(store: RunStore, add: Addition, cfg: Config, client, model_dir: str | None = None,
               echo: Callable[[str], None] | None = None) -> dict:
    """The add itself, after :func:`prepare_add` (``model_dir``: default, the model it resolved); its summary
    (see the module docstring)."""
    if add.skipped is not None:
        return add.skipped
    with store.writing(STAGE):
        return _add(store, add, cfg, client, model_dir or add.model_dir, echo or log.info)


def run_add(store: RunStore, src, cfg: Config, client, model_dir: str | None = None, labels=None,
            echo: Callable[[str], None] | None = None) -> dict:
    """Add the faces of ``src`` to the clustered run ``store`` (:func:`prepare_add`, then :func:`finish_add`)."""
    with store.writing(STAGE):
        add = prepare_add(store, src, cfg, model_dir, labels, echo)
        return finish_add(store, add, cfg, client, model_dir, echo)


def _add(store: RunStore, add: Addition, cfg: Config, client, model_dir, echo) -> dict:
    method, pinned = add.clustering["method"], add.clustering["pinned"]
    clustering, done, src, labels = add.clustering, add.done, add.src, add.labels
    feats = store.array("features")
    n_old, dim = (int(s) for s in feats.shape)
    token = uuid.uuid4().hex[:8]
    timings = {"ingest": add.seconds}
    new, summary_in = add.new, add.summary_in
    m = int(new.array("features").shape[0])
    t0 = time.perf_counter()
    n = n_old + m
    prev_inputs = int(store.record("ingest")["summary"].get("n_input", n_old)) + sum(a["n_input"] for a in done)
    w = StageWriter(store, STAGE)
    paths = A.grow(store, w, new, client, prev_inputs)
    timings["copy"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kn = A.knn(store, w, client, paths, n_old, cfg.proposals.fan_in, cfg.knn)
    timings["knn"] = time.perf_counter() - t0
    how = f"the run's IVF lists, nprobe {kn['nprobe']}" if kn["search"] == "ivf" else "exact search"
    echo(f"add: kNN of {m} new faces ({how}); {kn['old_rows_changed']} of {n_old} old lists entered by a new face "
         f"({timings['knn']:.1f}s)")
    learned = method == "gcn"
    scored = uses_prob(clustering)  # edges/prob grows with the lists
    ed = {}
    old_labels = np.asarray(store.array("clusters")[:], np.int64)
    next_id = int(old_labels.max()) + 1 if n_old else 0
    labels_out = np.concatenate([old_labels, np.full(m, -1, np.int64)])
    if scored:
        t0 = time.perf_counter()
        ed = A.edges(store, w, client, paths, n_old, model_dir, model_digest(model_dir))
        timings["edges"] = time.perf_counter() - t0
        echo(f"add: {ed['edges_scored']} edges scored ({timings['edges']:.1f}s)")
    if learned:
        t0 = time.perf_counter()
        rows, attached = _learned_targets(store, paths, old_labels, n_old, n, model_dir, cfg.add.recluster)
        labels_out[n_old:][attached >= 0] = attached[attached >= 0]
    else:
        t0 = time.perf_counter()
        attached = np.full(m, -1, np.int64)
        moved = _follow_anchor(store, client, paths, pinned) if pinned.get("auto") else False
        if moved:  # the automatic threshold moved with the data: every component is cut again
            clustering = {**clustering, "pinned": pinned}
            rows = np.arange(n, dtype=np.int64)
            echo(f"add: the data's threshold moved to {pinned['th']:.6g}; every component is cut again")
        else:
            seeds = _seeds(store, paths, n_old, n, kn["changed"], pinned)
            rows = np.flatnonzero(A.affected(store, client, paths, n, old_labels, seeds, pinned.get("t_cos"),
                                             pinned.get("t_prob")))
    timings["closure"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if len(rows) >= 2:
        sub = A.build_sub_run(store, client, paths, rows, f"{store.url}/_tmp/add-sub-{token}", scored)
        sub_labels, sub_scores = _cluster_sub(sub, cfg, client, method, pinned, model_dir)
    else:
        sub_labels, sub_scores = np.arange(len(rows)), np.full(len(rows), np.nan, np.float32)
    timings["recluster"] = time.perf_counter() - t0
    echo(f"add: {int((attached >= 0).sum())} new faces joined an old cluster; {len(rows)} faces re-clustered "
         f"({int((rows < n_old).sum())} old; {timings['recluster']:.1f}s)")
    ids, _ = keep_ids(old_labels, rows, sub_labels, next_id)
    labels_out[rows] = ids
    w.write_array("clusters", labels_out, chunks=(max(1, min(n, 1 << 20)),))
    if learned:
        old_scores = np.asarray(store.array("clusters_score")[:], np.float32) if store.has("clusters_score") else \
            np.full(n_old, np.nan, np.float32)
        scores = np.concatenate([old_scores, np.full(m, np.nan, np.float32)])
        scores[rows] = sub_scores
        w.write_array("clusters_score", scores, chunks=(max(1, min(n, 1 << 20)),))
    kept = int(len(np.intersect1d(np.unique(labels_out[:n_old]), np.unique(old_labels))))
    entry = {"rows": [n_old, n], "n": m, "n_input": int(summary_in.get("n_input", m)), "source": os.path.abspath(src),
             "labels": os.path.abspath(labels) if labels else None, "digest": add.digest, "fingerprint": add.fingerprint,
             "time": now_iso()}
    summary = {"n_old": n_old, "n_new": m, "n": n, "method": method, "knn_search": kn["search"],
               "entering_pairs": kn.get("entering_pairs"), "old_lists_changed": kn["old_rows_changed"],
               "edges_scored": ed.get("edges_scored"), "joined_old_clusters": int((attached >= 0).sum()),
               "reclustered": int(len(rows)),
               "n_clusters": int(len(np.unique(labels_out))), "old_cluster_ids_kept": kept,
               "old_clusters": int(len(np.unique(old_labels))),
               "seconds": {k: round(v, 3) for k, v in timings.items()}}
    t0 = time.perf_counter()
    _commit(store, w, clustering, done + [entry], summary, model_dir if scored else None)
    summary["seconds"]["commit"] = round(time.perf_counter() - t0, 3)
    summary["seconds"]["total"] = round(time.perf_counter() - add.t_start, 3)
    return summary


def _follow_anchor(store: RunStore, client, paths: dict, pinned: dict) -> bool:
    """Threshold method at the data's automatic threshold: re-read the anchor on the grown kNN lists (as
    clustering all faces afresh would) and update ``pinned``; True when it moved."""
    anchor = client.submit(A.anchor_task, store.url, paths, key=f"add-anchor-{uuid.uuid4().hex[:8]}").result()
    if float(anchor["anchor"]) == float(pinned["th"]):
        return False
    pinned.update(anchor=anchor, th=float(anchor["anchor"]), t_cos=float(anchor["anchor"]))
    if pinned.get("auto_floor"):
        pinned["min_edge_sim"] = edge_floor(float(anchor["anchor"]))
    return True


def _seeds(store, paths, n_old, n, changed, pinned) -> np.ndarray:
    """The new faces, and the old faces whose list lost a neighbour at or above the cut (an edge the
    clustering may have used is gone from that side). A cut in probability: every old face whose list
    changed (its dropped neighbours are its least similar, not its least probable ones)."""
    if pinned.get("t_prob") is not None:
        return np.concatenate([np.flatnonzero(changed[:n_old]), np.arange(n_old, n)])
    t = pinned.get("t_cos")
    old_last = np.asarray(store.array("knn/sim")[:, -1], np.float32)
    lost = changed[:n_old] & (old_last >= np.float32(t if t is not None else -1.0))
    return np.concatenate([np.flatnonzero(lost), np.arange(n_old, n)])


def _learned_targets(store: RunStore, paths: dict, old_labels: np.ndarray, n_old: int, n: int,
                     model_dir: str, mode: str = "new") -> tuple[np.ndarray, np.ndarray]:
    """Learned method: which new faces join an old cluster as they are, and which faces are re-clustered.

    ``mode="new"``: each new face joins the cluster of its most probable old neighbour (at the model's
    attach level, else its floor) when it is a cluster of >= 2 faces; the new faces that join none are
    re-clustered with the old singletons they reach at P >= the floor.
    ``mode="touched"``: no face joins as it is; the new faces are re-clustered with every old cluster one
    of them reaches at P >= the floor (whole clusters).
    Returns (rows to re-cluster, joined id per new face or -1).

    Why not re-cluster every component a new face touches: at 5% added nearly every identity of more than
    a few faces gains one, and the closure held 92% of the faces (20k built-in faces: the add took 0.88
    of a full run, for the same F)."""
    meta = edge_meta(model_dir)
    floor = float(run_levels(meta, store)["floor"])  # an adapted run: the model's adapt_levels
    level = floor
    idx = np.asarray(store.root[paths["knn/index"]][n_old:n])
    prob = np.asarray(store.root[paths["edges/prob"]][n_old:n])
    sizes = np.bincount(old_labels) if n_old else np.zeros(0, np.int64)
    if mode == "touched":
        reach = (idx >= 0) & (idx < n_old) & (prob >= np.float32(floor))
        hit = np.zeros(len(sizes), bool)
        hit[old_labels[idx[reach]]] = True
        return (np.concatenate([np.flatnonzero(hit[old_labels]), np.arange(n_old, n)]).astype(np.int64),
                np.full(n - n_old, -1, np.int64))
    attached = attach_new(idx, prob, old_labels, sizes >= 2, level)
    free = attached < 0
    nb, p = idx[free], prob[free]
    reach = (nb >= 0) & (nb < n_old) & (p >= np.float32(floor))
    cand = unique_sorted(nb[reach])
    singles = cand[sizes[old_labels[cand]] == 1]
    return np.concatenate([singles, n_old + np.flatnonzero(free)]).astype(np.int64), attached


def _cluster_sub(sub: RunStore, cfg: Config, client, method: str, pinned: dict, model_dir: str | None):
    """Run the method's stages on the sub-run with the whole run's anchor and thresholds; (labels, scores)."""
    import dataclasses

    cfg = dataclasses.replace(cfg, proposals=dataclasses.replace(cfg.proposals, min_edge_sim=pinned["min_edge_sim"]))
    if method == "threshold":
        if pinned.get("t_prob") is not None:  # the cut in probability space: edges/prob is the sub-run's already
            run_prob_threshold_clusters(sub, model_dir, cfg, client, level=pinned["th"], max_size=pinned.get("max_size"))
        else:
            run_graph(sub, cfg, client, anchor=pinned["anchor"])
            run_threshold_clusters(sub, pinned["th"], cfg, client, max_size=pinned.get("max_size"))
        return np.asarray(sub.array("clusters")[:], np.int64), None
    runners = stage_runners(model_dir, cfg, log.info)
    for name, runner in runners.items():
        if name in ("knn", "edges"):
            continue  # written by the add
        if name == "graph":
            run_graph(sub, cfg, client, anchor=pinned["anchor"])
            continue
        try:
            runner(sub, cfg, client)
        except BadInput:
            if name != "proposals":
                raise
            # no group of these faces reaches any proposal threshold: each stays on its own (a whole run
            # with no proposal is refused as a sign of wrong thresholds; here the thresholds are the run's)
            log.info("add: the faces re-clustered form no proposal; they stay singletons")
            n = int(sub.array("features").shape[0])
            return np.arange(n, dtype=np.int64), np.full(n, np.nan, np.float32)
    return np.asarray(sub.array("clusters")[:], np.int64), np.asarray(sub.array("clusters_score")[:], np.float32)


def _commit(store: RunStore, w: StageWriter, clustering: dict, additions: list[dict], summary: dict,
            model_dir: str | None):
    """Seal the add's arrays and commit them with every record they change (one journalled step).

    The grown stages' records get the digests their stages would compute now, so a later
    ``facecluster cluster`` keeps the grown kNN lists and edge probabilities and recomputes the rest."""
    learned = model_dir is not None
    sealed = store.seal(w)
    now = now_iso()
    records = {}
    owned = {"ingest": ["features", "input_rows", "labels"], "knn": ["knn/index", "knn/sim", "knn/ivf_list"]}
    if learned:
        owned["edges"] = ["edges/prob", "edges/row_summary", "edges/first_ids"]  # the last two: runs since 0.3.1
    identities = {}
    for stage, names in owned.items():
        rec = dict(store.record(stage))
        arrays = dict(rec.get("arrays") or {})
        arrays.update({a: sealed[a] for a in names if a in sealed})
        rec.update(arrays=arrays, run=uuid.uuid4().hex[:16], added=len(additions), finished=now)
        rec["summary"] = {**rec.get("summary", {}), "n": summary["n"]}
        if stage != "ingest":  # its input is the grown upstream stage
            rec["upstream"] = {dep: identities[dep] for dep in rec.get("inputs", [])}
            # the edges stage's digest chains its model's path (run_edges' ``extra``)
            extra = {"model": os.path.abspath(model_dir)} if stage == "edges" else None
            rec["digest"] = digest(stage, rec["params"], rec["upstream"], extra)
        records[stage] = rec
        identities[stage] = record_identity(rec)
    inputs = ["knn"] + (["edges"] if learned else [])
    upstream = {dep: identities[dep] for dep in inputs}
    params = {"clustering": clustering, "additions": additions}
    records[STAGE] = {"params": params, "inputs": inputs, "upstream": upstream, "digest": digest(STAGE, params, upstream),
                      "run": uuid.uuid4().hex[:16], "started": additions[-1]["time"], "finished": now,
                      "complete": True, "status": "complete", "outputs": sorted(k for k in sealed if k.startswith("clusters")),
                      "arrays": {k: v for k, v in sealed.items() if k.startswith("clusters")}, "summary": summary,
                      "versions": store.record("ingest").get("versions")}
    for name, rec in store.records().items():
        if (name in SUPERSEDED or name.startswith("dedup:")) and not rec.get("superseded_by"):
            records[name] = {**rec, "superseded_by": STAGE, "complete": False, "status": "superseded by add"}
    store.commit(w, records)
