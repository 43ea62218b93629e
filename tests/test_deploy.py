"""deploy/ recipes: script syntax, manifests, Dockerfile order, and the recipes run for real on
127.0.0.1 (TLS scheduler/worker scripts; the SLURM and PBS batch scripts with stand-in srun /
remote shell)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dask_procs import free_port, stop_process_group
from facecluster.pipeline.cluster import MALLOC_ENV, ClusterError, check_workers, connect, detect_openblas_coretype, make_jobqueue_cluster
from facecluster.pipeline.commands._common import build_config
from facecluster.pipeline.config import Config, DaskConfig
from facecluster.pipeline.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VENV_BIN = str(Path(sys.executable).parent)
SCRIPTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".sh", ".sbatch", ".pbs"))
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _env(**extra) -> dict:
    """The test's environment for recipe scripts, without values the scripts must set themselves."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                        "DASK_SCHEDULER_ADDRESS", "THREADS_PER_WORKER", *MALLOC_ENV)}
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    env.update(extra)
    return env


def _group_members(pgid: int, grace: float = 10.0) -> list:
    """Processes still alive in process group ``pgid`` after up to ``grace`` seconds."""
    import time

    import psutil

    deadline = time.monotonic() + grace
    while True:
        alive = []
        for q in psutil.process_iter(["pid"]):
            try:
                if q.pid != os.getpid() and os.getpgid(q.pid) == pgid and q.status() != psutil.STATUS_ZOMBIE:
                    alive.append(q)
            except (ProcessLookupError, psutil.Error):
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# -- static checks ---------------------------------------------------------------------
def test_every_recipe_has_a_readme():
    for sub in ("local", "manual", "slurm", "pbs", "kubernetes", "docker"):
        assert (DEPLOY / sub / "README.md").stat().st_size > 300, sub
    text = (DEPLOY / "README.md").read_text()
    assert "OPENBLAS_CORETYPE" in text and "OMP_NUM_THREADS" in text


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(DEPLOY)) for p in SCRIPTS])
def test_shell_scripts_parse(script):
    assert len(SCRIPTS) >= 9
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if script.parent.name != "common":  # executed ones (common/ is sourced)
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert "set -euo pipefail" in script.read_text()


def test_kubernetes_manifests():
    docs = {}
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            docs[d["kind"]] = d
    assert set(docs) == {"DaskCluster", "Job", "PersistentVolumeClaim"}
    dc, job, pvc = docs["DaskCluster"], docs["Job"], docs["PersistentVolumeClaim"]
    assert dc["apiVersion"] == "kubernetes.dask.org/v1"
    name = dc["metadata"]["name"]
    worker = dc["spec"]["worker"]["spec"]["containers"][0]
    sched = dc["spec"]["scheduler"]["spec"]["containers"][0]
    assert worker["args"][:2] == ["dask", "worker"] and sched["args"][:2] == ["dask", "scheduler"]
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "1"
    assert {p["containerPort"] for p in sched["ports"]} == {8786, 8787}
    assert dc["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    driver = job["spec"]["template"]["spec"]["containers"][0]
    assert driver["args"][:2] == ["facecluster", "cluster"]
    # the operator names the scheduler Service "<cluster>-scheduler"
    assert driver["args"][driver["args"].index("--scheduler") + 1] == f"tcp://{name}-scheduler:8786"
    assert driver["image"] == worker["image"] == sched["image"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    for spec in (dc["spec"]["worker"]["spec"], job["spec"]["template"]["spec"]):
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_dockerfile_installs_torch_cpu_first():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    torch_at = next(i for i, ln in enumerate(lines) if "torch==2.13.0" in ln)
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_at]
    package_at = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install \".["))
    copy_at = min(i for i, ln in enumerate(lines) if ln.split()[:2] in (["COPY", d] for d in ("facecluster", "pipeline", "tasks")))
    assert torch_at < copy_at < package_at  # torch resolved before pip ever sees the package's deps
    assert "OMP_NUM_THREADS=1" in text and "OPENBLAS_NUM_THREADS=1" in text
    assert 'ENTRYPOINT ["/usr/local/bin/facecluster-entrypoint"]' in lines
    for src in (ln.split()[1] for ln in lines if ln.startswith("COPY ")):  # everything it copies exists
        assert (ROOT / src).exists(), src
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text()
    assert "!facecluster/**" in ignore and "!pipeline/**" in ignore and "!tasks/**" in ignore
    for d in ("facecluster", "pipeline", "tasks"):  # every folder of the package is copied
        assert any(ln.split()[:2] == ["COPY", d] for ln in lines), d


def test_local_config_loads():
    cfg = Config.load(str(DEPLOY / "local" / "facecluster.toml"), {})
    assert cfg.dask.threads_per_worker == 1 and cfg.dask.memory_limit == "auto"


def test_jobqueue_yaml_prologue_is_kept(tmp_path):
    pytest.importorskip("dask_jobqueue")
    import dask

    conf = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())
    assert set(conf["jobqueue"]) == {"slurm", "pbs"}
    site = conf["jobqueue"]["slurm"]["job-script-prologue"]
    # as a file in ~/.config/dask/ would: merged into the defaults, key by key
    flat = {f"jobqueue.{system}.{k}": v for system, keys in conf["jobqueue"].items() for k, v in keys.items()}
    with dask.config.set(flat):
        cluster = make_jobqueue_cluster(DaskConfig(jobqueue="slurm", job_cores=4, openblas_coretype="Haswell"))
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert site[0] in script and "export OPENBLAS_CORETYPE=Haswell" in script
    assert script.index(site[0]) < script.index("export OPENBLAS_CORETYPE") < script.index("dask_worker")


def test_worker_env_script():
    def run(**extra):
        r = subprocess.run(["bash", "-c", f"source {DEPLOY}/common/worker-env.sh && env"], env=_env(**extra),
                           capture_output=True, text=True, check=True)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    env = run()
    assert env.get("OPENBLAS_CORETYPE") == detect_openblas_coretype()
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert {k: env[k] for k in MALLOC_ENV} == MALLOC_ENV  # what the package gives the workers it starts
    env = run(OPENBLAS_CORETYPE="Zen", THREADS_PER_WORKER="2")
    assert env["OPENBLAS_CORETYPE"] == "Zen" and env["OMP_NUM_THREADS"] == "2"


@needs_openssl
def test_make_certs_keeps_ca_and_verifies(tmp_path):
    script = DEPLOY / "manual" / "make-certs.sh"
    subprocess.run(["bash", str(script), str(tmp_path), "a"], check=True, capture_output=True)
    ca = (tmp_path / "ca.pem").read_bytes()
    subprocess.run(["bash", str(script), str(tmp_path), "b"], check=True, capture_output=True)
    assert (tmp_path / "ca.pem").read_bytes() == ca  # old certificates stay valid
    for name in ("a", "b"):
        r = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / f"{name}.pem")],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "OK" in r.stdout
        assert oct((tmp_path / f"{name}.key").stat().st_mode & 0o777) == "0o600"
    assert subprocess.run(["bash", str(script)], capture_output=True).returncode == 2


# -- recipes run for real on 127.0.0.1 ----------------------------------------------------------
def _check_remote(client, n_workers: int) -> dict:
    from facecluster.tasks.metrics import pairwise_f

    reports = check_workers(client)
    assert len(reports) == n_workers
    for rep in reports.values():  # set by deploy/common/worker-env.sh, not inherited from the test
        assert rep["env"]["OPENBLAS_CORETYPE"] == detect_openblas_coretype()
        assert rep["env"]["OMP_NUM_THREADS"] == "1" and rep["nthreads"] == 1
    gt, pred = [0, 0, 1, 1], [0, 0, 0, 1]
    assert client.submit(pairwise_f, gt, pred, pure=False).result() == pytest.approx(pairwise_f(gt, pred))
    return reports


@needs_openssl
def test_manual_tls_recipe(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(DEPLOY / "manual" / "make-certs.sh"), str(certs)], check=True, capture_output=True)
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    env = _env(DASK_HOST="127.0.0.1", DASK_PORT=str(port), DASK_DASHBOARD="127.0.0.1:0",
               MEMORY_LIMIT="2GiB", LOCAL_DIR=str(tmp_path))
    procs = []
    try:
        with open(tmp_path / "scheduler.log", "wb") as log:
            procs.append(subprocess.Popen(["bash", str(DEPLOY / "manual" / "start-scheduler.sh"), str(certs)],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        with open(tmp_path / "worker.log", "wb") as log:
            procs.append(subprocess.Popen(["bash", str(DEPLOY / "manual" / "start-worker.sh"), address, str(certs), "1"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                          start_new_session=True))
        # the flags a user types (facecluster ... --scheduler tls://... --tls-ca-file ... --tls-cert ... --tls-key ...)
        flags = {"scheduler": address, "tls_ca_file": str(certs / "ca.pem"), "tls_cert": str(certs / "client.pem"),
                 "tls_key": str(certs / "client.key")}
        cfg = dataclasses.replace(build_config(None, flags).dask, connect_timeout=45.0)
        try:
            with connect(cfg, quiet=True) as client:
                assert client.scheduler.address == address
                _check_remote(client, 1)
        except ClusterError:
            print((tmp_path / "scheduler.log").read_text(), (tmp_path / "worker.log").read_text())
            raise
        # No certificates: a one-line BadInput naming the flags, before any network wait.
        with pytest.raises(BadInput) as e:
            with connect(DaskConfig(scheduler=address)):
                pass
        assert "--tls-ca-file" in str(e.value) and "\n" not in str(e.value)
        # A certificate from another CA: the scheduler refuses the handshake; one line.
        other = tmp_path / "other-ca"
        subprocess.run(["bash", str(DEPLOY / "manual" / "make-certs.sh"), str(other), "client"], check=True,
                       capture_output=True)
        bad = DaskConfig(scheduler=address, tls_ca_file=str(other / "ca.pem"), tls_cert=str(other / "client.pem"),
                         tls_key=str(other / "client.key"), connect_timeout=1.5)
        with pytest.raises(ClusterError) as e:
            with connect(bad):
                pass
        assert address in str(e.value) and "certificates" in str(e.value) and "\n" not in str(e.value)
    finally:
        for p in procs:
            stop_process_group(p)


FAKE_FACECLUSTER = r'''
import json, os, sys
from facecluster.pipeline.cluster import connect
from facecluster.pipeline.config import DaskConfig
sys.path.insert(0, os.environ["TESTS_DIR"])
from test_deploy import _check_remote
args = sys.argv[1:]
with connect(DaskConfig(scheduler=args[args.index("--scheduler") + 1]), quiet=True) as client:
    reports = _check_remote(client, int(os.environ["EXPECT_WORKERS"]))
json.dump({"args": args, "workers": len(reports)}, open(os.environ["FAKE_OUT"], "w"))
'''


def _fake_bin(tmp_path: Path) -> Path:
    """Stand-ins: `srun` runs its command here, a remote shell ignores the host, `facecluster` checks the cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "fake_facecluster.py").write_text(FAKE_FACECLUSTER)
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
        "fake-rsh": '#!/bin/bash\nshift\nexec "$@"\n',
        "facecluster": f'#!/bin/bash\nexec "{sys.executable}" "{tmp_path}/fake_facecluster.py" "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_batch_script_runs_scheduler_workers_and_driver(system, tmp_path):
    """The sbatch/qsub script on one 'node': scheduler, workers, wait, driver, teardown."""
    out = tmp_path / "driver.json"
    env = _env(DEPLOY_DIR=str(DEPLOY), SCRATCH_DIR=str(tmp_path), DASK_DASHBOARD="127.0.0.1:0",
               FAKE_OUT=str(out), TESTS_DIR=str(Path(__file__).parent), EXPECT_WORKERS="1",
               TMPDIR=str(tmp_path), WORKER_WAIT="60")
    env["PATH"] = os.pathsep.join([str(_fake_bin(tmp_path)), env["PATH"]])
    if system == "slurm":
        cmd = ["bash", str(DEPLOY / "slurm" / "facecluster.sbatch"), "run.zarr", "--model", "model"]
        env.update(SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="1", SLURM_MEM_PER_NODE="2048",
                   SLURM_JOB_ID="t1", SLURM_SUBMIT_DIR=str(tmp_path))
    else:
        nodefile = tmp_path / "nodes"
        nodefile.write_text("localhost\nlocalhost\n")  # one host, listed once per core
        cmd = ["bash", str(DEPLOY / "pbs" / "facecluster.pbs")]
        env.update(PBS_NODEFILE=str(nodefile), NCPUS="1", PBS_JOBID="t2", PBS_O_WORKDIR=str(tmp_path),
                   REMOTE_SHELL="fake-rsh", FACECLUSTER_ARGS="run.zarr --model model", MEMORY_LIMIT="2GiB")
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode(errors="replace")
        left = _group_members(p.pid)  # the script's EXIT trap must have stopped scheduler and workers
    finally:
        stop_process_group(p)  # whatever is left, it started (its own session)
    result = json.loads(out.read_text())
    assert result["args"][:3] == ["cluster", "run.zarr", "--model"] and result["workers"] == 1
    assert result["args"][-2] == "--scheduler" and result["args"][-1].startswith("tcp://")
    assert "dask workers ready" in output.decode()
    assert not left, f"processes left running after the script exited: {[q.pid for q in left]}"
