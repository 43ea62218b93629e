"""Options shared by commands: configuration file, flag overrides, Dask connection."""

from __future__ import annotations

import functools

import click

from ..config import Config


def config_option(f):
    """``--config run.toml``: the TOML file every stage parameter can be set in."""
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="TOML configuration file (flags override it; see `facecluster config show`).")(f)


def dask_options(f):
    """Where the work runs: an existing scheduler, SLURM/PBS, or a LocalCluster (default)."""
    opts = [
        click.option("--scheduler", default=None, metavar="ADDR",
                     help="Existing Dask scheduler, e.g. tcp://HOST:8786 (default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster)."),
        click.option("--workers", "n_workers", type=int, default=None, help="LocalCluster worker processes (default: one per core)."),
        click.option("--threads", "threads_per_worker", type=int, default=None, help="Threads per worker process (default 1)."),
        click.option("--memory-limit", default=None, help="Memory per LocalCluster worker, e.g. 4GiB (default: auto)."),
        click.option("--slurm", "jobqueue", flag_value="slurm", default=None, help="Start workers as SLURM jobs (dask-jobqueue)."),
        click.option("--pbs", "jobqueue", flag_value="pbs", help="Start workers as PBS jobs (dask-jobqueue)."),
        click.option("--jobs", type=int, default=None, help="Number of SLURM/PBS jobs."),
        click.option("--job-cores", type=int, default=None, help="Cores per SLURM/PBS job."),
        click.option("--job-memory", default=None, help="Memory per SLURM/PBS job, e.g. 32GiB."),
        click.option("--job-walltime", default=None, help="Walltime per SLURM/PBS job, e.g. 02:00:00."),
        click.option("--job-queue", default=None, help="SLURM partition / PBS queue."),
        click.option("--job-account", default=None, help="Account / project to charge."),
        click.option("--tls-ca-file", default=None, type=click.Path(dir_okay=False), help="CA certificate for a tls:// scheduler (else dask config distributed.comm.tls.ca-file)."),
        click.option("--tls-cert", default=None, type=click.Path(dir_okay=False), help="Client certificate (PEM) for a tls:// scheduler."),
        click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="Client private key (PEM) for a tls:// scheduler."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


DASK_KEYS = ("scheduler", "n_workers", "threads_per_worker", "memory_limit", "jobqueue", "jobs", "job_cores",
             "job_memory", "job_walltime", "job_queue", "job_account", "tls_ca_file", "tls_cert", "tls_key")


def build_config(config_path, kwargs: dict, mapping: dict[str, str] | None = None) -> Config:
    """Config from the TOML file plus the flags given (``mapping``: kwarg -> "section.key").

    Dask flags are picked from ``kwargs`` by name; flags left unset (None) do not
    override the file. Consumed kwargs are removed from ``kwargs``.
    """
    overrides = {}
    for key in DASK_KEYS:
        if key in kwargs:
            overrides[f"dask.{key}"] = kwargs.pop(key)
    for kw, dotted in (mapping or {}).items():
        if kw in kwargs:
            overrides[dotted] = kwargs.pop(kw)
    return Config.load(config_path, overrides)


def pass_config(mapping: dict[str, str] | None = None):
    """Decorator: replace ``config_path`` + mapped flags by a ``cfg: Config`` argument."""

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, config_path=None, **kwargs):
            cfg = build_config(config_path, kwargs, mapping)
            return f(*args, cfg=cfg, **kwargs)

        return wrapper

    return deco
