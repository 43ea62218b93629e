"""Connection to Dask: an existing scheduler, SLURM/PBS via dask-jobqueue, or a LocalCluster.

Where the work runs, in order of precedence:

1. ``--scheduler ADDR`` / ``dask.scheduler`` / ``$DASK_SCHEDULER_ADDRESS``: an existing
   scheduler (``tcp://HOST:8786`` or ``tls://HOST:8786``).
2. ``--slurm`` / ``--pbs``: a dask-jobqueue cluster whose workers are batch jobs.
3. Otherwise a ``LocalCluster`` sized to the machine (one 1-thread worker process per core).

TLS: for ``tls://`` schedulers give ``--tls-ca-file/--tls-cert/--tls-key`` (or the
``dask.tls_*`` config keys). When none are given, distributed's own configuration
is used unchanged (``distributed.comm.tls.ca-file``, ``distributed.comm.tls.client.cert``,
``distributed.comm.tls.client.key``, e.g. from ``~/.config/dask/*.yaml`` or
``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``), so a site-wide Dask TLS setup keeps working.

Thread and BLAS settings are part of every kernel's contract:

* faiss-cpu bundles an OpenBLAS that falls back to a generic "Prescott" kernel on
  some CPUs (measured 3.8-4.6x slower exact search on Ice Lake VMs). The core type
  must be in the environment *before* faiss is imported, so it is set here in the
  driver's ``os.environ`` (LocalCluster workers inherit it) and put in jobqueue job
  scripts; workers started by hand get it from the deploy/ recipes. At connect time
  every worker reports the kernel its faiss OpenBLAS actually picked (logged).
* One thread per worker process by default: 2 processes x 1 thread beat
  1 process x 2 threads for faiss (OpenMP spinning); tasks set faiss/torch threads
  to the worker's thread count (see :func:`worker_threads`).
* glibc's malloc settings (:data:`MALLOC_ENV`): Dask's nanny starts every worker with
  ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap threshold at 128 KiB, so
  every array over 128 KiB is a fresh ``mmap`` whose pages fault in on first touch and
  are unmapped on ``free``. The kernels make many such temporaries (n x k arrays of a
  score batch, IVF candidate blocks); workers start with the thresholds raised and one arena.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Iterator

from .config import DaskConfig
from .errors import BadInput

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# glibc malloc for worker processes: arrays up to 64 MiB come from the heap, up to 64 MiB of freed heap
# top stays mapped, and one arena serves every thread (a task runs in a worker thread, whose own arena's
# heaps are at most 64 MiB: two live 40 MB arrays already overflow one), so a task's temporaries reuse
# pages instead of mmap + page faults + munmap per array. Dask's own default, MALLOC_TRIM_THRESHOLD_=65536,
# pins the mmap threshold at 128 KiB. Measured: minor faults per 24 MB array freed and allocated again in
# a thread, 750 -> 0; `bench cluster --n 100000` 124.0 / 116.5 s -> 87.8 s in all (edges 2.2x, score
# 1.9x with the lambda_2 change), peak RSS per worker 1.48 -> 1.36 GB. 1 GiB / 256 MiB thresholds ran as
# fast but held freed memory at 1M faces: peak RSS per worker 5.3 GB against 4.0 GB (proposals); at
# 64 MiB the 1M proposals stage peaked at 4,192 MiB against 4,179 under Dask's default, 270 s against
# 294 s. Set whatever the environment holds (a nanny started in the driver's process leaves Dask's value
# in os.environ). Other C libraries ignore these variables.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 26), "MALLOC_TRIM_THRESHOLD_": str(1 << 26), "MALLOC_ARENA_MAX": "1"}
# What a worker must be able to import to run facecluster tasks (module, pip name).
REQUIRED_ON_WORKERS = (("facecluster.tasks", "facecluster"), ("facecluster.pipeline", "facecluster"), ("faiss", "faiss-cpu"),
                       ("torch", "torch"), ("zarr", "zarr"))


class ClusterError(RuntimeError):
    """The Dask cluster cannot be used (unreachable, no workers, a worker lacks a package)."""


class CodeMismatch(ClusterError, BadInput):
    """A worker runs other facecluster code than the driver (exit 2: the installation is the input to fix)."""


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of the facecluster source this process imports (``facecluster``, ``.pipeline``, ``.tasks``).

    Driver and workers must run the same code: a worker with an older checkout fails
    later with a signature error inside a task; comparing digests at connect names it.
    Each package is hashed from its own folder (``facecluster`` itself: its top-level
    modules only), so an editable install, where ``facecluster.pipeline`` is the
    repository's ``pipeline/`` folder, and a wheel, where it is ``facecluster/pipeline/``,
    of the same code agree.
    """
    h = hashlib.sha256()
    for pkg, files in (("facecluster", "*.py"), ("facecluster.pipeline", "**/*.py"), ("facecluster.tasks", "**/*.py")):
        spec = importlib.util.find_spec(pkg)
        root = Path(spec.origin).parent
        for f in sorted(root.glob(files)):
            h.update(f"{pkg}/{f.relative_to(root).as_posix()}".encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (empty when /proc/cpuinfo is unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: the /proc/cpuinfo flags each OpenBLAS kernel named here needs, widest first: a kernel forced on a CPU without
#: them dies of SIGILL (``pni`` is SSE3)
CORETYPE_FLAGS = {"SkylakeX": frozenset({"avx512f", "avx512bw", "avx512vl"}), "Haswell": frozenset({"avx2", "fma"}),
                  "Prescott": frozenset({"pni"})}


def coretype_missing_flags(name: str, flags: set[str] | None = None) -> list[str]:
    """The CPU flags OpenBLAS kernel ``name`` needs that this CPU (or ``flags``) lacks, sorted; [] for a kernel it
    can run or one not in :data:`CORETYPE_FLAGS`."""
    have = cpu_flags() if flags is None else flags
    return sorted(CORETYPE_FLAGS.get(name, frozenset()) - have)


def detect_openblas_coretype() -> str | None:
    """The OpenBLAS kernel name matching this CPU's vector extensions (None: leave OpenBLAS alone)."""
    flags = cpu_flags()
    for name in ("SkylakeX", "Haswell"):
        if not coretype_missing_flags(name, flags):
            return name
    return None


def resolve_coretype(setting: str = "auto") -> str | None:
    """The OPENBLAS_CORETYPE a setting means, without touching the environment.

    "auto": an exported value, else the one detected from this CPU; "none": whatever
    is exported (possibly None); anything else: that OpenBLAS core name.
    """
    if setting == "none":
        return os.environ.get("OPENBLAS_CORETYPE")
    if setting == "auto":
        return os.environ.get("OPENBLAS_CORETYPE") or detect_openblas_coretype()
    return setting


def configure_blas_env(setting: str = "auto") -> str | None:
    """Set OPENBLAS_CORETYPE in this process's environment (before faiss is imported).

    Parameters
    ----------
    setting : str
        "auto" (detect, unless the user already exported a value), "none"
        (leave it), or an explicit OpenBLAS core name.

    Returns
    -------
    str or None
        The value in effect.
    """
    value = resolve_coretype(setting)
    if value and setting != "none":
        os.environ["OPENBLAS_CORETYPE"] = value
    return value


def worker_env(cfg: DaskConfig) -> dict[str, str]:
    """Environment every worker process must start with (thread counts, OpenBLAS core type, malloc thresholds).

    Pure: the driver's own environment is not changed (workers may run on other CPUs).
    """
    env = {v: str(cfg.threads_per_worker) for v in THREAD_VARS}
    env.update(MALLOC_ENV)
    core = resolve_coretype(cfg.openblas_coretype)
    if core:
        env["OPENBLAS_CORETYPE"] = core
    return env


def pick(results, i: int):
    """Task: item ``i`` of another task's list result (one future per item, without the driver)."""
    return results[i]


def release_memory() -> int:
    """Run on each worker between stages: hand the freed pages inside glibc's heap back to the system
    (``malloc_trim``); returns the resident bytes released (0 where the C library has no such call).

    Why: with :data:`MALLOC_ENV` an array under 64 MiB comes from the heap, and a freed one in the
    middle of the heap stays resident until something trims it, so a stage began with what the
    stages before it had freed (at 1M faces the proposals stage's workers started at ~1.2 GB).
    """
    import ctypes
    import gc

    import psutil

    gc.collect()
    me = psutil.Process()
    before = me.memory_info().rss
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return 0
    return max(0, before - me.memory_info().rss)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# What the score and edges stages raise both thresholds to while their tasks run. A score task reads its rows into arrays of
# hundreds of MB and builds ~60 MB temporaries per 65k member rows, all just above MALLOC_ENV's 64 MiB: each
# one a fresh mmap whose pages the kernel zeroes on first touch and takes back on free. Measured, the score
# stage alone on a 1M-face store (2 workers, 14 tasks, runs alternated, session 20): 34-46 s of system CPU per
# worker at 64 MiB (27% of the workers' samples in the kernel's clear_page), 16-21 s at 1 GiB; 156-163 s ->
# 127-131 s wall; the same peak RSS per worker (3,031 / 2,489 MiB). Not for every stage: at 1 GiB in every stage
# the 1M chain's communities stage peaked at 4,473 MiB against 3,132 (freed heap held beside an Infomap
# child process).
# The edges stage too (its tasks gather neighbour rows into arrays of the same sizes): alone at 1M, alternated,
# 96.8-103.0 s -> 78.4-84.3 s, system CPU per worker 16.5-19.9 -> 5.2-5.6 s, peak RSS 803-814 MiB either way.
HEAP_REUSE_THRESHOLD = 1 << 30


def set_malloc_thresholds(nbytes: int | None = None) -> bool:
    """Run on a worker: set glibc's mmap and trim thresholds to ``nbytes`` (None: back to the values the worker
    started with, :data:`MALLOC_ENV`'s where its environment has none). False where the C library is not glibc.

    A process-wide setting of the worker: :func:`heap_reuse` sets it for one stage and puts it back.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    ok = True
    for param, var in ((M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"), (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_")):
        value = nbytes if nbytes is not None else int(os.environ.get(var) or MALLOC_ENV[var])
        ok = bool(mallopt(param, int(value))) and ok
    return ok


@contextlib.contextmanager
def heap_reuse(client, nbytes: int = HEAP_REUSE_THRESHOLD):
    """Raise the workers' malloc thresholds to ``nbytes`` for the block (one stage), then put them back.

    A worker that joins during the block (lost-worker recovery) runs with its own thresholds: the same
    results, its tasks only slower. On the way out the stage's freed heap is handed back too
    (``release_memory``): at the restored thresholds a freed chunk that no longer borders the heap's top
    is never trimmed on its own, so without it a worker kept up to the block's threshold resident and
    served later large arrays from it whatever its thresholds said.
    """
    client.run(set_malloc_thresholds, int(nbytes), on_error="ignore")  # a lost worker's replacement keeps its own
    try:
        yield
    finally:
        try:
            client.run(set_malloc_thresholds, None)
            client.run(release_memory)
        except Exception as exc:  # a lost connection must not hide the stage's own error, nor pass unsaid
            log.warning("could not put the workers' malloc thresholds back (%s); they keep %d bytes until they restart",
                        exc, int(nbytes))


def worker_threads() -> int:
    """Threads this task may use: the Dask worker's thread count (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))


# -- TLS -----------------------------------------------------------------------------
def tls_security(cfg: DaskConfig):
    """A ``distributed.Security`` from ``cfg.tls_*`` files, or None to use Dask's own config.

    Raises
    ------
    BadInput
        A named certificate/key file does not exist, or a key is given without a certificate.
    """
    files = {"--tls-ca-file": cfg.tls_ca_file, "--tls-cert": cfg.tls_cert, "--tls-key": cfg.tls_key}
    if not any(files.values()):
        return None
    for flag, path in files.items():
        if path and not Path(path).is_file():
            raise BadInput(f"{path}: no such file (given as {flag}); point it at the PEM file made by deploy/manual/make-certs.sh")
    if cfg.tls_key and not cfg.tls_cert:
        raise BadInput(f"{cfg.tls_key}: --tls-key given without --tls-cert; give the client certificate too")
    if not cfg.tls_ca_file:
        raise BadInput("--tls-cert given without --tls-ca-file; give the CA certificate that signed the scheduler's certificate")
    from distributed.security import Security

    return Security(tls_ca_file=cfg.tls_ca_file, tls_client_cert=cfg.tls_cert, tls_client_key=cfg.tls_key,
                    require_encryption=True)


def scheduler_address(cfg: DaskConfig) -> str | None:
    """The scheduler to connect to: ``cfg.scheduler``, else ``$DASK_SCHEDULER_ADDRESS``, else None."""
    return cfg.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


# -- clusters we start ------------------------------------------------------------------
def local_cluster_size(cfg: DaskConfig) -> tuple[int, int, int | str]:
    """(worker processes, threads per worker, memory per worker) of the default LocalCluster."""
    import psutil

    cores = os.cpu_count() or 1
    n_workers = cfg.n_workers or max(1, cores // cfg.threads_per_worker)
    memory: int | str = cfg.memory_limit
    if memory == "auto":
        memory = int(psutil.virtual_memory().total * 0.9 / n_workers)
    return n_workers, cfg.threads_per_worker, memory


def _local_cluster(cfg: DaskConfig):
    from distributed import LocalCluster

    n_workers, threads, memory = local_cluster_size(cfg)
    env = worker_env(cfg)
    # LocalCluster workers are spawned processes: they inherit os.environ at spawn.
    os.environ.update(env)
    # The workers' own ERROR logs: under the CLI's quiet default (its distributed loggers at ERROR)
    # they are silenced too. A task's failure reaches the driver, which prints its one line; what
    # only the workers log is the shutdown race after Ctrl-C (a heartbeat to a scheduler already
    # gone: "Failed to communicate with scheduler during heartbeat" and a 30-line traceback, seen
    # on a loaded machine). Elsewhere (the API, -vv) they keep ERROR, as before.
    quiet = logging.getLogger("distributed.worker").getEffectiveLevel() >= logging.ERROR
    with _children_ignore_sigint():
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                            memory_limit=memory, dashboard_address=":0",
                            silence_logs=logging.CRITICAL if quiet else logging.ERROR)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Spawn worker processes with SIGINT ignored (they inherit it).

    Ctrl-C reaches the whole foreground process group: each LocalCluster worker
    and nanny would die printing its own KeyboardInterrupt traceback (~100 lines)
    while the driver prints its one line. The driver alone handles the interrupt
    and closes the cluster it started.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def make_jobqueue_cluster(cfg: DaskConfig):
    """A dask-jobqueue SLURMCluster/PBSCluster for ``cfg`` (no jobs submitted yet).

    One job = ``cfg.job_cores`` cores and ``cfg.job_memory``, split into
    ``job_cores // threads_per_worker`` worker processes of ``threads_per_worker``
    threads each. The job script exports OPENBLAS_CORETYPE and the thread variables
    before ``dask worker`` starts (faiss reads them at import). Anything not set here
    (interface, local directory, extra directives) comes from dask-jobqueue's own
    configuration (``jobqueue.slurm.*`` / ``jobqueue.pbs.*``). With ``cfg.tls_*`` the
    scheduler and workers talk TLS with those certificates.
    ``cluster.job_script()`` shows the script that ``cluster.scale(jobs=n)`` submits.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError("--slurm/--pbs need dask-jobqueue: pip install 'facecluster[hpc]'") from None
    if cfg.jobqueue not in ("slurm", "pbs"):
        raise ClusterError(f"unknown job queue {cfg.jobqueue!r}: use --slurm or --pbs")
    import dask

    env = worker_env(cfg)
    # Passing job_script_prologue replaces dask-jobqueue's configured one: keep the
    # site's lines (module load, venv activation) first, then our exports.
    site = dask.config.get(f"jobqueue.{cfg.jobqueue}.job-script-prologue", None) or []
    prologue = list(site) + [f"export {k}={v}" for k, v in env.items()]
    cls = dask_jobqueue.SLURMCluster if cfg.jobqueue == "slurm" else dask_jobqueue.PBSCluster
    processes = max(1, cfg.job_cores // cfg.threads_per_worker)
    kwargs = dict(cores=cfg.job_cores, processes=processes, memory=cfg.job_memory, walltime=cfg.job_walltime,
                  queue=cfg.job_queue, account=cfg.job_account, job_script_prologue=prologue,
                  job_name="facecluster-worker", python=sys.executable)
    security = tls_security(cfg)
    if security is not None:
        # Workers get --tls-ca-file/--tls-cert/--tls-key on their command line; the
        # certificate files must be readable at the same paths on the compute nodes.
        kwargs.update(security=_cluster_security(security), protocol="tls://")
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def _cluster_security(client_security):
    """The Security of a cluster we start: the client's files also used as scheduler/worker certs."""
    from distributed.security import Security

    return Security(tls_ca_file=client_security.tls_ca_file,
                    tls_scheduler_cert=client_security.tls_client_cert, tls_scheduler_key=client_security.tls_client_key,
                    tls_worker_cert=client_security.tls_client_cert, tls_worker_key=client_security.tls_client_key,
                    tls_client_cert=client_security.tls_client_cert, tls_client_key=client_security.tls_client_key,
                    require_encryption=True)


def _jobqueue_cluster(cfg: DaskConfig):
    cluster = make_jobqueue_cluster(cfg)
    cluster.scale(jobs=cfg.jobs)
    return cluster


# -- checks run on workers ----------------------------------------------------------------
def worker_report(dask_worker=None) -> dict:
    """Run on a worker: host, threads, BLAS settings and the packages facecluster needs.

    faiss is imported (the OpenBLAS kernel it picked can only be read once loaded;
    workers import it for the kNN stage anyway); torch is only looked up, not loaded.
    """
    rep: dict = {"host": socket.gethostname(), "pid": os.getpid(), "python": sys.executable, "code": code_digest(),
                 "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE",) + THREAD_VARS + tuple(MALLOC_ENV)},
                 "cpu_coretype": detect_openblas_coretype(), "missing": {}, "versions": {}}
    # client.run passes the Worker as ``dask_worker`` (get_worker() only works inside tasks).
    rep["nthreads"] = int(dask_worker.state.nthreads) if dask_worker is not None else None
    for module, dist in REQUIRED_ON_WORKERS:
        try:
            if module == "faiss":
                importlib.import_module(module)
            elif importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named {module!r}")
            try:
                rep["versions"][dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                rep["versions"][dist] = "?"
        except Exception as e:  # ImportError, or a broken native library (OSError)
            rep["missing"][module] = f"{type(e).__name__}: {e}"
    rep["faiss_blas"] = None
    if "faiss" not in rep["missing"]:
        try:
            from threadpoolctl import threadpool_info

            for lib in threadpool_info():
                if lib.get("internal_api") == "openblas" and "faiss" in lib.get("filepath", ""):
                    rep["faiss_blas"] = {"architecture": lib.get("architecture"), "threads": lib.get("num_threads")}
        except ImportError:
            pass
    return rep


def _describe(addr: str, rep: dict) -> str:
    blas = rep.get("faiss_blas") or {}
    core = rep["env"].get("OPENBLAS_CORETYPE") or "unset"
    return (f"worker {addr} on {rep['host']} (pid {rep['pid']}): {rep.get('nthreads')} thread(s), "
            f"OPENBLAS_CORETYPE={core}, faiss OpenBLAS kernel {blas.get('architecture', '?')} "
            f"x {blas.get('threads', '?')} threads, OMP_NUM_THREADS={rep['env'].get('OMP_NUM_THREADS') or 'unset'}")


def check_workers(client) -> dict[str, dict]:
    """Ask every connected worker for :func:`worker_report`; log one line per worker.

    Returns
    -------
    dict
        Worker address -> report.

    Raises
    ------
    ClusterError
        One line naming the first worker that cannot import facecluster, faiss, torch
        or zarr, and the fix.
    """
    reports = client.run(worker_report, on_error="return")
    out = {}
    for addr in sorted(reports):
        rep = reports[addr]
        if isinstance(rep, BaseException):
            # The function is pickled by reference to pipeline.cluster: a worker
            # without the package fails to unpickle it.
            raise ClusterError(
                f"worker {addr} cannot run facecluster code ({type(rep).__name__}: {rep}); install facecluster "
                "in the environment that runs `dask worker` on that host (pip install facecluster)")
        if rep.get("code") != code_digest():
            raise CodeMismatch(
                f"worker {addr} on {rep['host']} runs other facecluster code than this driver (code digest "
                f"{rep.get('code')} there, {code_digest()} here; {rep['python']}); install the same facecluster "
                "version/checkout on every worker and restart `dask worker`")
        if rep["missing"]:
            module, why = next(iter(rep["missing"].items()))
            dist = dict(REQUIRED_ON_WORKERS)[module]
            raise ClusterError(f"worker {addr} on {rep['host']} cannot import {module} ({why}); "
                               f"pip install {dist} in the environment that runs `dask worker` there ({rep['python']})")
        log.info("%s", _describe(addr, rep))
        arch = (rep.get("faiss_blas") or {}).get("architecture")
        if not rep["env"].get("OPENBLAS_CORETYPE") and rep["cpu_coretype"] and arch and arch != rep["cpu_coretype"]:
            log.warning("worker %s: faiss uses the %s OpenBLAS kernel on a %s-capable CPU (exact kNN several times "
                        "slower); start `dask worker` with OPENBLAS_CORETYPE=%s exported (see deploy/README.md)",
                        addr, arch, rep["cpu_coretype"], rep["cpu_coretype"])
        out[addr] = rep
    return out


def _probe_store(url: str, created: str | None) -> str | None:
    """Run on a worker: None if the run store opens here (and is the driver's), else why not."""
    import zarr

    try:
        root = zarr.open_group(store=url, mode="r")
        meta = root.attrs.get("facecluster")
    except Exception as e:  # FileNotFoundError, GroupNotFoundError, fsspec/credential errors
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {msg}"[:300]
    if created is not None:
        here = meta.get("created") if isinstance(meta, dict) else None
        if here != created:
            return (f"a different store is at that path there (created {here}, the driver's was created {created}): "
                    "the path is not on a shared filesystem")
    return None


def check_store_reachable(client, url: str) -> dict[str, str]:
    """Ask every worker to open the run store at ``url``.

    Local paths are made absolute (workers started by hand have another working
    directory). fsspec URLs (``s3://bucket/run.zarr``, ``gs://``, ``file://``) are
    passed to zarr as they are; object stores need their fsspec backend and
    credentials on every worker (``pip install facecluster[s3]``). ``memory://``
    stores live inside one process and never reach worker processes.

    Returns
    -------
    dict
        Worker address -> "ok" (empty when no worker is connected).

    Raises
    ------
    pipeline.store.StoreError
        One line naming the first worker that cannot open the store, the URL and the fix.
    """
    from .store import StoreError, is_local, normalize_url

    url = normalize_url(url)
    if url.startswith("memory://"):
        raise StoreError(f"{url}: a memory:// store exists only inside the driver process and Dask workers are other "
                         "processes; use a path on a shared filesystem or an object-store URL such as s3://bucket/run.zarr")
    created = None
    with contextlib.suppress(Exception):  # not created yet, or not a facecluster store: presence is checked only
        import zarr

        meta = zarr.open_group(store=url, mode="r").attrs.get("facecluster")
        created = meta.get("created") if isinstance(meta, dict) else None
    results = client.run(_probe_store, url, created, on_error="return")
    if not results:
        log.warning("no Dask worker connected yet: cannot check that workers reach %s", url)
    out = {}
    for addr in sorted(results):
        why = results[addr]
        if isinstance(why, BaseException):
            why = f"{type(why).__name__}: {why}"
        if why is not None:
            if is_local(url):
                fix = ("put it on a shared filesystem mounted at the same path on every worker, or use an "
                       "object-store URL such as s3://bucket/run.zarr")
            else:
                fix = ("install that URL's fsspec backend on every worker (pip install 'facecluster[s3]' for s3://) "
                       "and give the workers credentials for it (e.g. AWS_* environment variables)")
            raise StoreError(f"worker {addr} cannot open the run store {url} ({why}); {fix}")
        out[addr] = "ok"
    return out


# -- connecting ------------------------------------------------------------------------
def _client_for_address(address: str, cfg: DaskConfig):
    from distributed import Client

    security = tls_security(cfg)
    if security is None and address.startswith("tls://"):
        import dask

        if not dask.config.get("distributed.comm.tls.ca-file", None):
            raise BadInput(f"{address}: a tls:// scheduler needs certificates: give --tls-ca-file, --tls-cert and "
                           "--tls-key (or set dask config distributed.comm.tls.*); see deploy/manual/README.md")
    if security is not None and not address.startswith("tls://"):
        raise BadInput(f"{address}: TLS certificates given but the address is not tls://; use tls://HOST:PORT")
    timeout = cfg.connect_timeout
    try:
        _handshake(address, security, timeout)
        client = Client(address, security=security, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({reason}); check the address, that "
                           "`dask scheduler` is running there and the port is open"
                           + (" and that the certificates match the scheduler's CA" if address.startswith("tls://") else "")) from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise ClusterError(f"the Dask scheduler at {address} has no workers after {timeout:g}s; start some with "
                           f"`dask worker {address}` (see deploy/)") from None
    return client


def _handshake(address: str, security, timeout: float) -> None:
    """Open one comm to ``address`` (connect and Dask handshake) within ``timeout`` seconds.

    distributed applies its connect timeout to the TCP connect only: a server that
    accepts the connection but never speaks Dask (an HTTP server on the port) makes
    ``Client(address)`` wait forever. Bounding the whole handshake here turns that
    into one line.
    """
    from distributed.comm import connect as comm_connect
    from distributed.security import Security

    args = (security or Security()).get_connection_args("client")

    # distributed's own timeout ends a connect that gets nowhere (an OSError, reported as
    # "cannot reach" by the caller); the outer one, a little later, ends a silent handshake
    limit = timeout + max(2.0, timeout / 2)

    async def probe():
        comm = await asyncio.wait_for(comm_connect(address, timeout=timeout, **args), limit)
        comm.abort()

    # its own thread and event loop: the caller may already run one
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, probe()).result()
        except asyncio.TimeoutError as e:
            if type(e) is not asyncio.TimeoutError:  # an OSError subclass raised by the connect itself
                raise
            raise ClusterError(f"{address} accepted the connection but did not answer the Dask handshake within "
                               f"{limit:g}s: it is not a Dask scheduler (check the address and port; "
                               "`dask scheduler` listens on 8786 by default)") from None


def worker_infos(client) -> list[dict]:
    """The scheduler's record of every worker (``memory_limit``, ``nthreads``, ...), not only the first few."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # older distributed: no n_workers argument
        info = client.scheduler_info()
    return list(info.get("workers", {}).values())


def total_threads(workers: list[dict]) -> int:
    """Worker threads in all, from :func:`worker_infos` records (at least 1)."""
    return sum(int(w.get("nthreads", 1)) for w in workers) or 1


def _n_workers(client) -> int:
    return len(worker_infos(client))


@contextlib.contextmanager
def connect(cfg: DaskConfig | None = None, quiet: bool = False, check: bool = True) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``distributed.Client`` for the configured cluster; closes what it started.

    Parameters
    ----------
    cfg : DaskConfig, optional
        Where to run (see the module docstring); default: a LocalCluster.
    quiet : bool
        Do not print the one-line cluster summary (with the dashboard link) to stderr.
    check : bool
        Run :func:`check_workers` on the workers present at connect time.

    Raises
    ------
    ClusterError
        One line: the scheduler is unreachable, has no workers, or a worker lacks a package.
    BadInput
        TLS files missing or inconsistent with the address.
    """
    from distributed import Client

    cfg = cfg or DaskConfig()
    address = scheduler_address(cfg)
    cluster = None
    if address:
        # The driver imports faiss too (small in-process steps); set its kernel first.
        configure_blas_env(cfg.openblas_coretype)
        client = _client_for_address(address, cfg)
        kind = f"scheduler {address}"
    elif cfg.jobqueue:
        configure_blas_env(cfg.openblas_coretype)
        cluster = _jobqueue_cluster(cfg)
        client = Client(cluster, security=getattr(cluster, "security", None))
        kind = f"{cfg.jobqueue} ({cfg.jobs} jobs of {cfg.job_cores} cores)"
    else:
        cluster = _local_cluster(cfg)
        client = Client(cluster)
        kind = "LocalCluster"
    try:
        nworkers = _n_workers(client)
        if check and nworkers:
            check_workers(client)
        elif cfg.jobqueue and not address:
            log.info("workers join as the %s jobs start; `squeue`/`qstat` shows them", cfg.jobqueue)
        msg = f"dask: {kind}, {nworkers} workers, dashboard {client.dashboard_link}"
        log.info(msg)
        if not quiet:
            print(msg, file=sys.stderr)
    except BaseException:
        client.close()
        if cluster is not None:
            cluster.close()
        raise
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
