"""Every installed import name lives under ``facecluster`` (issue 15, item 2).

The repository keeps its ``pipeline/`` and ``tasks/`` folders; the packaging maps them to
``facecluster.pipeline`` and ``facecluster.tasks``. A ``tasks.py`` or ``pipeline.py`` in the
working directory (Celery's and invoke's convention) must not shadow any of it: not in the
driver, not in LocalCluster worker processes, not in `dask worker` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHADOW = "raise ImportError('the shadowing {name}.py in the working directory was imported')\n"


def _shadowed_dir(path: Path) -> Path:
    """``path`` holding a tasks.py and a pipeline.py that fail loudly when imported."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tasks", "pipeline"):
        (path / f"{name}.py").write_text(SHADOW.format(name=name))
    return path


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("facecluster")
    assert script.exists(), "the console script is installed with the package"
    return [str(script)]


def _run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "FACECLUSTER_PROGRESS": "0", **(env or {})})
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    assert "shadowing" not in p.stderr
    return p.stdout


def test_packaging_names_every_package_folder():
    """pyproject lists exactly the package folders, each under facecluster (nothing else at the top level)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, mapping = set(conf["packages"]), conf["package-dir"]
    assert {p.split(".")[0] for p in packages} == {"facecluster"}
    assert mapping == {"facecluster.pipeline": "pipeline", "facecluster.tasks": "tasks"}
    found = {"facecluster"}
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name,) + rel))
    assert packages == found
    # besides the .py files, only the general model's files ship (the wheel test checks they are in it)
    assert conf.get("package-data") == {"facecluster.pipeline": ["models/general/config.json", "models/general/*.pt"]}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"facecluster": "facecluster.pipeline.cli:main"}


def test_import_names_resolve_to_this_checkout():
    import facecluster
    from facecluster import pipeline, tasks

    assert Path(facecluster.__file__).parent == ROOT / "facecluster"
    assert Path(pipeline.__file__).parent == ROOT / "pipeline"
    assert Path(tasks.__file__).parent == ROOT / "tasks"
    assert facecluster.__version__ == pipeline.__version__


@pytest.mark.slow
def test_wheel_holds_only_facecluster_and_workers_from_it_agree(tmp_path):
    """`pip wheel .`: one top-level package; the code digest of the wheel's tree equals this checkout's."""
    from facecluster.pipeline.cluster import code_digest

    src, out = tmp_path / "src", tmp_path / "wheel"
    for name in ("pyproject.toml", "README.md"):  # built from a copy: setuptools writes build/ into the source tree
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for folder in ("facecluster", "pipeline", "tasks"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)], cwd=tmp_path)
    (whl,) = out.glob("facecluster-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        assert tops == {"facecluster", whl.name.split("-py")[0] + ".dist-info"}
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        assert "facecluster = facecluster.pipeline.cli:main" in entry
        # every module of the checkout is in the wheel, at its namespaced path
        for folder in ("pipeline", "tasks"):
            for f in (ROOT / folder).rglob("*.py"):
                assert f"facecluster/{folder}/{f.relative_to(ROOT / folder).as_posix()}" in names
        # and the general model's files: a non-editable install clusters without --model
        for f in ("config.json", "edges.pt", "gcnd.pt", "gcns.pt"):
            assert f"facecluster/pipeline/models/general/{f}" in names
        site = _shadowed_dir(tmp_path / "site")
        z.extractall(site)
    # a process importing the wheel's files (first on its path) from a shadowed directory: same digest
    got = _run([sys.executable, "-c", "import facecluster.pipeline.cluster as c; print(c.__file__); print(c.code_digest())"],
               cwd=site, env={"PYTHONPATH": str(site)}).split()
    assert got[0] == str(site / "facecluster" / "pipeline" / "cluster.py")
    assert got[1] == code_digest()


@pytest.mark.slow
def test_tasks_py_and_pipeline_py_in_the_working_directory(tmp_path):
    """In a directory holding tasks.py and pipeline.py: import, console script, `python -m`, LocalCluster."""
    work = _shadowed_dir(tmp_path / "work")
    out = _run([sys.executable, "-c", "import facecluster, facecluster.pipeline.stages.knn, facecluster.tasks.knn; "
                "print(facecluster.__version__)"], cwd=work)
    assert out.strip() == __import__("facecluster").__version__
    assert "facecluster, version" in _run(_cli() + ["--version"], cwd=work)
    assert "Commands" in _run([sys.executable, "-m", "facecluster", "--help"], cwd=work)
    _run(_cli() + ["synth", "600", "-o", "data", "--seed", "3"], cwd=work)
    _run(_cli() + ["ingest", "data/test/features.npy", "--labels", "data/test/labels.npy", "-o", "run.zarr"], cwd=work)
    # `python -m` puts the working directory first on the driver's path, and LocalCluster's spawned
    # workers inherit that path: both import facecluster.tasks beside the shadowing tasks.py
    out = _run([sys.executable, "-m", "facecluster", "cluster", "run.zarr", "--method", "threshold", "--workers", "2"],
               cwd=work)
    assert "clusters" in out
    # the Python API from `python -c` (the working directory first on the path), its own LocalCluster
    api = _run([sys.executable, "-c", "import numpy as np, facecluster; X = np.load('data/test/features.npy'); "
                "print(facecluster.FaceClusterer(method='threshold').fit_predict(X).tolist())"], cwd=work)
    labels = np.load(work / "data" / "test" / "labels.npy")
    import zarr

    clusters = zarr.open_group(str(work / "run.zarr"), mode="r")["clusters"][:]
    assert clusters.shape == labels.shape and clusters.min() >= 0
    assert json.loads(api) == clusters.tolist()  # the same labels as the CLI


@pytest.mark.slow
def test_dask_worker_processes_in_a_shadowed_directory(tmp_path):
    """`dask worker` subprocesses whose working directory holds tasks.py / pipeline.py run facecluster tasks."""
    from dask_procs import dask_cluster

    from facecluster.pipeline.cluster import connect
    from facecluster.tasks.synth import make_faces

    procs_dir = tmp_path / "procs"
    for i in range(2):
        _shadowed_dir(procs_dir / f"worker-{i}")
    x, _ = make_faces(400, 32, seed=1)
    np.save(tmp_path / "f.npy", x)
    work = _shadowed_dir(tmp_path / "work")
    with dask_cluster(n_workers=2, workdir=procs_dir) as procs:
        with connect(procs.dask_config()) as client:  # connect checks every worker's facecluster code digest
            paths = client.run(lambda: __import__("facecluster.tasks.knn", fromlist=["x"]).__file__)
            assert set(paths.values()) == {str(ROOT / "tasks" / "knn.py")}
        _run(_cli() + ["ingest", str(tmp_path / "f.npy"), "-o", "run.zarr"], cwd=work)
        _run(_cli() + ["cluster", "run.zarr", "--method", "threshold", *procs.cli_args()], cwd=work)
