"""`facecluster cluster --slurm` against a real one-node SLURM (munged + slurmctld + slurmd on 127.0.0.1).

dask-jobqueue submits real batch jobs with sbatch; their `dask worker`s run the
stages; the labels must equal a LocalCluster run's. Skipped (with the reason)
only where the Debian packages are not installed or the test is not root.
"""

from __future__ import annotations

import numpy as np
import pytest

from facecluster.pipeline.cli import main
from facecluster.pipeline.store import RunStore
from slurm_procs import slurm_cluster, unavailable_reason

_why_not = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as sp:
        yield sp


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.timeout(600)
def test_cluster_in_slurm_jobs_equals_local_cluster(slurm, tmp_path, monkeypatch, local_client, capsys):
    rng = np.random.default_rng(7)
    lab = rng.integers(0, 30, size=900)
    x = (rng.normal(size=(30, 24))[lab] + 0.4 * rng.normal(size=(900, 24))).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    for name in ("slurm", "local"):
        assert _cli(["ingest", tmp_path / "f.npy", "-o", tmp_path / f"{name}.zarr", "--chunk-rows", 200], capsys)[0] == 0
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.chdir(tmp_path)  # the jobs' slurm-JOBID.out logs land here
    code, out, err = _cli(["cluster", tmp_path / "slurm.zarr", "--method", "threshold", "--slurm", "--jobs", 1,
                           "--job-cores", 2, "--threads", 1, "--job-memory", "1GiB", "--job-walltime", "00:10:00"],
                          capsys)
    assert code == 0, err + slurm.logs()
    assert "dask: slurm (1 jobs of 2 cores)" in err
    logs = sorted(tmp_path.glob("slurm-*.out"))
    assert logs, "no SLURM job ran"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "Start worker" in text and "Registered to" in text, text[-2000:]
    # the command cancelled its jobs when it ended: none left but ones completing (CG)
    states = slurm.run("squeue", "-h", "-o", "%T").split()
    assert set(states) <= {"COMPLETING"}, states
    code, _, err = _cli(["cluster", tmp_path / "local.zarr", "--method", "threshold",
                         "--scheduler", local_client.scheduler.address], capsys)
    assert code == 0, err
    a = RunStore.open(tmp_path / "slurm.zarr", mode="r")
    b = RunStore.open(tmp_path / "local.zarr", mode="r")
    np.testing.assert_array_equal(a.array("knn/index")[:], b.array("knn/index")[:])
    np.testing.assert_array_equal(a.array("clusters")[:], b.array("clusters")[:])
