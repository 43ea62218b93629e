"""Connection to Dask: an existing scheduler, SLURM/PBS via dask-jobqueue, or a LocalCluster.

Thread and BLAS settings are part of every kernel's contract:

* faiss-cpu bundles an OpenBLAS that falls back to a generic "Prescott" kernel on
  some CPUs (measured 3.8-4.6x slower exact search on Ice Lake VMs). The core type
  must be in the environment *before* faiss is imported, so it is set here in the
  driver's ``os.environ`` (LocalCluster workers inherit it) and passed to jobqueue
  workers; remote workers started by hand get it from deploy/ recipes.
* One thread per worker process by default: 2 processes x 1 thread beat
  1 process x 2 threads for faiss (OpenMP spinning); tasks set faiss/torch threads
  to the worker's thread count (see :func:`worker_threads`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from .config import DaskConfig

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_openblas_coretype() -> str | None:
    """The OpenBLAS kernel name matching this CPU's vector extensions (None: leave OpenBLAS alone)."""
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def configure_blas_env(setting: str = "auto") -> str | None:
    """Set OPENBLAS_CORETYPE in this process's environment (before faiss is imported).

    ``setting``: "auto" (detect, unless the user already exported a value), "none"
    (leave it), or an explicit OpenBLAS core name. Returns the value in effect.
    """
    if setting == "none":
        return os.environ.get("OPENBLAS_CORETYPE")
    if setting == "auto":
        if os.environ.get("OPENBLAS_CORETYPE"):
            return os.environ["OPENBLAS_CORETYPE"]
        value = detect_openblas_coretype()
    else:
        value = setting
    if value:
        os.environ["OPENBLAS_CORETYPE"] = value
    return value


def worker_env(cfg: DaskConfig) -> dict[str, str]:
    """Environment every worker process must start with."""
    env = {v: str(cfg.threads_per_worker) for v in THREAD_VARS}
    core = configure_blas_env(cfg.openblas_coretype)
    if core:
        env["OPENBLAS_CORETYPE"] = core
    return env


def worker_threads() -> int:
    """Threads this task may use: the Dask worker's thread count (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))


def _local_cluster(cfg: DaskConfig):
    import psutil
    from distributed import LocalCluster

    cores = os.cpu_count() or 1
    n_workers = cfg.n_workers or max(1, cores // cfg.threads_per_worker)
    memory = cfg.memory_limit
    if memory == "auto":
        memory = int(psutil.virtual_memory().total * 0.9 / n_workers)
    env = worker_env(cfg)
    # LocalCluster workers are spawned processes: they inherit os.environ at spawn.
    os.environ.update(env)
    return LocalCluster(n_workers=n_workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                        memory_limit=memory, dashboard_address=":0", silence_logs=logging.ERROR)


def _jobqueue_cluster(cfg: DaskConfig):
    try:
        import dask_jobqueue
    except ImportError:
        raise RuntimeError("--slurm/--pbs need dask-jobqueue: pip install 'facecluster[hpc]'") from None
    env = worker_env(cfg)
    prologue = [f"export {k}={v}" for k, v in env.items()]
    cls = dask_jobqueue.SLURMCluster if cfg.jobqueue == "slurm" else dask_jobqueue.PBSCluster
    kwargs = dict(cores=cfg.job_cores, processes=max(1, cfg.job_cores // cfg.threads_per_worker),
                  memory=cfg.job_memory, walltime=cfg.job_walltime, queue=cfg.job_queue,
                  account=cfg.job_account, job_script_prologue=prologue)
    cluster = cls(**{k: v for k, v in kwargs.items() if v is not None})
    cluster.scale(jobs=cfg.jobs)
    return cluster


@contextlib.contextmanager
def connect(cfg: DaskConfig | None = None, quiet: bool = False) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``distributed.Client`` for the configured cluster; closes what it started."""
    from distributed import Client

    cfg = cfg or DaskConfig()
    address = cfg.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    cluster = None
    if address:
        configure_blas_env(cfg.openblas_coretype)
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise RuntimeError(f"cannot reach the Dask scheduler at {address}: {e}; check the address and that `dask scheduler` is running") from None
        kind = f"scheduler {address}"
    elif cfg.jobqueue:
        cluster = _jobqueue_cluster(cfg)
        client = Client(cluster)
        kind = f"{cfg.jobqueue} ({cfg.jobs} jobs)"
    else:
        cluster = _local_cluster(cfg)
        client = Client(cluster)
        kind = "LocalCluster"
    try:
        nworkers = len(client.scheduler_info(n_workers=-1).get("workers", {})) if address else len(cluster.workers)
    except TypeError:
        nworkers = len(client.scheduler_info().get("workers", {}))
    msg = f"dask: {kind}, {nworkers} workers, dashboard {client.dashboard_link}"
    log.info(msg)
    if not quiet:
        import sys

        print(msg, file=sys.stderr)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
