"""The clustering methods: one cluster id per face of a run store, written to ``clusters``.

``facecluster cluster --method NAME`` and :class:`facecluster.FaceClusterer` both call
:func:`check_method` (before a Dask cluster is started) and :func:`run_method`.

* ``gcn`` (the learned method, the default): knn -> [edges -> communities] -> graph ->
  proposals -> GCN-D -> GCN-S -> dedup (+ attach), with a model written by ``facecluster train``;
* ``threshold``: the baseline, the components of the kNN graph at one cosine threshold ``th``
  (optionally split by Algorithm 1), cut from the graph's maximum spanning forest; without ``th``,
  the components of the kNN edges with P(same identity) >= the cut the general model recorded in
  training (:mod:`facecluster.pipeline.stages.cut`);
* ``infomap``: the map equation on the kNN graph, one Dask task per group of connected components
  (:mod:`facecluster.pipeline.stages.infomap`): cosine weights at an automatic ``min_sim`` (the cosine where
  the general model's edge probability crosses the level it chose in training), or the learned edge
  probability of a model's edge scorer at the model's floor.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from .config import Config
from .errors import BadInput
from .model_files import GENERAL_MODEL_DIR, check_model, edge_meta, model_digest
from .run import ensure_graph, ensure_knn, run_cluster
from .stages.cut import (check_enough_similarities, cut_source, enough_similarities, model_cut,
                         run_prob_threshold_clusters)
from .stages.edges import run_edges, scorer_p
from .stages.infomap import check_min_sim_value, model_infomap_level, run_infomap_clusters
from .stages.proposals import run_threshold_clusters
from .store import RunStore

log = logging.getLogger(__name__)

DEFAULT_METHOD = "gcn"


def cluster_gcn(store: RunStore, cfg: Config, client, options: dict, echo: Callable[[str], None] | None = None) -> dict:
    """The learned chain with ``options["model"]``; the dedup stage's summary plus ``"stages"`` (what ran)."""
    report = run_cluster(store, cfg, client, options["model"], echo=echo, force=options.get("force", False))
    return {**report["dedup"]["summary"], "stages": report}


def cluster_threshold(store: RunStore, cfg: Config, client, options: dict,
                      echo: Callable[[str], None] | None = None) -> dict:
    """Components of the kNN graph at ``options["th"]`` (a cosine); without one, components of the kNN edges with
    P(same identity) >= the cut ``options["model"]`` (default: the general model) recorded in training."""
    th = options.get("th")
    if th is None:
        model = options.get("model") or str(GENERAL_MODEL_DIR)
        ensure_knn(store, cfg, client)
        check_enough_similarities(store)
        run_edges(store, model, scorer_p(cfg), client)
        return run_prob_threshold_clusters(store, model, cfg, client, max_size=options.get("max_size"),
                                           force=options.get("force", False))
    ensure_graph(store, cfg, client)
    floor = store.record("graph")["summary"].get("min_edge_sim")
    if floor is not None and th < floor and cfg.proposals.min_edge_sim is None:
        # An explicit threshold under the automatic edge floor: rebuild the graph down to it
        # rather than fail (an explicit [proposals] min_edge_sim is respected and checked).
        cfg = dataclasses.replace(cfg, proposals=dataclasses.replace(cfg.proposals, min_edge_sim=float(th)))
        ensure_graph(store, cfg, client)
    return run_threshold_clusters(store, th, cfg, client, max_size=options.get("max_size"),
                                  force=options.get("force", False))


def cluster_infomap(store: RunStore, cfg: Config, client, options: dict,
                    echo: Callable[[str], None] | None = None) -> dict:
    """Infomap per connected component: on the cosine graph (knn, graph), or with ``options["model"]`` on the
    learned-affinity graph (knn, edges); ``options["min_sim"]`` overrides the automatic floor.

    On the cosine without ``min_sim`` the floor is read off the general model's edge probabilities (knn, edges
    with the general model, graph) where it records a level for it, and the run has enough kNN similarities
    for its scale; else Otsu's anchor of the cosines.
    """
    model, min_sim = options.get("model"), options.get("min_sim")
    level_model = None
    ensure_knn(store, cfg, client)
    if model:
        run_edges(store, model, cfg, client)
    else:
        general = str(GENERAL_MODEL_DIR)
        if min_sim is None and model_infomap_level(general) is not None and enough_similarities(store):
            run_edges(store, general, scorer_p(cfg), client)
            level_model = general
        ensure_graph(store, cfg, client)
    return run_infomap_clusters(store, cfg, client, model_dir=model, min_sim=min_sim,
                                force=options.get("force", False), level_model=level_model)


# method name -> runner(store, cfg, client, options, echo) -> summary
METHODS: dict[str, Callable[..., dict]] = {"gcn": cluster_gcn, "threshold": cluster_threshold,
                                           "infomap": cluster_infomap}


def model_for(method: str, model: str | None, th: float | None = None) -> tuple[str | None, str | None]:
    """The model ``method`` runs with, and one line saying which (None: the method runs without one).

    The learned method without a model runs the general model shipped in the package
    (:data:`facecluster.pipeline.model_files.GENERAL_MODEL_DIR`, ``facecluster train --general``);
    ``infomap`` without one stays on the cosine; ``threshold`` without ``th`` cuts the general model's
    edge probabilities at the cut it recorded in training (``--model`` is not an option of it), and with
    ``th`` takes no model.
    """
    if method == "threshold":
        if th is not None:
            return None, None
        general = str(GENERAL_MODEL_DIR)
        return general, f"threshold (no --th): components of kNN edges with {cut_source(general, model_cut(general))}"
    if model:
        return str(model), f"model: {model} (digest {model_digest(model)})" if method in ("gcn", "infomap") else None
    if method != "gcn":
        return None, None
    return str(GENERAL_MODEL_DIR), (f"model: the general model shipped with facecluster ({GENERAL_MODEL_DIR}, digest "
                                    f"{model_digest(GENERAL_MODEL_DIR)}; trained on generated faces only by `facecluster "
                                    "train --general`); pass --model DIR for one trained on your own labelled faces")


def check_method(store: RunStore, method: str, model: str | None, min_sim: float | None = None) -> None:
    """Bad input of a method, found before any Dask cluster starts (BadInput / ValueError).

    The learned method's model is loaded once (small), so a missing, unsafe or foreign
    file, or a model for another feature dimension, fails before kNN runs, not after.
    Whether a model is given at all is the caller's check (its message names its own option).
    ``infomap`` takes a model optionally (it must have an edge scorer) and ``min_sim``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    if min_sim is not None and method != "infomap":
        raise BadInput(f"--min-sim is an option of --method infomap, not of --method {method}")
    if method == "gcn" or (method == "infomap" and model):
        check_model(model, store.array("features").shape[1], store.url)
    if method == "infomap":
        if model and edge_meta(model) is None:
            raise BadInput(f"{model}: has no edge scorer (trained before facecluster 0.2); --method infomap with a "
                           "model weighs edges by its probabilities: re-train it, or omit --model for the cosine")
        check_min_sim_value(min_sim, bool(model))


def run_method(store: RunStore, cfg: Config, client, method: str, options: dict,
               echo: Callable[[str], None] | None = None) -> dict:
    """Run ``method`` on ``store`` as the one writer (leftovers of a killed run removed first); its summary.

    Parameters
    ----------
    store : RunStore
        An ingested run store.
    cfg : Config
        Every stage's parameters.
    client : distributed.Client
        Where the stages run.
    method : str
        A key of :data:`METHODS`.
    options : dict
        ``model`` (gcn; optional for infomap), ``th`` and ``max_size`` (threshold), ``min_sim`` (infomap),
        ``force`` (all).
    echo : callable, optional
        One line per stage (default: logging).
    """
    runner = METHODS[method]
    with store.writing("cluster"):
        store.clean_tmp()
        return runner(store, cfg, client, options, echo or log.info)
