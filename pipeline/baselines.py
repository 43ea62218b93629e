"""The untrained baselines on a run's kNN graph, with their parameter chosen with the labels.

* the threshold baseline: connected components of the kNN graph at one similarity
  threshold (cut of the stored maximum spanning forest), the threshold chosen for
  the best pairwise F against the run's labels: the best any single threshold can do;
* kNN + Infomap on the stored kNN lists (edges with similarity >= ``min_sim``),
  ``min_sim`` chosen with the labels (when ``infomap`` is installed);
* kNN + Infomap at an automatic ``min_sim`` (a label-free rule from the data).

Grids are placed on the run's own kNN-similarity range (:mod:`facecluster.tasks.baselines`) so
that neither baseline is mis-tuned on a face model whose cosines sit on another
scale; each sweep returns its whole curve and whether the peak lies inside the grid.
Used by ``facecluster demo`` and ``bench quality``.
"""

from __future__ import annotations

import uuid

import numpy as np

from facecluster.tasks.baselines import (AUTO_MIN_SIM, INFOMAP_POINTS, INFOMAP_STEP, MIN_SIM_RULES, THRESHOLD_POINTS,
                             THRESHOLD_STEP, Sweep, auto_min_sim, similarity_grid, sweep)

from .config import Config
from .stages.graph import knn_sims  # the rows the anchor is computed from place the grids too
from .model_files import GENERAL_MODEL_DIR
from .stages.cut import cut_labels, model_cut
from .stages.edges import run_edges, scorer_p
from .stages.infomap import COSINE, resolve_min_sim
from .stages.proposals import graph_anchor, threshold_task
from .store import RunStore, open_array


def has_infomap() -> bool:
    """Whether Infomap is installed (a dependency of facecluster; ``pip install 'infomap>=2.16,<3'``)."""
    try:
        import infomap  # noqa: F401
    except ImportError:
        return False
    return True


def _evaluator(store: RunStore, client, task, prefix: str, *args):
    """A batch evaluator for :func:`facecluster.tasks.baselines.sweep`: runs ``task(url, value, *args)`` on the workers.

    Each point scores by pairwise F; its extras are (BCubed F, clusters); its result the labels.
    """
    from facecluster.tasks.metrics import evaluate

    gt = store.array("labels")[:]
    token = uuid.uuid4().hex[:8]

    def run(values):
        futs = [client.submit(task, store.url, float(v), *args, key=f"{prefix}-{v}-{token}") for v in values]
        out = []
        for fut in futs:
            labels = fut.result()
            m = evaluate(gt, labels)
            out.append((m["pairwise_f"], (m["bcubed_f"], m["n_clusters"]), labels))
        return out

    return run


def oracle_threshold(store: RunStore, cfg: Config, client, grid: np.ndarray | None = None) -> Sweep:
    """The best single-threshold clustering by pairwise F against the run's labels.

    Parameters
    ----------
    store : a labelled run with its graph stage done.
    cfg : Config ([proposals] step for the cut).
    client : distributed.Client.
    grid : explicit thresholds; default: the data's kNN-similarity range (quantiles), step
        ``min(0.01, range / 50)`` rounded down to 1, 2 or 5 x 10^n, clipped below at the graph's
        edge floor (a cut below it would miss edges). Either grid is extended while the best
        point sits on an edge.

    Returns
    -------
    Sweep : ``best`` the threshold, ``result`` its labels, ``curve`` (th, pairwise F, BCubed F, clusters).
    """
    floor = store.require("graph")["summary"].get("min_edge_sim")
    lo_limit = -1.0 if floor is None else float(floor)
    if grid is None:
        grid, step = similarity_grid(knn_sims(store), THRESHOLD_STEP, THRESHOLD_POINTS, lo_limit=lo_limit)
    else:
        grid = np.sort(np.asarray(grid, np.float64))
        step = float(np.min(np.diff(grid))) if len(grid) > 1 else THRESHOLD_STEP
    run = _evaluator(store, client, threshold_task, "oracle-th", cfg.proposals.step, None)
    return sweep(run, grid, step, lo_limit=lo_limit, hi_limit=1.0, name="threshold")


def auto_threshold(store: RunStore, cfg: Config, client) -> tuple[float, np.ndarray]:
    """``--method threshold`` without ``--th``: the components of the kNN edges with P(same identity) >= the general
    model's cut (its edge scorer: runs stage "edges"); (the cut, labels)."""
    model = str(GENERAL_MODEL_DIR)
    run_edges(store, model, scorer_p(cfg), client)
    level = model_cut(model, store)
    return level, cut_labels(store, level, cfg, client)


def infomap_task(url: str, min_sim: float) -> np.ndarray:
    """Worker task: Infomap over the stored kNN lists (edges with similarity >= min_sim)."""
    from facecluster.tasks.peers import infomap_clusters, knn_edge_list

    index = open_array(url, "knn/index")[:]
    sim = open_array(url, "knn/sim")[:]
    src, dst, w = knn_edge_list(index, sim, min_sim)
    return infomap_clusters(len(index), src, dst, w)


def infomap_peer(store: RunStore, client, grid: np.ndarray | None = None) -> Sweep | None:
    """kNN + Infomap with ``min_sim`` chosen with the labels (best pairwise F); None without infomap.

    The default grid spans the data's kNN-similarity range with step ``min(0.02, range / 25)``
    (rounded down to 1, 2 or 5 x 10^n); it is extended while the best point sits on an edge.
    """
    if not has_infomap():
        return None
    if grid is None:
        grid, step = similarity_grid(knn_sims(store), INFOMAP_STEP, INFOMAP_POINTS)
    else:
        grid = np.sort(np.asarray(grid, np.float64))
        step = float(np.min(np.diff(grid))) if len(grid) > 1 else INFOMAP_STEP
    return sweep(_evaluator(store, client, infomap_task, "infomap"), grid, step, name="min_sim")


def infomap_auto(store: RunStore, client, rules=None) -> dict | None:
    """kNN + Infomap at label-free ``min_sim`` values, one per rule; None without infomap.

    Parameters
    ----------
    rules : names from :data:`facecluster.tasks.baselines.MIN_SIM_RULES` (default: all of them, so
        that every candidate is measured; :data:`facecluster.tasks.baselines.AUTO_MIN_SIM` is the one
        reported as "kNN + Infomap at an automatic min_sim").

    Returns
    -------
    dict : rule -> {"min_sim", "labels"}; the anchor is the graph stage's Otsu threshold.
    """
    if not has_infomap():
        return None
    anchor = graph_anchor(store)["anchor"]
    sims = knn_sims(store)
    rules = list(rules or MIN_SIM_RULES)
    values = [auto_min_sim(anchor, sims, r) for r in rules]
    token = uuid.uuid4().hex[:8]
    futs = [client.submit(infomap_task, store.url, v, key=f"infomap-auto-{r}-{token}") for r, v in zip(rules, values)]
    return {r: {"min_sim": v, "labels": f.result()} for r, v, f in zip(rules, values, futs)}


def infomap_general(store: RunStore, cfg: Config, client) -> dict | None:
    """kNN + Infomap (cosine, whole graph) at ``--method infomap``'s default ``min_sim``: the cosine where the
    general model's P crosses the level it chose in training (its edges stage runs on ``store``); None without
    infomap. ``{"min_sim", "info", "labels"}``."""
    if not has_infomap():
        return None
    model = str(GENERAL_MODEL_DIR)
    run_edges(store, model, scorer_p(cfg), client)
    value, info = resolve_min_sim(store, COSINE, None, None, level_model=model)
    labels = client.submit(infomap_task, store.url, value, key=f"infomap-general-{uuid.uuid4().hex[:8]}").result()
    return {"min_sim": value, "info": info, "labels": labels}


__all__ = ["AUTO_MIN_SIM", "auto_threshold", "has_infomap", "infomap_auto", "infomap_general", "infomap_peer", "infomap_task",
           "knn_sims", "oracle_threshold"]
