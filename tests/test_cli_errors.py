"""Issue 18 item 7: the CLI's smaller one-line answers (Ctrl-C, label options), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from facecluster.pipeline.cli import main


def test_evaluate_names_the_gt_option(tmp_path, capsys):
    np.save(tmp_path / "pred.npy", np.arange(5))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(tmp_path / "pred.npy"), "--gt", str(tmp_path / "nope.meta")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nope.meta: label file not found; check the path given to --gt" in err
    assert "--labels" not in err


@pytest.mark.timeout(300)
def test_ctrl_c_exits_130_with_one_line_and_releases_the_lock(tmp_path):
    """SIGINT to the whole process group (what a terminal sends) during kNN on a LocalCluster."""
    from facecluster.pipeline.store import RunStore

    rng = np.random.default_rng(0)
    # 200k faces: the kNN stage (quadratic) must outlast the test's reaction on a loaded machine; with 60k the
    # whole run finished between seeing the kNN stage start and the signal (exit 0) when the load was ~20
    np.save(tmp_path / "f.npy", rng.normal(size=(200_000, 128)).astype(np.float32))
    env = dict(os.environ, FACECLUSTER_PROGRESS="0")
    run = tmp_path / "r.zarr"
    subprocess.run([sys.executable, "-m", "facecluster", "ingest", str(tmp_path / "f.npy"), "-o", str(run)],
                   check=True, env=env, capture_output=True)
    p = subprocess.Popen([sys.executable, "-m", "facecluster", "cluster", str(run), "--method", "threshold", "--workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                         # as from a terminal: SIGINT at its default whatever this pytest process inherited or set
                         # (a child started with SIGINT ignored keeps ignoring it: in CI the run finished, exit 0)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(2400):  # until the kNN stage is under way (its temporary arrays exist)
            if (run / "_tmp").exists() and any((run / "_tmp").glob("knn__*")):
                break
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert "interrupted" in err.splitlines()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    store = RunStore.open(run)
    assert store.lock_holder() is None and not store.is_complete("knn")


_LOST_INTERRUPT = """
import contextlib, gc, signal, sys, time
from facecluster.pipeline.cli import interrupts_delivered

def raise_inside(phase, info):  # the SIGINT handler runs inside a gc callback, as in CI (distributed's GC diagnosis)
    if phase == "start" and not fired:
        fired.append(1)
        signal.raise_signal(signal.SIGINT)

fired = []
gc.callbacks.append(raise_inside)
try:
    with interrupts_delivered() if sys.argv[1] == "on" else contextlib.nullcontext():
        gc.collect()
        t = time.monotonic()
        while time.monotonic() - t < 20:
            time.sleep(0.01)
    print("finished", len(fired))
except KeyboardInterrupt:
    print("interrupted", len(fired))
"""


@pytest.mark.parametrize("delivered", ["off", "on"])
def test_an_interrupt_raised_inside_a_gc_callback_still_stops_the_command(tmp_path, delivered):
    """Python drops a KeyboardInterrupt raised in a gc callback (CI: Ctrl-C landed in distributed's GC diagnosis and
    `facecluster cluster` ran on). Without the CLI's hook the interrupt is lost (the loop runs its 20 s out); with it,
    SIGINT is sent again to the main thread and the command stops at once, printing nothing about the dropped one."""
    (tmp_path / "lost.py").write_text(_LOST_INTERRUPT)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(tmp_path / "lost.py"), delivered], capture_output=True, text=True,
                         timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if delivered == "off":
        assert out.stdout.split() == ["finished", "1"] and "KeyboardInterrupt" in out.stderr, out
    else:
        assert out.stdout.split() == ["interrupted", "1"], out
        assert "KeyboardInterrupt" not in out.stderr and time.monotonic() - t0 < 15, out


def _tiny_run(tmp_path, n, capsys):
    rng = np.random.default_rng(3)
    np.save(tmp_path / "f.npy", rng.normal(size=(n, 8)).astype(np.float32))
    with pytest.raises(SystemExit) as e:
        main(["ingest", str(tmp_path / "f.npy"), "-o", str(tmp_path / "r.zarr")])
    assert e.value.code == 0, capsys.readouterr().err
    return tmp_path / "r.zarr"


def _code_err(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def test_one_face_is_refused_with_the_reason(tmp_path, local_client, capsys):
    run = _tiny_run(tmp_path, 1, capsys)
    code, err = _code_err(["cluster", run, "--method", "threshold", "--scheduler", local_client.scheduler.address], capsys)
    assert code == 2 and "holds 1 face; clustering needs at least 2" in err


def test_two_faces_with_k1_do_not_get_a_guessed_threshold(tmp_path, local_client, capsys):
    """0.1.4 derived a threshold from the one similarity there is and merged two unrelated faces."""
    run = _tiny_run(tmp_path, 2, capsys)
    addr = local_client.scheduler.address
    assert _code_err(["knn", run, "-k", 1, "--scheduler", addr], capsys)[0] == 0
    code, err = _code_err(["cluster", run, "--method", "threshold", "--scheduler", addr], capsys)
    assert code == 2 and "too few to derive a threshold" in err and "too few to cluster" in err
    assert not (run / "clusters").exists()


def test_k_close_to_n_warns(tmp_path, local_client, capsys, caplog):
    run = _tiny_run(tmp_path, 40, capsys)
    with caplog.at_level("WARNING", logger="facecluster.pipeline.stages.knn"):
        assert _code_err(["knn", run, "-k", 39, "--scheduler", local_client.scheduler.address], capsys)[0] == 0
    warned = [r.message for r in caplog.records if "neighbours for 40 faces" in r.message]
    assert len(warned) == 1 and "k=39" in warned[0] and "use -k below N/2" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="facecluster.pipeline.stages.knn"):
        assert _code_err(["knn", run, "-k", 10, "--scheduler", local_client.scheduler.address], capsys)[0] == 0
    assert not [r for r in caplog.records if "neighbours for 40 faces" in r.message]


def test_bin_read_with_half_its_dim_is_refused(tmp_path, capsys):
    """0.1.4 read a 64-d .bin given --dim 32 as 2N rows of 32 dims when no labels fixed N."""
    from facecluster.tasks.synth import make_splits

    feats = make_splits(3000, dim=64, seed=1)["train"][0].astype("<f4")
    feats.tofile(tmp_path / "f.bin")
    code, err = _code_err(["ingest", tmp_path / "f.bin", "--dim", 32, "-o", tmp_path / "half.zarr"], capsys)
    assert code == 2 and "every 2 consecutive rows look like different parts of one vector" in err
    assert "true dimension is probably 64" in err and not (tmp_path / "half.zarr").exists()
    code, err = _code_err(["ingest", tmp_path / "f.bin", "--dim", 64, "-o", tmp_path / "ok.zarr"], capsys)
    assert code == 0, err


def test_infomap_min_sim_outside_the_data_is_one_line(tmp_path, local_client, capsys):
    """``--min-sim`` no cosine can be: refused before any stage runs; outside the run's kNN similarities: refused
    after kNN (the range is the data's); with another method: refused. Each one line, exit 2."""
    run = _tiny_run(tmp_path, 300, capsys)
    addr = local_client.scheduler.address
    code, err = _code_err(["cluster", run, "--method", "infomap", "--min-sim", 3, "--scheduler", addr], capsys)
    assert code == 2 and "--min-sim 3 is not a cosine similarity" in err and len(err.strip().splitlines()) == 1
    assert not (run / "knn").exists()
    code, err = _code_err(["cluster", run, "--method", "threshold", "--min-sim", 0.5, "--scheduler", addr], capsys)
    assert code == 2 and "--min-sim is an option of --method infomap" in err
    assert _code_err(["knn", run, "-k", 10, "--scheduler", addr], capsys)[0] == 0
    code, err = _code_err(["cluster", run, "--method", "infomap", "--min-sim", 0.9999, "--scheduler", addr], capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("dask:")]
    assert code == 2 and len(lines) == 1 and "--min-sim 0.9999 is outside the range of the run's kNN similarities" in lines[0]
    assert not (run / "clusters").exists()
    code, err = _code_err(["cluster", run, "--method", "infomap", "--min-sim", 0.8, "--scheduler", addr], capsys)
    assert code == 0, err  # inside the range (0.52 .. 0.94 on these faces)
