"""Shared fixtures. A LocalCluster is expensive to start (~3-5 s): tests share one per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LFW = SHARED_DATA / "lfw-sface"

os.environ.setdefault("FACECLUSTER_PROGRESS", "0")


def _local_client(n_workers: int):
    """A real distributed.LocalCluster of ``n_workers`` processes x 1 thread, and its client."""
    from distributed import Client, LocalCluster

    from facecluster.pipeline.cluster import configure_blas_env

    configure_blas_env("auto")
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="4GiB") as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def local_client():
    """A real LocalCluster with 2 worker processes x 1 thread."""
    yield from _local_client(2)


@pytest.fixture(scope="session")
def single_worker_client():
    """A real LocalCluster with 1 worker process (worker-count invariance tests)."""
    yield from _local_client(1)


@pytest.fixture(scope="module")
def dask_subprocess_cluster(tmp_path_factory):
    """`dask scheduler` + 2 `dask worker` subprocesses (tcp, nanny, 1 thread) on 127.0.0.1.

    Yields a ``dask_procs.DaskProcs``: ``.address``, ``.cli_args()`` (flags for the
    facecluster CLI), ``.dask_config()`` (for ``facecluster.pipeline.cluster.connect``), ``.client()``.
    Module-scoped: tests that kill workers should start their own with
    ``dask_procs.dask_cluster(...)``.
    """
    from dask_procs import dask_cluster

    with dask_cluster(n_workers=2, workdir=tmp_path_factory.mktemp("dask-procs")) as procs:
        yield procs


SMALL_CONFIG = {"knn": {"k": 20}, "proposals": {"preset": "fast"},
                "gcn": {"hidden": [16, 8], "epochs": 2, "lr": 0.003, "dropout": 0.1, "score_batch": 64}}


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, local_client):
    """The built-in data (32-d train/test splits, disjoint identities) and a small model trained on the
    train split with the Python API (``facecluster.train``), with its configuration as a TOML file.

    Returns a dict: ``train`` / ``test`` ((features, labels) arrays), ``config`` (TOML path, for the API
    and the CLI alike), ``model`` (the model directory), ``tmp`` (the fixture's folder).
    """
    import facecluster
    from facecluster.pipeline.config import Config
    from facecluster.tasks.synth import make_splits

    tmp = tmp_path_factory.mktemp("small-model")
    splits = make_splits(2400, dim=32, seed=5)
    config = tmp / "small.toml"
    config.write_text(Config.from_dict(SMALL_CONFIG).to_toml())
    model = facecluster.train(*splits["train"], out=tmp / "model", config=config, client=local_client)
    return {"train": splits["train"], "test": splits["test"], "config": config, "model": model, "tmp": tmp}
