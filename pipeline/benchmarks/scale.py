"""`facecluster bench scale`: the stages after kNN on 10^6 .. 10^7 faces, time per face and memory per stage.

Setup (not timed): for each size N, a run store whose kNN lists are generated directly with a planted identity
structure (:mod:`facecluster.tasks.planted`: no search, so 10^7 faces fit this machine's time; features of
``--dim`` dimensions, 64 by default, so they fit its disk), written chunk by chunk by the workers.

Timed, per size, on one LocalCluster of ``--workers`` processes x 1 thread: every stage after ``knn`` of the
chain ``facecluster cluster`` runs with the model (the general model by default): edges, communities, graph,
proposals, score, dedup. For each stage: seconds, microseconds per face, peak RSS per worker and of the driver
(sampled every 0.2 s), worker CPU seconds.

Printed: per stage, time per face at every size and its growth from the smallest to the largest size (the goal:
<= 1.3x), and the memory growth per added face of the peak worker and driver RSS (bytes per face) with the size
at which a 16 GiB worker would run out at that rate. N-sized state in one task or in the driver shows up there.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import click
import numpy as np

from facecluster.tasks.planted import LATENT, Planted
from facecluster.tasks.synth import SynthParams, draw_sizes

from . import MemorySampler, save_result
from ..forest import row_chunks
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

WORKER_LIMIT = 16 << 30


def warm_worker() -> None:
    """Import the stages' kernels (torch, faiss, infomap) on a worker before any clock starts."""
    import facecluster.tasks.edges  # noqa: F401  (torch)
    import facecluster.tasks.gcn  # noqa: F401
    import facecluster.tasks.peers  # noqa: F401
    import faiss  # noqa: F401


def write_rows_task(url: str, paths: dict, r0: int, r1: int, planted: Planted, k: int, dim: int, seed: int) -> int:
    """Rows [r0, r1) of the planted run's arrays named in ``paths``: features, input rows and identities
    (ingest), or the kNN lists."""
    def put(name, values):
        open_array(url, paths[name], "r+")[r0:r1] = values

    ids = np.arange(r0, r1, dtype=np.int64)
    if "features" in paths:
        put("features", planted.features(r0, r1, dim))
        put("input_rows", ids)
        put("labels", planted.identity(ids))
    if "knn/index" in paths:
        index, sim = planted.knn(r0, r1, k)
        put("knn/index", index)
        put("knn/sim", sim)
    return r1 - r0


def build_planted_run(url: str, n: int, k: int, dim: int, chunk_rows: int, seed: int, client) -> dict:
    """A run store with ``ingest`` and ``knn`` complete, its lists planted; returns the setup facts."""
    t0 = time.perf_counter()
    sizes = draw_sizes(n, SynthParams(dim=dim), np.random.default_rng(seed))
    planted = Planted(sizes, seed=seed)
    store = RunStore.create(url, overwrite=True)
    planted_f = client.scatter(planted, broadcast=True)
    arrays = {"features": ((n, dim), (chunk_rows, dim), np.float32, None),
              "input_rows": ((n,), (chunk_rows,), np.int64, None), "labels": ((n,), (chunk_rows,), np.int64, None),
              "knn/index": ((n, k), (chunk_rows, k), np.int64, None),
              "knn/sim": ((n, k), (chunk_rows, k), np.float32, float("-inf"))}
    paths = {}
    for stage, params, names, inputs in (("ingest", {"bench": "scale", "n": n, "dim": dim, "seed": seed},
                                          ("features", "input_rows", "labels"), []),
                                         ("knn", {"bench": "scale", "k": k, "mode": "planted", "seed": seed},
                                          ("knn/index", "knn/sim"), ["ingest"])):
        with store.stage(stage, params, inputs=inputs) as w:
            for name in names:
                shape, chunks, dtype, fill = arrays[name]
                w.create_array(name, shape, chunks, dtype, fill_value=fill)
                paths[name] = w.tmp_path(name)
            wait_futures([client.submit(write_rows_task, url, {x: paths[x] for x in names}, a, b, planted_f, k, dim,
                                        seed, key=f"scale-{stage}-{a}") for a, b in row_chunks(n, chunk_rows)],
                         f"bench scale: planted {stage}")
            w.summary.update(n=n, chunk_rows=chunk_rows, **({"dim": dim, "n_input": n} if stage == "ingest" else
                                                             {"k": k, "mode": "planted"}))
    return {"identities": int(len(sizes)), "largest_identity": int(sizes.max()), "seconds": round(time.perf_counter() - t0, 2)}


def growth(sizes: list[int], by_size: dict) -> dict:
    """Per stage: time per face growth (largest / smallest N) and peak-RSS bytes per added face (worker, driver)."""
    lo, hi = str(min(sizes)), str(max(sizes))
    out = {}
    for stage in by_size[lo]["stages"]:
        a, b = by_size[lo]["stages"][stage], by_size[hi]["stages"][stage]
        dn = max(int(hi) - int(lo), 1)
        w_bpf = (max(b["peak_rss_mib_per_worker"]) - max(a["peak_rss_mib_per_worker"])) * 2**20 / dn
        d_bpf = (b["driver_peak_rss_mib"] - a["driver_peak_rss_mib"]) * 2**20 / dn
        runs_out = None
        if w_bpf > 0:
            runs_out = int(int(hi) + (WORKER_LIMIT - max(b["peak_rss_mib_per_worker"]) * 2**20) / w_bpf)
        out[stage] = {"time_per_face_growth": round(b["us_per_face"] / max(a["us_per_face"], 1e-9), 3),
                      "worker_bytes_per_face": round(w_bpf, 1), "driver_bytes_per_face": round(d_bpf, 1),
                      "worker_16gib_at_n": runs_out}
    return out


@click.command("scale")
@click.option("--sizes", default="1000000,3000000,10000000", show_default=True, help="Comma-separated N.")
@click.option("--k", "k", type=int, default=80, show_default=True)
@click.option("--dim", type=click.IntRange(min=LATENT), default=64, show_default=True,
              help=f"Feature dimensions (the planted latent vectors, {LATENT}-d, zero-padded).")
@click.option("--chunk-rows", type=int, default=65_536, show_default=True)
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Model directory (default: the general model shipped in the package).")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-scale", show_default=True)
@click.option("--keep", is_flag=True, help="Keep each size's run store (10^7 faces: ~10 GB).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON result (default bench-scale.json).")
def command(sizes, k, dim, chunk_rows, model_dir, workers, seed, workdir, keep, out):
    """Time per face and peak memory per stage after kNN, from 1M to 10M faces (planted kNN lists).

    \b
    Examples:
      facecluster bench scale --sizes 100000,300000          # minutes
      facecluster bench scale                                # 1M, 3M, 10M: hours on 2 cores
    """
    from ..cluster import connect
    from ..config import Config
    from ..methods import model_for
    from ..run import run_stages, stage_runners

    ns = sorted({int(s) for s in str(sizes).split(",") if s.strip()})
    if not ns or ns[0] < 2:
        raise click.BadParameter("give sizes >= 2, e.g. --sizes 1000000,3000000", param_hint="--sizes")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    # every stage after kNN, also those a communities-output model skips by default (graph, super-vertex proposals,
    # the other floors): their growth with N is what this measures
    cfg = Config.from_dict({"dask": {"n_workers": workers}, "edges": {"output_only": False}})
    model, which = model_for("gcn", model_dir)
    click.echo(which, err=True)
    result = {"sizes": ns, "k": k, "dim": dim, "chunk_rows": chunk_rows, "workers": workers, "model": model,
              "knn": "planted (facecluster.tasks.planted), no search", "by_size": {}}
    with connect(cfg.dask, quiet=True) as client:
        client.run(warm_worker)  # the first stage timed would otherwise pay the workers' imports
        for n in ns:
            url = str(wd / f"scale-{n}.zarr")
            setup = build_planted_run(url, n, k, dim, chunk_rows, seed, client)
            click.echo(f"{n} faces: planted kNN lists in {setup['seconds']:.1f}s ({setup['identities']} identities)",
                       err=True)
            store = RunStore.open(url)
            stages = {}
            for name, runner in stage_runners(model, cfg, log.info).items():
                if name == "knn":
                    continue
                with MemorySampler(client) as mem:
                    rep = run_stages(store, cfg, client, {name: runner}, echo=log.info)[name]
                stages[name] = {"seconds": rep["seconds"], "us_per_face": round(1e6 * rep["seconds"] / n, 2),
                                **mem.summary()}
                click.echo(f"  {name:<12} {rep['seconds']:8.1f}s {stages[name]['us_per_face']:8.1f} us/face  peak RSS "
                           f"per worker {stages[name]['peak_rss_mib_per_worker']} MiB, driver "
                           f"{stages[name]['driver_peak_rss_mib']} MiB", err=True)
            result["by_size"][str(n)] = {"setup": setup, "stages": stages}
            if not keep:
                shutil.rmtree(url, ignore_errors=True)
    if len(ns) > 1:
        result["growth"] = growth(ns, result["by_size"])
    path = save_result("scale", result, out)
    click.echo(f"time per face (us) at N = {', '.join(map(str, ns))}; growth {ns[0]} -> {ns[-1]} (goal <= 1.3x); "
               f"peak RSS growth per added face:")
    for stage in result["by_size"][str(ns[0])]["stages"]:
        per = " ".join(f"{result['by_size'][str(n)]['stages'][stage]['us_per_face']:8.1f}" for n in ns)
        line = f"  {stage:<12} {per}"
        if "growth" in result:
            g = result["growth"][stage]
            line += (f"   x{g['time_per_face_growth']:.2f}   worker {g['worker_bytes_per_face']:.0f} B/face"
                     f" (16 GiB at N = {g['worker_16gib_at_n'] or '-'}), driver {g['driver_bytes_per_face']:.0f} B/face")
        click.echo(line)
    click.echo(f"result in {path}")
