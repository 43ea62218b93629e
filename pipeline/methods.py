"""The clustering methods: one cluster id per face of a run store, written to ``clusters``.

``facecluster cluster --method NAME`` and :class:`facecluster.FaceClusterer` both call
:func:`check_method` (before a Dask cluster is started) and :func:`run_method`.

* ``gcn`` (the learned method, the default): knn -> [edges -> communities] -> graph ->
  proposals -> GCN-D -> GCN-S -> dedup (+ attach), with a model written by ``facecluster train``;
* ``threshold``: the baseline, the components of the kNN graph at one similarity threshold
  (automatic unless given; optionally split by Algorithm 1), cut from the graph's maximum
  spanning forest.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from .config import Config
from .model_files import check_model
from .run import ensure_graph, run_cluster
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
    """Components of the forest at ``options["th"]`` (None: derived from the data's kNN similarities)."""
    ensure_graph(store, cfg, client)
    th = options.get("th")
    floor = store.record("graph")["summary"].get("min_edge_sim")
    if th is not None and floor is not None and th < floor and cfg.proposals.min_edge_sim is None:
        # An explicit threshold under the automatic edge floor: rebuild the graph down to it
        # rather than fail (an explicit [proposals] min_edge_sim is respected and checked).
        cfg = dataclasses.replace(cfg, proposals=dataclasses.replace(cfg.proposals, min_edge_sim=float(th)))
        ensure_graph(store, cfg, client)
    return run_threshold_clusters(store, th, cfg, client, max_size=options.get("max_size"),
                                  force=options.get("force", False))


# method name -> runner(store, cfg, client, options, echo) -> summary
METHODS: dict[str, Callable[..., dict]] = {"gcn": cluster_gcn, "threshold": cluster_threshold}


def check_method(store: RunStore, method: str, model: str | None) -> None:
    """Bad input of a method, found before any Dask cluster starts (BadInput / ValueError).

    The learned method's model is loaded once (small), so a missing, unsafe or foreign
    file, or a model for another feature dimension, fails before kNN runs, not after.
    Whether a model is given at all is the caller's check (its message names its own option).
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    if method == "gcn":
        check_model(model, store.array("features").shape[1], store.url)


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
        ``model`` (gcn), ``th`` and ``max_size`` (threshold), ``force`` (both).
    echo : callable, optional
        One line per stage (default: logging).
    """
    runner = METHODS[method]
    with store.writing("cluster"):
        store.clean_tmp()
        return runner(store, cfg, client, options, echo or log.info)
