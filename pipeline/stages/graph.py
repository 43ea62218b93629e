"""Stage "graph": the maximum spanning forest (MSF) of the kNN graph, distributed.

One task per row chunk of ``knn/index``/``knn/sim`` builds that chunk's
undirected edges (self-loops and padding dropped) and reduces them to the
chunk's MSF (memory bounded by the chunk); a tree of forest merges with an
explicit fan-in (MSF(A u B) = MSF(MSF(A) u MSF(B))) gives one forest of <= N-1
edges. Its cuts are the connected components at every threshold
(DESIGN.md section 5), so every later pass (super-vertices of every proposal
setting, the threshold clustering) reads only this forest.

Outputs: ``graph/forest_src``, ``graph/forest_dst`` (int64, src < dst, sorted by
(src, dst)), ``graph/forest_sim`` (float32). The forest is unique (ties broken by
edge ids), so it does not depend on chunk size or worker count.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np

from facecluster.tasks.thresholds import TooFewSimilarities

from ..config import Config
from ..errors import BadInput
from ..forest import cluster_budget, forest_tasks, row_chunks, spanning_forest
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "graph"
SAMPLE_ROWS = 20_000  # kNN rows sampled (by a fixed stride) for the automatic threshold


def anchor_task(url: str, sample_rows: int = SAMPLE_ROWS) -> dict:
    """Worker task: the data's anchor threshold from a stride sample of ``knn/sim`` rows."""
    from facecluster.tasks.thresholds import auto_threshold

    z = open_array(url, "knn/sim")
    idx = open_array(url, "knn/index")
    n = z.shape[0]
    stride = max(1, -(-n // sample_rows))
    rows = np.arange(0, n, stride)
    sim = z.get_orthogonal_selection((rows, slice(None)))
    nb = idx.get_orthogonal_selection((rows, slice(None)))
    sim = np.where(nb >= 0, sim, -np.inf)
    ok = sim[np.isfinite(sim)]
    return {"anchor": auto_threshold(sim), "rows_sampled": int(len(rows)),
            "sim_quantiles": {str(q): float(np.quantile(ok, q)) for q in (0.1, 0.5, 0.9, 0.99)} if len(ok) else {}}


def knn_sims(store: RunStore, sample_rows: int = SAMPLE_ROWS, weights: str = "knn/sim") -> np.ndarray:
    """The listed kNN edge weights (``weights``: ``knn/sim`` or ``edges/prob``) of a stride sample of rows, flat
    (self and padding excluded): the rows the anchor is computed from."""
    from facecluster.tasks.baselines import valid_sims

    idx, sim = sampled_rows(store, ("knn/index", weights), sample_rows)
    return valid_sims(sim, idx)


def sampled_rows(store: RunStore, names, sample_rows: int = SAMPLE_ROWS) -> list[np.ndarray]:
    """The same stride sample of rows (a function of N only: never of the chunking) of each N-row array ``names``."""
    arrays = [store.array(name) for name in names]
    n = arrays[0].shape[0]
    rows = np.arange(0, n, max(1, -(-n // sample_rows)))
    return [a.get_orthogonal_selection((rows, slice(None))) for a in arrays]


def run_graph(store: RunStore, cfg: Config, client, force: bool = False, anchor: dict | None = None) -> dict:
    """Build the kNN graph's maximum spanning forest and store it (stage "graph").

    Parameters
    ----------
    store : RunStore with a completed "knn" stage.
    cfg : Config (``proposals.min_edge_sim``, ``proposals.fan_in``).
    client : distributed.Client.
    anchor : dict, optional
        The anchor to use instead of one derived from this run's similarities (an add re-clusters part
        of a run with the whole run's anchor, so its thresholds are the run's).

    Returns
    -------
    dict : the stage summary (edges in, forest edges, nodes touched).
    """
    store.require("knn", f"run `facecluster knn {store.url}` first")
    index = store.array("knn/index")
    n, k = index.shape
    r = int(index.chunks[0])
    configured = cfg.proposals.min_edge_sim
    params = {"min_edge_sim": configured}
    if anchor is not None:
        params["anchor"] = float(anchor["anchor"])
    with store.stage(STAGE, params, inputs=["knn"], force=force) as w:
        if w is None:
            return store.record(STAGE).get("summary", {})
        from facecluster.tasks.thresholds import edge_floor

        # The anchor is computed once here and reused by every later stage (proposals,
        # threshold clustering) from this stage's record.
        if anchor is None:
            try:
                anchor = client.submit(anchor_task, store.url, key=f"graph-anchor-{uuid.uuid4().hex[:8]}").result()
            except TooFewSimilarities as e:  # a tiny run: an automatic threshold would be a guess
                raise BadInput(f"{store.url}: {e} - {n} faces with k={k} are too few to cluster; ingest more faces") from None
            anchor["source"] = "auto (Otsu threshold of kNN similarities)"
        anchor = dict(anchor)
        if configured is None:
            # Edges far below every threshold any setting uses only cost time (249 s vs
            # 28 s for the forest at 1M faces) and can never join a component.
            min_sim = edge_floor(anchor["anchor"])
        else:
            min_sim = None if configured <= -1.0 else float(configured)
        budget, slots = cluster_budget(client, cfg.proposals.forest_edges)
        src, dst, sim = spanning_forest(client, store.url, n, r, min_sim, cfg.proposals.fan_in, forest_edges=budget)
        w.write_array("graph/forest_src", src)
        w.write_array("graph/forest_dst", dst)
        w.write_array("graph/forest_sim", sim)
        summary = {"n": int(n), "k": int(k), "chunks": len(row_chunks(n, r)),
                   "forest_tasks": len(forest_tasks(n, r, k, budget, slots)), "forest_budget": budget,
                   "forest_edges": int(len(src)),
                   "min_edge_sim": min_sim, "anchor": anchor,
                   "forest_sim_quantiles": {str(q): float(np.quantile(sim, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)} if len(sim) else {}}
        w.summary.update(summary)
        log.info("graph: %d faces, %d forest edges from %d chunks", n, len(src), summary["chunks"])
        return summary


def read_forest(store: RunStore):
    """The stored forest (src, dst, sim)."""
    store.require(STAGE, f"run `facecluster proposals {store.url}` (it builds the graph) first")
    return (store.array("graph/forest_src")[:], store.array("graph/forest_dst")[:], store.array("graph/forest_sim")[:])
