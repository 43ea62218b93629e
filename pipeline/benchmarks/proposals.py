"""`facecluster bench proposals`: super-vertices on >= 1M faces vs scipy's single-process connected components.

Setup (not timed): the built-in dataset (``facecluster.tasks.synth.make_faces``) and its kNN
lists. Exact kNN at 1M faces is N^2 d multiply-adds (hours on 2 cores), so the
benchmark builds them with faiss IVF (nlist ~ sqrt(N), small nprobe,
quantizer trained on a seeded sample): approximate lists with the real
structure of a kNN graph (same k, same similarity distribution, each row sorted,
self excluded). They are stored in a run store like the kNN stage's output.

Timed, in one run on the same edges:

* distributed: the "graph" stage (per-chunk maximum spanning forests + tree
  merge) and then Algorithm 1 at the data's automatic threshold (step 0.05,
  max_size 300) on the forest, on a fresh LocalCluster; peak RSS per worker.
* single process: scipy ``connected_components`` on the full thresholded edge
  list (every kNN edge with s >= th0), and Algorithm 1 on that full edge list
  (vectorised ladder, scipy CC per step), in a fresh spawned process; its peak RSS.

Labels of the two Algorithm 1 runs must be identical (checked).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np

from . import save_result

log = logging.getLogger(__name__)


class RssSampler:
    """Peak RSS of this process, sampled every ``interval`` s by a daemon thread.

    (``ru_maxrss`` is inherited across fork/exec on Linux, so spawned workers
    would report the driver's peak; sampling measures the process itself.)
    """

    def __init__(self, interval: float = 0.02):
        import threading

        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.start = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval):
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return {"start": int(self.start), "peak": int(self.peak)}


_SAMPLER: RssSampler | None = None


def _start_sampler() -> int:
    global _SAMPLER
    _SAMPLER = RssSampler()
    return _SAMPLER.start


def _stop_sampler() -> dict:
    return _SAMPLER.stop()


def build_run(path: Path, n: int, k: int, dim: int, chunk_rows: int, nprobe: int, seed: int) -> dict:
    """Write features and IVF kNN lists of the built-in dataset into a new run store."""
    import faiss

    from facecluster.tasks.synth import make_faces

    from ..store import RunStore

    t0 = time.perf_counter()
    feats, labels = make_faces(n, dim=dim, seed=seed)
    t_gen = time.perf_counter() - t0
    store = RunStore.create(path, overwrite=True)
    with store.stage("ingest", {"bench": "proposals", "n": n, "dim": dim, "seed": seed}) as w:
        w.write_array("features", feats, chunks=(chunk_rows, dim))
        w.write_array("labels", labels.astype(np.int64), chunks=(chunk_rows,))  # the identities, for quality
        w.summary.update(n=n, dim=dim, chunk_rows=chunk_rows)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    nlist = max(16, int(np.sqrt(n)))
    quant = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.cp.seed = seed
    index.train(feats[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))])
    index.add(feats)
    index.nprobe = nprobe
    with store.stage("knn", {"bench": "proposals", "k": k, "mode": "ivf", "nlist": nlist, "nprobe": nprobe},
                     inputs=["ingest"]) as w:
        zi = w.create_array("knn/index", (n, k), (chunk_rows, k), np.int64)
        zs = w.create_array("knn/sim", (n, k), (chunk_rows, k), np.float32)
        for a in range(0, n, chunk_rows):
            b = min(a + chunk_rows, n)
            sim, idx = index.search(feats[a:b], k + 1)
            rows = np.arange(a, b)[:, None]
            sim = np.where((idx == rows) | (idx < 0), -np.inf, sim)
            order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -sim), axis=1)[:, :k]
            idx = np.take_along_axis(idx, order, 1)
            sim = np.take_along_axis(sim, order, 1)
            ok = np.isfinite(sim)
            zi[a:b] = np.where(ok, idx, -1)
            zs[a:b] = np.where(ok, sim, 0).astype(np.float32)
    t_knn = time.perf_counter() - t0
    del feats, index, labels
    return {"generate_s": round(t_gen, 2), "knn_ivf_s": round(t_knn, 2), "nlist": nlist, "nprobe": nprobe}


def reuse_or_build_run(path: Path, n: int, k: int, dim: int, chunk_rows: int, nprobe: int, seed: int,
                       need_labels: bool = False):
    """(RunStore, setup) of a bench store: reused when its kNN lists are complete for these n, k and dim
    (and it holds the identities, with ``need_labels``), else built afresh (:func:`build_run`; setup
    None when reused)."""
    from ..store import RunStore

    try:
        store = RunStore.open(path)
        rec = store.record("ingest") or {}
        if not (store.is_complete("knn") and (store.has("labels") or not need_labels)
                and rec.get("params", {}).get("n") == n and store.array("knn/index").shape[1] == k
                and rec.get("params", {}).get("dim") == dim):
            raise LookupError
        click.echo(f"reusing kNN lists in {path}")
        return store, None
    except Exception:
        click.echo(f"building {n} faces x {dim} dims and IVF kNN lists (k={k}) in {path} ...")
        setup = build_run(path, n, k, dim, chunk_rows, nprobe, seed)
        click.echo(f"  setup: {setup}")
        return RunStore.open(path), setup


def scipy_baseline(url: str, th0: float, step: float, max_size: int) -> dict:
    """In a fresh process: scipy CC and Algorithm 1 on the full thresholded kNN edge list; peak RSS."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    from facecluster.tasks.components import super_vertices

    from ..store import open_array

    sampler = RssSampler()
    idx = open_array(url, "knn/index")[:]
    sim = open_array(url, "knn/sim")[:]
    n, k = idx.shape
    t0 = time.perf_counter()
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    nb = idx.ravel()
    s = sim.ravel()
    keep = (nb >= 0) & (nb != rows) & (s >= np.float32(th0))
    src, dst, s = rows[keep], nb[keep], s[keep]
    del rows, nb, idx, sim
    t_edges = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = sp.csr_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    ncomp, _ = connected_components(g, directed=False)
    t_cc = time.perf_counter() - t0
    del g
    t0 = time.perf_counter()
    labels, _ = super_vertices(n, src, dst, s, th0, step, max_size)
    t_alg1 = time.perf_counter() - t0
    return {"edges_thresholded": int(len(src)), "edge_list_s": round(t_edges, 2), "cc_s": round(t_cc, 2),
            "components_at_th0": int(ncomp), "algorithm1_full_edges_s": round(t_alg1, 2),
            **{f"{k}_rss_bytes": v for k, v in sampler.stop().items()}, "labels": labels}


@click.command("proposals")
@click.option("--n", "n", type=int, default=1_000_000, show_default=True, help="Faces.")
@click.option("--k", "k", type=int, default=80, show_default=True, help="Neighbours per face.")
@click.option("--dim", type=int, default=256, show_default=True, help="Embedding dimension.")
@click.option("--chunk-rows", type=int, default=65_536, show_default=True, help="Rows per chunk (R).")
@click.option("--nprobe", type=int, default=2, show_default=True, help="IVF lists probed when building the kNN lists.")
@click.option("--workers", type=int, default=2, show_default=True, help="LocalCluster worker processes.")
@click.option("--max-size", type=int, default=300, show_default=True, help="Algorithm 1 max_size.")
@click.option("--step", type=float, default=0.05, show_default=True, help="Algorithm 1 ladder step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--all-edges", is_flag=True, help="Build the forest from every kNN edge (default: edges >= th0, "
              "the lowest threshold used, as proposals.min_edge_sim).")
@click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
              help="Run store to write (default: bench-proposals.zarr in the current directory); reused if complete.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON result file.")
def command(n, k, dim, chunk_rows, nprobe, workers, max_size, step, seed, all_edges, store_path, out):
    """Graph (maximum spanning forest) + super-vertices on N faces vs scipy CC on the full edge list.

    \b
    Examples:
      facecluster bench proposals --n 1000000 --k 80
      facecluster bench proposals --n 200000 --store /tmp/bp.zarr   # keep the kNN lists for re-runs
    """
    from ..cluster import configure_blas_env

    configure_blas_env("auto")  # before faiss is imported
    from distributed import Client, LocalCluster

    from ..config import Config
    from ..stages.graph import anchor_task, run_graph
    from ..stages.proposals import threshold_task

    store, setup = reuse_or_build_run(Path(store_path or "bench-proposals.zarr"), n, k, dim, chunk_rows, nprobe, seed)
    edges_total = int(n) * int(k)
    result = {"n": n, "k": k, "dim": dim, "chunk_rows": int(store.array("knn/index").chunks[0]), "workers": workers,
              "knn": "faiss IVF (nlist ~ sqrt(N), seeded training); not exact", "setup": setup}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        th0 = float(client.submit(anchor_task, store.url, pure=False).result()["anchor"])
        t_anchor = time.perf_counter() - t0
        cfg = Config.from_dict({"dask": {"n_workers": workers},
                                "proposals": {"min_edge_sim": -1.0 if all_edges else th0}})
        client.run(_start_sampler)
        t0 = time.perf_counter()
        graph = run_graph(store, cfg, client, force=True)
        t_graph = time.perf_counter() - t0
        t0 = time.perf_counter()
        labels = client.submit(threshold_task, store.url, th0, step, max_size, pure=False).result()
        t_sv = time.perf_counter() - t0
        rss = client.run(_stop_sampler)
        peaks = {w: r["peak"] for w, r in rss.items()}
        idle = {w: r["start"] for w, r in rss.items()}
    sizes = np.bincount(labels)
    result["distributed"] = {
        "anchor_threshold_s": round(t_anchor, 2), "min_edge_sim": None if all_edges else th0,
        "graph_s": round(t_graph, 2), "super_vertices_s": round(t_sv, 2), "total_s": round(t_graph + t_sv, 2),
        "forest_edges": graph["forest_edges"], "th0": th0, "super_vertices": int(len(sizes)),
        "largest": int(sizes.max()), "peak_rss_per_worker_bytes": sorted(peaks.values()),
        "idle_rss_per_worker_bytes": sorted(idle.values()),
        "edges_per_task_chunk": int(result["chunk_rows"]) * k,
        "peak_rss_growth_per_worker_bytes": sorted(peaks[w] - idle[w] for w in peaks),
        "bytes_per_chunk_knn_entry": round(max(peaks[w] - idle[w] for w in peaks) / (int(result["chunk_rows"]) * k), 1),
    }
    click.echo(f"distributed ({workers} workers): graph {t_graph:.1f}s + super-vertices {t_sv:.1f}s; "
               f"forest {graph['forest_edges']} edges from {edges_total} kNN entries; "
               f"peak RSS per worker {[round(p / 2**20) for p in sorted(peaks.values())]} MiB "
               f"(growth {[round((peaks[w] - idle[w]) / 2**20) for w in sorted(peaks)]} MiB)")
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        base = pool.submit(scipy_baseline, store.url, th0, step, max_size).result()
    same = bool(np.array_equal(base.pop("labels"), labels))
    growth = base["peak_rss_bytes"] - base["start_rss_bytes"]
    base["bytes_per_thresholded_edge"] = round(growth / max(base["edges_thresholded"], 1), 1)
    base["bytes_per_knn_entry"] = round(growth / edges_total, 1)
    result["scipy_single_process"] = base
    result["labels_identical"] = same
    result["speedup_vs_scipy_alg1"] = round((base["edge_list_s"] + base["algorithm1_full_edges_s"]) / (t_graph + t_sv), 2)
    click.echo(f"scipy single process: edge list {base['edge_list_s']}s, CC at th0 {base['cc_s']}s, "
               f"Algorithm 1 on full edges {base['algorithm1_full_edges_s']}s ({base['edges_thresholded']} edges >= {th0:.4f}); "
               f"peak RSS {base['peak_rss_bytes'] / 2**20:.0f} MiB (growth {growth / 2**20:.0f} MiB = "
               f"{base['bytes_per_thresholded_edge']} B per thresholded edge, {base['bytes_per_knn_entry']} B per kNN entry)")
    click.echo(f"labels identical: {same}")
    p = save_result("proposals", result, out)
    click.echo(f"saved {p}")
    if not same:
        raise click.ClickException("distributed super-vertices differ from the single-process result")
