"""Issue 18 item 7: the CLI's smaller one-line answers (Ctrl-C, label options), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.cli import main


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
    from pipeline.store import RunStore

    rng = np.random.default_rng(0)
    np.save(tmp_path / "f.npy", rng.normal(size=(60000, 128)).astype(np.float32))
    env = dict(os.environ, FACECLUSTER_PROGRESS="0")
    run = tmp_path / "r.zarr"
    subprocess.run([sys.executable, "-m", "pipeline", "ingest", str(tmp_path / "f.npy"), "-o", str(run)],
                   check=True, env=env, capture_output=True)
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "cluster", str(run), "--method", "threshold", "--workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
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
