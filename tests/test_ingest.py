"""Ingest: readers, validate_block, the stage and `facecluster ingest` through the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from facecluster.pipeline.config import IngestConfig
from facecluster.pipeline.errors import BadInput
from facecluster.pipeline.stages.ingest import run_ingest
from facecluster.pipeline.store import RunStore
from facecluster.tasks.io import open_reader, read_labels, validate_block, write_meta

LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw-sface"

FACECLUSTER = shutil.which("facecluster") or str(Path(sys.executable).with_name("facecluster"))
N, D = 203, 16


def oracle(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.sqrt((x * x).sum(axis=1, keepdims=True))).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((N, D)) * rng.uniform(0.01, 50, size=(N, 1))).astype(np.float32)
    lab = rng.integers(0, 20, size=N).astype(np.int64)
    return x, lab


def snapshot(path: Path):
    """Bytes + mtime of every file under path (the input must never change)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def write_input(fmt: str, d: Path, x, lab):
    """Write x (and labels) in format fmt; return (feats path, labels path or None, cfg kwargs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "npy":
        np.save(d / "f.npy", x)
        np.save(d / "l.npy", lab)
        return d / "f.npy", d / "l.npy", {}
    if fmt == "npz":
        np.savez(d / "f.npz", other=np.zeros(3), feats=x)
        write_meta(d / "l.meta", lab)
        return d / "f.npz", d / "l.meta", {}
    if fmt == "npz_compressed":
        np.savez_compressed(d / "f.npz", features=x.astype(np.float64))
        np.save(d / "l.npy", lab)
        return d / "f.npz", d / "l.npy", {}
    if fmt == "bin_dim":
        x.astype("<f4").tofile(d / "f.bin")
        return d / "f.bin", None, {"dim": x.shape[1]}
    if fmt == "bin_meta":  # N from the .meta of the same stem (the reference layout)
        x.astype("<f4").tofile(d / "f.bin")
        write_meta(d / "f.meta", lab)
        return d / "f.bin", None, {}
    if fmt == "bin_labels":
        x.astype("<f4").tofile(d / "f.bin")
        write_meta(d / "labels.meta", lab)
        return d / "f.bin", d / "labels.meta", {}
    if fmt == "zarr":
        import zarr

        z = zarr.create_array(str(d / "f.zarr"), shape=x.shape, chunks=(37, x.shape[1]), dtype="f4")
        z[:] = x
        np.save(d / "l.npy", lab)
        return d / "f.zarr", d / "l.npy", {}
    if fmt == "parquet_fixed":
        t = pa.table({"id": np.arange(len(x)), "emb": pa.array(list(x), type=pa.list_(pa.float32(), x.shape[1])),
                      "label": lab})
        pq.write_table(t, d / "f.parquet", row_group_size=60)
        return d / "f.parquet", None, {}
    if fmt == "parquet_list":
        t = pa.table({"vec": pa.array([list(map(float, r)) for r in x], type=pa.list_(pa.float64())),
                      "person": lab})
        pq.write_table(t, d / "f.parquet", row_group_size=50)
        return d / "f.parquet", None, {"column": "vec", "label_column": "person"}
    raise AssertionError(fmt)


FORMATS = ["npy", "npz", "npz_compressed", "bin_dim", "bin_meta", "bin_labels", "zarr", "parquet_fixed", "parquet_list"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(tmp_path, data, fmt):
    x, lab = data
    feats, labels, kw = write_input(fmt, tmp_path, x, lab)
    before = snapshot(feats)
    out = tmp_path / "run.zarr"
    s = run_ingest(feats, out, labels=labels, cfg=IngestConfig(chunk_rows=50, **kw))
    assert snapshot(feats) == before
    store = RunStore.open(out)
    f = store.array("features")
    assert f.dtype == np.float32 and f.shape == (N, D) and f.chunks == (50, D)
    np.testing.assert_array_equal(f[:], oracle(x))
    np.testing.assert_array_equal(store.array("input_rows")[:], np.arange(N))
    has_labels = fmt not in ("bin_dim", "bin_meta")
    assert store.has("labels") == has_labels and s["has_labels"] == has_labels
    if has_labels:
        np.testing.assert_array_equal(store.array("labels")[:], lab)
        assert store.array("labels").chunks == (50,)
    rec = store.record("ingest")
    assert rec["complete"] and rec["summary"]["n"] == N and rec["summary"]["dim"] == D
    assert rec["summary"]["chunk_rows"] == 50 and rec["summary"]["dropped"] == {}
    assert not store.has("_tmp") or not list(store.root["_tmp"].keys())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.zarr")]


def test_stored_values_do_not_depend_on_chunk_size(tmp_path, data):
    x, _ = data
    np.save(tmp_path / "f.npy", x)
    res = []
    for r in (1, 7, 64, 1000):
        out = tmp_path / f"r{r}.zarr"
        run_ingest(tmp_path / "f.npy", out, cfg=IngestConfig(chunk_rows=r))
        a = RunStore.open(out).array("features")
        assert a.chunks[0] == min(r, N)
        res.append(a[:])
    for other in res[1:]:
        assert np.array_equal(res[0].view(np.uint32), other.view(np.uint32))


def test_drop_invalid_maps_rows(tmp_path, data):
    x, lab = data
    x = x.copy()
    x[3, 2] = np.nan
    x[10] = 0
    x[11, 0] = np.inf
    x[150, 5] = -np.inf
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "l.npy", lab)
    s = run_ingest(tmp_path / "f.npy", tmp_path / "r.zarr", labels=tmp_path / "l.npy",
                   cfg=IngestConfig(chunk_rows=32, drop_invalid=True))
    keep = np.setdiff1d(np.arange(N), [3, 10, 11, 150])
    store = RunStore.open(tmp_path / "r.zarr")
    np.testing.assert_array_equal(store.array("input_rows")[:], keep)
    np.testing.assert_array_equal(store.array("features")[:], oracle(x[keep]))
    np.testing.assert_array_equal(store.array("labels")[:], lab[keep])
    assert s["n"] == len(keep) and s["n_input"] == N and s["n_dropped"] == 4
    assert s["dropped"] == {"all_zero": 1, "nan_or_inf": 3}
    assert store.array("features").shape == (len(keep), D)


def test_drop_invalid_ragged_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [[1.0, 2.0, 2.0], [1.0, 0.0], None, [0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1.0, None, 1.0]]
    pq.write_table(pa.table({"v": pa.array(rows, type=pa.list_(pa.float32()))}), tmp_path / "f.parquet")
    s = run_ingest(tmp_path / "f.parquet", tmp_path / "r.zarr", cfg=IngestConfig(drop_invalid=True, chunk_rows=2))
    store = RunStore.open(tmp_path / "r.zarr")
    np.testing.assert_array_equal(store.array("input_rows")[:], [0, 4])
    np.testing.assert_allclose(store.array("features")[:], [[1 / 3, 2 / 3, 2 / 3], [0.6, 0.8, 0.0]], rtol=1e-6)
    assert s["dropped"] == {"all_zero": 1, "nan_or_inf": 1, "wrong_dim": 2}


def test_all_rows_invalid_is_bad_input(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(BadInput, match="all 5 rows are invalid"):
        run_ingest(tmp_path / "f.npy", tmp_path / "r.zarr", cfg=IngestConfig(drop_invalid=True))
    assert not (tmp_path / "r.zarr").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["f.npy"]


def test_rerun_is_skipped_and_changed_input_reruns(tmp_path, data):
    x, lab = data
    f = tmp_path / "f.npy"
    np.save(f, x)
    out = tmp_path / "r.zarr"
    s1 = run_ingest(f, out, cfg=IngestConfig(chunk_rows=64))
    d1 = RunStore.open(out).record("ingest")["digest"]
    s2 = run_ingest(f, out, cfg=IngestConfig(chunk_rows=64))
    assert not s1["skipped"] and s2["skipped"]
    assert RunStore.open(out).record("ingest")["digest"] == d1
    # a different parameter re-runs
    s3 = run_ingest(f, out, cfg=IngestConfig(chunk_rows=32))
    assert not s3["skipped"] and RunStore.open(out).array("features").chunks == (32, D)
    d3 = RunStore.open(out).record("ingest")["digest"]
    assert d3 != d1
    # a changed input (same shape) re-runs and stores the new values
    x2 = x[::-1].copy()
    np.save(f, x2)
    os.utime(f, ns=(1, 1))  # even with an old mtime the content hash changes
    s4 = run_ingest(f, out, cfg=IngestConfig(chunk_rows=32))
    assert not s4["skipped"]
    store = RunStore.open(out)
    assert store.record("ingest")["digest"] != d3
    np.testing.assert_array_equal(store.array("features")[:], oracle(x2))
    # adding labels re-runs too
    np.save(tmp_path / "l.npy", lab)
    s5 = run_ingest(f, out, labels=tmp_path / "l.npy", cfg=IngestConfig(chunk_rows=32))
    assert not s5["skipped"] and RunStore.open(out).has("labels")


def test_bad_input_in_existing_store_leaves_no_partial_arrays(tmp_path, data):
    x, _ = data
    f = tmp_path / "f.npy"
    np.save(f, x)
    out = tmp_path / "r.zarr"
    run_ingest(f, out, cfg=IngestConfig(chunk_rows=64))
    x2 = x.copy()
    x2[190, 1] = np.nan  # late bad row: earlier blocks were already written under _tmp
    np.save(f, x2)
    with pytest.raises(BadInput, match=r"row 190 contains NaN"):
        run_ingest(f, out, cfg=IngestConfig(chunk_rows=64))
    store = RunStore.open(out)
    rec = store.record("ingest")
    assert not rec["complete"] and rec["status"] == "failed"
    assert not (out / "_tmp").exists() or not any(p.name != "zarr.json" for p in (out / "_tmp").iterdir())


def test_bin_reader_reads_blocks_without_whole_file(tmp_path, data):
    x, _ = data
    x.astype("<f4").tofile(tmp_path / "f.bin")
    r = open_reader(tmp_path / "f.bin", dim=D)
    sizes = [len(b) for _, b, _ in r.blocks(50)]
    assert sizes == [50, 50, 50, 50, 3]


def test_existing_non_store_directory_is_refused(tmp_path, data):
    x, _ = data
    np.save(tmp_path / "f.npy", x)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="not a facecluster run store"):
        run_ingest(tmp_path / "f.npy", tmp_path / "out")
    with pytest.raises(BadInput, match="refusing to overwrite"):
        run_ingest(tmp_path / "f.npy", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# -- validate_block against a numpy oracle ----------------------------------------------
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(0, 12), st.just(5)),
                  elements=st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.sampled_from([0.0, np.nan, np.inf, -np.inf]))),
       st.integers(1, 5))
def test_validate_block_matches_oracle(x, split):
    normed, bad, reasons = validate_block(x, 0, 5)
    fin = np.isfinite(x).all(axis=1)
    zero = fin & ~(x != 0).any(axis=1)
    exp_bad = ~fin | zero
    np.testing.assert_array_equal(bad, exp_bad)
    np.testing.assert_array_equal(reasons, np.where(~fin, "nan_or_inf", "all_zero")[exp_bad])
    good = ~exp_bad
    np.testing.assert_array_equal(normed[good], oracle(x[good]))
    assert not normed[bad].any()
    # row results do not depend on how the rows are cut into blocks
    parts = [validate_block(x[i:i + split], i, 5)[0] for i in range(0, len(x), split)]
    if parts:
        assert np.array_equal(np.concatenate(parts).view(np.uint32), normed.view(np.uint32))


def test_validate_block_extremes_and_wrong_dim():
    x = np.array([[1e-200, 1e-200], [1e200, -1e200], [3.0, 4.0]], dtype=np.float64)
    normed, bad, _ = validate_block(x, 0, 2)
    assert not bad.any()
    np.testing.assert_allclose(normed, [[0.70710677, 0.70710677], [0.70710677, -0.70710677], [0.6, 0.8]], rtol=1e-6)
    _, bad, reasons = validate_block(np.ones((3, 4), np.float32), 0, 5)
    assert bad.all() and list(reasons) == ["wrong_dim"] * 3
    _, bad, reasons = validate_block(np.ones((3, 2), np.int8), 0, 2, lengths=[2, 1, 2])
    assert list(bad) == [False, True, False] and list(reasons) == ["wrong_dim"]


# -- labels ------------------------------------------------------------------------------
def test_labels_meta_round_trip_and_errors(tmp_path):
    lab = np.array([5, 0, -1, 123456789012], dtype=np.int64)
    write_meta(tmp_path / "a.meta", lab)
    assert (tmp_path / "a.meta").read_text() == "5\n0\n-1\n123456789012\n"
    np.testing.assert_array_equal(read_labels(tmp_path / "a.meta"), lab)
    (tmp_path / "b.meta").write_text("1\n2\n\n")  # blank trailing line is fine
    np.testing.assert_array_equal(read_labels(tmp_path / "b.meta"), [1, 2])
    (tmp_path / "c.meta").write_text("1\nfoo\n3\n")
    with pytest.raises(ValueError, match=r"c\.meta: line 2 is 'foo'"):
        read_labels(tmp_path / "c.meta")
    np.save(tmp_path / "f.npy", np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="not an integer"):
        read_labels(tmp_path / "f.npy")
    np.save(tmp_path / "g.npy", np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="1-D"):
        read_labels(tmp_path / "g.npy")


# -- the console script: exit codes and one-line messages ---------------------------------
def _bad_cases(tmp: Path, x, lab):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = {}

    def npy(name, arr):
        np.save(tmp / name, arr)
        return tmp / name

    xn = x.copy(); xn[17, 3] = np.nan
    cases["nan"] = ([npy("nan.npy", xn)], "nan.npy", r"row 17 contains NaN or infinite")
    xi = x.copy(); xi[42, 0] = -np.inf
    cases["inf"] = ([npy("inf.npy", xi)], "inf.npy", r"row 42 contains NaN or infinite")
    xz = x.copy(); xz[99] = 0
    cases["zero"] = ([npy("zero.npy", xz)], "zero.npy", r"row 99 is all zeros")
    cases["wrong_dim_flag"] = ([npy("ok.npy", x), "--dim", "17"], "ok.npy", r"16 dims but --dim is 17")
    ragged = [list(map(float, r)) for r in x]
    ragged[5] = ragged[5][:-1]
    pq.write_table(pa.table({"v": pa.array(ragged)}), tmp / "ragged.parquet")
    cases["wrong_dim_row"] = ([tmp / "ragged.parquet"], "ragged.parquet", r"row 5 has 15 values, expected 16")
    with open(tmp / "trunc.bin", "wb") as fh:
        fh.write(x.astype("<f4").tobytes()[:-8])
    cases["truncated_bin"] = ([tmp / "trunc.bin", "--dim", "16"], "trunc.bin", r"row 202 is incomplete")
    write_meta(tmp / "short.meta", lab[:-1])
    cases["labels_length"] = ([npy("ok2.npy", x), "--labels", tmp / "short.meta"], "short.meta", r"202 labels for 203 feature rows")
    (tmp / "empty.bin").write_bytes(b"")
    cases["empty_bin"] = ([tmp / "empty.bin", "--dim", "16"], "empty.bin", r"empty file")
    cases["empty_npy"] = ([npy("empty.npy", np.zeros((0, 16), np.float32))], "empty.npy", r"empty file")
    pq.write_table(pa.table({"name": ["a", "b"], "v": pa.array([[1.0], [2.0]])}), tmp / "str.parquet")
    cases["non_numeric_column"] = ([tmp / "str.parquet", "--column", "name"], "str.parquet", r"non-numeric column")
    cases["non_numeric_npy"] = ([npy("str.npy", np.array([["a", "b"]]))], "str.npy", r"not numbers")
    (tmp / "f.csv").write_text("1,2\n")
    cases["unknown_extension"] = ([tmp / "f.csv"], "f.csv", r"unknown feature format '.csv'")
    (tmp / "bad.meta").write_text("1\n2\nthree\n")
    cases["bad_meta_line"] = ([npy("ok3.npy", x[:3]), "--labels", tmp / "bad.meta"], "bad.meta", r"line 3 is 'three'")
    return cases


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, data):
    x, lab = data
    cases = _bad_cases(tmp_path, x, lab)
    before = {k: snapshot(Path(v[0][0])) for k, v in cases.items()}
    # run the console scripts concurrently: each one pays the interpreter start-up
    procs = {k: subprocess.Popen([FACECLUSTER, "ingest", *map(str, args), "-o", str(tmp_path / f"{k}.zarr")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (args, _, _) in cases.items()}
    import re

    failures = []
    for k, p in procs.items():
        out, err = p.communicate(timeout=120)
        _, fname, pattern = cases[k]
        lines = err.strip().splitlines()
        ok = (p.returncode == 2 and len(lines) == 1 and fname in lines[0] and re.search(pattern, lines[0])
              and lines[0].startswith("error: "))
        if not ok:
            failures.append(f"{k}: rc={p.returncode} stderr={err!r}")
        if (tmp_path / f"{k}.zarr").exists() or list(tmp_path.glob(f".{k}.zarr.*")):
            failures.append(f"{k}: left an output behind")
        if snapshot(Path(cases[k][0][0])) != before[k]:
            failures.append(f"{k}: input modified")
    assert not failures, "\n".join(failures)


def test_cli_success_summary_and_skip(tmp_path, data):
    x, lab = data
    np.save(tmp_path / "f.npy", x)
    write_meta(tmp_path / "l.meta", lab)
    out = tmp_path / "run.zarr"
    cmd = [FACECLUSTER, "ingest", str(tmp_path / "f.npy"), "--labels", str(tmp_path / "l.meta"), "-o", str(out),
           "--chunk-rows", "64"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "N=203 d=16 chunks=4x64" in p.stdout and "labels=yes" in p.stdout and "dropped=0" in p.stdout
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "up to date (skipped)" in p.stdout
    # a config file supplies drop_invalid; the flag-less run uses it
    xz = x.copy(); xz[0] = 0
    np.save(tmp_path / "g.npy", xz)
    (tmp_path / "run.toml").write_text("[ingest]\ndrop_invalid = true\nchunk_rows = 50\n")
    p = subprocess.run([FACECLUSTER, "ingest", str(tmp_path / "g.npy"), "-o", str(tmp_path / "g.zarr"),
                        "--config", str(tmp_path / "run.toml")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "N=202" in p.stdout and "chunks=5x50" in p.stdout and "all_zero 1" in p.stdout
    p = subprocess.run([FACECLUSTER, "ingest", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--drop-invalid" in p.stdout and "Examples" in p.stdout


@pytest.mark.realdata
@pytest.mark.skipif(not (LFW / "features.npy").exists(), reason="needs ../shared/data/lfw-sface")
def test_real_lfw_features(tmp_path):
    f, l = LFW / "features.npy", LFW / "labels.npy"
    before = (f.stat().st_mtime_ns, f.stat().st_size)
    s = run_ingest(f, tmp_path / "lfw.zarr", labels=l, cfg=IngestConfig(chunk_rows=4096))
    x = np.load(f)
    assert s["n"] == len(x) and s["dim"] == x.shape[1]
    store = RunStore.open(tmp_path / "lfw.zarr")
    np.testing.assert_array_equal(store.array("features")[:], oracle(x))
    np.testing.assert_array_equal(store.array("labels")[:], np.load(l))
    assert (f.stat().st_mtime_ns, f.stat().st_size) == before
