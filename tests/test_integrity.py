"""Issue 18: the run store never answers wrongly in silence.

Real run stores on disk, the real CLI and a real LocalCluster (worker processes):
lost / truncated / altered chunks, re-ingested data, --force upstream, two
writers, the writer lock and `facecluster verify`.
"""

from __future__ import annotations

import os
import shutil
import socket

import numpy as np
import pytest

from facecluster.pipeline.cli import main
from facecluster.pipeline.store import ChunkError, LockedError, RunStore, StoreError, open_array

N, DIM, R = 640, 16, 128


def _data(tmp_path, seed=0, n=N, name="f"):
    """Clustered unit vectors (40 identities) and their labels, as .npy files."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 40, size=n).astype(np.int64)
    centers = rng.normal(size=(40, DIM))
    x = (centers[lab] + 0.35 * rng.normal(size=(n, DIM))).astype(np.float32)
    np.save(tmp_path / f"{name}.npy", x)
    np.save(tmp_path / f"{name}_lab.npy", lab)
    return tmp_path / f"{name}.npy", tmp_path / f"{name}_lab.npy", x, lab


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _err_line(err: str) -> str:
    """The one error line (Dask's own log lines are not ours to count)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def run(tmp_path, capsys):
    feats, lab, _, _ = _data(tmp_path)
    url = tmp_path / "r.zarr"
    code, _, err = _cli(["ingest", feats, "--labels", lab, "-o", url, "--chunk-rows", R], capsys)
    assert code == 0, err
    return url


def _cluster(url, client, capsys, *extra):
    return _cli(["cluster", url, "--method", "threshold", "--scheduler", client.scheduler.address, *extra], capsys)


# -- item 1: a lost chunk is an error, never fill values -------------------------------------
def test_lost_features_chunk_fails_cluster_with_one_line(run, local_client, capsys):
    os.remove(run / "features" / "c" / "2" / "0")
    code, _, err = _cluster(run, local_client, capsys)
    assert code == 2
    line = _err_line(err)
    assert "array 'features' chunk c/2/0 is missing" in line and "facecluster ingest" in line
    assert not (run / "clusters").exists()


def test_lost_knn_and_labels_chunks_are_refused(run, local_client, capsys):
    assert _cluster(run, local_client, capsys)[0] == 0
    os.remove(run / "labels" / "c" / "1")
    code, _, err = _cli(["evaluate", run], capsys)
    assert code == 2 and "array 'labels' chunk c/1 is missing" in _err_line(err)
    os.remove(run / "knn" / "index" / "c" / "0" / "0")
    code, _, err = _cluster(run, local_client, capsys, "--force", "--th", "0.3")  # graph is rebuilt: reads knn
    assert code == 2
    line = _err_line(err)
    assert "array 'knn/index' chunk c/0/0 is missing" in line and "facecluster knn" in line


def test_reingest_repairs_a_lost_chunk(tmp_path, run, capsys):
    feats, lab = tmp_path / "f.npy", tmp_path / "f_lab.npy"
    before = RunStore.open(run).array("features")[:]
    os.remove(run / "features" / "c" / "3" / "0")
    code, out, err = _cli(["ingest", feats, "--labels", lab, "-o", run, "--chunk-rows", R], capsys)
    assert code == 0 and "skipped" not in out, out + err
    np.testing.assert_array_equal(RunStore.open(run).array("features")[:], before)
    assert _cli(["verify", run], capsys)[0] == 0


# -- item 2: a truncated or altered chunk names the array and the chunk ---------------------
def test_truncated_chunk_names_array_and_chunk_on_workers(run, local_client, capsys):
    p = run / "features" / "c" / "1" / "0"
    p.write_bytes(p.read_bytes()[:100])
    code, _, err = _cluster(run, local_client, capsys)
    assert code == 2
    line = _err_line(err)
    assert "array 'features' chunk c/1/0 is damaged" in line and "blosc" not in line.lower()
    # the same check on a worker process, through open_array
    with pytest.raises(ChunkError, match="chunk c/1/0 is damaged"):
        local_client.submit(lambda u: open_array(u, "features")[:], str(run), pure=False).result()


def test_verify_reads_every_chunk(run, local_client, capsys):
    assert _cluster(run, local_client, capsys)[0] == 0
    code, out, _ = _cli(["verify", run], capsys)
    assert code == 0 and "ok" in out
    # one flipped byte in the middle of a chunk: same length, same trailer, wrong CRC
    p = run / "knn" / "sim" / "c" / "2" / "0"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    code, _, err = _cli(["verify", run], capsys)
    assert code == 2
    assert "array 'knn/sim' chunk c/2/0 is damaged" in err and "facecluster knn" in err
    with pytest.raises(ChunkError, match="knn/sim' chunk c/2/0 is damaged"):
        RunStore.open(run).array("knn/sim")[:]


def test_array_replaced_by_another_runs_array_is_refused(tmp_path, run, capsys):
    feats, lab, _, _ = _data(tmp_path, seed=5, name="g")
    other = tmp_path / "o.zarr"
    assert _cli(["ingest", feats, "--labels", lab, "-o", other, "--chunk-rows", R], capsys)[0] == 0
    shutil.rmtree(run / "labels")
    shutil.copytree(other / "labels", run / "labels")  # a self-consistent array, but not this run's
    with pytest.raises(ChunkError, match="'labels' is not the one stage 'ingest' wrote"):
        RunStore.open(run).array("labels")
    code, _, err = _cli(["verify", run], capsys)
    assert code == 2 and "'labels' is not the one stage 'ingest' wrote" in err


# -- item 3: digests chain the data ----------------------------------------------------------
def test_reingesting_permuted_data_recomputes_everything(tmp_path, run, local_client, capsys):
    assert _cluster(run, local_client, capsys)[0] == 0
    _, _, x, lab = _data(tmp_path)
    perm = np.random.default_rng(1).permutation(N)
    np.save(tmp_path / "perm.npy", x[perm])
    np.save(tmp_path / "perm_lab.npy", lab[perm])
    code, out, err = _cli(["ingest", tmp_path / "perm.npy", "--labels", tmp_path / "perm_lab.npy", "-o", run,
                           "--chunk-rows", R], capsys)
    assert code == 0 and "skipped" not in out, out + err
    # the stale clustering is refused, not exported / evaluated
    code, _, err = _cli(["export", run, "-o", tmp_path / "c.npy"], capsys)
    assert code == 2 and "stale" in _err_line(err) and not (tmp_path / "c.npy").exists()
    assert _cli(["evaluate", run], capsys)[0] == 2
    code, _, err = _cli(["report", run, "-o", tmp_path / "rep"], capsys)
    assert code == 2 and "stale" in _err_line(err) and not (tmp_path / "rep").exists()
    code, out, err = _cluster(run, local_client, capsys)
    assert code == 0, err
    # the permuted run clusters exactly like a fresh run on the permuted file
    fresh = tmp_path / "fresh.zarr"
    assert _cli(["ingest", tmp_path / "perm.npy", "--labels", tmp_path / "perm_lab.npy", "-o", fresh,
                 "--chunk-rows", R], capsys)[0] == 0
    assert _cluster(fresh, local_client, capsys)[0] == 0
    a = RunStore.open(run, mode="r").array("clusters")[:]
    b = RunStore.open(fresh, mode="r").array("clusters")[:]
    np.testing.assert_array_equal(a, b)
    assert _cli(["export", run, "-o", tmp_path / "c.npy"], capsys)[0] == 0


def test_reingest_with_other_n_refuses_export(tmp_path, run, local_client, capsys):
    assert _cluster(run, local_client, capsys)[0] == 0
    feats, lab, _, _ = _data(tmp_path, seed=2, n=N - 37, name="h")
    assert _cli(["ingest", feats, "--labels", lab, "-o", run, "--chunk-rows", R], capsys)[0] == 0
    code, _, err = _cli(["export", run, "--format", "csv", "-o", tmp_path / "c.csv"], capsys)
    assert code == 2 and "stale" in _err_line(err) and not (tmp_path / "c.csv").exists()


def test_knn_force_makes_downstream_stale(tmp_path, run, local_client, capsys):
    assert _cluster(run, local_client, capsys)[0] == 0
    store = RunStore.open(run)
    # the threshold method without --th: knn -> edges (the general model's P) -> clusters
    edges_run, clusters_run = store.record("edges")["run"], store.record("clusters")["run"]
    code, _, err = _cli(["knn", run, "--force", "--scheduler", local_client.scheduler.address], capsys)
    assert code == 0, err
    assert "stage 'edges' is stale" in store.stale_reason("clusters")
    assert _cli(["export", run, "-o", tmp_path / "c.npy"], capsys)[0] == 2
    assert _cluster(run, local_client, capsys)[0] == 0
    assert store.record("edges")["run"] != edges_run and store.record("clusters")["run"] != clusters_run
    assert store.stale_reason("clusters") is None


# -- item 4: concurrent processes do not lose each other's records ------------------------
def test_two_store_handles_keep_each_others_records(tmp_path):
    url = tmp_path / "r.zarr"
    RunStore.create(url)
    a, b = RunStore.open(url), RunStore.open(url)  # as two processes would hold it
    with b.stage("one", {"p": 1}) as w:
        w.write_array("one", np.arange(3))
    with a.stage("two", {"p": 2}) as w:
        w.write_array("two", np.arange(4))
    for s in (a, b, RunStore.open(url)):
        assert s.is_complete("one") and s.is_complete("two")
    assert a.stage_digest("three", {}, ["one"]) == b.stage_digest("three", {}, ["one"])


# -- item 5: one writer at a time; readers never block ------------------------------------
def test_second_writer_exits_2_readers_do_not_block(tmp_path, run, local_client, capsys):
    assert _cluster(run, local_client, capsys)[0] == 0
    holder = RunStore.open(run)
    with holder.writing("test holds the lock"):
        code, _, err = _cluster(run, local_client, capsys, "--force")
        assert code == 2
        line = _err_line(err)
        assert "in use by another writer" in line and f"pid {os.getpid()} on {socket.gethostname()}" in line
        feats, lab = tmp_path / "f.npy", tmp_path / "f_lab.npy"
        for extra in ([], ["--overwrite"]):  # into the run, or replacing it: both wait for the writer
            code, _, err = _cli(["ingest", feats, "--labels", lab, "-o", run, "--chunk-rows", 64, *extra], capsys)
            assert code == 2 and "in use by another writer" in _err_line(err)
        assert RunStore.open(run).record("ingest")["params"]["chunk_rows"] == R
        # readers work while the writer holds the lock
        assert _cli(["export", run, "-o", tmp_path / "c.npy"], capsys)[0] == 0
        assert _cli(["evaluate", run], capsys)[0] == 0
        assert _cli(["verify", run], capsys)[0] == 0
    assert holder.lock_holder() is None
    assert _cluster(run, local_client, capsys, "--force")[0] == 0


def _plant_lock(url, host: str, pid: int) -> None:
    """The lock file a holder on ``host`` with ``pid`` would leave (written as the store writes it)."""
    from zarr.core.sync import sync

    from facecluster.pipeline.store import LOCK_GROUP, _json_node

    holder = {"holder": "facecluster cluster", "host": host, "pid": pid,
              "started": "2026-01-01T00:00:00.000+00:00", "token": "planted"}
    sync(RunStore.open(url)._raw.set(f"{LOCK_GROUP}/zarr.json", _json_node({"lock": holder})))


def test_stale_lock_of_a_dead_process_is_taken_over(run, local_client, capsys, caplog):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant_lock(run, "elsewhere.example", dead.pid)  # another host: cannot tell, never broken
    with pytest.raises(LockedError, match="pid .* on elsewhere.example"):
        with RunStore.open(run).writing("x"):
            pass
    _plant_lock(run, socket.gethostname(), dead.pid)  # this host, process gone (kill -9): stale
    with caplog.at_level("WARNING", logger="facecluster.pipeline.store"):
        assert _cluster(run, local_client, capsys)[0] == 0
    assert any("stale lock" in r.message for r in caplog.records)
    assert RunStore.open(run).lock_holder() is None


def test_killed_run_leftovers_are_removed_by_a_threshold_rerun(run, local_client, capsys):
    store = RunStore.open(run)
    with pytest.raises(KeyboardInterrupt):
        with store.stage("knn", {"k": 3}, inputs=["ingest"]) as w:
            w.create_array("knn/index", (N, 3), (R, 3), np.int64)
            tmp = w.tmp_path("knn/index")
            shutil.copytree(run / tmp, run / (tmp + "x"))  # what a kill -9 leaves behind
            raise KeyboardInterrupt
    assert (run / (tmp + "x")).exists()
    assert _cluster(run, local_client, capsys)[0] == 0
    assert not (run / (tmp + "x")).exists()


def test_read_only_store_cannot_write(run):
    store = RunStore.open(run, mode="r")
    with pytest.raises(StoreError, match="read-only"):
        with store.stage("x", {}) as w:
            assert w is None


@pytest.mark.timeout(300)
def test_two_cluster_processes_the_second_exits_2_and_the_first_completes(tmp_path, local_client, capsys):
    """0.1.4: the second `cluster` deleted the first's _tmp arrays and the first failed blaming workers."""
    import subprocess
    import sys
    import time

    np.save(tmp_path / "big.npy", np.random.default_rng(0).normal(size=(60000, 128)).astype(np.float32))
    run = tmp_path / "big.zarr"
    assert _cli(["ingest", tmp_path / "big.npy", "-o", run], capsys)[0] == 0
    first = subprocess.Popen([sys.executable, "-m", "facecluster", "cluster", str(run), "--method", "threshold",
                              "--scheduler", local_client.scheduler.address],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, FACECLUSTER_PROGRESS="0"))
    try:
        for _ in range(2400):  # until the first is inside the kNN stage
            if (run / "_tmp").exists() and any((run / "_tmp").glob("knn__*")):
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        code, _, err = _cluster(run, local_client, capsys)
        assert code == 2
        line = _err_line(err)
        assert "in use by another writer" in line and f"pid {first.pid} on" in line and "cluster" in line
        out, err1 = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err1
    assert RunStore.open(run).stale_reason("clusters") is None
