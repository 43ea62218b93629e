"""The whole pipeline through the CLI on real `dask scheduler` + `dask worker` subprocesses, and faults.

* Integration: ``facecluster synth / ingest / train / cluster --scheduler ADDR`` against two
  `dask worker` processes (nanny, 1 thread) on 127.0.0.1 give the same ``knn/*``,
  ``proposals/*``, ``score/*`` and ``clusters`` arrays as ``cluster`` on a LocalCluster.
* Lost worker: a worker process is SIGKILLed while the kNN stage's (then the score
  stage's) tasks are running; the nanny restarts it, Dask recomputes, and every array
  is identical to the undisturbed run. The kill time is checked against the stage's
  record (started..finished), and a run whose kill missed the stage is retried on a
  fresh store, so a slow or fast machine never turns into a silent pass.
* Killed driver: the `facecluster cluster` process is SIGKILLed while kNN tasks are
  writing (its arrays exist only under ``_tmp/``), then again once the knn record is
  complete; no array at a final name belongs to an incomplete stage; the last re-run
  prints which stages were skipped and gives identical labels.

Every subprocess runs in its own process group and is killed on the way out; failures
print the driver's output and the scheduler/worker logs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from dask_procs import dask_cluster, stop_process_group

pytestmark = pytest.mark.timeout(300)

N_FACES = 6000  # both splits; ~3000 faces each
DIM = 32
CHUNK_ROWS = 128  # 24 chunks per split: several tasks per stage and worker
CONFIG = f"""
[ingest]
chunk_rows = {CHUNK_ROWS}
[knn]
k = 20
q_rows = {CHUNK_ROWS}
[proposals]
preset = "fast"
[gcn]
hidden = [16, 8]
epochs = 2
lr = 0.003
dropout = 0.1
score_batch = 16
iop_range = [0.0, 1.0]   # GCN-S on every proposal, and a strict keep threshold,
keep_prob = 0.99         # so the tiny model prunes members and score/keep is exercised
[edges]
output_only = false      # every stage runs (and is killed and resumed below) whichever output the model chooses
"""
# arrays that must be identical between runs (everything a stage writes, up to the labels)
COMPARED = ("knn/index", "knn/sim", "proposals/offsets", "proposals/members", "proposals/setting", "proposals/level",
            "score/iou", "score/iop", "score/segmented", "score/keep", "clusters", "clusters_score")
CLI_TIMEOUT = 240
KILL_ATTEMPTS = 3


# -- helpers ---------------------------------------------------------------------------------
def _facecluster() -> list[str]:
    script = Path(sys.executable).with_name("facecluster")
    return [str(script)] if script.exists() else [sys.executable, "-m", "facecluster"]


def _argv(args: list) -> list[str]:
    return _facecluster() + [str(a) for a in args]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env["FACECLUSTER_PROGRESS"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def fc(args: list, procs=None, timeout: float = CLI_TIMEOUT) -> str:
    """Run ``facecluster ARGS`` to completion; returns stdout+stderr, fails with logs on error."""
    p = subprocess.Popen(_argv(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=_env(), start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(p)
        out = p.communicate()[0]
        pytest.fail(f"facecluster {' '.join(map(str, args))} did not finish in {timeout}s\n{out[-4000:]}\n"
                    f"{procs.logs() if procs else ''}")
    finally:
        stop_process_group(p, timeout=1) if p.poll() is None else None
    if p.returncode != 0:
        pytest.fail(f"facecluster {' '.join(map(str, args))} exited {p.returncode}\n{out[-4000:]}\n"
                    f"{procs.logs() if procs else ''}")
    return out


def start_fc(args: list, log_path: Path) -> subprocess.Popen:
    """Start ``facecluster ARGS`` in its own session (so it and its children can be killed)."""
    fh = open(log_path, "w")
    try:
        return subprocess.Popen(_argv(args), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_env(), start_new_session=True)
    finally:
        fh.close()


def cluster_args(run, model, cfg_path) -> list:
    return ["cluster", run, "--model", model, "--config", cfg_path]


def read_arrays(url, names=COMPARED) -> dict[str, np.ndarray]:
    root = zarr.open_group(store=str(url), mode="r")
    return {n: root[n][...] for n in names}


def assert_same_arrays(got: dict, want: dict, what: str) -> None:
    for name in want:
        a, b = got[name], want[name]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {name} is {a.dtype}{a.shape}, expected {b.dtype}{b.shape}"
        if not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
            diff = int(np.sum(a != b)) if a.shape == b.shape else -1
            pytest.fail(f"{what}: {name} differs from the reference run in {diff} of {a.size} values")


def records(url) -> dict:
    """Stage records, read while another process may be rewriting them (retry a torn read)."""
    from facecluster.pipeline.store import RunStore

    for _ in range(50):
        try:
            return RunStore.open(url, mode="r").records()
        except Exception:  # zarr.json being rewritten: JSON decode error / missing key
            time.sleep(0.02)
    return RunStore.open(url, mode="r").records()


def _iso(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s)


def final_arrays(url) -> list[str]:
    """Arrays of a local store outside ``_tmp/`` (from their zarr.json)."""
    base = Path(url)
    out = []
    for meta in base.rglob("zarr.json"):
        rel = meta.parent.relative_to(base).as_posix()
        if rel == "." or rel.split("/")[0] == "_tmp":
            continue
        with contextlib.suppress(ValueError, OSError):
            if json.loads(meta.read_text()).get("node_type") == "array":
                out.append(rel)
    return sorted(out)


def assert_only_complete_outputs(url) -> dict:
    """Every array at a final name is an output of a stage whose record is complete."""
    recs = records(url)
    done = {o for r in recs.values() if r.get("complete") for o in r.get("outputs", [])}
    stray = [a for a in final_arrays(url) if a not in done]
    assert not stray, (f"{url}: arrays {stray} sit at final names but no complete stage record lists them "
                       f"(records: { {k: r.get('status') for k, r in recs.items()} })")
    return recs


def ingest(data: Path, split: str, out: Path, cfg_path: Path) -> Path:
    fc(["ingest", data / split / "features.npy", "--labels", data / split / "labels.npy", "-o", out,
        "--config", cfg_path])
    return out


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    """This module's own scheduler + 2 nanny workers (the fault tests kill workers)."""
    with dask_cluster(n_workers=2, workdir=tmp_path_factory.mktemp("dask-procs"), memory_limit="3GiB") as p:
        yield p


@pytest.fixture(scope="module")
def setup(tmp_path_factory, procs):
    """Synthetic data, the config file and a tiny model trained through the CLI on the subprocess cluster."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg_path = tmp / "run.toml"
    cfg_path.write_text(CONFIG)
    data = tmp / "data"
    fc(["synth", N_FACES, "--dim", DIM, "--seed", 3, "-o", data])
    train = ingest(data, "train", tmp / "train.zarr", cfg_path)
    model = tmp / "model"
    # an ensemble of 2 GCN-D models: the invariance tests below then cover its scoring on every cluster
    fc(["train", train, "--out", model, "--config", cfg_path, "--ensemble", 2] + procs.cli_args(), procs)
    assert json.loads((model / "config.json").read_text())["ensemble"] == 2
    return {"tmp": tmp, "cfg": cfg_path, "data": data, "model": model}


@pytest.fixture(scope="module")
def reference(setup):
    """The test split clustered through the CLI on a LocalCluster (2 processes x 1 thread)."""
    run = ingest(setup["data"], "test", setup["tmp"] / "local.zarr", setup["cfg"])
    out = fc(cluster_args(run, setup["model"], setup["cfg"]) + ["--workers", 2, "--threads", 1])
    assert "LocalCluster" in out, out
    arrays = read_arrays(run)
    n = arrays["clusters"].shape[0]
    assert n > 2500 and arrays["clusters"].min() == 0 and len(np.unique(arrays["clusters"])) > 100
    assert len(arrays["proposals/offsets"]) > 200
    assert not arrays["score/keep"].all()  # GCN-S removed some members: the pruning path runs too
    return arrays


# -- integration --------------------------------------------------------------------------------
def test_cli_on_dask_subprocesses_matches_localcluster(setup, procs, reference):
    run = ingest(setup["data"], "test", setup["tmp"] / "procs.zarr", setup["cfg"])
    out = fc(cluster_args(run, setup["model"], setup["cfg"]) + procs.cli_args(), procs)
    assert f"scheduler {procs.address}, 2 workers" in out, out
    for stage in ("knn", "graph", "proposals", "score", "dedup"):
        assert re.search(rf"^{stage}\s+done", out, re.M), f"no '{stage} done' line in\n{out}"
    assert "skipped (up to date): none" in out, out
    assert_same_arrays(read_arrays(run), reference, "dask subprocesses vs LocalCluster")
    recs = records(run)
    assert recs["knn"]["summary"]["tasks"] >= 20  # several chunks per worker, not one task
    assert recs["score"]["summary"]["tasks"] >= 10
    assert_only_complete_outputs(run)


# -- a worker dies ------------------------------------------------------------------------------
def _processing(prefix: str):
    def predicate(client) -> bool:
        return any(str(k).startswith(prefix) for keys in client.processing().values() for k in keys)

    return predicate


@pytest.mark.parametrize("stage,prefix", [("knn", "knn-search"), ("communities", "communities-infomap"),
                                          ("score", "score-")])
def test_worker_killed_mid_stage_gives_identical_labels(setup, procs, reference, stage, prefix):
    """SIGKILL a worker process while ``stage``'s tasks run; the run completes with identical arrays."""
    misses = []
    for attempt in range(KILL_ATTEMPTS):
        procs.wait_for_workers(2, timeout=90)  # the nanny has restarted any earlier victim
        run = ingest(setup["data"], "test", setup["tmp"] / f"kill-{stage}-{attempt}.zarr", setup["cfg"])
        result: dict = {}

        def watch():
            try:
                result["pid"] = procs.kill_worker_at(_processing(prefix), timeout=CLI_TIMEOUT, poll=0.02)
                result["at"] = dt.datetime.now(dt.timezone.utc)
            except Exception as e:  # reported below, never lost in the thread
                result["error"] = e

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(0.5)  # the watcher's client is connected before the driver submits anything
        out = fc(cluster_args(run, setup["model"], setup["cfg"]) + procs.cli_args(), procs)
        watcher.join(timeout=CLI_TIMEOUT)
        assert "error" not in result, f"watcher failed: {result.get('error')!r}"
        rec = records(run)[stage]
        pid, at = result.get("pid"), result.get("at")
        print(f"attempt {attempt}: killed worker pid {pid} at {at}; {stage} ran {rec['started']}..{rec['finished']}")
        if pid is not None and _iso(rec["started"]) <= at <= _iso(rec["finished"]):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # the victim really is gone
            assert f"Worker process {pid} was killed by signal 9" in procs.logs(tail=400), procs.logs()
            assert_same_arrays(read_arrays(run), reference, f"worker {pid} killed during {stage}")
            assert re.search(rf"^{stage}\s+done", out, re.M), out
            assert_only_complete_outputs(run)
            procs.wait_for_workers(2, timeout=90)
            return
        misses.append(f"attempt {attempt}: kill pid={pid} at {at}, {stage} ran {rec['started']}..{rec['finished']}")
    pytest.fail(f"the worker kill never landed inside the {stage} stage:\n" + "\n".join(misses) + "\n" + procs.logs())


# -- the driver dies ----------------------------------------------------------------------------
def _wait_for(cond, p: subprocess.Popen, log_path: Path, what: str, timeout: float = CLI_TIMEOUT, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if p.poll() is not None:
            return False
        time.sleep(poll)
    stop_process_group(p)
    pytest.fail(f"timed out waiting for {what}\n{log_path.read_text()[-4000:]}")


def _tmp_chunks(run: Path, prefix: str) -> int:
    return sum(1 for d in (run / "_tmp").glob(f"{prefix}*") for f in (d / "c").rglob("*") if f.is_file())


def _kill_driver_when(run: Path, args: list, cond, log_path: Path, what: str) -> bool:
    """Start the driver, SIGKILL its process group when ``cond()``; False if it finished first."""
    p = start_fc(args, log_path)
    try:
        hit = _wait_for(cond, p, log_path, what)
        if hit:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            assert p.returncode == -signal.SIGKILL
        else:
            assert p.returncode == 0, f"driver failed before {what}:\n{log_path.read_text()[-4000:]}"
        return hit
    finally:
        stop_process_group(p, timeout=1) if p.poll() is None else None


def test_driver_killed_then_rerun_resumes(setup, procs, reference):
    args = lambda run: cluster_args(run, setup["model"], setup["cfg"]) + procs.cli_args()  # noqa: E731
    tmp = setup["tmp"]
    for attempt in range(KILL_ATTEMPTS):
        procs.wait_for_workers(2, timeout=90)
        run = ingest(setup["data"], "test", tmp / f"driver-{attempt}.zarr", setup["cfg"])

        # 1. killed while kNN tasks write into the stage's temporary arrays
        def writing_knn():
            rec = records(run).get("knn", {})
            return rec.get("status") == "running" and _tmp_chunks(run, "knn__knn__index") > 0

        if not _kill_driver_when(run, args(run), writing_knn, tmp / f"driver-{attempt}-1.log", "kNN chunks under _tmp"):
            continue  # the whole run finished before the first chunk was seen: retry on a fresh store
        recs = assert_only_complete_outputs(run)
        assert not recs["knn"]["complete"] and recs["knn"]["status"] == "running", recs["knn"]
        assert _tmp_chunks(run, "knn__knn__index") > 0  # the half-written array is there, under _tmp only
        assert not (run / "knn" / "index").exists()

        # 2. killed again once the knn record is complete
        knn_done = lambda: records(run).get("knn", {}).get("complete", False)  # noqa: E731
        log2 = tmp / f"driver-{attempt}-2.log"
        if _kill_driver_when(run, args(run), knn_done, log2, "the knn record to be complete"):
            recs = assert_only_complete_outputs(run)
            assert recs["knn"]["complete"]
            assert not recs.get("dedup", {}).get("complete"), "killed after the last stage: nothing left to resume"
            skipped_expected = [s for s in ("knn", "graph", "proposals", "score") if recs.get(s, {}).get("complete")]

            # 3. the same command again: resumes, says what it skipped, same labels
            out = fc(args(run), procs)
            print(f"attempt {attempt}: re-run after killed drivers:\n{out}")
            for s in skipped_expected:
                assert re.search(rf"^{s}\s+skipped \(up to date\)", out, re.M), f"{s} not reported skipped:\n{out}"
            assert re.search(r"^dedup\s+done", out, re.M), out
            assert re.search(r"skipped \(up to date\): knn\b", out), out  # the command's summary line
            assert_same_arrays(read_arrays(run), reference, "re-run after killed drivers")
            assert_only_complete_outputs(run)
            return
    pytest.fail(f"the driver finished before it could be killed in {KILL_ATTEMPTS} attempts")
