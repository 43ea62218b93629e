"""`facecluster bench infomap`: ``cluster --method infomap`` on N workers against single-process Infomap.

Setup (not timed): the built-in dataset (``facecluster.tasks.synth.make_faces``, identities
stored as ``labels``) and its kNN lists built with faiss IVF, as ``bench proposals`` builds
them (exact kNN at 1M faces is hours on 2 cores); the store is reused when complete.

Timed, in one run on the same kNN lists:

* distributed (a fresh LocalCluster of ``--workers`` processes x 1 thread): the graph stage
  (maximum spanning forest, and the automatic ``min_sim``: the Otsu anchor) and the infomap
  clusters stage (the forest cut at ``min_sim``, components packed into tasks, Infomap per
  component), i.e. what ``facecluster cluster RUN --method infomap`` runs after kNN; each
  worker's peak RSS (sampled every 0.2 s).
* single process (a fresh spawned process): :func:`facecluster.tasks.peers.infomap_clusters`
  on the whole edge list at the same ``min_sim`` (what ``bench quality`` runs as kNN + Infomap);
  its peak RSS.

The partitions are compared: pairwise and BCubed F of one against the other (the single-process
one as reference), and of each against the identities.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np

from . import MemorySampler, save_result
from .proposals import RssSampler, reuse_or_build_run

log = logging.getLogger(__name__)


def single_process_infomap(url: str, min_sim: float) -> dict:
    """In a fresh process: Infomap on the whole thresholded kNN edge list; time and peak RSS."""
    from facecluster.tasks.peers import infomap_clusters, knn_edge_list

    from ..store import open_array

    sampler = RssSampler()
    t0 = time.perf_counter()
    idx = open_array(url, "knn/index")[:]
    sim = open_array(url, "knn/sim")[:]
    src, dst, w = knn_edge_list(idx, sim, min_sim)
    del sim
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = infomap_clusters(len(idx), src, dst, w)
    t_infomap = time.perf_counter() - t0
    return {"read_and_edge_list_s": round(t_read, 2), "infomap_s": round(t_infomap, 2),
            "total_s": round(t_read + t_infomap, 2), "edges": int(len(src)),
            **{f"{k}_rss_mib": round(v / 2**20) for k, v in sampler.stop().items()}, "labels": labels}


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Pairwise and BCubed P/R/F of ``b`` against ``a`` taken as the reference, and cluster counts."""
    from facecluster.tasks.metrics import bcubed_f, pairwise_f

    pp, pr, pf = pairwise_f(a, b)
    bp, br, bf = bcubed_f(a, b)
    return {"pairwise_p": round(pp, 4), "pairwise_r": round(pr, 4), "pairwise_f": round(pf, 4),
            "bcubed_p": round(bp, 4), "bcubed_r": round(br, 4), "bcubed_f": round(bf, 4),
            "clusters_reference": int(len(np.unique(a))), "clusters": int(len(np.unique(b)))}


@click.command("infomap")
@click.option("--n", "n", type=int, default=100_000, show_default=True, help="Faces.")
@click.option("--k", "k", type=int, default=80, show_default=True, help="Neighbours per face.")
@click.option("--dim", type=int, default=256, show_default=True, help="Embedding dimension.")
@click.option("--chunk-rows", type=int, default=65_536, show_default=True, help="Rows per chunk (R).")
@click.option("--nprobe", type=int, default=2, show_default=True, help="IVF lists probed when building the kNN lists.")
@click.option("--workers", type=int, default=2, show_default=True, help="LocalCluster worker processes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip-single", is_flag=True, help="Skip the single-process Infomap (when it would not fit).")
@click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
              help="Run store to write (default: bench-infomap.zarr in the current directory); reused if complete.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON result file.")
def command(n, k, dim, chunk_rows, nprobe, workers, seed, skip_single, store_path, out):
    """`cluster --method infomap` (graph + infomap stages) on N faces vs single-process Infomap on the same graph.

    \b
    Examples:
      facecluster bench infomap --n 100000
      facecluster bench infomap --n 1000000 --store /scratch/bi.zarr   # keep the kNN lists for re-runs
    """
    from ..cluster import configure_blas_env

    configure_blas_env("auto")  # before faiss is imported
    from distributed import Client, LocalCluster

    from ..config import Config
    from ..stages.graph import run_graph
    from ..stages.infomap import run_infomap_clusters

    store, setup = reuse_or_build_run(Path(store_path or "bench-infomap.zarr"), n, k, dim, chunk_rows, nprobe, seed,
                                      need_labels=True)
    result = {"n": n, "k": k, "dim": dim, "chunk_rows": int(store.array("knn/index").chunks[0]), "workers": workers,
              "knn": "faiss IVF (nlist ~ sqrt(N), seeded training); not exact", "setup": setup}
    cfg = Config.from_dict({"dask": {"n_workers": workers}})
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        with MemorySampler(client) as mem_graph:
            t0 = time.perf_counter()
            run_graph(store, cfg, client, force=True)
            t_graph = time.perf_counter() - t0
        with MemorySampler(client) as mem_infomap:
            t0 = time.perf_counter()
            summary = run_infomap_clusters(store, cfg, client, force=True)
            t_infomap = time.perf_counter() - t0
    labels = store.array("clusters")[:]
    gt = store.array("labels")[:]
    min_sim = float(summary["min_sim"])
    result["distributed"] = {
        "graph_s": round(t_graph, 2), "infomap_s": round(t_infomap, 2), "total_s": round(t_graph + t_infomap, 2),
        "min_sim": min_sim, **{key: summary[key] for key in ("n_clusters", "n_singletons", "largest", "components",
                                                             "components_multi", "largest_component", "tasks", "forest")},
        "memory": {"graph": mem_graph.summary(), "infomap": mem_infomap.summary()},
        "peak_rss_mib_per_worker": sorted(round(max(mem_graph.workers.get(w, 0), v) / 2**20)
                                          for w, v in mem_infomap.workers.items()),
        "vs_labels": compare(gt, labels)}
    d = result["distributed"]
    click.echo(f"distributed ({workers} workers): graph {t_graph:.1f}s + infomap {t_infomap:.1f}s at cosine >= "
               f"{min_sim:.4f}; {d['n_clusters']} clusters; largest component {d['largest_component']} faces, "
               f"{d['tasks']} tasks; peak RSS per worker {d['memory']['infomap']['peak_rss_mib_per_worker']} MiB in "
               f"infomap ({d['memory']['graph']['peak_rss_mib_per_worker']} in graph); vs labels pairwise F "
               f"{d['vs_labels']['pairwise_f']}, BCubed F {d['vs_labels']['bcubed_f']}")
    if not skip_single:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            base = pool.submit(single_process_infomap, store.url, min_sim).result()
        single = base.pop("labels")
        base["vs_labels"] = compare(gt, single)
        result["single_process"] = base
        result["distributed_vs_single"] = compare(single, labels)
        result["speedup_vs_single_process"] = round(base["total_s"] / (t_graph + t_infomap), 2)
        result["speedup_infomap_stage_vs_single_infomap"] = round(base["infomap_s"] / t_infomap, 2)
        click.echo(f"single process: read + edge list {base['read_and_edge_list_s']}s, Infomap {base['infomap_s']}s "
                   f"({base['edges']} directed edges >= {min_sim:.4f}); peak RSS {base['peak_rss_mib']} MiB; vs labels "
                   f"pairwise F {base['vs_labels']['pairwise_f']}, BCubed F {base['vs_labels']['bcubed_f']}")
        c = result["distributed_vs_single"]
        click.echo(f"distributed vs single process: pairwise F {c['pairwise_f']}, BCubed F {c['bcubed_f']} "
                   f"({c['clusters']} vs {c['clusters_reference']} clusters); wall time ratio single / distributed "
                   f"{result['speedup_vs_single_process']}")
    p = save_result("infomap", result, out)
    click.echo(f"saved {p}")
