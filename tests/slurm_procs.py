"""A real one-node SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd as subprocesses.

Debian's ``slurm-wlm`` daemons (``slurmctld``, ``slurmd``, ``slurm-client``) and ``munge``
run from a temporary folder with their own munge key, socket, ports, state and
logs; nothing under /etc or /run is used or changed. Clients (``sbatch``, and
dask-jobqueue through it) find the cluster through ``SLURM_CONF``.

slurmd launches jobs as the submitting user and must run as root, so the cluster
is only available to root (CI runs as root; ``.ci/run`` installs the packages).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dask_procs import free_port, stop_process_group

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge (Debian; .ci/run does it when CI=true)"


def unavailable_reason() -> str | None:
    """Why a SLURM cluster cannot be started here (None when it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM/munge not installed (missing {', '.join(missing)}): {INSTALL}"
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs; the SLURM test runs as root (as in CI)"
    return None


@dataclass
class SlurmProcs:
    workdir: Path
    conf: Path
    env: dict
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> str:
        return subprocess.run(list(cmd), env=self.env, check=check, capture_output=True, text=True, timeout=60).stdout

    def logs(self) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.workdir / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run("scancel", "--full", "-u", str(os.getuid()), check=False)
        for p in reversed(self.procs):
            stop_process_group(p)


def _node_memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    return max(1024, min(8192, total_kb // 1024 // 2))


def _wait(pred, timeout: float, what: str, logs) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return
        time.sleep(0.2)
    raise RuntimeError(f"SLURM test cluster: {what} not ready after {timeout:g}s\n{logs()}")


@contextlib.contextmanager
def slurm_cluster(workdir: str | os.PathLike, cpus: int = 2, timeout: float = 60) -> Iterator[SlurmProcs]:
    """Start munged + slurmctld + slurmd (one node ``fcnode``, ``cpus`` CPUs) and stop them after."""
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)  # munged wants its socket's folder searchable by every user
    for sub in ("state", "spool"):
        (d / sub).mkdir(exist_ok=True)
    subprocess.run(["mungekey", "-c", "-k", str(d / "munge.key")], check=True, capture_output=True)
    sock = d / "munge.sock"
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=fctest",
        "SlurmctldHost=localhost(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "AuthType=auth/munge",
        f"AuthInfo=socket={sock}",
        "CredType=cred/munge",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}",
        f"SlurmdLogFile={d / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",  # no cgroups needed (containers)
        "TaskPlugin=task/none",
        "ReturnToService=2",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        f"NodeName=fcnode NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_node_memory_mb()} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    env = dict(os.environ, SLURM_CONF=str(conf))
    sp = SlurmProcs(d, conf, env)

    def start(cmd, name):
        out = open(d / f"{name}.out", "wb")
        sp.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start(["munged", "-F", "-f", "-S", str(sock), f"--key-file={d / 'munge.key'}", f"--log-file={d / 'munged.log'}",
               f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"], "munged")
        _wait(sock.exists, timeout, "munged", sp.logs)
        start(["slurmctld", "-D", "-f", str(conf)], "slurmctld")
        start(["slurmd", "-D", "-N", "fcnode", "-f", str(conf)], "slurmd")
        _wait(lambda: sp.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle", timeout, "node fcnode", sp.logs)
        yield sp
    finally:
        sp.close()

