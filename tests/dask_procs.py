"""Real `dask scheduler` + `dask worker` subprocesses on 127.0.0.1, for integration and fault tests.

Unlike ``LocalCluster`` these are separate programs started from the command line,
exactly as on a multi-host deployment: workers import task functions from the
installed package, run in their own working directory (so relative paths do not
resolve as on the driver) and can be killed with a signal.

Usage::

    from dask_procs import dask_cluster

    with dask_cluster(n_workers=2, workdir=tmp_path) as procs:
        run_cli(["cluster", run, "--scheduler", procs.address])   # subprocess or CliRunner
        with procs.client() as client:                             # a Client with the right security
            ...
        procs.kill_worker()            # SIGKILL the Worker process of the first worker (nanny restarts it)

Everything is started in its own process group and torn down (SIGTERM, then SIGKILL
of the group) by :meth:`DaskProcs.close`, which the context manager always calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
DASK_WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS cluster (one certificate used by scheduler, workers and client)."""

    ca: Path
    cert: Path
    key: Path

    def security(self):
        """The client-side ``distributed.Security`` for these files."""
        from distributed.security import Security

        return Security(tls_ca_file=str(self.ca), tls_client_cert=str(self.cert), tls_client_key=str(self.key),
                        require_encryption=True)

    def cli_args(self) -> list[str]:
        """``--tls-ca-file/--tls-cert/--tls-key`` for `dask scheduler`, `dask worker` and `facecluster`."""
        return ["--tls-ca-file", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]


def make_tls_files(directory: str | os.PathLike, name: str = "node") -> TLSFiles:
    """Make a CA and a certificate ``name`` with deploy/manual/make-certs.sh (needs the openssl CLI)."""
    script = Path(__file__).resolve().parents[1] / "deploy" / "manual" / "make-certs.sh"
    d = Path(directory)
    subprocess.run(["bash", str(script), str(d), name], check=True, capture_output=True, text=True, timeout=60)
    return TLSFiles(ca=d / "ca.pem", cert=d / f"{name}.pem", key=d / f"{name}.key")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subprocess_env(nthreads: int, extra: dict | None) -> dict:
    from facecluster.pipeline.cluster import THREAD_VARS, resolve_coretype

    env = dict(os.environ)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    core = resolve_coretype("auto")  # what deploy/common/worker-env.sh exports
    if core:
        env["OPENBLAS_CORETYPE"] = core
    for v in THREAD_VARS:
        env[v] = str(nthreads)
    env.update(extra or {})
    return env


@dataclass
class DaskProcs:
    """A running scheduler and its workers (subprocesses); see :func:`start_cluster`."""

    address: str
    workdir: Path
    scheduler_file: Path
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    tls: TLSFiles | None = None
    nthreads: int = 1
    nanny: bool = True
    memory_limit: str = "4GiB"
    env: dict = field(default_factory=dict)
    _logs: list[Path] = field(default_factory=list)

    # -- connecting ---------------------------------------------------------------
    @property
    def security(self):
        """Client ``Security`` (None for plain tcp)."""
        return self.tls.security() if self.tls else None

    def cli_args(self) -> list[str]:
        """Flags that point `facecluster` at this cluster: ``--scheduler ADDR`` (+ TLS files)."""
        return ["--scheduler", self.address] + (self.tls.cli_args() if self.tls else [])

    def dask_config(self):
        """A ``facecluster.pipeline.config.DaskConfig`` for ``facecluster.pipeline.cluster.connect``."""
        from facecluster.pipeline.config import DaskConfig

        tls = {}
        if self.tls:
            tls = dict(tls_ca_file=str(self.tls.ca), tls_cert=str(self.tls.cert), tls_key=str(self.tls.key))
        return DaskConfig(scheduler=self.address, connect_timeout=30.0, **tls)

    def client(self, timeout: float = 30):
        """A new ``distributed.Client`` to the scheduler (close it, or use ``with``)."""
        from distributed import Client

        return Client(self.address, security=self.security, timeout=f"{timeout}s")

    # -- workers ------------------------------------------------------------------
    def add_workers(self, n: int = 1, wait: bool = True, timeout: float = 60) -> list[subprocess.Popen]:
        """Start ``n`` more `dask worker` processes (each in its own directory and process group)."""
        start = len(self.workers)
        new = []
        for i in range(start, start + n):
            wdir = self.workdir / f"worker-{i}"
            wdir.mkdir(parents=True, exist_ok=True)
            cmd = DASK_WORKER + [self.address, "--name", f"w{i}", "--nthreads", str(self.nthreads),
                                 "--memory-limit", self.memory_limit, "--host", "127.0.0.1", "--no-dashboard",
                                 "--local-directory", str(wdir), "--death-timeout", "60",
                                 "--nanny" if self.nanny else "--no-nanny"]
            if self.tls:
                cmd += self.tls.cli_args()
            new.append(self._spawn(cmd, wdir, f"worker-{i}.log"))
        self.workers.extend(new)
        if wait:
            self.wait_for_workers(len(self.workers), timeout=timeout)
        return new

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        """Block until ``n`` workers are registered; raises with the logs' tails if they do not come."""
        deadline = time.monotonic() + timeout
        with self.client(timeout=timeout) as c:
            while True:
                have = len(c.scheduler_info(n_workers=-1)["workers"])
                if have >= n:
                    return
                dead = [p for p in [self.scheduler] + self.workers if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{have}/{n} dask workers registered "
                                       f"({len(dead)} process(es) exited)\n{self.logs()}")
                time.sleep(0.2)

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of the process that runs its tasks (the nanny's child with a nanny).

        A worker that is dying or being replaced by its nanny right now is left out: the
        scheduler may still list it while its stream is already closed, and a broadcast
        to it raises CommClosedError (seen on a loaded machine right after kill_worker).
        """
        with self.client() as c:
            got = c.run(os.getpid, on_error="return")
        return {addr: pid for addr, pid in got.items() if isinstance(pid, int)}

    def kill_worker(self, pid: int | None = None, sig: int = signal.SIGKILL) -> int:
        """Kill one worker process (default: the first worker's Worker process) with ``sig``.

        With ``nanny=True`` the nanny notices and starts a fresh worker (as in a real
        deployment); with ``nanny=False`` the worker is gone for good. Dask recomputes
        the tasks whose results were held by the dead worker. Returns the pid killed.
        """
        if pid is None:
            pids = self.worker_pids()
            if not pids:
                raise RuntimeError("no worker to kill")
            pid = pids[sorted(pids)[0]]
        os.kill(pid, sig)
        return pid

    def kill_worker_at(self, predicate, timeout: float = 60, poll: float = 0.05, sig: int = signal.SIGKILL) -> int | None:
        """Kill one worker as soon as ``predicate(client)`` is true (e.g. a stage's tasks are running).

        Meant to run in a thread next to the pipeline under test. Returns the pid
        killed, or None when ``predicate`` never became true within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if predicate(c):
                    return self.kill_worker(sig=sig)
                time.sleep(poll)
        return None

    # -- diagnostics and teardown -----------------------------------------------------
    def logs(self, tail: int = 40) -> str:
        """The last ``tail`` lines of every process's log."""
        out = []
        for path in self._logs:
            with contextlib.suppress(OSError):
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def _spawn(self, cmd: list[str], cwd: Path, log_name: str) -> subprocess.Popen:
        log_path = self.workdir / log_name
        self._logs.append(log_path)
        with open(log_path, "ab") as fh:
            # start_new_session: own process group, so teardown also reaches a nanny's worker child
            return subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def close(self, timeout: float = 10) -> None:
        """Stop every process: SIGTERM to each process group, then SIGKILL what is left."""
        procs = self.workers + [self.scheduler]
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            _signal_group(p, signal.SIGKILL)  # children (nanny workers) even if the parent exited
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def stop_process_group(p: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group of ``p`` (started with ``start_new_session=True``), then SIGKILL it."""
    _signal_group(p, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=timeout)
    _signal_group(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=5)


def start_cluster(n_workers: int = 2, workdir: str | os.PathLike | None = None, nthreads: int = 1,
                  nanny: bool = True, tls: TLSFiles | None = None, memory_limit: str = "4GiB",
                  env: dict | None = None, timeout: float = 60) -> DaskProcs:
    """Start `dask scheduler` and ``n_workers`` `dask worker` processes on 127.0.0.1.

    Parameters
    ----------
    n_workers : int
        Worker processes (``nthreads`` threads each); 0 starts only the scheduler.
    workdir : path, optional
        Where logs, the scheduler file and each worker's directory go (a new temporary
        directory when omitted). Workers run with ``workdir/worker-i`` as their cwd.
    nanny : bool
        Start workers under a nanny (the `dask worker` default: a killed worker is restarted).
    tls : TLSFiles, optional
        Run everything over TLS (``tls://`` address) with these files (see :func:`make_tls_files`).
    env : dict, optional
        Extra environment for every process (OPENBLAS_CORETYPE and thread variables are set already).

    Returns
    -------
    DaskProcs
        Call ``close()`` when done (or use :func:`dask_cluster`).
    """
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dask-procs-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sched_file = workdir / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    proc_env = _subprocess_env(nthreads, env)
    cmd = DASK + ["--host", "127.0.0.1", "--port", str(free_port()), "--no-dashboard",
                  "--scheduler-file", str(sched_file)]
    if tls:
        cmd += ["--protocol", "tls"] + tls.cli_args()
    procs = DaskProcs(address="", workdir=workdir, scheduler_file=sched_file, scheduler=None, tls=tls,  # type: ignore[arg-type]
                      nthreads=nthreads, nanny=nanny, memory_limit=memory_limit, env=proc_env)
    try:
        procs.scheduler = procs._spawn(cmd, workdir, "scheduler.log")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                procs.address = json.loads(sched_file.read_text())["address"]
                break
            if procs.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start\n{procs.logs()}")
            time.sleep(0.1)
        if n_workers:
            procs.add_workers(n_workers, wait=True, timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        procs.close() if procs.scheduler is not None else None
        raise
    return procs


@contextlib.contextmanager
def dask_cluster(**kwargs) -> Iterator[DaskProcs]:
    """:func:`start_cluster` as a context manager that always tears everything down."""
    procs = start_cluster(**kwargs)
    try:
        yield procs
    finally:
        procs.close()
