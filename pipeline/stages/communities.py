"""Stage "communities": Infomap on the learned-affinity graph at several floors, one Dask task per group of components.

At each floor the graph is the kNN edges with P(same identity) >= that floor: the
multi-scale floors ``FLOORS`` (fixed in probability, which means the same on every
face model) plus the model's floor (chosen on validation identities in training).
The proposals stage offers every floor's communities to GCN-D, which picks among
them per proposal, as it does among the multi-scale super-vertex proposals.

Connected components are independent Infomap problems: they are cuts of one
maximum spanning forest of ``edges/prob`` (:mod:`facecluster.pipeline.forest`, built once
down to the lowest floor). The components of the lowest floor are packed into tasks of at most
``NODES_PER_TASK`` nodes (about ``TASKS_PER_WORKER`` tasks per worker; a component larger than that is a
task of its own per floor: the one part that stays in one process, reported as ``largest_component``); every higher
floor's components nest in them, so each task reads its nodes' kNN rows once and runs Infomap per
component at every floor (:func:`facecluster.tasks.peers.infomap_by_component`). A task's nodes lie in every
chunk (components are scattered over the face ids), so the rows are first regrouped by task in one pass over
the store (:func:`regroup_rows`, one Dask task per range of whole chunks, into scratch arrays) and each task
reads its own slices: reading them from the store decoded all of it per task (49 x 11 CPU-s at 10M faces),
so the partition does not depend on how components are packed, on the chunk size
or on the worker count.
A problem of ``CHILD_LINKS`` links or more runs in a child process of the worker
(:mod:`facecluster.tasks.infomap_child`): Infomap holds the GIL for its whole run, and a
worker whose event loop is silent for longer than the scheduler's ``worker-ttl`` is removed
(at 1M planted faces the giant component's task was lost every 600 s that way).
The machinery (:func:`infomap_components`) takes any weight array shaped like
``knn/index``: ``--method infomap`` runs it on the cosine ``knn/sim`` too.

Output ``communities/labels`` (N x F int64: column f holds the communities at
``floors[f]``, ids 0..C-1 by smallest member; the floors are in the stage summary,
the model's floor first).
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np

from facecluster.tasks.components import canonical_labels, components
from facecluster.tasks.peers import same_cut

from ..cluster import worker_infos
from ..config import Config
from ..forest import spanning_forest
from ..model_files import edge_meta, model_digest
from ..progress import wait_futures
from ..store import RunStore, StageWriter, open_array
from .edges import run_levels

log = logging.getLogger(__name__)

STAGE = "communities"
NODES_PER_TASK = 200_000
TASKS_PER_WORKER = 8  #: the default packing: about this many tasks per worker (each serves every floor)
MIN_NODES_PER_TASK = 5_000  # below this a task's overhead outweighs the parallelism
INFOMAP_SEED = 42
GATHER_ENTRIES = 1 << 24  #: kNN entries per task of the pass that regroups the rows by communities task
GATHER_CHUNK_ROWS = 8192  #: rows per chunk of the regrouped arrays: a task's slice decodes little beyond itself


def component_task(url: str, nodes_path: str, comp_path: str, a: int, b: int, floors: list[float],
                   weights: str, joint: bool, pieces: list[tuple], *gathered,
                   columns: list[int] | None = None) -> list[np.ndarray]:
    """Worker task: Infomap modules, at each of ``floors``, of whole components of the lowest floor (one array per
    floor, aligned with the task's nodes), numbered within each component of that floor (``joint``: one Infomap run per floor over all of them). The nodes (ascending) are
    entries ``[a, b)`` of the stage's scratch array ``nodes_path``, their component id at every floor the same rows
    of ``comp_path`` (one column per floor; ``columns``: the column of each of ``floors``, default in order).

    Their kNN rows (``knn/index`` and ``weights``) are read once for every floor, from ``pieces``: ``(index path,
    weights path, lo, hi)`` per row range of the store in range order, rows ``[lo, hi)`` of the arrays
    :func:`gather_task` regrouped by task (``gathered``: those tasks' futures, so that they run first). Read straight
    from the store, they cost a pass over all of it whatever the task's size (its nodes are spread over every chunk:
    11 CPU-s for 200k of 10M faces)."""
    from facecluster.tasks.peers import infomap_by_component

    nodes = open_array(url, nodes_path)[a:b]
    comps = open_array(url, comp_path)[a:b]
    idx = np.concatenate([open_array(url, ip)[lo:hi] for ip, _, lo, hi in pieces]).astype(np.int64, copy=False)
    w = np.concatenate([open_array(url, wp)[lo:hi] for _, wp, lo, hi in pieces])
    if len(idx) != len(nodes):
        raise RuntimeError(f"{url}: a communities task got {len(idx)} regrouped kNN rows for {len(nodes)} nodes")
    out = []
    for f_i, floor in zip(range(len(floors)) if columns is None else columns, floors):
        comp = comps[:, f_i]
        # a higher floor's components nest in the lowest floor's: the task holds them whole; its singletons sit
        # out (module 0, alone in their component)
        _, inv, count = np.unique(comp, return_inverse=True, return_counts=True)
        multi = count[inv.reshape(-1)] >= 2
        module = np.zeros(len(nodes), np.int64)
        module[multi] = infomap_by_component(nodes[multi], comp[multi], idx[multi], w[multi], floor,
                                             seed=INFOMAP_SEED, joint=joint)
        out.append(module)
    return out


def gather_task(url: str, task_path: str, a: int, b: int, index_path: str, weights_path: str, weights: str) -> int:
    """Worker task: rows ``[a, b)`` of ``knn/index`` and of ``weights`` whose node is in some communities task
    (``task_path``: each face's task, -1 for none), written to the scratch arrays ``index_path`` / ``weights_path``
    grouped by task, ascending by row within a task (so a task's rows from every range, in range order, are its
    nodes in ascending order: what it would read from the store). Returns the rows written."""
    task = open_array(url, task_path)[a:b]
    rows = np.flatnonzero(task >= 0)
    rows = rows[np.argsort(task[rows], kind="stable")]
    if len(rows):
        out = open_array(url, index_path, mode="r+")
        # int32 where ids fit (they do below 2^31 faces): half the scratch bytes; read back as int64
        out[...] = open_array(url, "knn/index")[a:b][rows].astype(out.dtype)
        open_array(url, weights_path, mode="r+")[...] = open_array(url, weights)[a:b][rows]
    return int(len(rows))


def regroup_rows(client, writer: StageWriter, node_sets: list[np.ndarray], weights: str, name: str, token: str,
                 gather_entries: int = GATHER_ENTRIES):
    """One pass over the kNN store that writes every task's rows grouped by task (:func:`gather_task`, one Dask
    task per range of whole chunks of about ``gather_entries`` entries), so that each communities task reads its
    own rows instead of decoding the whole store: at 10M planted faces 49 tasks read 11 CPU-s each (the Infomap
    tasks 1,825 -> 1,406 CPU-s with this pass, which took 44; the stage 1,159.7 -> 951.8 s, the same labels).

    Returns (pieces, futures): ``pieces[range][task]`` = (index path, weights path, lo, hi) of that task's rows in
    that range's scratch arrays, and the regrouping tasks' futures."""
    url = writer.store.url
    index = open_array(url, "knn/index")
    n, k = index.shape
    r = int(index.chunks[0])
    task = np.full(n, -1, np.int32)
    for g_i, nodes in enumerate(node_sets):
        task[nodes] = g_i
    task_path = writer.scratch_array(f"{name}-task", task)
    per = max(1, int(gather_entries) // max(1, r * k))
    ranges = [(a, min(a + per * r, n)) for a in range(0, n, per * r)]
    id_dtype = np.int32 if n < 2**31 else np.int64
    w_dtype = open_array(url, weights).dtype
    pieces, futs = [], []
    for a, b in ranges:
        counts = np.bincount(task[a:b][task[a:b] >= 0], minlength=len(node_sets))
        kept = int(counts.sum())
        if not kept:
            continue
        offsets = np.concatenate([[0], np.cumsum(counts)])
        rows = (max(1, min(kept, GATHER_CHUNK_ROWS)), k)
        ip = writer.scratch_space(f"{name}-index-{a}", (kept, k), rows, id_dtype)
        wp = writer.scratch_space(f"{name}-weights-{a}", (kept, k), rows, w_dtype)
        pieces.append([(ip, wp, int(offsets[t]), int(offsets[t + 1])) for t in range(len(node_sets))])
        futs.append(client.submit(gather_task, url, task_path, a, b, ip, wp, weights, key=f"{name}-gather-{a}-{token}"))
    return pieces, futs


def scratch_of(pieces) -> list[str]:
    return [path for p in pieces for path in p[0][:2]]


def floor_components(n: int, forest, floor: float) -> np.ndarray:
    """The graph's connected components at ``floor`` from its spanning forest, cut as the Infomap tasks read the
    edges (``weight >= floor`` in float64, :func:`facecluster.tasks.peers.same_cut`): a cut at float32(floor),
    which rounds below 0.7 and 0.95, would join two nodes through an edge at exactly float32(floor) that no
    task's graph holds, and solve the two parts as one Infomap problem."""
    src, dst, wt = forest
    keep = wt >= same_cut(wt.dtype, floor)
    return components(n, src[keep], dst[keep])


def pack_components(sizes: np.ndarray, budget: int) -> list[np.ndarray]:
    """Component ids (of size >= 2) packed in id order into groups of about ``budget`` nodes."""
    groups, cur, filled = [], [], 0
    for c in np.flatnonzero(sizes >= 2):
        cur.append(c)
        filled += int(sizes[c])
        if filled >= budget:
            groups.append(np.asarray(cur, np.int64))
            cur, filled = [], 0
    if cur:
        groups.append(np.asarray(cur, np.int64))
    return groups


def infomap_task_priority(n_nodes: int, n_floors: int) -> int:
    """Dask priority of an Infomap task: its nodes times the floors it runs, so the largest start first.

    Why: the tasks' costs are far apart (1M built-in faces: the largest component's four per-floor tasks 45-101 s
    each, the other ~20 tasks 3-12 s) and they are all ready at once, after the regrouping pass; in submission
    order a large one could start last and leave the other worker idle: the 1M chain's communities stage took
    201.7 s once (busy 0.86 / 0.97) and 318.8 s another time on the same code (busy 0.98 / 0.67; 204-212 s alone).
    Largest first bounds the stage by about max(largest task, total / workers). Never changes a label (each
    component is solved alone, with the same seed, wherever and whenever it runs).
    """
    return int(n_nodes) * int(n_floors)


def infomap_components(client, writer: StageWriter, n: int, forest, floors: list[float], weights: str, name: str,
                       budget: int | None = None, joint: bool = False,
                       gather_entries: int = GATHER_ENTRIES) -> list[tuple[np.ndarray, dict]]:
    """Infomap on the kNN graph weighted by array ``weights`` at each of ``floors``, one Dask task per group of components.

    Parameters
    ----------
    client : distributed.Client.
    writer : the running stage's writer, whose run store holds ``knn/index`` and ``weights`` (an N x k
        array: ``edges/prob`` or ``knn/sim``); every floor's plan (the node ids of each task, grouped, and
        their component ids) goes to its scratch arrays, which the tasks read their share of.
    n : faces.
    forest : (src, dst, weight) of a maximum spanning forest of the same weights holding every edge
        >= ``min(floors)`` (:func:`facecluster.pipeline.forest.spanning_forest`, or the graph stage's
        forest for ``knn/sim``): its cut at a floor gives the graph's connected components there.
    floors : edges with weight >= floor are the graph, per floor. A task holds whole components of the
        lowest floor, in which every higher floor's components nest, and runs every floor on them.
    weights : the weight array's name.
    name : prefix of the task keys and progress lines.
    budget : nodes per task (default: about ``TASKS_PER_WORKER`` tasks per worker, within
        ``MIN_NODES_PER_TASK``..``NODES_PER_TASK``); a component of the lowest floor larger than that is one
        task. The packing never changes the result: each component is solved alone with the same seed.
    joint : one Infomap run per task over all its components (their modules split by component
        afterwards), closer to a whole-graph run (:func:`facecluster.tasks.peers.infomap_by_component`);
        the result then depends on the packing (by the lowest floor's components): give a fixed ``budget``, not
        the worker-dependent default, and one floor.
    gather_entries : kNN entries per task of the regrouping pass (:func:`regroup_rows`); never changes the result.

    Returns
    -------
    list of (labels, stats), one per floor: labels (N int64, communities numbered 0..C-1 by
    smallest member); stats with ``components``, ``components_multi``, ``largest_component``
    (faces of the largest component: the one task that bounds time and memory), ``tasks``,
    ``communities``, ``singletons``, ``largest_community``.
    """
    if not floors:
        return []
    url = writer.store.url
    if budget is None:
        n_workers = max(1, len(worker_infos(client)))
        budget = int(min(NODES_PER_TASK, max(MIN_NODES_PER_TASK, -(-n // (TASKS_PER_WORKER * n_workers)))))
    token = uuid.uuid4().hex[:8]
    # the components at every floor, and tasks of whole components of the lowest floor, in which those of every
    # higher floor nest (its edges are a subset): one task reads its nodes' kNN rows once for all the floors. One
    # task per floor and group read them once per floor, and each read decodes the whole kNN store (the nodes of
    # a task are spread over it): at 10M planted faces 199 tasks of 200k nodes, 11 CPU-s of reads each
    comps = (np.stack([floor_components(n, forest, f) for f in floors], axis=1) if n
             else np.zeros((0, len(floors)), np.int64))
    base = int(np.argmin(floors))
    sizes = np.bincount(comps[:, base], minlength=1) if n else np.zeros(0, np.int64)
    order = np.argsort(comps[:, base], kind="stable") if n else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = pack_components(sizes, budget)
    node_sets = [np.sort(np.concatenate([order[starts[c]:starts[c + 1]] for c in cids])) for cids in groups]
    del order
    if node_sets:
        # the node lists go to the workers through the store, not inside the task graph (N ids and a component
        # id per floor each: 40 MiB at 1M faces, which distributed warns about and ships through the scheduler) nor by
        # scatter (a lost worker would take them along: see StageWriter.scratch_array)
        grouped = np.concatenate(node_sets)
        ends = np.cumsum([len(nodes) for nodes in node_sets], dtype=np.int64)
        nodes_path = writer.scratch_array(f"{name}-nodes", grouped)
        comp_path = writer.scratch_array(f"{name}-comp", comps[grouped])
        del grouped
        pieces, gathered = regroup_rows(client, writer, node_sets, weights, name, token, gather_entries)
        # a group of one component larger than the budget runs one task per floor: its floors in one task were the
        # stage's serial tail (a 1M-face built-in run: a component of 686k faces at 0.5, one worker idle 80% of the
        # stage). With its rows regrouped each of those tasks reads only its own slices.
        by_floor = [len(nodes) > budget and len(floors) > 1 for nodes in node_sets]
        runs = [[[f_i] for f_i in range(len(floors))] if by_floor[g_i] else [list(range(len(floors)))]
                for g_i in range(len(node_sets))]
        # every Infomap task reads every regrouped piece: they are submitted once the pass is done, largest first. A
        # worker starts what it holds by priority, but tasks submitted earlier (and all released at once by the last
        # gather) reached a worker over several messages, and under load it started a smaller one that came first
        wait_futures(gathered, f"{name} (regrouping)", gather=False)
        todo = sorted(((g_i, j) for g_i in range(len(node_sets)) for j in range(len(runs[g_i]))),
                      key=lambda t: -infomap_task_priority(len(node_sets[t[0]]), len(runs[t[0]][t[1]])))
        futs = [[None] * len(r) for r in runs]
        for g_i, j in todo:
            nodes, b, cols = node_sets[g_i], ends[g_i], runs[g_i][j]
            mine = [p[g_i] for p in pieces if p[g_i][3] > p[g_i][2]]
            futs[g_i][j] = client.submit(
                component_task, url, nodes_path, comp_path, int(b - len(nodes)), int(b), [floors[f_i] for f_i in cols],
                weights, joint, mine, *gathered, columns=cols,
                key=f"{name}-infomap-{g_i}-{cols[0] if len(cols) == 1 else 'all'}-{len(nodes)}n-{token}",
                priority=infomap_task_priority(len(nodes), len(cols)))
        flat = wait_futures([f for fs in futs for f in fs], f"{name} {', '.join(f'{f:g}' for f in floors)}")
        parts, i = [], 0
        for fs in futs:  # each group's modules per floor, in the order of floors (its tasks' lists, joined)
            parts.append([mods for got in flat[i:i + len(fs)] for mods in got])
            i += len(fs)
        n_tasks = len(flat)
        del futs, flat
        for path in scratch_of(pieces):  # gigabytes at 10M faces: not left on disk until the stage ends
            writer.drop_scratch(path)
    else:
        parts, n_tasks = [], 0
    results = []
    for f_i, floor in enumerate(floors):
        comp = comps[:, f_i]
        fsizes = np.bincount(comp, minlength=1) if n else np.zeros(0, np.int64)
        module = np.zeros(n, np.int64)
        for nodes, mods in zip(node_sets, parts):
            module[nodes] = mods[f_i]
        width = int(module.max()) + 1 if n else 1
        labels = canonical_labels(comp * width + module) if n else np.zeros(0, np.int64)
        csizes = np.bincount(labels) if n else np.zeros(0, np.int64)
        stats = {"floor": floor, "components": int(len(fsizes)), "components_multi": int((fsizes >= 2).sum()),
                 "largest_component": int(fsizes.max()) if n else 0, "tasks": n_tasks,
                 "communities": int(len(csizes)), "singletons": int((csizes == 1).sum()),
                 "largest_community": int(csizes.max()) if n else 0}
        log.info("%s at %s >= %.4g: %d communities (%d singletons) in %d components, largest component %d (%d tasks)",
                 name, weights, floor, stats["communities"], stats["singletons"], stats["components"],
                 stats["largest_component"], stats["tasks"])
        results.append((labels, stats))
    return results


FLOORS = (0.5, 0.7, 0.85, 0.95)


def community_floors(model_floor: float) -> list[float]:
    """The model's floor first, then the multi-scale floors not equal to it."""
    return [float(model_floor)] + [f for f in FLOORS if abs(f - model_floor) > 1e-9]


def run_communities(store: RunStore, model_dir: str, cfg: Config, client, force: bool = False,
                    output_only: bool = False) -> dict:
    """Infomap communities of the learned-affinity graph; writes ``communities/labels`` (input stage "edges").

    ``output_only``: the model's floor alone (what a model whose output is its communities needs), not the
    multi-scale floors the proposals offer GCN-D. Each component is its own Infomap problem, so that floor's
    communities are the same either way."""
    store.require("edges", f"run `facecluster cluster {store.url} --model DIR` (it scores the edges) first")
    floor = run_levels(edge_meta(model_dir), store)["floor"]  # adapted runs: the model's adapt_levels
    floors = [float(floor)] if output_only else community_floors(floor)
    index = store.array("knn/index")
    n, _ = index.shape
    r = int(index.chunks[0])
    params = {"floors": floors, "seed": INFOMAP_SEED, "model_digest": model_digest(model_dir)}
    with store.stage(STAGE, params, inputs=["edges"], extra={"model": os.path.abspath(model_dir)}, force=force) as w:
        if w is None:
            return store.record(STAGE).get("summary", {})
        forest = spanning_forest(client, store.url, n, r, min(floors), cfg.proposals.fan_in,
                                 weights="edges/prob", name="communities-forest",
                                 forest_edges=cfg.proposals.forest_edges)
        out = w.create_array("communities/labels", (n, len(floors)), (r, len(floors)), np.int64)
        per_floor = []
        for f_i, (labels, stats) in enumerate(infomap_components(client, w, n, forest, floors, "edges/prob",
                                                                 "communities")):
            out[:, f_i] = labels
            per_floor.append(stats)
        summary = {"n": int(n), "floors": floors, "floor": floors[0], "per_floor": per_floor,
                   **{k: per_floor[0][k] for k in ("communities", "singletons", "largest_component", "largest_community")}}
        w.summary.update(summary)
        return summary
