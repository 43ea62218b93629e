"""``--method infomap``: the map equation on the run's kNN graph, one Dask task per group of connected components.

The weights are the learned edge probability ``edges/prob`` when a model with an edge
scorer is given (edges at P >= the model's communities floor, chosen in training), the
cosine ``knn/sim`` otherwise, with ``min_sim`` chosen from the data, never from labels: the
cosine where the general model's edge probability crosses the level it recorded in training
(``edges.infomap_level``; :func:`facecluster.tasks.edges.infomap_min_sim`, on the same stride
sample of rows as the graph stage's anchor), or, for a general model without that level or a
run with too few edges near it, :data:`facecluster.tasks.baselines.AUTO_MIN_SIM` of the graph
stage's anchor (Otsu's threshold of the kNN similarities), the rule ``bench quality`` reports
as "kNN + Infomap (automatic min_sim)".

The work is the communities stage's (:func:`facecluster.pipeline.stages.communities.infomap_components`):
the graph's connected components at the floor are cuts of a maximum spanning forest of the
weights (for the cosine, the graph stage's stored forest when its edge floor lies below
``min_sim``), packed in component order into batches of about ``BATCH_NODES`` faces, one Dask
task and one Infomap run per batch (modules split by component afterwards). Not one run per
component, as the communities stage does: the map equation's index codebook is shared by every
module of a run, so a component solved alone is split more finely than in the whole graph
(100k built-in faces, automatic min_sim: pairwise F 0.733 per component, 0.776 whole graph;
batches of 25k / 12.5k / 5k nodes: 0.776 / 0.773 / 0.764). The batches depend only on the
components, never on the chunk size or the worker count, so neither changes the labels. A
component larger than a batch is one task: its size is ``largest_component`` in the summary
(and the CLI's line).

Writes ``clusters`` (N int64, ids 0..C-1 by smallest member) in stage "clusters", like the
threshold method; the stage's digest chains the graph stage (cosine) or the edges stage
(which chains the model's digest).
"""

from __future__ import annotations

import logging

import numpy as np

from facecluster.tasks.baselines import AUTO_MIN_SIM, MIN_BAND_EDGES, PROB_BAND, auto_min_sim, prob_level_min_sim
from facecluster.tasks.edges import edge_pairs

from ..config import Config
from ..errors import BadInput
from ..forest import spanning_forest
from ..model_files import edge_meta
from ..store import RunStore
from .communities import INFOMAP_SEED, infomap_components
from .edges import run_levels
from .graph import knn_sims, read_forest, sampled_rows
from .proposals import CLUSTERS_STAGE, graph_anchor

log = logging.getLogger(__name__)

COSINE, LEARNED = "knn/sim", "edges/prob"
BATCH_NODES = 25_000  # faces per Infomap run (whole components; a larger component alone): see the module docs


def check_min_sim_value(min_sim: float | None, learned: bool) -> None:
    """BadInput for a ``min_sim`` no kNN graph can hold (a cosine outside [-1, 1], a probability outside [0, 1])."""
    if min_sim is None:
        return
    lo = 0.0 if learned else -1.0
    what = "an edge probability (a model is given)" if learned else "a cosine similarity"
    if not np.isfinite(min_sim) or not lo <= min_sim <= 1.0:
        raise BadInput(f"--min-sim {min_sim:g} is not {what}: give a value in [{lo:g}, 1], or omit it for the "
                       "automatic one")


def model_infomap_level(model_dir: str | None, store: RunStore | None = None) -> float | None:
    """The P level a model recorded for the cosine floor of ``--method infomap`` (``edges.infomap_level``; for
    a run whose P the edges stage adapted, the level chosen on adapted P:
    :func:`facecluster.pipeline.stages.edges.run_levels`; None: no model, or one trained before facecluster 0.6.1)."""
    meta = edge_meta(model_dir) if model_dir else None
    level = run_levels(meta, store)["infomap_level"] if meta else None
    return None if level is None else float(level)


def resolve_min_sim(store: RunStore, weights: str, min_sim: float | None, model_dir: str | None,
                    level_model: str | None = None) -> tuple[float, dict]:
    """The edge floor and where it came from; an explicit one is checked against the data's range (BadInput).

    Cosine: the cosine where ``level_model``'s P crosses its ``infomap_level`` (the run's ``edges/prob`` must be
    that model's), else the automatic rule on the graph stage's anchor. Learned: the model's communities floor.
    An explicit ``min_sim`` must lie within the range of the sampled kNN weights: above it every face
    is a singleton, below it the floor keeps every listed edge.
    """
    if min_sim is None:
        if weights == LEARNED:
            return float(run_levels(edge_meta(model_dir), store)["floor"]), {"source": "the model's communities floor"}
        level, note = model_infomap_level(level_model, store), ""
        if level is not None:
            value, count = prob_level_min_sim(*edge_pairs(*sampled_rows(store, ("knn/index", "knn/sim", "edges/prob"))),
                                              level)
            if value is not None:
                return value, {"source": f"auto: the cosine where the general model's P(same identity) crosses {level:g}, "
                                         f"the level it chose in training (median of the {count} sampled kNN edges with "
                                         f"P within {PROB_BAND:g} of it)",
                               "rule": "prob_level", "level": level, "band_edges": count, "model": str(level_model)}
            note = (f"; only {count} sampled kNN edges with the general model's P within {PROB_BAND:g} of its level "
                    f"{level:g} (< {MIN_BAND_EDGES})")
        anchor = graph_anchor(store)
        value = auto_min_sim(anchor["anchor"], knn_sims(store), AUTO_MIN_SIM)
        return value, {"source": f"auto: the {AUTO_MIN_SIM!r} rule on the kNN similarities{note}",
                       "rule": AUTO_MIN_SIM, "anchor": anchor["anchor"]}
    sample = knn_sims(store, weights=weights)
    if len(sample):
        lo, hi = float(sample.min()), float(sample.max())
        if not lo <= min_sim <= hi:
            what = "edge probabilities" if weights == LEARNED else "kNN similarities"
            raise BadInput(f"{store.url}: --min-sim {min_sim:g} is outside the range of the run's {what} "
                           f"({lo:.4g} .. {hi:.4g}, sampled rows); give a value inside it, or omit --min-sim for the "
                           "automatic one")
    return float(min_sim), {"source": "explicit"}


def run_infomap_clusters(store: RunStore, cfg: Config, client, model_dir: str | None = None,
                         min_sim: float | None = None, force: bool = False, level_model: str | None = None) -> dict:
    """Infomap per connected component of the kNN graph at its floor; writes ``clusters`` (stage "clusters").

    Parameters
    ----------
    store : RunStore with the graph stage complete (cosine) or the edges stage (``model_dir``).
    cfg : Config (``proposals.fan_in`` for the forest's merge tree).
    client : distributed.Client.
    model_dir : a model with an edge scorer: weights ``edges/prob``; None: the cosine.
    min_sim : the edge floor (default: from the data, or the model's floor).
    force : recompute even if up to date.
    level_model : cosine weights without ``min_sim``: the model whose ``edges/prob`` (the edges stage must have
        run with it) and recorded ``infomap_level`` place the floor (:func:`resolve_min_sim`).

    Returns
    -------
    dict : the summary: ``min_sim`` (and its ``min_sim_info``), ``weights``, ``n_clusters``, ``n_singletons``,
        ``largest`` (cluster), ``largest_component`` (faces of the largest component: one task),
        ``components``, ``tasks``.
    """
    weights = LEARNED if model_dir else COSINE
    upstream = "edges" if model_dir else "graph"
    store.require(upstream, f"run `facecluster cluster {store.url} --method infomap` (it runs the stages before)")
    check_min_sim_value(min_sim, bool(model_dir))
    floor, info = resolve_min_sim(store, weights, min_sim, model_dir, level_model)
    # a floor read off the edge probabilities: the clusters chain the edges stage too (a re-run edges stage
    # makes them stale, as it makes the learned method's)
    inputs = [upstream] + (["edges"] if info.get("rule") == "prob_level" else [])
    index = store.array("knn/index")
    n, _ = index.shape
    params = {"method": "infomap", "weights": weights, "min_sim": floor, "seed": INFOMAP_SEED, "batch_nodes": BATCH_NODES}
    with store.stage(CLUSTERS_STAGE, params, inputs=inputs, force=force) as w:
        if w is None:
            return store.record(CLUSTERS_STAGE).get("summary", {})
        graph_floor = store.record("graph")["summary"].get("min_edge_sim", -1.0) if weights == COSINE else None
        if weights == COSINE and (graph_floor is None or graph_floor <= floor):
            forest, forest_source = read_forest(store), "graph"  # cut at min_sim: the components there
        else:
            forest = spanning_forest(client, store.url, n, int(index.chunks[0]), floor, cfg.proposals.fan_in,
                                     weights=weights, name="infomap-forest",
                                     forest_edges=cfg.proposals.forest_edges)
            forest_source = weights
        (labels, stats), = infomap_components(client, w, n, forest, [floor], weights, "infomap",
                                              budget=BATCH_NODES, joint=True)
        w.write_array("clusters", labels)
        summary = {"method": "infomap", "weights": "learned" if model_dir else "cosine", "min_sim": floor,
                   "min_sim_info": info, "model": model_dir, "forest": forest_source,
                   "n_clusters": stats["communities"], "n_singletons": stats["singletons"],
                   "largest": stats["largest_community"], "batch_nodes": BATCH_NODES,
                   **{k: stats[k] for k in ("components", "components_multi", "largest_component", "tasks")}}
        w.summary.update(summary)
        log.info("infomap: %d clusters (%d singletons) at %s >= %.4g; largest component %d faces",
                 summary["n_clusters"], summary["n_singletons"], weights, floor, summary["largest_component"])
        return summary
