"""Typed configuration: TOML loading, flag overrides, one-line errors naming the key, `config show`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from facecluster.pipeline.commands._common import build_config
from facecluster.pipeline.config import Config, ConfigError

FACECLUSTER = shutil.which("facecluster") or str(Path(sys.executable).with_name("facecluster"))


def test_defaults_and_toml_round_trip(tmp_path):
    cfg = Config.load()
    assert cfg.ingest.chunk_rows == 16384 and cfg.knn.k == 80 and cfg.ingest.drop_invalid is False
    # to_toml() is valid TOML that loads back to the same configuration
    p = tmp_path / "all.toml"
    p.write_text(cfg.to_toml())
    assert Config.load(p).to_dict() == cfg.to_dict()
    assert tomllib.loads(cfg.to_toml())["knn"]["k"] == 80


def test_toml_values_and_flag_overrides(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[ingest]\nchunk_rows = 1000\ndrop_invalid = true\n[knn]\nk = 30\nmode = "exact"\n'
                 '[gcn]\nhidden = [64, 8]\n')
    cfg = Config.load(p)
    assert cfg.ingest.chunk_rows == 1000 and cfg.ingest.drop_invalid is True
    assert cfg.knn.k == 30 and cfg.knn.mode == "exact" and cfg.gcn.hidden == (64, 8)
    cfg = Config.load(p, {"knn.k": 12, "ingest.chunk_rows": None})  # None = flag not given
    assert cfg.knn.k == 12 and cfg.ingest.chunk_rows == 1000 and cfg.knn.mode == "exact"
    # the CLI helper: dask flags by name, mapped flags by the mapping; consumed kwargs removed
    kwargs = {"n_workers": 2, "chunk_rows": 77, "dim": None, "keep": "me"}
    cfg = build_config(p, kwargs, {"chunk_rows": "ingest.chunk_rows", "dim": "ingest.dim"})
    assert cfg.dask.n_workers == 2 and cfg.ingest.chunk_rows == 77 and cfg.ingest.dim is None
    assert kwargs == {"keep": "me"}
    # sections are frozen (hashable, safe to ship to workers)
    with pytest.raises(Exception):
        cfg.knn.k = 5  # type: ignore[misc]


@pytest.mark.parametrize("toml, key", [
    ("[knn]\nk = 0\n", "knn.k"),
    ("[knn]\nk = 2.5\n", "knn.k"),
    ("[knn]\nk = true\n", "knn.k"),
    ('[knn]\nmode = "fastest"\n', "knn.mode"),
    ("[ingest]\nchunk_rows = -1\n", "ingest.chunk_rows"),
    ('[ingest]\ndrop_invalid = "yes"\n', "ingest.drop_invalid"),
    ("[gcn]\niop_range = [0.8, 0.2]\n", "gcn.iop_range"),
    ("[gcn]\nhidden = [64, -1]\n", "gcn.hidden"),
    ("[proposals]\nthresholds = [0.5, 2.0]\n", "proposals.thresholds"),
    ('[edges]\nadapt = "yes"\n', "edges.adapt"),
    ('[edges]\nbalance = "all"\n', "edges.balance"),
    ('[add]\nrecluster = "all"\n', "add.recluster"),
    ("[knn]\nkk = 3\n", "knn.kk"),
    ("[kn]\nk = 3\n", "[kn]"),
    ("knn = 3\n", "[knn]"),
])
def test_invalid_values_name_the_key(tmp_path, toml, key):
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as e:
        Config.load(p)
    msg = str(e.value)
    assert key in msg and str(p) in msg and "\n" not in msg


def test_invalid_override_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"knn\.k: must be >= 1"):
        Config.load(None, {"knn.k": 0})
    with pytest.raises(ConfigError, match="configuration file not found"):
        Config.load(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("[knn\nk = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(tmp_path / "broken.toml")


def test_config_show_through_console_script(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("[knn]\nk = 30\n")
    r = subprocess.run([FACECLUSTER, "config", "show", "--config", str(p), "--set", "ingest.chunk_rows=512",
                        "--set", "knn.mode=ivf", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["knn"]["k"] == 30 and shown["knn"]["mode"] == "ivf" and shown["ingest"]["chunk_rows"] == 512
    r = subprocess.run([FACECLUSTER, "config", "show"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and tomllib.loads(r.stdout)["ingest"]["chunk_rows"] == 16384
    r = subprocess.run([FACECLUSTER, "config", "show", "--set", "knn.k=0"], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "knn.k" in lines[0]
