"""`facecluster bench cluster`: proposals scored per second per worker, time by stage, worker memory.

Setup: the built-in dataset: a labelled training split (``--train-n`` faces) on
which a model is trained (``--epochs``, not part of the timed chain), and
``--n`` faces of other identities to cluster. Timed: the learned chain
knn -> graph -> proposals -> score (GCN-D + GCN-S) -> dedup on a fresh
LocalCluster, each stage's wall time and share of the total, its work bound (its
dense arithmetic at the GEMM rate the workers reach in this run, see
:mod:`.work`), each worker's busy share (task compute time / stage time, from the
Dask task stream), the score stage's proposals per second per worker, and each
worker's peak resident memory during every stage (sampled every 0.2 s). Then the
yardstick of issue 16: one process running faiss ``IndexFlatIP`` (exact kNN,
``--workers`` threads, the same cores) over the same faces, timed on a query sample
after the cluster is closed and extrapolated to every face; the chain's total is
printed as a ratio of it (a ratio measured in one run survives a noisy machine).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
import numpy as np

from . import MemorySampler, save_result
from .work import busy_shares, gemm_rate, single_process_faiss, stage_flop

log = logging.getLogger(__name__)

#: queries of the one-process faiss yardstick, timed in the run and extrapolated to every face
FAISS_QUERIES = 4096


@click.command("cluster")
@click.option("--n", type=int, default=100_000, show_default=True, help="Faces to cluster.")
@click.option("--train-n", type=int, default=20_000, show_default=True, help="Faces of the training split.")
@click.option("--dim", type=int, default=256, show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True, help="Training epochs (setup, not timed).")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-cluster", show_default=True)
@click.option("--model", "model_arg", default=None,
              help="Run this model instead of training one: a model directory, or 'general' for the model shipped "
                   "with facecluster (what `facecluster cluster RUN` runs without --model); --train-n and --epochs "
                   "are then unused.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON result (default bench-cluster.json).")
def command(n, train_n, dim, epochs, workers, workdir, model_arg, out):
    """Throughput of the learned chain by stage; proposals scored per second per worker.

    \b
    Examples:
      facecluster bench cluster --n 100000
      facecluster bench cluster --n 1000000 --train-n 20000 --workdir /scratch/bench
      facecluster bench cluster --n 1000000 --model general   # the no-labels default chain
    """
    from distributed import get_task_stream

    from ..cluster import connect
    from ..config import Config
    from ..model_files import GENERAL_MODEL_DIR, check_dim, read_model_config
    from ..run import stage_runners, run_stages
    from ..stages.ingest import run_ingest
    from ..store import RunStore
    from ..train import train
    from facecluster.tasks.synth import make_faces, make_splits

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    cfg = Config.from_dict({"dask": {"n_workers": workers}, "gcn": {"epochs": epochs}})
    meta = None  # the model's config.json; read after training when the run trains it
    if model_arg is None:
        model = str(wd / "model")
        feats, labels = make_splits(2 * train_n, dim=dim, seed=1)["train"]
        np.save(wd / "train_f.npy", feats)
        np.save(wd / "train_l.npy", labels)
        run_ingest(wd / "train_f.npy", str(wd / "train.zarr"), labels=wd / "train_l.npy", overwrite=True)
    else:
        model = str(GENERAL_MODEL_DIR) if model_arg == "general" else model_arg
        meta = read_model_config(model)
        check_dim(meta, dim, model, "--dim")
    feats, labels = make_faces(n, dim=dim, seed=2)
    np.save(wd / "test_f.npy", feats)
    del feats
    run_ingest(wd / "test_f.npy", str(wd / "test.zarr"), overwrite=True)
    result = {"n": n, "train_n": train_n if model_arg is None else None, "dim": dim, "workers": workers,
              "model": model_arg or "trained in this run",
              "model_output": None if meta is None else (meta.get("output") or {}).get("source", "proposals")}
    with connect(cfg.dask, quiet=True) as client:
        if model_arg is None:
            t0 = time.perf_counter()
            meta = train(RunStore.open(str(wd / "train.zarr")), model, cfg, client, echo=log.info)
            result["train_seconds_incl_stages"] = round(time.perf_counter() - t0, 1)
            result["train_metrics"] = meta["metrics"]
            result["model_output"] = (meta.get("output") or {}).get("source", "proposals")
        store = RunStore.open(str(wd / "test.zarr"))
        rates = client.run(gemm_rate)  # all workers at once: the rate they share
        result["gemm_flop_per_s"] = round(sum(rates.values()))
        click.echo(f"float32 GEMM, all workers at once: {sum(rates.values()) / 1e9:.1f} GFLOP/s", err=True)
        stages, memory, busy, bound = {}, {}, {}, {}
        for name, runner in stage_runners(model, cfg, log.info).items():
            with MemorySampler(client) as mem, get_task_stream(client) as stream:
                rep = run_stages(store, cfg, client, {name: runner}, echo=log.info)[name]
            stages[name] = rep["seconds"]
            memory[name] = mem.summary()
            busy[name] = busy_shares(stream.data, list(rates), rep["seconds"])
            flop = stage_flop(name, rep.get("summary", {}), store, model)
            # three significant digits: a small run's bound is milliseconds, which rounding to 0.01 s erased
            bound[name] = None if not flop else float(f"{flop / sum(rates.values()):.3g}")  # 0: no dense arithmetic
            click.echo(f"{name}: {rep['seconds']:.1f}s, busy per worker {list(busy[name].values())}, peak RSS per "
                       f"worker {memory[name]['peak_rss_mib_per_worker']} MiB, driver "
                       f"{memory[name]['driver_peak_rss_mib']} MiB",
                       err=True)
            if name == "score":
                s = rep["summary"]
                result["score"] = {k: s.get(k) for k in ("n_proposals", "seconds", "proposals_per_s",
                                                         "proposals_per_s_per_worker", "segmented")}
        result["stage_seconds"] = stages
        result["total_seconds"] = round(sum(stages.values()), 2)
        result["stage_share"] = {k: round(v / max(result["total_seconds"], 1e-9), 3) for k, v in stages.items()}
        result["work_bound_seconds"] = bound
        result["busy_share_per_worker"] = busy
        result["memory_by_stage"] = memory
    # the yardstick: one process, faiss IndexFlatIP over the same faces, on a query sample (cluster closed)
    x = np.ascontiguousarray(np.load(wd / "test_f.npy"), dtype=np.float32)
    nq = int(min(n, FAISS_QUERIES))
    secs, _ = single_process_faiss(x, cfg.knn.k, workers, q=x[np.linspace(0, n - 1, nq).astype(np.int64)])
    del x
    est = secs / nq * n
    result["faiss_flat"] = {"queries": nq, "threads": workers, "search_seconds": round(secs, 3),
                            "seconds_extrapolated": float(f"{est:.4g}")}
    result["total_vs_faiss_flat"] = round(result["total_seconds"] / max(est, 1e-9), 3)
    path = save_result("cluster", result, out)
    click.echo(f"{n} faces, {workers} workers, model {result['model']} (output: {result['model_output']}), "
               f"{result['total_seconds']:.1f}s in all:")
    for k, v in stages.items():
        b = bound[k]
        click.echo(f"  {k:<12} {v:8.1f}s {100 * result['stage_share'][k]:5.1f}%   work-bound "
                   + ("-" if b is None else f"{b:.1f}s ({v / max(b, 1e-9):.1f}x)")
                   + "   busy per worker " + " ".join(f"{x:.2f}" for x in busy[k].values()))
    sc = result.get("score", {})
    click.echo(f"score: {sc.get('n_proposals')} proposals, {sc.get('proposals_per_s_per_worker')} proposals/s/worker")
    click.echo(f"all stages {result['total_seconds']:.1f}s = {result['total_vs_faiss_flat']:.3f}x one-process faiss "
               f"IndexFlatIP exact kNN of the same {n} faces ({workers} threads: {est:.1f}s, extrapolated from {nq} "
               "queries timed in this run)")
    peak = max(max(v["peak_rss_mib_per_worker"] or [0]) for v in memory.values())
    click.echo(f"peak worker RSS (sampled every 0.2 s): {peak} MiB; result in {path}")
