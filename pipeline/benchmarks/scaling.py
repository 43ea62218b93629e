"""`facecluster bench scaling`: every stage on 1 vs 2 worker processes (1 thread each), same data.

What is measured, in one run on this machine:

* the built-in dataset (``facecluster.tasks.synth.make_splits``): a test split of about ``--n`` faces
  to cluster and a disjoint training split for a small GCN model (trained once, first,
  with 2 workers for its upstream stages; reported separately, not part of the ratio),
  or ``--model DIR`` to reuse a model;
* the test split ingested into one run store per worker count; on a LocalCluster of
  ``w`` processes x 1 thread, the chain knn -> graph -> proposals -> score -> dedup
  (``facecluster.pipeline.run.run_stages``) with each stage's wall time, so speed-up = t(1) / t(2);
* peak RSS of every worker process and of the driver while each stage runs (sampled
  every 0.2 s through ``client.run`` and psutil in a background thread);
* that both runs give identical ``clusters`` (worker-count invariance).

Workers import faiss and torch before the clock starts (a warm-up task), so the
times compare the stages' work, not interpreter start-up. On a 2-core machine the
ideal speed-up is 2; stages whose time is dominated by the driver (serial steps,
waiting on one task) stay near 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from . import MemorySampler, save_result

log = logging.getLogger(__name__)

STAGES = ("knn", "edges", "communities", "graph", "proposals", "score", "dedup")


def _warm_up() -> int:
    """Run on each worker: import what the stages import, so start-up is not timed."""
    import faiss  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import facecluster.tasks.gcn  # noqa: F401
    import facecluster.tasks.knn  # noqa: F401

    return os.getpid()


def _config(chunk_rows: int, k: int, hidden: list[int], epochs: int, workers: int, memory: str):
    from ..config import Config

    return Config.from_dict({
        "dask": {"n_workers": workers, "threads_per_worker": 1, "memory_limit": memory},
        "ingest": {"chunk_rows": chunk_rows},
        "knn": {"k": k, "mode": "exact"},
        "gcn": {"hidden": hidden, "epochs": epochs},
    })


def _ingest(tmp: Path, x: np.ndarray, y: np.ndarray, name: str, cfg):
    from ..stages.ingest import run_ingest
    from ..store import RunStore

    fx, fy = tmp / f"{name}_features.npy", tmp / f"{name}_labels.npy"
    np.save(fx, x)
    np.save(fy, y)
    run_ingest(fx, str(tmp / f"{name}.zarr"), labels=fy, cfg=cfg.ingest)
    fx.unlink()
    fy.unlink()
    return RunStore.open(str(tmp / f"{name}.zarr"))


def train_model(tmp: Path, x: np.ndarray, y: np.ndarray, cfg) -> tuple[Path, dict]:
    """A small GCN-D/GCN-S on the training split (upstream stages on a 2-worker LocalCluster)."""
    from ..cluster import connect
    from ..train import train

    store = _ingest(tmp, x, y, "train", cfg)
    t0 = time.perf_counter()
    with connect(cfg.dask, quiet=True) as client:
        meta = train(store, tmp / "model", cfg, client, echo=log.info)
    return tmp / "model", {"faces": int(len(x)), "seconds": round(time.perf_counter() - t0, 2),
                           "epochs": cfg.gcn.epochs, "hidden": list(cfg.gcn.hidden),
                           "train_proposals": meta["metrics"].get("train_proposals"),
                           "val_spearman_iou": meta["metrics"].get("val_spearman_iou")}


def _tasks(summary: dict):
    """Parallel tasks of a stage, from its summary (names differ by stage)."""
    if summary.get("tasks") is not None:
        return summary["tasks"]
    if summary.get("chunks") is not None:  # graph: one task per chunk (+ the merge tree)
        return summary["chunks"]
    if summary.get("settings") is not None:  # proposals: one task per setting
        return len(summary["settings"])
    return summary.get("map_tasks")  # dedup


def _sizes(name: str, summary: dict) -> dict:
    """What the driver gathers in a stage (for the README's memory figures)."""
    if name == "graph":
        return {"forest_edges": summary.get("forest_edges")}
    if name == "proposals":
        return {"proposals": summary.get("n_proposals"), "before_dedup": summary.get("before_dedup"),
                "memberships": (summary.get("sizes") or {}).get("faces"), "settings": len(summary.get("settings") or [])}
    if name == "dedup":
        return {"clusters": summary.get("n_clusters")}
    return {}


def run_once(store, cfg, model_dir: Path) -> dict:
    """The chain on one store with ``cfg.dask.n_workers`` workers: per-stage seconds and memory."""
    from ..cluster import connect
    from ..run import stage_runners

    runners = stage_runners(str(model_dir), cfg, log.info)
    out = {}
    with connect(cfg.dask, quiet=True) as client:
        pids = client.run(_warm_up)
        for name in runners:
            with MemorySampler(client) as mem:
                t0 = time.perf_counter()
                summary = runners[name](store, cfg, client)
                seconds = time.perf_counter() - t0
            out[name] = {"seconds": round(seconds, 3), **mem.summary(),
                         "tasks": _tasks(summary or {}), "sizes": _sizes(name, summary or {})}
            log.info("%d worker(s): %s %.2fs", len(pids), name, seconds)
    return out


@click.command("scaling")
@click.option("--n", "n", type=int, default=50_000, show_default=True, help="Faces to cluster (test split).")
@click.option("--dim", type=int, default=256, show_default=True)
@click.option("--k", "k", type=int, default=80, show_default=True)
@click.option("--chunk-rows", type=int, default=4096, show_default=True, help="R: rows per chunk.")
@click.option("--train-n", type=int, default=10_000, show_default=True, help="Faces for the model's training split.")
@click.option("--epochs", type=int, default=3, show_default=True, help="Training epochs of the small model.")
@click.option("--hidden", default="128,64", show_default=True, help="Graph-conv widths of the small model.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Reuse this model directory instead of training one (its feature dimension must be --dim).")
@click.option("--memory-limit", default="4GiB", show_default=True, help="Memory limit of every worker (same for 1 and 2).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where the run stores go (default: a temporary folder, removed).")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Runs per worker count (alternating 1,2 / 2,1 order); the fastest run of each stage is reported.")
@click.option("--out", default=None, help="JSON output (default bench-scaling.json).")
def command(n, dim, k, chunk_rows, train_n, epochs, hidden, model_dir, memory_limit, workdir, repeat, out):
    """Seconds per stage with 1 vs 2 worker processes (1 thread each), the speed-up and peak memory.

    \b
    Examples:
      facecluster bench scaling --n 50000
      facecluster bench scaling --n 20000 --repeat 3 --out scaling.json
    """
    from ..cluster import configure_blas_env

    configure_blas_env("auto")  # before faiss loads here or in the LocalCluster workers
    from facecluster.tasks.synth import make_splits

    widths = [int(v) for v in hidden.split(",") if v.strip()]
    base = _config(chunk_rows, k, widths, epochs, 2, memory_limit)
    t0 = time.perf_counter()
    splits = make_splits(n + (0 if model_dir else train_n), dim=dim, seed=0,
                         test_fraction=n / (n + (0 if model_dir else train_n)))
    click.echo(f"data: test {len(splits['test'][0])} x {dim}, train {len(splits['train'][0])} "
               f"({time.perf_counter() - t0:.1f}s)", err=True)
    result: dict = {"dim": dim, "k": k, "chunk_rows": chunk_rows, "threads_per_worker": 1,
                    "memory_limit": memory_limit, "cpu_count": os.cpu_count()}
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-", dir=workdir) as td:
        tmp = Path(td)
        if model_dir is None:
            x, y = splits["train"]
            model, result["train"] = train_model(tmp, x, y, base)
            click.echo(f"model: trained on {result['train']['faces']} faces in {result['train']['seconds']:.1f}s "
                       "(not part of the comparison)", err=True)
        else:
            model = Path(model_dir)
            result["model"] = str(model)
        x, y = splits["test"]
        result["n"] = int(len(x))
        all_runs: dict[int, list] = {1: [], 2: []}
        clusters = []
        for rep in range(max(1, repeat)):
            # alternate the order so drifting background load does not favour one side
            for w in ((1, 2) if rep % 2 == 0 else (2, 1)):
                cfg = _config(chunk_rows, k, widths, epochs, w, memory_limit)
                store = _ingest(tmp, x, y, f"run{w}-{rep}", cfg)
                click.echo(f"run {rep + 1}/{repeat}: the chain with {w} worker(s)...", err=True)
                all_runs[w].append(run_once(store, cfg, model))
                clusters.append(store.array("clusters")[...])
                shutil.rmtree(tmp / f"run{w}-{rep}.zarr", ignore_errors=True)
        # per stage, the fastest of the repeats (the one least disturbed by other processes)
        ran = [name for name in STAGES if all(name in r for rs in all_runs.values() for r in rs)]
        runs = {w: {name: min((r[name] for r in rs), key=lambda v: v["seconds"]) for name in ran}
                for w, rs in all_runs.items()}
        result["runs"] = {str(w): rs for w, rs in all_runs.items()}
        result["repeat"] = max(1, repeat)
        result["identical_clusters"] = all(np.array_equal(clusters[0], c) for c in clusters[1:])
        result["n_clusters"] = int(len(np.unique(clusters[0])))
    rows = []
    for name in ran:
        a, b = runs[1][name], runs[2][name]
        rows.append({"stage": name, "seconds_1": a["seconds"], "seconds_2": b["seconds"],
                     "speedup": round(a["seconds"] / max(b["seconds"], 1e-9), 2), "tasks": b["tasks"],
                     "worker_cpu_seconds_1": a["worker_cpu_seconds"], "worker_cpu_seconds_2": b["worker_cpu_seconds"],
                     "driver_cpu_seconds_2": b["driver_cpu_seconds"],
                     # share of the workers' wall time spent computing (1.0 = every worker busy all along)
                     "worker_busy_1": round(a["worker_cpu_seconds"] / max(a["seconds"], 1e-9), 2),
                     "worker_busy_2": round(b["worker_cpu_seconds"] / max(2 * b["seconds"], 1e-9), 2),
                     "load_avg_1": a["load_avg_1min_after"], "load_avg_2": b["load_avg_1min_after"],
                     "peak_rss_mib_1": a["peak_rss_mib_per_worker"], "peak_rss_mib_2": b["peak_rss_mib_per_worker"],
                     "driver_peak_rss_mib_1": a["driver_peak_rss_mib"], "driver_peak_rss_mib_2": b["driver_peak_rss_mib"]})
    tot1 = sum(r["seconds_1"] for r in rows)
    tot2 = sum(r["seconds_2"] for r in rows)
    result["stages"] = rows
    result["sizes"] = {name: runs[2][name]["sizes"] for name in ran if runs[2][name]["sizes"]}
    result["total"] = {"seconds_1": round(tot1, 3), "seconds_2": round(tot2, 3), "speedup": round(tot1 / max(tot2, 1e-9), 2)}
    click.echo(f"N={result['n']} d={dim} k={k} R={chunk_rows}; LocalCluster 1 vs 2 processes x 1 thread")
    click.echo(f"{'stage':<10} {'1 worker s':>10} {'2 workers s':>11} {'speed-up':>8} {'tasks':>6} "
               f"{'worker CPU s (1|2)':>18} {'load (1|2)':>11}  {'peak RSS/worker MiB (1 | 2)':<28} driver MiB")
    for r in rows:
        click.echo(f"{r['stage']:<10} {r['seconds_1']:>10.2f} {r['seconds_2']:>11.2f} {r['speedup']:>8.2f} "
                   f"{str(r['tasks'] or ''):>6} {r['worker_cpu_seconds_1']:>8.1f} | {r['worker_cpu_seconds_2']:<7.1f} "
                   f"{r['load_avg_1']:>4.1f} | {r['load_avg_2']:<4.1f}  "
                   f"{str(r['peak_rss_mib_1']) + ' | ' + str(r['peak_rss_mib_2']):<28} {r['driver_peak_rss_mib_2']}")
    click.echo(f"{'total':<10} {tot1:>10.2f} {tot2:>11.2f} {result['total']['speedup']:>8.2f}")
    click.echo(f"clusters identical for 1 and 2 workers: {result['identical_clusters']} ({result['n_clusters']} clusters)")
    path = save_result("scaling", result, out)
    click.echo(f"saved {path}")
