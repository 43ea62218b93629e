"""``facecluster demo``: the whole method on the built-in dataset, with its baselines.

synth (train / test splits, disjoint identities) -> ingest both -> train the edge scorer,
GCN-D and GCN-S on train -> cluster test (knn -> edges -> communities -> graph -> proposals
-> GCN-D -> GCN-S -> dedup -> attach) -> evaluate the model's output (dedup over the
proposals or its communities, as its validation chose), GCN-D + GCN-S dedup and the
communities, beside:

* the threshold baseline with its threshold chosen *with the ground truth* (the
  best any single threshold can do: a bound the learned method must beat),
* GCN-D alone (dedup without GCN-S pruning),
* kNN + Infomap on the same kNN graph (the field's strongest untrained peer;
  its edge threshold also chosen with the ground truth), when installed.

The baselines and their grids (on the data's own similarity range) live in
:mod:`facecluster.pipeline.baselines`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable


from .baselines import infomap_peer, oracle_threshold
from .config import Config
from .store import RunStore
from .synth import write_dataset

log = logging.getLogger(__name__)

def run_demo(out_dir: str | Path, n: int, cfg: Config, client, seed: int = 0,
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo in ``out_dir``; returns {method: metrics} (also written to ``out_dir/demo.json``)."""
    from facecluster.tasks.metrics import evaluate

    from .run import run_cluster
    from .stages.dedup import run_dedup
    from .model_files import read_model_config
    from .stages.ingest import run_ingest
    from .train import train

    # the full chain: the GCN-D and GCN-D + GCN-S rows dedup over every proposal, also where the model's output is
    # its communities
    cfg = dataclasses.replace(cfg, edges=dataclasses.replace(cfg.edges, output_only=False))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    data = out / "data"
    if not (data / "dataset.json").exists():
        write_dataset(data, n, dim=256, seed=seed, test_fraction=0.5, overwrite=True)
    timings["synth"] = time.perf_counter() - t
    runs = {}
    for split in ("train", "test"):
        t = time.perf_counter()
        run_ingest(data / split / "features.npy", out / f"{split}.zarr", labels=data / split / "labels.npy", cfg=cfg.ingest)
        runs[split] = RunStore.open(out / f"{split}.zarr")
        timings[f"ingest {split}"] = time.perf_counter() - t
    n_train = runs["train"].array("features").shape[0]
    n_test = runs["test"].array("features").shape[0]
    echo(f"demo: built-in dataset, {n_train} training faces, {n_test} test faces (disjoint identities), in {out}")

    model_dir = out / "model"
    t = time.perf_counter()
    from .stages.knn import run_knn
    from .model_files import model_digest

    # training computes the training run's edges, communities and proposals itself: its kNN and the
    # training settings say whether the model is up to date
    run_knn(runs["train"], cfg, client)
    train_digest = runs["train"].record("knn")["digest"]
    settings = {"gcn": cfg.gcn.to_dict(), "edges": cfg.edges.to_dict(), "proposals": cfg.proposals.to_dict()}
    stamp = model_dir / "trained-on.json"
    if not (stamp.exists() and json.loads(stamp.read_text()).get("knn") == train_digest
            and json.loads(stamp.read_text()).get("settings") == settings):
        train(runs["train"], model_dir, cfg, client, echo=lambda s: echo(f"  train: {s}"))
        stamp.write_text(json.dumps({"knn": train_digest, "settings": settings, "model": model_digest(model_dir)}))
    else:
        echo("  train: model up to date (skipped)")
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    report = run_cluster(runs["test"], cfg, client, str(model_dir), echo=lambda s: echo(f"  cluster: {s}"))
    timings["cluster"] = time.perf_counter() - t
    store = runs["test"]
    gt = store.array("labels")[:]
    results = {}

    t = time.perf_counter()
    th = oracle_threshold(store, cfg, client)
    results[f"threshold (best th={th.best:g}, chosen with labels)"] = evaluate(gt, th.result)
    timings["threshold grid"] = time.perf_counter() - t

    peer = infomap_peer(store, client)
    if peer is not None:
        results[f"kNN + Infomap (best min_sim={peer.best:g}, chosen with labels)"] = evaluate(gt, peer.result)
    else:
        echo("  (Infomap peer skipped: pip install 'infomap>=2.16,<3')")

    meta = read_model_config(model_dir)
    attach = (meta.get("edges") or {}).get("attach") if cfg.edges.attach else None
    source = (meta.get("output") or {}).get("source", "proposals")
    run_dedup(store, cfg, client, use_gcns=False, out="clusters_gcnd", attach=attach)
    results["GCN-D"] = evaluate(gt, store.array("clusters_gcnd")[:])
    if source != "proposals":
        run_dedup(store, cfg, client, out="clusters_gcnds", attach=attach)
    results["GCN-D + GCN-S"] = evaluate(gt, store.array("clusters" if source == "proposals" else "clusters_gcnds")[:])
    if store.has("communities/labels"):
        results["communities (Infomap on the learned affinity)"] = evaluate(gt, store.array("communities/labels")[:, 0])
    results[f"learned output ({source}, chosen on validation)"] = evaluate(gt, store.array("clusters")[:])
    summary = {"n_train": int(n_train), "n_test": int(n_test), "results": results, "threshold_sweep": th.to_dict(),
               "infomap_sweep": peer.to_dict() if peer is not None else None,
               "stages": report, "timings": {k: round(v, 2) for k, v in timings.items()}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
