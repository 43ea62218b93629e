"""`facecluster bench NAME`: one module per benchmark, each exposing a click ``command``.

Benchmarks print ratios measured within one run (never absolute timings compared
across runs: machines are shared and noisy) and save their results as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

BENCHMARKS = {
    "knn": "kNN: distributed exact vs single-process faiss; IVF speed-up and edge recall; memory per worker.",
    "proposals": "Super-vertices on >= 1M faces vs scipy connected components; bytes per edge.",
    "cluster": "Proposals scored per second per worker; end-to-end time by stage; peak memory.",
    "scaling": "1 vs 2 worker processes for each stage.",
    "scale": "Stages after kNN on 1M..10M faces (planted kNN lists): time per face and peak memory per stage.",
    "infomap": "--method infomap on N workers vs single-process Infomap on the same graph; peak memory; partitions compared.",
    "add": "Adding 5% of N faces to a clustered run vs clustering all N afresh (goal <= 0.20); peak memory per worker.",
    "quality": "GCN-D and GCN-D+S over training seeds vs the label-chosen threshold, Infomap, true-IoU bound; train/test shift.",
}


def save_result(name: str, result: dict, out: str | os.PathLike | None) -> Path:
    """Write a benchmark result (with machine facts) as JSON; returns the path."""
    path = Path(out) if out else Path(f"bench-{name}.json")
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}, **result}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def _over_children(me, read) -> float:
    """Sum of ``read(child)`` over the live child processes of ``me`` (a child that ends between the listing
    and the reading counts 0)."""
    import psutil

    total = 0.0
    for child in me.children(recursive=True):
        try:
            total += read(child)
        except psutil.Error:
            pass
    return total


def process_rss(children: bool = False) -> int:
    """Resident memory of this process (run on workers with ``client.run``), with ``children`` that of its live
    child processes too: a worker runs a large Infomap problem in a child (:mod:`facecluster.tasks.infomap_child`),
    whose memory is the task's. (Not for the driver: a LocalCluster's workers are its children.)"""
    import psutil

    me = psutil.Process()
    rss = me.memory_info().rss
    if children:
        rss += int(_over_children(me, lambda c: c.memory_info().rss))
    return rss


def process_cpu(children: bool = False) -> float:
    """User + system CPU seconds of this process, with ``children`` those of its child processes too: the ones
    that ended (and were waited for) and the ones still running."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    cpu = t.user + t.system
    if children:
        cpu += t.children_user + t.children_system + _over_children(me, lambda c: sum(c.cpu_times()[:2]))
    return cpu


class MemorySampler:
    """Peak RSS of every worker and of this (driver) process while a block runs, and their CPU seconds.

    CPU seconds (user + system of the worker processes) show the work done; on a
    shared machine other processes steal cores, so wall-time ratios understate what
    the stage would get from idle cores, and the load average is recorded with them.
    """

    def __init__(self, client, interval: float = 0.2):
        self.client, self.interval = client, interval
        self.workers: dict[str, int] = {}
        self.driver = 0
        self._stop = threading.Event()

    def _sample(self):
        self.driver = max(self.driver, process_rss())
        try:
            for w, v in self.client.run(process_rss, children=True, on_error="ignore").items():
                self.workers[w] = max(self.workers.get(w, 0), v)
        except Exception:  # a sample lost to a busy or restarting worker is fine
            pass

    def _loop(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self.start = self.client.run(process_rss, children=True, on_error="ignore")
        self._sample()
        self._cpu0 = self.client.run(process_cpu, children=True)
        self._driver_cpu0 = process_cpu()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()
        cpu1 = self.client.run(process_cpu, children=True)
        self.worker_cpu = sum(cpu1[w] - self._cpu0[w] for w in cpu1 if w in self._cpu0)
        self.driver_cpu = process_cpu() - self._driver_cpu0
        self.load = os.getloadavg()[0]

    def summary(self) -> dict:
        return {"peak_rss_mib_per_worker": sorted(round(v / 2**20) for v in self.workers.values()),
                "start_rss_mib_per_worker": sorted(round(v / 2**20) for v in self.start.values()),
                "driver_peak_rss_mib": round(self.driver / 2**20), "worker_cpu_seconds": round(self.worker_cpu, 2),
                "driver_cpu_seconds": round(self.driver_cpu, 2), "load_avg_1min_after": round(self.load, 2)}
