"""Stage "proposals": super-vertices (Algorithm 1) and multi-scale proposals (Algorithm 2).

Every setting's super-vertices, at its th0 and at every raised threshold of its
ladder, are cuts of the one maximum spanning forest written by the "graph"
stage, so a setting needs only the forest (<= N-1 edges) and one streaming pass
over ``features`` for the level >= 1 mean features. Settings run as parallel
Dask tasks per group of settings sharing a level-0 cut (:func:`cut_key`: they
differ only at level >= 1, and share the cut, the sums and the level-1 kNN): one
cut task, one levels task; their proposals are merged, de-duplicated (identical
member sets kept once, first by (setting, level)) and stored as CSR.

The level-1 kNN among super-vertices: exact up to ``EXACT_MAX`` of them (in the
levels task); above, in the cut task, among the candidates the faces' own kNN lists
propose and their neighbours' neighbours (:func:`facecluster.tasks.proposals.face_graph_knn`,
one more streaming pass, over ``knn/index``): at 1M built-in faces it found 0.92 of the
exact top-3 where the IVF search it replaced found 0.49, at a third of the stage's time,
and its work grows linearly with the faces (the IVF's as N^1.5).

Thresholds: unless explicit ones are given, the anchor threshold is derived from
the data's kNN similarity distribution (:func:`facecluster.tasks.thresholds.auto_threshold`)
and the preset's settings are placed relative to it.

Also here: :func:`run_threshold_clusters`, the threshold clustering baseline
(components of the forest at one threshold, stage "clusters").
"""

from __future__ import annotations

import logging
import uuid

import numpy as np

from distributed import as_completed

from facecluster.tasks import proposals as tp
from facecluster.tasks.arrays import unique_sorted

from ..cluster import pick
from ..config import Config
from ..errors import BadInput
from ..forest import row_chunks
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "proposals"
CLUSTERS_STAGE = "clusters"
OPEN_CUTS = 2  #: groups of settings between their cut and their levels at once (at least one per worker)
SUMS_CHUNK_ROWS = 1 << 16  #: rows per chunk of a cut's scratch array of super-vertex feature sums


# -- worker tasks -------------------------------------------------------------------------
def _forest(url: str):
    return (open_array(url, "graph/forest_src")[:], open_array(url, "graph/forest_dst")[:],
            open_array(url, "graph/forest_sim")[:])


def cut_key(setting: dict) -> tuple:
    """Settings with equal keys share their level-0 cut (super-vertices) and level-1 kNN graph."""
    return (setting["th0"], setting["step"], setting["max_size"], setting["sv_k"], setting["levels"] > 1)


def cut_task(url: str, settings: list[dict], min_size: int, max_proposal_size: int, sums_path: str | None = None,
             exact_max: int | None = None) -> dict:
    """Worker task: what the settings of one :func:`cut_key` share, up to their level-1 kNN.

    The super-vertices, their level-0 proposals and, for multi-level settings, the
    feature sums of the super-vertices (one streaming pass over ``features``): in the
    state, or, given ``sums_path`` (a scratch array of at least as many rows as faces),
    written there and read back by :func:`cut_sums`. Above ``exact_max`` (default ``EXACT_MAX``) super-vertices
    also their level-1 kNN (``state["knn1"]``) among the candidates of the faces' kNN lists.
    """
    from facecluster.tasks import proposals as P
    from facecluster.tasks.components import super_vertices

    if len({cut_key(s) for s in settings}) != 1:
        raise ValueError("settings_task: settings must share their cut_key")
    first = settings[0]
    src, dst, sim = _forest(url)
    feats = open_array(url, "features")
    n = feats.shape[0]
    labels, _ = super_vertices(n, src, dst, sim, first["th0"], first["step"], first["max_size"])
    n_groups = int(labels.max()) + 1 if n else 0
    # whole-component settings (max_size above the proposal cap) keep components up to their own max_size
    cap0 = max(int(max_proposal_size), int(first["max_size"]))
    state = {"labels": labels, "n_groups": n_groups, "largest": int(np.bincount(labels).max()) if n else 0,
             "level0": (0,) + P.to_csr(P.select_proposals(labels, min_size, cap0)), "sums0": None}
    if first["levels"] > 1 and n_groups > 1:
        r = int(feats.chunks[0])
        sums0 = np.zeros((n_groups, feats.shape[1]), np.float64)
        for a in range(0, n, r):  # stream the features: one chunk in memory at a time
            P.add_group_sums(sums0, feats[a:a + r], labels[a:a + r])
        if sums_path is None:
            state["sums0"] = sums0
        else:
            # on disk between the cut and its levels task: the state stays on a worker while both workers
            # search this group's and another group's level-1 kNN, and at 1M faces these float64 sums were
            # 1 GB of a worker's 4.1 GB peak (sampled: one cut's sums beside both groups' kNN plans); written
            # before the level-1 kNN, which needs only the unit means, so that the sums are gone while it runs.
            # One chunk at a time: written whole, zarr encoded several chunks at once, each copied on its way
            # (sampled at 1M: the task's RSS 2.3 -> 3.4 GB while it wrote the 1 GB of sums)
            out = open_array(url, sums_path, mode="r+")
            for a, b in row_chunks(n_groups, int(out.chunks[0])):
                out[a:b] = sums0[a:b]
            state["sums_path"] = sums_path
        graph_knn = n_groups > (P.EXACT_MAX if exact_max is None else exact_max)
        means = P.unit_means(sums0) if graph_knn else None
        del sums0
        if graph_knn:
            index = open_array(url, "knn/index")
            rk, m = int(index.chunks[0]), min(P.GRAPH_NEIGHBOURS, index.shape[1])
            stats = {}
            state["knn1"] = P.face_graph_knn(labels, means, first["sv_k"],
                                             ((a, index[a:a + rk, :m]) for a in range(0, n, rk)), stats)
            state["level1_pairs"] = stats["pairs"]  # the similarities it computed (bench's work-bound)
    return state


def cut_sums(url: str, state: dict) -> np.ndarray | None:
    """A cut's super-vertex feature sums (None for single-level settings)."""
    if state.get("sums_path"):
        return np.asarray(open_array(url, state["sums_path"])[:state["n_groups"]])
    return state["sums0"]


def levels_task(url: str, settings: list[dict], state: dict, min_size: int, max_proposal_size: int) -> list[dict]:
    """Worker task: every setting's levels >= 1 from its cut.

    The level-1 kNN is the cut's (``state["knn1"]``) or, up to ``EXACT_MAX``
    super-vertices, searched exactly here. Returns, per setting, ``{"levels": [(level,
    offsets, members), ...], "n_super_vertices": ..., "largest_super_vertex": ...}``
    (the same as running each setting alone).
    """
    from facecluster.tasks import proposals as P

    from ..cluster import worker_threads

    first, sums0 = settings[0], cut_sums(url, state)
    knn1 = None
    if sums0 is not None:
        knn1 = state.get("knn1")
        if knn1 is None:
            knn1 = P.level_knn(sums0, first["sv_k"], worker_threads())
    outs = []
    for setting in settings:
        out = {"levels": [state["level0"]], "n_super_vertices": state["n_groups"], "largest_super_vertex": state["largest"],
               "level1_pairs": state.get("level1_pairs")}
        outs.append(out)
        if sums0 is None:
            continue
        sums, face_labels = sums0, state["labels"]
        for level in range(1, setting["levels"]):
            g, ng = P.higher_level(sums, setting["sv_k"], setting["sv_th"], setting["step"], setting["sv_max_size"],
                                   worker_threads(), knn=knn1 if level == 1 else None)
            face_labels = g[face_labels]
            nodes = np.bincount(g, minlength=ng)
            out["levels"].append((level,) + P.to_csr(P.select_proposals(face_labels, min_size, max_proposal_size,
                                                                           nodes, min_nodes=2)))
            if ng == len(sums):
                break  # nothing merged: higher levels would repeat this one
            sums = P.aggregate_sums(sums, g, ng)
    return outs


def settings_task(url: str, settings: list[dict], min_size: int, max_proposal_size: int) -> list[dict]:
    """All levels of settings that share one :func:`cut_key`, in one process (what the stage's
    cut and levels tasks compute together).

    The super-vertices, the feature sums and the level-1 kNN among super-vertices are
    computed once for the group (at 1M faces that kNN was 87% of a setting's time);
    each setting then groups them with its own ``sv_th`` / ``sv_max_size``.
    """
    return levels_task(url, settings, cut_task(url, settings, min_size, max_proposal_size, exact_max=tp.EXACT_MAX),
                       min_size, max_proposal_size)


def communities_task(url: str, column: int, min_size: int, max_size: int) -> dict:
    """Worker task: the stored Infomap communities at one floor (``column``) of ``min_size``..``max_size``
    faces, as one setting's result."""
    from facecluster.tasks import proposals as P

    labels = open_array(url, "communities/labels")[:, column]
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    return {"levels": [(0,) + P.to_csr(P.select_proposals(labels, min_size, max_size))],
            "n_super_vertices": int(len(sizes)), "largest_super_vertex": int(sizes.max()) if len(sizes) else 0}


def setting_counts(res: dict) -> dict:
    """Worker task: a setting's result without its proposal lists (level -> number of proposals)."""
    return {"n_super_vertices": res["n_super_vertices"], "largest_super_vertex": res["largest_super_vertex"],
            "level1_pairs": res.get("level1_pairs"),
            "levels": [(int(lv), int(len(o) - 1)) for lv, o, _ in res["levels"]]}


def combine_task(settings: list[dict], results: list[dict]) -> dict:
    """Worker task: order, de-duplicate and flatten every setting's proposals into CSR."""
    from facecluster.tasks import proposals as P

    groups, setting_of, level_of = [], [], []
    for s, res in zip(settings, results):
        for level, offsets, members in res["levels"]:
            for g in P.from_csr(offsets, members):
                groups.append(g)
                setting_of.append(s["id"])
                level_of.append(level)
    kept, pos = P.dedup_proposals(groups)
    offsets, members = P.to_csr(kept)
    return {"offsets": offsets, "members": members,
            "setting": np.asarray(setting_of, np.int32)[pos] if len(pos) else np.zeros(0, np.int32),
            "level": np.asarray(level_of, np.int32)[pos] if len(pos) else np.zeros(0, np.int32),
            "before_dedup": len(groups)}


def threshold_task(url: str, th: float, step: float, max_size: int | None) -> np.ndarray:
    """Worker task: components of the forest at ``th`` (Algorithm 1 splitting when ``max_size``)."""
    from facecluster.tasks.components import super_vertices, threshold_components

    src, dst, sim = _forest(url)
    n = open_array(url, "knn/index").shape[0]
    if max_size:
        return super_vertices(n, src, dst, sim, th, step, max_size)[0]
    return threshold_components(n, src, dst, sim, th)


def graph_anchor(store: RunStore) -> dict:
    """The anchor threshold recorded by the graph stage ({"anchor", "rows_sampled", "sim_quantiles", "source"})."""
    return dict(store.require("graph")["summary"]["anchor"])


def check_threshold(store: RunStore, th: float) -> None:
    """BadInput when ``th`` lies below the edge floor the graph was built with (its cut would be wrong)."""
    floor = store.require("graph")["summary"].get("min_edge_sim")
    if floor is not None and th < floor:
        raise BadInput(f"{store.url}: threshold {th:.4g} is below the graph's edge floor {floor:.4g} (edges below it were "
                       f"not kept); rebuild the graph with `--min-edge-sim {th:.4g}` (or -1 to keep every edge)")



# -- driver ---------------------------------------------------------------------------------
def resolve_settings(store: RunStore, cfg: Config, client) -> tuple[list[dict], dict]:
    """The settings to run (explicit thresholds, or placed around the data's anchor threshold)."""
    from facecluster.tasks.thresholds import make_settings

    pc = cfg.proposals
    if pc.thresholds:
        info = {**graph_anchor(store), "anchor": min(pc.thresholds), "source": "explicit thresholds"}
        check_threshold(store, min(pc.thresholds))
    else:
        info = graph_anchor(store)
    settings = make_settings(pc.preset, info["anchor"], pc.step, pc.max_size, pc.thresholds, pc.sv_k, pc.levels,
                             pc.sv_th, pc.whole_size)
    return settings, info


def _size_stats(sizes: np.ndarray) -> dict:
    if len(sizes) == 0:
        return {"count": 0}
    q = np.quantile(sizes, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"count": int(len(sizes)), "faces": int(sizes.sum()), "min": int(q[0]), "p25": float(q[1]),
            "median": float(q[2]), "p75": float(q[3]), "max": int(q[4]), "mean": float(sizes.mean())}


def run_proposals(store: RunStore, cfg: Config, client, force: bool = False, communities: bool = False,
                  super_vertices: bool = True) -> dict:
    """Compute and store the multi-scale proposals (stage "proposals").

    Needs the "graph" stage (the forest) and ``features``. Writes
    ``proposals/offsets`` (P+1 int64), ``proposals/members`` (M int64, each
    proposal's members ascending), ``proposals/setting`` and ``proposals/level``
    (P int32). Proposals are ordered by (setting, level, smallest member); a
    member set produced by several settings is kept once (first occurrence).

    ``communities``: also propose every Infomap community of the learned-affinity
    graph (stage "communities", which must be complete), at each of its floors, of
    ``min_size`` up to ``max(max_proposal_size, whole_size)`` faces: one more setting
    per floor (``"source": "communities"``), combined before the super-vertex settings
    (so a member set both produce counts as a community).

    ``super_vertices=False`` (with ``communities``): the communities alone, no super-vertex setting and no
    graph stage needed (a model whose output is its communities needs nothing else, ``[edges] output_only``).
    No community of ``min_size``.. faces then means no proposal, not an error: every face is a singleton
    before the attach step, as the communities output of a full run would have it.

    Returns
    -------
    dict : the stage summary (settings with thresholds, anchor, counts per
        setting and level, size distribution, warnings).

    Raises
    ------
    BadInput : when no setting yields any proposal (super-vertex settings).
    """
    if not (super_vertices or communities):
        raise ValueError("run_proposals: without super-vertex settings the communities are the only proposals")
    pc = cfg.proposals
    if super_vertices:
        store.require("graph", f"run the graph stage first (facecluster proposals {store.url} runs it)")
        settings, info = resolve_settings(store, cfg, client)
    else:
        settings, info = [], {}
    params = {"settings": settings, "min_size": pc.min_size, "max_proposal_size": pc.max_proposal_size,
              "communities": bool(communities)}
    if not super_vertices:  # absent otherwise: a full run recorded before the option keeps its digest
        params["super_vertices"] = False
    inputs = (["graph"] if super_vertices else []) + (["communities"] if communities else [])
    with store.stage(STAGE, params, inputs=inputs, force=force) as w:
        if w is None:
            return store.record(STAGE).get("summary", {})
        token = uuid.uuid4().hex[:8]
        groups = {}
        for i, s in enumerate(settings):
            groups.setdefault(cut_key(s), []).append(i)
        # Multi-level groups with more super-vertices first (a higher th0 cuts more): the longest work starts first.
        order = sorted(groups.values(), key=lambda ix: (settings[ix[0]]["levels"] <= 1, -settings[ix[0]]["th0"]))
        futs = [None] * len(settings)
        cuts, open_groups, sums_paths = {}, {}, {}
        done = as_completed()
        n_faces, dim = store.array("features").shape

        def start(j: int) -> None:
            group, members = [settings[i] for i in order[j]], order[j]
            if group[0]["levels"] > 1:  # room for the cut's sums (at most one row per face; rows never written stay unstored)
                sums_paths[j] = w.scratch_space(f"sums-{j}", (n_faces, dim), (SUMS_CHUNK_ROWS, dim), np.float64)
            cuts[j] = client.submit(cut_task, store.url, group, pc.min_size, pc.max_proposal_size, sums_paths.get(j),
                                    tp.EXACT_MAX, key=f"proposals-cut-{j}-{token}", priority=len(order) - j)
            grp = client.submit(levels_task, store.url, group, cuts[j], pc.min_size, pc.max_proposal_size,
                                key=f"proposals-levels-{j}-{token}", priority=len(order) - j)
            for pos, i in enumerate(members):
                futs[i] = client.submit(pick, grp, pos, key=f"proposals-setting-{settings[i]['id']}-{token}")
            open_groups[grp] = j
            done.add(grp)

        # At most OPEN_CUTS groups between their cut and their levels: a cut's state (its super-vertices' level-1
        # kNN, at 1M faces each cut's sums were 1 GB before they went to scratch arrays) stays on a worker until
        # its levels task has run.
        n_open = min(len(order), max(OPEN_CUTS, len(client.scheduler_info().get("workers", {}))))
        for j in range(n_open):
            start(j)
        nxt = n_open
        for fut in done:  # a group's levels ran: release its cut, start the next group
            if fut.status == "error":
                fut.result()  # raises the task's exception (its result stays on the workers otherwise)
            j = open_groups.pop(fut)
            del cuts[j]
            if j in sums_paths:
                w.drop_scratch(sums_paths.pop(j))
            if nxt < len(order):
                start(nxt)
                nxt += 1
        if communities:
            # first in the combine order: a member set that a super-vertex setting also produced is kept once, as
            # a community (dedup with the model's communities as output selects proposals by their setting)
            cap = max(pc.max_proposal_size, pc.whole_size)
            comm_settings, comm_futs = [], []
            for col, floor in enumerate(store.record("communities")["summary"]["floors"]):
                comm_settings.append({"id": len(settings) + col, "source": "communities", "floor": floor,
                                      "max_size": cap, "levels": 1})
                comm_futs.append(client.submit(communities_task, store.url, col, pc.min_size, cap,
                                               key=f"proposals-communities-{col}-{token}"))
            settings, futs = comm_settings + settings, comm_futs + futs
        # Only each setting's counts come to the driver; its proposal lists go straight to the combine task.
        results = wait_futures([client.submit(setting_counts, f, key=f"proposals-counts-{s['id']}-{token}")
                                for s, f in zip(settings, futs)], "proposals")
        comb = client.submit(combine_task, settings, futs, key=f"proposals-combine-{token}").result()
        sizes = np.diff(comb["offsets"])
        per_setting, warnings = [], []
        for s, res in zip(settings, results):
            m = comb["setting"] == s["id"]
            row = {**s, "super_vertices": res["n_super_vertices"], "largest_super_vertex": res["largest_super_vertex"],
                   "level1_pairs": res.get("level1_pairs"),
                   "proposals": int(m.sum()),
                   "before_dedup": {str(lv): cnt for lv, cnt in res["levels"]},
                   "per_level": {str(lv): int((m & (comb["level"] == lv)).sum()) for lv, _ in res["levels"]},
                   "sizes": _size_stats(sizes[m])}
            per_setting.append(row)
            if sum(row["before_dedup"].values()) == 0:
                what = (f"the communities at P >= {s['floor']}" if s.get("source") == "communities" else
                        f"setting {s['id']} (th0={s['th0']:.6g}, max_size={s['max_size']}, sv_max_size={s['sv_max_size']})")
                msg = f"{what} yields no proposal of {pc.min_size}..{pc.max_proposal_size} faces"
                warnings.append(msg)
                log.warning(msg)
        if len(sizes) == 0 and super_vertices:
            q = info.get("sim_quantiles", {})
            raise BadInput(
                f"{store.url}: no proposal from any of {len(settings)} settings (thresholds "
                f"{sorted({s['th0'] for s in settings if 'th0' in s})}; kNN similarity median {q.get('0.5', float('nan')):.3g}, "
                f"99th percentile {q.get('0.99', float('nan')):.3g}); pass thresholds within the data's similarity "
                "range (--th) or lower --min-size")
        w.write_array("proposals/offsets", comb["offsets"])
        w.write_array("proposals/members", comb["members"])
        w.write_array("proposals/setting", comb["setting"])
        w.write_array("proposals/level", comb["level"])
        summary = {"n_proposals": int(len(sizes)), "before_dedup": int(comb["before_dedup"]),
                   "threshold": info, "settings": per_setting, "sizes": _size_stats(sizes),
                   "per_level": {str(lv): int((comb["level"] == lv).sum()) for lv in np.unique(comb["level"]).tolist()},
                   "faces_covered": int(len(unique_sorted(comb["members"]))), "warnings": warnings}
        w.summary.update(summary)
        return summary


def read_proposals(store: RunStore) -> dict:
    """The stored proposals: offsets, members, setting, level (numpy arrays)."""
    store.require(STAGE)
    return {k: store.array(f"proposals/{k}")[:] for k in ("offsets", "members", "setting", "level")}


def run_threshold_clusters(store: RunStore, th: float | None, cfg: Config, client, max_size: int | None = None,
                           force: bool = False) -> dict:
    """The threshold clustering baseline: one cluster per component of the forest at ``th``.

    ``th=None`` uses the automatic threshold of the data. With ``max_size``,
    oversized components are split by Algorithm 1 (ladder step
    ``cfg.proposals.step``). Writes ``clusters`` (N int64, every face labelled,
    ids 0..C-1 by smallest member) in stage "clusters" (params record the method).
    """
    store.require("graph", f"run the graph stage first (facecluster proposals {store.url} runs it)")
    info = {"anchor": th, "source": "explicit"}
    if th is None:
        info = graph_anchor(store)
    check_threshold(store, float(info["anchor"]))
    th = float(info["anchor"])
    params = {"method": "threshold", "th": th, "max_size": max_size, "step": cfg.proposals.step if max_size else None}
    with store.stage(CLUSTERS_STAGE, params, inputs=["graph"], force=force) as w:
        if w is None:
            return store.record(CLUSTERS_STAGE).get("summary", {})
        labels = client.submit(threshold_task, store.url, th, cfg.proposals.step, max_size,
                               key=f"clusters-threshold-{uuid.uuid4().hex[:8]}").result()
        w.write_array("clusters", labels.astype(np.int64))
        sizes = np.bincount(labels)
        summary = {"method": "threshold", "th": th, "threshold": info, "max_size": max_size,
                   "n_clusters": int(len(sizes)), "n_singletons": int((sizes == 1).sum()),
                   "largest": int(sizes.max()) if len(sizes) else 0}
        w.summary.update(summary)
        return summary
