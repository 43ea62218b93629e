"""Stage "dedup": Algorithm 3 as a distributed group-by argmax, written to ``clusters``.

1. map: one task per range of proposals (about ``gcn.dedup_faces`` memberships)
   reads its CSR slice, ``score/iou`` and ``score/keep``, reduces its (face, tier,
   score, pid) triples to one winner per face and splits them by face range;
2. reduce: one task per face range ``[lo, hi)`` combines the partial winners of
   every map task (argmax is associative, so any partition gives the same winner)
   and turns them into cluster keys (proposal / pruned part / singleton);
3. numbering: the driver merges each range's distinct keys with their smallest
   face (one entry per cluster) into ids 0..C-1 ordered by smallest face, and one
   task per range writes its slice of ``clusters`` (chunks = face ranges).

Where the model's output is its communities, the merge step (:func:`merge_on_workers`) keeps its entries
on the workers by face range; the driver sees only per-pair sums and per-cluster arrays.

See ``facecluster.tasks.dedup`` for the exact semantics; ``facecluster.tasks.dedup.dedup_sequential`` is
the paper's loop, tested to agree.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np

from facecluster.tasks.arrays import unique_sorted
from facecluster.tasks.merge import MergeRounds, combine_sums, eligible_clusters

from ..cluster import pick, total_threads, worker_infos
from ..config import Config
from ..forest import row_chunks
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "dedup"


def map_task(url: str, p0: int, p1: int, bounds: np.ndarray, use_gcns: bool = True, settings=None) -> list:
    """Partial winners of proposals ``[p0, p1)``, split by face range (``use_gcns=False``: ignore GCN-S;
    ``settings``: only proposals of these settings take part)."""
    from facecluster.tasks.dedup import argmax_by_face, proposal_triples, split_by_face

    off = open_array(url, "proposals/offsets")[p0:p1 + 1]
    a, b = int(off[0]), int(off[-1])
    members = open_array(url, "proposals/members")[a:b]
    keep = open_array(url, "score/keep")[a:b] if use_gcns else None
    iou = open_array(url, "score/iou")[p0:p1]
    t = proposal_triples(off - a, members, iou, keep, pid0=p0)
    if settings is not None:
        allowed = np.isin(open_array(url, "proposals/setting")[p0:p1], np.asarray(settings))
        take = allowed[t[3] - p0]
        t = tuple(x[take] for x in t)
    return split_by_face(argmax_by_face(t), bounds)


def reduce_task(lo: int, hi: int, *parts):
    """Cluster keys of faces ``[lo, hi)``, their (key, first face) list, and each face's winning score."""
    from facecluster.tasks.dedup import argmax_by_face, first_faces, range_keys

    t = argmax_by_face(*parts)
    keys = range_keys(t, lo, hi)
    # The predicted IoU of the proposal that labelled each face (NaN: singleton, no proposal).
    score = np.full(hi - lo, np.nan, np.float32)
    face, tier, sc, _pid = t
    won = tier == 0
    score[face[won] - lo] = sc[won]
    return keys, first_faces(keys, lo), score


def first_of(res):
    return res[1]


def write_task(url: str, path: str, score_path: str, lo: int, hi: int, res, table_keys: np.ndarray,
               table_ids: np.ndarray) -> np.ndarray:
    """Write ``clusters[lo:hi]`` and the faces' winning scores (one whole chunk each); returns the range's singletons."""
    from facecluster.tasks.dedup import apply_numbering

    ids = apply_numbering(res[0], table_keys, table_ids)
    open_array(url, path, mode="r+")[lo:hi] = ids
    open_array(url, score_path, mode="r+")[lo:hi] = res[2]
    return lo + np.flatnonzero(np.asarray(res[0]) < 0)  # singleton keys are negative (tasks.dedup.range_keys)


def attach_task(url: str, score_path: str, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker task: each singleton face's most probable neighbour among faces a proposal claimed, and its P."""
    from facecluster.tasks.edges import best_claimed_neighbour

    idx = open_array(url, "knn/index").get_orthogonal_selection((faces, slice(None)))
    prob = open_array(url, "edges/prob").get_orthogonal_selection((faces, slice(None)))
    nb = unique_sorted(idx[idx >= 0])
    claimed_nb = np.isfinite(open_array(url, score_path).get_orthogonal_selection((nb,)))  # NaN: no proposal won it
    pos = np.searchsorted(nb, np.maximum(idx, 0))
    claimed = (idx >= 0) & claimed_nb[np.minimum(pos, max(len(nb) - 1, 0))] if len(nb) else np.zeros(idx.shape, bool)
    target, p = best_claimed_neighbour(idx, prob, claimed)
    return faces, target, p


def merge_entries_task(url: str, lo: int, hi: int, labels: np.ndarray, eligible: np.ndarray, bounds: np.ndarray):
    """Worker task: the (face, other cluster, best P) entries of kNN rows ``[lo, hi)`` for the merge step, split
    by the face ranges ``bounds``."""
    from facecluster.tasks.dedup import split_by_face
    from facecluster.tasks.merge import cross_entries

    return split_by_face(cross_entries(lo, open_array(url, "knn/index")[lo:hi], open_array(url, "edges/prob")[lo:hi],
                                       labels, eligible), bounds)


def merge_range_task(*parts):
    """Worker task: one face range's entries from every row chunk's share of them."""
    from facecluster.tasks.merge import combine_entries

    return combine_entries(*parts)


def merge_round_task(entries, labels: np.ndarray, cur: np.ndarray):
    """Worker task: one face range's entries under the current clusters, and its per-pair sums."""
    from facecluster.tasks.merge import round_sums

    return round_sums(entries, labels, cur)


def merge_ranges(n: int, threads: int, chunk_rows: int) -> np.ndarray:
    """Face-range bounds of the merge step's entries: about 4 ranges per worker thread, none under a chunk of
    kNN rows (the result does not depend on them: :func:`facecluster.tasks.merge.round_sums`)."""
    count = max(1, min(4 * int(threads), -(-n // max(1, int(chunk_rows)))))
    return np.unique(np.linspace(0, n, count + 1).astype(np.int64))


def merge_on_workers(client, url: str, labels: np.ndarray, level: float, chunk_rows: int, token: str):
    """The merge step (:func:`facecluster.tasks.merge.merge_clusters`) with its entries on the workers.

    One task per chunk of kNN rows gathers that chunk's cross-cluster entries, split by face range; one task
    per face range combines them and keeps them; every round, each range's task re-reads its entries under the
    current clusters and returns its per-pair sums, and only those (one per pair of clusters that share an
    entry) come to the driver, which picks the round's merges. The driver held every entry before: ~10 per face
    on planted lists at 1M faces, 20 B each plus the rounds' sorts (3.9 GB at 3M faces)."""
    n = len(labels)
    bounds = merge_ranges(n, total_threads(worker_infos(client)), chunk_rows)
    lab_f, elig_f = client.scatter([labels, eligible_clusters(labels)], broadcast=True)
    # one task per chunk of knn rows, not per face range (gcn.dedup_faces = 2^20 rows): a task's temporaries
    # are ~50 B per kNN edge, 4.4 GB on one worker for a 1M-face range (bench scale at 1M, session 25)
    chunks = [client.submit(merge_entries_task, url, lo, hi, lab_f, elig_f, bounds, key=f"dedup-merge-{lo}-{token}")
              for lo, hi in row_chunks(n, chunk_rows)]
    ranges = [client.submit(merge_range_task, *[client.submit(pick, c, i, key=f"dedup-mpick-{j}-{i}-{token}")
                                                for j, c in enumerate(chunks)], key=f"dedup-mrange-{i}-{token}")
              for i in range(len(bounds) - 1)]
    del chunks  # each chunk's entries are freed once every range has taken its share
    rounds = MergeRounds(labels, level)
    while True:
        cur_f = client.scatter(rounds.cur, broadcast=True)
        outs = [client.submit(merge_round_task, e, lab_f, cur_f, key=f"dedup-round-{rounds.rounds}-{i}-{token}")
                for i, e in enumerate(ranges)]
        ranges = [client.submit(pick, o, 0, key=f"dedup-rentries-{rounds.rounds}-{i}-{token}")
                  for i, o in enumerate(outs)]
        sums = combine_sums(*wait_futures([client.submit(pick, o, 1, key=f"dedup-rsums-{rounds.rounds}-{i}-{token}")
                                           for i, o in enumerate(outs)], "merge"))
        del outs
        if not rounds.step(sums):
            return rounds.labels()


def _proposal_ranges(offsets: np.ndarray, per: int) -> list[tuple[int, int]]:
    """Ranges of proposals with about ``per`` memberships each."""
    n_prop = len(offsets) - 1
    if n_prop == 0:
        return []
    cuts = np.searchsorted(offsets, np.arange(0, int(offsets[-1]), per), side="right") - 1
    cuts = np.unique(np.concatenate([np.clip(cuts, 0, n_prop), [n_prop]]))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def run_dedup(store: RunStore, cfg: Config, client, force: bool = False, use_gcns: bool = True,
              out: str = "clusters", attach: float | None = None, source: str = "proposals",
              merge: float | None = None) -> dict:
    """Labels every face from the scored proposals (stage "dedup", input "score"); writes ``clusters``.

    ``use_gcns=False`` ignores GCN-S's pruning (GCN-D alone). ``out`` names the
    output array (``clusters`` by default; another name is its own stage,
    ``dedup:<out>``, e.g. the demo's ``clusters_gcnd`` beside ``clusters``). The
    predicted IoU of the proposal that labelled each face goes to ``<out>_score``
    (NaN for faces no proposal claimed).

    ``attach``: a level of P(same identity) (the model's, chosen in training): a face
    no proposal claimed joins the cluster of its most probable neighbour among the
    claimed faces when that probability is at least the level (needs stage "edges");
    clusters are then renumbered 0..C-1 by smallest face. None: they stay singletons.

    ``merge``: a level of the affinity between two clusters (the model's, chosen in training on its
    communities): clusters of >= 3 faces are merged in rounds of mutual best partners at or above it
    (:mod:`facecluster.tasks.merge`; one task per face range gathers its kNN rows' cross-cluster entries,
    the driver runs the rounds on them), before the attach step. None: no merge.

    ``source``: "proposals" (every proposal competes: Algorithm 3) or "communities"
    (only the communities at the model's floor, the first communities setting: they
    are disjoint, so each of their faces keeps its community; the model chooses this
    output in training when it clusters the validation identities better).
    """
    from facecluster.tasks.dedup import global_numbering

    store.require("score", f"run `facecluster cluster {store.url} --model DIR` (it scores proposals) first")
    n = int(store.array("features").shape[0])
    per = int(cfg.gcn.dedup_faces)
    stage = STAGE if out == "clusters" else f"{STAGE}:{out}"
    settings = None
    if source == "communities":
        comm = [x["id"] for x in store.require("proposals")["summary"]["settings"] if x.get("source") == "communities"]
        if not comm:
            raise ValueError(f"{store.url}: dedup from the communities needs proposals made with them")
        settings = comm[:1]
    elif source != "proposals":
        raise ValueError(f"dedup source must be 'proposals' or 'communities', got {source!r}")
    params = {"faces_per_task": None, "use_gcns": bool(use_gcns), "out": out,  # partitioning never changes results
              "attach": None if attach is None else float(attach), "source": source}
    if merge is not None:  # absent otherwise: a run recorded before the merge step keeps its digest
        params["merge"] = float(merge)
    scored = attach is not None or merge is not None
    if scored:
        store.require("edges", "merging clusters or attaching faces needs the edge scorer's probabilities (stage 'edges')")
    with store.stage(stage, params, inputs=["score"] + (["edges"] if scored else []), force=force) as w:
        if w is None:
            return store.record(stage).get("summary", {})
        offsets = store.array("proposals/offsets")[:]
        bounds = np.unique(np.concatenate([np.arange(0, n, per), [n]])).astype(np.int64)
        token = uuid.uuid4().hex[:8]
        maps = [client.submit(map_task, store.url, a, b, bounds, bool(use_gcns), settings, key=f"dedup-map-{a}-{token}")
                for a, b in _proposal_ranges(offsets, per)]
        reds = []
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            parts = [client.submit(pick, m, i, key=f"dedup-pick-{j}-{i}-{token}") for j, m in enumerate(maps)]
            reds.append(client.submit(reduce_task, int(lo), int(hi), *parts, key=f"dedup-reduce-{lo}-{token}"))
        firsts = wait_futures([client.submit(first_of, r, key=f"dedup-first-{i}-{token}") for i, r in enumerate(reds)],
                              "dedup")
        tk, tid = global_numbering(firsts)
        w.create_array(out, (n,), (per,), np.int64)
        w.create_array(f"{out}_score", (n,), (per,), np.float32, fill_value=np.nan)
        tk_f, tid_f = client.scatter([tk, tid], broadcast=True)
        writes = [client.submit(write_task, store.url, w.tmp_path(out), w.tmp_path(f"{out}_score"), int(lo), int(hi),
                                r, tk_f, tid_f,
                                key=f"dedup-write-{lo}-{token}") for lo, hi, r in zip(bounds[:-1], bounds[1:], reds)]
        singletons = wait_futures(writes, "clusters")
        n_clusters = int(len(tk))
        singles = int((tk < 0).sum())
        merged = {"merges": 0, "rounds": 0, "faces_in_merged": 0}
        attaching = attach is not None and singles > 0
        # merge and attach rewrite the labels: read once, written once below
        arr = store.root[w.tmp_path(out)] if merge is not None or attaching else None
        labels = arr[:] if arr is not None else None
        if merge is not None:
            labels, merged = merge_on_workers(client, store.url, labels, float(merge),
                                              int(store.array("knn/index").chunks[0]), token)
            log.info("merge at %.4g: %d merges in %d rounds (%d faces in merged clusters)", merge,
                     merged["merges"], merged["rounds"], merged["faces_in_merged"])
        attached = 0
        if attaching:
            from facecluster.tasks.components import canonical_labels
            from facecluster.tasks.edges import attach as attach_faces

            parts = wait_futures([client.submit(attach_task, store.url, w.tmp_path(f"{out}_score"), f,
                                                key=f"dedup-attach-{i}-{token}")
                                  for i, f in enumerate(singletons) if len(f)], "attach")
            faces, target, p = (np.concatenate(x) for x in zip(*parts))
            unclaimed = np.zeros(n, bool)
            unclaimed[faces] = True
            tgt = np.full(n, -1, np.int64)
            tgt[faces] = target
            pr = np.zeros(n, np.float32)
            pr[faces] = p
            labels = canonical_labels(attach_faces(labels, unclaimed, tgt, pr, float(attach)))
            attached = int(((tgt >= 0) & (pr >= attach)).sum())
            singles -= attached
        if arr is not None:
            arr[:] = labels
            n_clusters = int(labels.max()) + 1 if n else 0
        pruned_parts = int(((tk >= 0) & (tk % 2 == 1)).sum())
        summary = {"n": n, "n_clusters": n_clusters, "singletons_uncovered": singles, "attached": attached,
                   "attach_level": attach, "merge_level": merge, **merged, "source": source,
                   "pruned_clusters": pruned_parts, "proposal_clusters": n_clusters - singles - pruned_parts,
                   "face_ranges": int(len(bounds) - 1), "map_tasks": len(maps), "use_gcns": bool(use_gcns),
                   "out": out}
        w.summary.update(summary)
        return summary
