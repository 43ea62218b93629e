"""`facecluster export`: formats, columns, atomic writes, errors (real run stores in tmp_path)."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest

from facecluster.pipeline.cli import main
from facecluster.pipeline.errors import BadInput
from facecluster.pipeline.export import export_clusters
from facecluster.pipeline.store import RunStore
from facecluster.tasks.io import read_labels


def _store(tmp_path, n=50, score=True, clusters=True, name="run.zarr"):
    """A run with ingest + dedup records: features, input_rows (every 2nd input row), clusters, score."""
    rng = np.random.default_rng(3)
    store = RunStore.create(tmp_path / name)
    feats = rng.normal(size=(n, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    with store.stage("ingest", {"chunk_rows": 16}) as w:
        w.write_array("features", feats, chunks=(16, 8))
        w.write_array("input_rows", np.arange(n, dtype=np.int64) * 2)
        w.summary.update(n=n, dim=8, chunk_rows=16)
    lab = rng.integers(0, 7, size=n).astype(np.int64)
    sc = rng.uniform(0.2, 1.0, size=n).astype(np.float32)
    sc[lab == 6] = np.nan  # faces no proposal claimed: singletons without a score
    if clusters:
        with store.stage("dedup", {"th": 0.5}, inputs=["ingest"]) as w:
            w.write_array("clusters", lab)
            if score:
                w.write_array("clusters_score", sc)
    return store, lab, sc


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("fmt", ["meta", "npy"])
def test_label_formats_round_trip(tmp_path, fmt):
    store, lab, _ = _store(tmp_path)
    res = export_clusters(store.url, fmt, tmp_path / f"out.{fmt}")
    assert res.path == tmp_path / f"out.{fmt}"
    back = read_labels(res.path) if fmt == "meta" else np.load(res.path)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, lab)
    assert res.n_faces == 50 and res.n_clusters == np.unique(lab).size
    if fmt == "meta":  # the reference format: one integer per line, nothing else
        lines = (tmp_path / "out.meta").read_text().splitlines()
        assert len(lines) == 50 and lines[0] == str(lab[0])


def test_parquet_and_csv_columns(tmp_path):
    store, lab, sc = _store(tmp_path)
    pres = export_clusters(store.url, "parquet", tmp_path / "c.parquet")
    t = pq.read_table(pres.path)
    assert t.column_names == ["face_id", "cluster_id", "input_row", "score"]
    np.testing.assert_array_equal(t["face_id"].to_numpy(), np.arange(50))
    np.testing.assert_array_equal(t["cluster_id"].to_numpy(), lab)
    np.testing.assert_array_equal(t["input_row"].to_numpy(), np.arange(50) * 2)
    got = t["score"].to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(sc))  # unclaimed faces are null
    np.testing.assert_allclose(got[~np.isnan(sc)], sc[~np.isnan(sc)])
    assert t["score"].null_count == int(np.isnan(sc).sum()) > 0
    assert pres.score_array == "clusters_score"

    cres = export_clusters(store.url, "csv", tmp_path / "c.csv")
    with open(cres.path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["face_id", "cluster_id", "input_row", "score"]
    assert len(rows) == 51
    assert [int(r[1]) for r in rows[1:]] == lab.tolist()
    empty = [r[3] == "" for r in rows[1:]]
    assert empty == np.isnan(sc).tolist()


def test_no_score_exports_without_column_and_says_so(tmp_path):
    store, lab, _ = _store(tmp_path, score=False)
    res = export_clusters(store.url, "parquet", tmp_path / "c.parquet")
    assert pq.read_table(res.path).column_names == ["face_id", "cluster_id", "input_row"]
    assert res.score_array is None
    assert any("without a score column" in n for n in res.notes)


def test_missing_clusters_is_bad_input(tmp_path, capsys):
    store, _, _ = _store(tmp_path, clusters=False)
    with pytest.raises(BadInput, match="facecluster cluster"):
        export_clusters(store.url, "meta", tmp_path / "x.meta")
    code, out, err = _run(["export", store.url, "--format", "csv"], capsys)
    assert code == 2
    assert err.startswith("error:") and "facecluster cluster" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.meta").exists() and not (tmp_path / "run.clusters.csv").exists()


def test_stale_clusters_refused(tmp_path):
    store, _, _ = _store(tmp_path)
    store.invalidate("dedup")
    with pytest.raises(BadInput, match="did not complete"):
        export_clusters(store.url, "npy")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store, lab, _ = _store(tmp_path)
    out = tmp_path / "out" / "c.parquet"
    out.parent.mkdir()
    out.write_bytes(b"previous export")

    def broken(table, where, *a, **k):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        export_clusters(store.url, "parquet", out)
    assert out.read_bytes() == b"previous export"  # the old file is intact, no half-written file
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.parquet"]  # temp file removed


def test_cli_default_path_and_format_from_extension(tmp_path, capsys):
    store, lab, _ = _store(tmp_path)
    code, out, _ = _run(["export", store.url, "--format", "npy"], capsys)
    assert code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "run.clusters.npy"), lab)
    assert "50 faces" in out
    code, out, _ = _run(["export", store.url, "-o", str(tmp_path / "x.csv")], capsys)
    assert code == 0 and (tmp_path / "x.csv").read_text().startswith("face_id,cluster_id,input_row,score")
    code, _, err = _run(["export", store.url, "-o", str(tmp_path / "x.txt")], capsys)
    assert code == 2 and "--format" in err
    code, out, _ = _run(["export", "--help"], capsys)
    assert code == 0 and "Examples:" in out and "facecluster export run.zarr" in out


def test_missing_store_is_bad_input(tmp_path, capsys):
    code, _, err = _run(["export", str(tmp_path / "nope.zarr"), "--format", "meta"], capsys)
    assert code == 2 and "nope.zarr" in err


def test_score_of_another_stage_is_not_used(tmp_path):
    """The threshold baseline (stage "clusters") overwrites `clusters` after dedup: dedup's score no longer applies."""
    store, _, _ = _store(tmp_path)
    base = np.arange(50, dtype=np.int64) // 5
    with store.stage("clusters", {"method": "threshold", "th": 0.5}, inputs=["ingest"]) as w:
        w.write_array("clusters", base)
    res = export_clusters(store.url, "parquet", tmp_path / "c.parquet")
    t = pq.read_table(res.path)
    assert "score" not in t.column_names and res.score_array is None
    np.testing.assert_array_equal(t["cluster_id"].to_numpy(), base)
