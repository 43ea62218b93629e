"""The learned clustering chain: knn -> [edges -> communities] -> graph -> proposals -> score (GCN-D, GCN-S) -> dedup
(a model whose output is its communities: knn -> edges -> communities -> proposals -> score -> dedup, see
:func:`stage_runners`), and the graph every method starts from (:func:`ensure_graph`).

Each stage is skipped when its record says its inputs and parameters are
unchanged, so re-running after a crash resumes at the first incomplete stage.
This module only orders the stages and reports what ran; the stages do the work.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .cluster import check_store_reachable, release_memory
from .config import Config
from .model_files import RETRAIN_NOTE, check_dim, edge_meta, model_digest, read_model_config
from .stages.communities import community_floors, run_communities
from .stages.dedup import run_dedup
from .stages.edges import run_edges, run_levels
from .stages.graph import run_graph
from .stages.knn import run_knn
from .stages.proposals import run_proposals
from .stages.score import run_score
from .store import RunStore

log = logging.getLogger(__name__)

CLUSTER_STAGES = ("knn", "edges", "communities", "graph", "proposals", "score", "dedup")


def full_chain_current(store: RunStore, model_dir: str, edges: dict) -> bool:
    """Whether ``store`` holds this model's full chain up to date (every communities floor and the super-vertex
    proposals beside them, fresh): then the output-only chain would redo, with fewer stages, what is there.
    ``edges``: the model's edge scorer metadata (:func:`edge_meta`)."""
    comm, prop = store.record("communities"), store.record("proposals")
    if not (comm and prop and comm.get("complete") and prop.get("complete")):
        return False
    if store.stale_reason("communities") or store.stale_reason("proposals"):
        return False
    return (comm["params"].get("model_digest") == model_digest(model_dir)
            and comm["params"].get("floors") == community_floors(run_levels(edges, store)["floor"])
            and prop["params"].get("communities") and prop["params"].get("super_vertices", True))


def stage_runners(model_dir: str | None, cfg: Config, echo: Callable[[str], None], store: RunStore | None = None):
    """The chain for a model: with an edge scorer, the learned affinity's stages join it.

    Where the model's output is its communities and ``[edges] output_only`` holds (the default), the chain is
    only what that output needs: knn, edges, the communities at the model's floor, those communities as the
    proposals (no graph stage, no super-vertex settings, no other floor), their scores and dedup. The labels are
    those of the full chain (each component is its own Infomap problem, and dedup from the communities takes the
    model floor's communities, which are disjoint, whatever else was proposed); the full chain's extra stages
    only feed GCN-D's own dedup over every proposal. At 1M built-in faces with the general model, the stages after
    edges took 42.4 s against the full chain's 214.8 s (communities 21.0 / 73.6, graph - / 15.8, proposals 0.5 /
    43.3, score 14.7 / 74.6, dedup 6.2 / 7.5), the same labels.
    """
    edges = edge_meta(model_dir) if model_dir else None
    runners = {"knn": run_knn}
    communities = False
    if edges is None:
        if model_dir:
            echo(RETRAIN_NOTE.format(model=model_dir))
    else:
        communities = cfg.edges.communities
    # the model's output: dedup over every proposal, or its communities (chosen on validation identities)
    source = (read_model_config(model_dir).get("output") or {}).get("source", "proposals") if communities else "proposals"
    output_only = source == "communities" and cfg.edges.output_only
    if output_only and store is not None and full_chain_current(store, model_dir, edges):
        output_only = False  # its stages are all up to date: nothing to redo
    if edges is not None:
        runners["edges"] = lambda store, cfg, client, force=False: run_edges(store, model_dir, cfg, client, force=force)
        if communities:
            runners["communities"] = lambda store, cfg, client, force=False: run_communities(
                store, model_dir, cfg, client, force=force, output_only=output_only)
    if not output_only:
        runners["graph"] = run_graph
    runners["proposals"] = lambda store, cfg, client, force=False: run_proposals(
        store, cfg, client, force=force, communities=communities, super_vertices=not output_only)
    runners["score"] = lambda store, cfg, client, force=False: run_score(store, model_dir, cfg, client, force=force)

    def levels(store) -> tuple:
        """(attach, merge) for this run: read when dedup runs, since an adapted run takes the model's adapt_levels."""
        if edges is None:
            return None, None
        lv = run_levels(edges, store)
        attach = lv["attach"] if cfg.edges.attach else None
        # the merge level was chosen on the communities: the dedup output over every proposal is not merged
        merge = lv["merge"] if cfg.edges.merge and source == "communities" else None
        return attach, merge

    def dedup(store, cfg, client, force=False):
        attach, merge = levels(store)
        return run_dedup(store, cfg, client, force=force, attach=attach, use_gcns=source == "proposals", source=source,
                         merge=merge)

    runners["dedup"] = dedup
    return runners


def ensure_knn(store: RunStore, cfg: Config, client) -> None:
    """Run the kNN stage if it never completed or is stale.

    A completed, fresh kNN is kept as it is, even if it was computed with other
    ``facecluster knn`` flags than this configuration; a stale one (its features were
    re-ingested since) is recomputed, never reused.
    """
    if store.stale_reason("knn") is not None:
        run_knn(store, cfg, client)


def ensure_graph(store: RunStore, cfg: Config, client) -> None:
    """:func:`ensure_knn`, then the graph stage (skipped if up to date)."""
    ensure_knn(store, cfg, client)
    run_graph(store, cfg, client)


def run_stages(store: RunStore, cfg: Config, client, stages: dict[str, Callable],
               echo: Callable[[str], None] | None = None, force: bool = False) -> dict:
    """Run ``stages`` in order; returns {stage: {"ran": bool, "seconds": float, "summary": dict}}.

    A stage counts as skipped when its record was already complete with the same
    ``finished`` time before the call (the stage returned its stored summary).
    ``force`` recomputes every stage.
    """
    echo = echo or log.info
    check_store_reachable(client, store.url)  # one line naming the worker that cannot open the store
    with store.writing("cluster"):  # one writer for the whole chain: another must not clean our _tmp
        store.clean_tmp()  # leftovers of a killed run: never results, only disk
        return _run_in_order(store, cfg, client, stages, echo, force)


def stage_note(summary) -> str:
    """What a stage's line adds to "done in ...": whether ``[edges] adapt`` adapted the scorer to the run."""
    if not isinstance(summary, dict) or "adaptation" not in summary:
        return ""
    ad = summary["adaptation"]
    if ad:
        return " (P adapted to this run: fitted on {} + {} confident edges)".format(*ad["pseudo_labels"])
    return " ([edges] adapt: too few confident edges to fit on, the scorer's own P)"


def _run_in_order(store: RunStore, cfg: Config, client, stages: dict[str, Callable], echo, force: bool) -> dict:
    report = {}
    for name, runner in stages.items():
        before = store.record(name) or {}
        t0 = time.perf_counter()
        summary = runner(store, cfg, client, force=force)
        seconds = time.perf_counter() - t0
        after = store.record(name) or {}
        ran = not (before.get("complete") and before.get("finished") == after.get("finished"))
        report[name] = {"ran": ran, "seconds": round(seconds, 3), "summary": summary}
        echo(f"{name:<10} {'done' if ran else 'skipped (up to date)'} in {seconds:.1f}s{stage_note(summary)}")
        if ran:  # the next stage starts from what this one still holds, not from what it freed
            # housekeeping: a worker lost right now (its tasks are recovered by the scheduler) must not fail the run
            freed = client.run(release_memory, on_error="ignore")
            log.debug("%s: released %s MiB on the workers", name, {w: b >> 20 for w, b in freed.items()})
    return report


def run_cluster(store: RunStore, cfg: Config, client, model_dir: str,
                echo: Callable[[str], None] | None = None, force: bool = False) -> dict:
    """The whole learned chain on one run store; writes ``clusters``."""
    # Fail on a model/run mismatch before spending minutes on kNN.
    check_dim(read_model_config(model_dir), store.array("features").shape[1], model_dir, store.url)
    echo = echo or log.info
    return run_stages(store, cfg, client, stage_runners(model_dir, cfg, echo, store), echo, force=force)
