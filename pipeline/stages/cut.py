"""``--method threshold`` without ``--th``: connected components of the kNN edges with P(same identity) >= a cut.

P is the edge scorer's probability (stage "edges", ``edges/prob``) of the general model shipped in the
package, and the cut is the level that model recorded in its own training (``edges.cut`` of its
``config.json``: the level whose components had the best mean pairwise + BCubed F over its generated
worlds, out of fold; :func:`facecluster.tasks.edges.choose_cut_over`). No histogram rule on the cosine
carries across face models and identity-size laws (README, "Candidate label-free cuts"); the
probability is read on the data's own similarity scale, so one level serves every face model.

The components are cuts of one maximum spanning forest of ``edges/prob``
(:func:`facecluster.pipeline.forest.spanning_forest`: unique, so the labels do not depend on the
chunk size or the worker count). ``max_size`` splits larger components by Algorithm 1 on the same
forest (ladder ``tau <- tau + (1 - tau) * step`` in probability).

Writes ``clusters`` (N int64, ids 0..C-1 by smallest member) in stage "clusters", inputs "edges"
(whose digest chains the model's).
"""

from __future__ import annotations

import logging

import numpy as np

from facecluster.tasks.components import super_vertices, threshold_components
from facecluster.tasks.thresholds import MIN_AUTO_SIMILARITIES

from ..config import Config
from ..errors import BadInput
from ..forest import spanning_forest
from ..model_files import GENERAL_MODEL_DIGEST, edge_meta, model_digest
from ..store import RunStore
from .edges import adapted, run_levels
from .proposals import CLUSTERS_STAGE

log = logging.getLogger(__name__)

WEIGHTS = "edges/prob"


def model_cut(model_dir: str, store: RunStore | None = None) -> float:
    """The components cut a model recorded in training (``edges.cut``; for a run whose P the edges stage
    adapted, the cut chosen on adapted P: :func:`facecluster.pipeline.stages.edges.run_levels`); BadInput
    when it has none."""
    meta = edge_meta(model_dir)
    if meta is None or meta.get("cut") is None:
        raise BadInput(f"{model_dir}: records no components cut (only the general model "
                       "shipped with facecluster does); --method threshold without --th uses the general "
                       "model shipped with facecluster, or pass --th")
    return float(run_levels(meta, store)["cut"])


def enough_similarities(store: RunStore) -> bool:
    """Whether the run's kNN lists hold enough similarities for the edge scorer's scale (see below)."""
    n, k = (int(v) for v in store.array("knn/index").shape)
    return n * k >= MIN_AUTO_SIMILARITIES


def check_enough_similarities(store: RunStore) -> None:
    """BadInput when the run's kNN lists hold too few similarities for the edge scorer's scale (every input is
    read on the data's own distribution of kNN similarities: from a handful it would be a guess, as the cosine
    anchor's would; :data:`facecluster.tasks.thresholds.MIN_AUTO_SIMILARITIES`)."""
    if not enough_similarities(store):
        n, k = (int(v) for v in store.array("knn/index").shape)
        raise BadInput(f"{store.url}: only {n * k} kNN similarities, too few to derive a threshold from the data (at "
                       f"least {MIN_AUTO_SIMILARITIES}) - {n} faces with k={k} are too few to cluster; ingest more "
                       "faces, or pass --th")


def cut_source(model_dir: str, level: float, adapted_p: bool = False) -> str:
    """One line: which rule and which model gave the cut (``adapted_p``: chosen for P adapted to the run)."""
    digest = model_digest(model_dir)
    who = "the general model shipped with facecluster" if digest == GENERAL_MODEL_DIGEST else str(model_dir)
    on = " on P adapted to each run, as this run's is" if adapted_p else ""
    return (f"P(same identity) >= {level:g}, the cut {who} (digest {digest}) chose in training{on} "
            "(best mean pairwise + BCubed F of components over its worlds)")


def cut_labels(store: RunStore, level: float, cfg: Config, client, max_size: int | None = None) -> np.ndarray:
    """Labels of the components of ``edges/prob`` at ``level`` (Algorithm 1 above ``max_size``), canonical."""
    index = store.array("knn/index")
    src, dst, p = spanning_forest(client, store.url, int(index.shape[0]), int(index.chunks[0]), level,
                                  cfg.proposals.fan_in, weights=WEIGHTS, name="threshold-prob-forest",
                                  forest_edges=cfg.proposals.forest_edges)
    n = int(index.shape[0])
    if max_size:
        return np.asarray(super_vertices(n, src, dst, p, level, cfg.proposals.step, max_size)[0], np.int64)
    return np.asarray(threshold_components(n, src, dst, p, level), np.int64)


def run_prob_threshold_clusters(store: RunStore, model_dir: str, cfg: Config, client, level: float | None = None,
                                max_size: int | None = None, force: bool = False) -> dict:
    """Components of the kNN edges with P >= ``level`` (default: the model's cut); the stage summary.

    Parameters
    ----------
    store : a run with stage "edges" done (by ``model_dir``'s edge scorer).
    model_dir : the model whose probabilities ``edges/prob`` holds (its cut is the default level).
    level : the cut (an add passes the run's pinned cut).
    max_size : split larger components by Algorithm 1 (ladder step ``cfg.proposals.step``).
    """
    store.require("edges", f"run `facecluster cluster {store.url} --method threshold` (it runs the stages before)")
    level = model_cut(model_dir, store) if level is None else float(level)
    digest = model_digest(model_dir)
    params = {"method": "threshold", "weights": WEIGHTS, "th": level, "max_size": max_size,
              "step": cfg.proposals.step if max_size else None}
    with store.stage(CLUSTERS_STAGE, params, inputs=["edges"], force=force) as w:
        if w is None:
            return store.record(CLUSTERS_STAGE).get("summary", {})
        labels = cut_labels(store, level, cfg, client, max_size)
        w.write_array("clusters", labels)
        sizes = np.bincount(labels)
        summary = {"method": "threshold", "weights": "learned", "th": level,
                   "threshold": {"source": cut_source(model_dir, level, adapted(store)), "model": str(model_dir), "model_digest": digest},
                   "max_size": max_size, "n_clusters": int(len(sizes)), "n_singletons": int((sizes == 1).sum()),
                   "largest": int(sizes.max()) if len(sizes) else 0}
        w.summary.update(summary)
        log.info("threshold: %d clusters at P >= %g", summary["n_clusters"], level)
        return summary
