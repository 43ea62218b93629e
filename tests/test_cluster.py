"""facecluster.pipeline.cluster against real `dask scheduler`/`dask worker` subprocesses (tcp and TLS),
store reachability from workers, dask-jobqueue job scripts, and the one-line errors."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dask_procs import dask_cluster, free_port, make_tls_files
from facecluster.pipeline.cluster import (MALLOC_ENV, ClusterError, _probe_store, check_store_reachable, check_workers, connect,
                              detect_openblas_coretype, heap_reuse, local_cluster_size, make_jobqueue_cluster, resolve_coretype,
                              worker_env)
from facecluster.pipeline.config import DaskConfig
from facecluster.pipeline.errors import BadInput
from facecluster.pipeline.store import RunStore, StoreError, open_array

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _kernel_check(client):
    """A trivial task and a facecluster kernel (imported from the installed package on the worker)."""
    from facecluster.tasks.metrics import pairwise_f

    assert client.submit(sum, [1, 2, 3], pure=False).result() == 6
    gt = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 1, 2])
    remote = client.submit(pairwise_f, gt, pred, pure=False).result()
    assert remote == pytest.approx(pairwise_f(gt, pred))
    return remote


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# -- plain tcp subprocess cluster ----------------------------------------------------------
def test_connect_scheduler_address_reports_workers(dask_subprocess_cluster, capsys, caplog):
    procs = dask_subprocess_cluster
    assert procs.address.startswith("tcp://127.0.0.1:")
    with caplog.at_level("INFO", logger="facecluster.pipeline.cluster"), connect(procs.dask_config()) as client:
        # connect() logged one line per worker with its BLAS settings
        assert sum("OPENBLAS_CORETYPE=" in r.message for r in caplog.records) == 2
        _kernel_check(client)
        reports = check_workers(client)
    assert len(reports) == 2
    for rep in reports.values():
        assert rep["nthreads"] == 1
        assert rep["missing"] == {}
        assert rep["env"]["OMP_NUM_THREADS"] == "1"
        assert rep["pid"] in set(procs.worker_pids().values())
        # The recipe exports a preset OPENBLAS_CORETYPE as it is (some machines preset one because
        # older OpenBLAS builds miscompute on them), else the type detected from the CPU; faiss's
        # OpenBLAS then runs that kernel.
        exported = resolve_coretype("auto")
        assert rep["env"].get("OPENBLAS_CORETYPE") == exported
        if exported:
            assert rep["faiss_blas"]["architecture"] == exported
    err = capsys.readouterr().err
    assert f"scheduler {procs.address}, 2 workers" in err
    assert "dashboard http://127.0.0.1:" in err


@pytest.mark.parametrize("preset", [None, "Haswell", "Prescott"])
def test_exported_coretype_with_and_without_a_preset(monkeypatch, preset):
    """A preset OPENBLAS_CORETYPE is kept for the driver and every worker; unset, the CPU's type is used."""
    if preset is None:
        monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_CORETYPE", preset)
    want = preset or detect_openblas_coretype()
    assert resolve_coretype("auto") == want
    assert worker_env(DaskConfig()).get("OPENBLAS_CORETYPE") == want
    assert worker_env(DaskConfig(openblas_coretype="Zen"))["OPENBLAS_CORETYPE"] == "Zen"
    assert resolve_coretype("none") == preset


def test_connect_from_env_variable(dask_subprocess_cluster, monkeypatch, capsys):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_subprocess_cluster.address)
    with connect(DaskConfig(), check=False) as client:
        assert client.scheduler.address == dask_subprocess_cluster.address
        assert client.submit(len, "abc", pure=False).result() == 3
    assert dask_subprocess_cluster.address in capsys.readouterr().err


def test_store_reachable_shared_and_relative_path(dask_subprocess_cluster, tmp_path, monkeypatch):
    procs = dask_subprocess_cluster
    RunStore.create(tmp_path / "run.zarr")
    with procs.client() as client:
        ok = check_store_reachable(client, str(tmp_path / "run.zarr"))
        assert sorted(ok) == sorted(procs.worker_pids()) and set(ok.values()) == {"ok"}
        # Workers run in their own directories: a relative path only works because it
        # is made absolute on the driver before it is sent.
        monkeypatch.chdir(tmp_path)
        assert len(check_store_reachable(client, "run.zarr")) == 2
        assert len(check_store_reachable(client, f"file://{tmp_path}/run.zarr")) == 2


def test_store_unreachable_one_line_error(dask_subprocess_cluster, tmp_path):
    procs = dask_subprocess_cluster
    missing = tmp_path / "only-on-another-host.zarr"
    with procs.client() as client:
        workers = set(procs.worker_pids())
        with pytest.raises(StoreError) as e:
            check_store_reachable(client, str(missing))
        msg = _one_line(e)
        assert str(missing) in msg and any(w in msg for w in workers) and "shared filesystem" in msg
        # An object store whose fsspec backend is not installed on the workers.
        with pytest.raises(StoreError) as e:
            check_store_reachable(client, "s3://no-such-bucket/run.zarr")
        msg = _one_line(e)
        assert "s3://no-such-bucket/run.zarr" in msg and any(w in msg for w in workers) and "fsspec backend" in msg
        # memory:// never crosses process boundaries.
        with pytest.raises(StoreError, match="memory://"):
            check_store_reachable(client, "memory://run.zarr")


def test_probe_detects_a_different_store_at_the_same_path(dask_subprocess_cluster, tmp_path):
    """Same path, different filesystem: the worker sees a store created at another time."""
    store = RunStore.create(tmp_path / "run.zarr")
    with dask_subprocess_cluster.client() as client:
        same = client.run(_probe_store, store.url, store.meta["created"])
        other = client.run(_probe_store, store.url, "1999-01-01T00:00:00.000+00:00")
    assert set(same.values()) == {None}
    assert all("not on a shared filesystem" in why for why in other.values())


def test_runstore_file_url_roundtrip(dask_subprocess_cluster, tmp_path):
    url = f"file://{tmp_path}/run.zarr"
    store = RunStore.create(url)
    assert store.url == str(tmp_path / "run.zarr")
    with store.stage("demo", {"a": 1}) as w:
        w.write_array("x", np.arange(10, dtype=np.int64))
    again = RunStore.open(url)
    assert again.is_complete("demo")
    np.testing.assert_array_equal(open_array(url, "x")[:], np.arange(10))
    with dask_subprocess_cluster.client() as client:
        assert len(check_store_reachable(client, url)) == 2
        # Workers read it (dask.array over the zarr array, computed on the cluster).
        got = client.compute(RunStore.open(url).dask_array("x").sum()).result()
    assert got == 45


# -- TLS ------------------------------------------------------------------------------------
def test_tls_missing_file_is_bad_input(tmp_path):
    cfg = DaskConfig(scheduler="tls://127.0.0.1:1", tls_ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(BadInput) as e:
        with connect(cfg):
            pass
    assert "ca.pem" in _one_line(e) and "--tls-ca-file" in str(e.value)


# -- failures at connect time -------------------------------------------------------------------
def test_unreachable_scheduler_one_line():
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError) as e:
        with connect(DaskConfig(scheduler=address, connect_timeout=2.0)):
            pass
    msg = _one_line(e)
    assert msg.startswith(f"cannot reach the Dask scheduler at {address}") and "dask scheduler" in msg


@pytest.mark.timeout(120)  # 0.1.4 waited forever here
def test_scheduler_address_that_is_not_dask_fails_within_the_timeout(tmp_path):
    import subprocess

    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket
        import time

        for _ in range(100):  # until the server listens
            with socket.socket() as sk:
                if sk.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        with pytest.raises(ClusterError) as e:
            with connect(DaskConfig(scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=2.0)):
                pass
        msg = _one_line(e)
        assert "did not answer the Dask handshake within 4s" in msg and "not a Dask scheduler" in msg
    finally:
        http.kill()
        http.wait()


def test_worker_with_other_code_is_named(tmp_path):
    """A worker importing another facecluster checkout (one changed line) is refused at connect, exit 2."""
    import facecluster
    from facecluster import pipeline, tasks

    # the layout of an installed wheel: facecluster/{pipeline,tasks}/, first on the worker's path
    other = tmp_path / "other" / "facecluster"
    shutil.copytree(os.path.dirname(facecluster.__file__), other)
    shutil.copytree(os.path.dirname(pipeline.__file__), other / "pipeline", dirs_exist_ok=True)
    shutil.copytree(os.path.dirname(tasks.__file__), other / "tasks", dirs_exist_ok=True)
    with open(other / "tasks" / "metrics.py", "a") as fh:
        fh.write("\n# an older or newer checkout\n")
    env = {"PYTHONPATH": os.pathsep.join([str(other.parent)] + [p for p in sys.path if p])}
    with dask_cluster(n_workers=1, env=env, workdir=tmp_path / "procs") as procs:
        with pytest.raises(ClusterError) as e:
            with connect(dataclasses.replace(procs.dask_config(), connect_timeout=10.0)):
                pass
        assert isinstance(e.value, BadInput)  # the CLI exits 2
        msg = _one_line(e)
        addr = next(iter(procs.worker_pids()))
        assert f"worker {addr}" in msg and "other facecluster code" in msg and "same facecluster" in msg


@needs_openssl
def test_no_workers_then_worker_without_faiss_over_tls(tmp_path):
    """A TLS scheduler with no workers, then a worker whose environment lacks faiss: one line each.

    (TLS connections with real work are covered by tests/test_deploy.py::test_manual_tls_recipe.)
    """
    fake = tmp_path / "shadow" / "faiss"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: faiss-cpu is not installed here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent)] + sys.path)}
    tls = make_tls_files(tmp_path / "certs")
    with dask_cluster(n_workers=0, nanny=False, env=env, tls=tls, workdir=tmp_path / "procs") as procs:
        assert procs.address.startswith("tls://127.0.0.1:")
        cfg = dataclasses.replace(procs.dask_config(), connect_timeout=2.0)
        with pytest.raises(ClusterError) as e:
            with connect(cfg):
                pass
        assert "has no workers" in _one_line(e) and f"dask worker {procs.address}" in str(e.value)
        procs.add_workers(1)
        with pytest.raises(ClusterError) as e:
            with connect(cfg):
                pass
        msg = _one_line(e)
        assert "cannot import faiss" in msg and "simulated" in msg and "pip install faiss-cpu" in msg
        addr = next(iter(procs.worker_pids()))
        assert addr in msg


# -- LocalCluster and dask-jobqueue ---------------------------------------------------------------
def test_local_cluster_default_size_and_dashboard(capsys):
    n, threads, memory = local_cluster_size(DaskConfig())
    assert (n, threads) == (os.cpu_count(), 1) and isinstance(memory, int) and memory > 0
    assert local_cluster_size(DaskConfig(threads_per_worker=2, memory_limit="3GiB"))[1:] == (2, "3GiB")
    with connect(DaskConfig(n_workers=1, memory_limit="2GiB")) as client:
        _kernel_check(client)
        assert len(client.scheduler_info()["workers"]) == 1
    err = capsys.readouterr().err
    assert "LocalCluster, 1 workers, dashboard http" in err


# Minor page faults per 24 MB array allocated, filled and freed in the process that runs it. Source text, so
# that the LocalCluster worker and a plain subprocess run the same code (defined under a module name that
# is not importable, cloudpickle ships the function by value).
FAULT_PROBE = """
def fault_probe(rounds=20):
    import resource
    import numpy as np
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        a = np.ones(3_000_000)  # two live at once: 48 MB, under MALLOC_ENV's thresholds
        b = a + 1.0
        del a, b
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (2 * rounds)
"""


def _fault_probe():
    ns = {"__name__": "facecluster_test_fault_probe"}
    exec(FAULT_PROBE, ns)
    return ns["fault_probe"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc environment variables")
def test_local_cluster_workers_reuse_freed_arrays():
    """Workers start with MALLOC_ENV (Dask's nanny default pins glibc's mmap threshold at 128 KiB): a freed
    24 MB temporary is reused, not unmapped and faulted in again page by page."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # what Dask's nanny gives a worker
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    code = FAULT_PROBE + "\nprint(fault_probe())"
    dask_default = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True).stdout)
    with connect(DaskConfig(n_workers=1, memory_limit="2GiB")) as client:
        seen = client.run(lambda: {k: os.environ.get(k) for k in MALLOC_ENV})
        in_worker = client.submit(_fault_probe(), pure=False).result()
    assert list(seen.values()) == [MALLOC_ENV]
    if dask_default < 100:  # e.g. transparent huge pages "always": few faults either way, nothing to compare
        pytest.skip(f"{dask_default:.0f} faults per array under Dask's default here")
    assert in_worker < dask_default / 4, (in_worker, dask_default)


LARGE_FAULT_PROBE = FAULT_PROBE.replace("fault_probe", "large_fault_probe").replace(
    "np.ones(3_000_000)  # two live at once: 48 MB, under MALLOC_ENV's thresholds",
    "np.ones(12_500_000)  # 100 MB, over MALLOC_ENV's 64 MiB thresholds")


MMAP_PROBE = """
def malloc_is_mmapped(nbytes=512 << 20):
    # Does glibc serve a request larger than any free chunk with its own mmap (at or over the mmap threshold)
    # or from the heap's top? Untouched, so nothing becomes resident; MALLOC_ARENA_MAX=1 keeps every thread on
    # the main arena, whose heap lies below the program break.
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    p = libc.malloc(nbytes)
    from_heap = p < libc.sbrk(0)
    libc.free(p)
    return not from_heap
"""


def _probes():
    ns = {"__name__": "facecluster_test_fault_probe"}
    exec(LARGE_FAULT_PROBE + MMAP_PROBE, ns)
    return ns["large_fault_probe"], ns["malloc_is_mmapped"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_heap_reuse_raises_worker_thresholds_for_a_stage_and_puts_them_back():
    """Inside ``heap_reuse`` (the score and edges stages) a freed 100 MB array is reused from the heap and a large
    request comes from the heap; after it the worker is back at its own thresholds (a large request is its own mmap
    again) with the block's freed heap handed back."""
    assert LARGE_FAULT_PROBE != FAULT_PROBE
    fault_probe, is_mmapped = _probes()
    with connect(DaskConfig(n_workers=1, memory_limit="2GiB")) as client:
        mmapped_before = client.submit(is_mmapped, pure=False).result()
        faults_before = client.submit(fault_probe, pure=False).result()
        with heap_reuse(client, 1 << 30):
            mmapped_inside = client.submit(is_mmapped, pure=False).result()
            faults_inside = client.submit(fault_probe, 40, pure=False).result()
            rss_inside = client.run(lambda: __import__("psutil").Process().memory_info().rss)
        mmapped_after = client.submit(is_mmapped, pure=False).result()
        rss_after = client.run(lambda: __import__("psutil").Process().memory_info().rss)
        env = client.run(lambda: {k: os.environ.get(k) for k in MALLOC_ENV})
    assert list(env.values()) == [MALLOC_ENV]  # mallopt, not the environment
    assert (mmapped_before, mmapped_inside, mmapped_after) == (True, False, True)
    (inside,), (after,) = rss_inside.values(), rss_after.values()
    assert after < inside - 150e6, (inside >> 20, after >> 20)  # the probe's two freed 100 MB arrays went back
    if faults_before < 20:  # e.g. transparent huge pages "always" on huge-page-aligned maps: nothing to compare
        pytest.skip(f"{faults_before:.0f} faults per 100 MB array at the workers' thresholds here")
    assert faults_inside < faults_before / 4, (faults_before, faults_inside)


def test_heap_reuse_puts_thresholds_back_and_trims_when_the_stage_fails():
    calls = []

    class FakeClient:
        def run(self, fn, *args, on_error="raise"):
            calls.append((fn.__name__, *args, on_error))

    with pytest.raises(RuntimeError, match="stage failed"):
        with heap_reuse(FakeClient(), 1 << 30):
            raise RuntimeError("stage failed")
    # setting them skips a worker lost at that moment (its replacement keeps its own thresholds)
    assert calls == [("set_malloc_thresholds", 1 << 30, "ignore"), ("set_malloc_thresholds", None, "raise"),
                     ("release_memory", "raise")]


def test_heap_reuse_says_when_it_cannot_put_thresholds_back(caplog):
    class LostClient:
        def run(self, fn, *args, on_error="raise"):
            if args == (None,):
                raise OSError("connection lost")

    with caplog.at_level("WARNING", logger="facecluster.pipeline.cluster"):
        with heap_reuse(LostClient(), 1 << 30):
            pass
    assert "could not put the workers' malloc thresholds back (connection lost)" in caplog.text


@pytest.mark.parametrize("queue", ["slurm", "pbs"])
def test_jobqueue_job_script(queue, tmp_path):
    pytest.importorskip("dask_jobqueue")
    cfg = DaskConfig(jobqueue=queue, jobs=3, job_cores=8, threads_per_worker=2, job_memory="32GiB",
                     job_walltime="01:30:00", job_queue="cpuq", job_account="proj42", openblas_coretype="SkylakeX")
    cluster = make_jobqueue_cluster(cfg)
    try:
        script = cluster.job_script()
        assert len(cluster.workers) == 0  # nothing submitted
    finally:
        cluster.close()
    for line in ("export OPENBLAS_CORETYPE=SkylakeX", "export OMP_NUM_THREADS=2", "export OPENBLAS_NUM_THREADS=2",
                 "export MKL_NUM_THREADS=2", *(f"export {k}={v}" for k, v in MALLOC_ENV.items())):
        assert line in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert "--nworkers 4" in script and "--nthreads 2" in script and "--memory-limit 8.00GiB" in script
    # the environment comes before the worker starts (faiss reads it at import)
    assert script.index("export OPENBLAS_CORETYPE") < script.index("distributed.cli.dask_worker")
    if queue == "slurm":
        for line in ("#SBATCH -p cpuq", "#SBATCH -A proj42", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G",
                     "#SBATCH -t 01:30:00", "#SBATCH -J facecluster-worker"):
            assert line in script
    else:
        for line in ("#PBS -q cpuq", "#PBS -A proj42", "#PBS -l walltime=01:30:00", "#PBS -N facecluster-worker"):
            assert line in script
        assert "ncpus=8" in script and "mem=" in script


@needs_openssl
def test_jobqueue_with_tls_puts_certificates_on_worker_command(tmp_path):
    pytest.importorskip("dask_jobqueue")
    tls = make_tls_files(tmp_path / "certs")
    cfg = DaskConfig(jobqueue="slurm", job_cores=2, tls_ca_file=str(tls.ca), tls_cert=str(tls.cert),
                     tls_key=str(tls.key))
    cluster = make_jobqueue_cluster(cfg)
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://")
    finally:
        cluster.close()
    assert f"--tls-ca-file {tls.ca}" in script and f"--tls-cert {tls.cert}" in script and f"--tls-key {tls.key}" in script
    assert "--protocol tls://" in script


def test_dask_procs_kill_worker_is_replaced_by_nanny(dask_subprocess_cluster):
    """The helper later fault tests use: killing a worker process; the nanny brings a new one."""
    procs = dask_subprocess_cluster
    before = procs.worker_pids()
    killed = procs.kill_worker()
    assert killed in before.values()
    procs.wait_for_workers(2, timeout=60)
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = procs.worker_pids()
        if len(after) == 2 and killed not in after.values():
            break
        time.sleep(0.2)
    assert len(after) == 2 and killed not in after.values()
    with procs.client() as client:
        assert client.submit(sum, [4, 5], pure=False).result() == 9


# Frees 400 MB of 20 MB arrays in the middle of the heap (a small array allocated after them keeps the heap's top
# in use, so glibc's own trim cannot return them) and reports the resident bytes before and after.
HEAP_PROBE = """
def heap_probe():
    import numpy as np, psutil
    me = psutil.Process()
    # 20 MB arrays (under MALLOC_ENV's mmap threshold), each followed by a small pin that stays: the freed
    # arrays are holes below live chunks, which free() cannot hand back by itself (only a free top of the
    # heap is trimmed) and malloc_trim can
    arrays, pins = [], []
    for _ in range(20):
        arrays.append(np.ones(2_500_000))
        pins.append(np.ones(37_501))  # ~300 KB: past the small-chunk caches, cut from the top of the heap
    held = me.memory_info().rss
    del arrays
    import sys
    sys.facecluster_test_pins = pins  # alive past the return: freed with the function's locals they would
    return held, me.memory_info().rss  # make the whole region one free top, which free() trims by itself
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_memory_returns_freed_heap_to_the_system():
    from facecluster.pipeline.cluster import release_memory

    # the function itself, in a process of its own with the workers' malloc settings (nothing else trims there)
    code = HEAP_PROBE + (
        "import psutil\n"
        "from facecluster.pipeline.cluster import release_memory\n"
        "held, after_free = heap_probe()\n"
        "freed = release_memory()\n"
        "print(held, after_free, freed, psutil.Process().memory_info().rss)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **MALLOC_ENV}, capture_output=True,
                         text=True, check=True)
    held, after_free, freed, rss = (int(v) for v in out.stdout.split())
    assert after_free > held - (100 << 20)  # freed inside the heap: still resident
    assert freed > 300 << 20, freed  # malloc_trim handed it back
    assert rss < after_free - (300 << 20)
    # and on a worker, as the chain calls it between stages
    ns = {"__name__": "facecluster_test_heap_probe"}
    exec(HEAP_PROBE, ns)
    with connect(DaskConfig(n_workers=1, memory_limit="2GiB")) as client:
        held, after_free = client.submit(ns["heap_probe"], pure=False).result()
        freed = list(client.run(release_memory).values())[0]
        rss = list(client.run(lambda: __import__("psutil").Process().memory_info().rss).values())[0]
    assert after_free > held - (100 << 20)
    assert freed > 300 << 20, freed
    assert rss < after_free - (300 << 20)
