"""The run store: stage records, skip / re-run, digest chaining, temporary arrays, open errors."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from facecluster.pipeline.store import RunStore, StoreError, open_array


def _tmp_arrays(store: RunStore) -> list[str]:
    if not store.has("_tmp"):
        return []
    return [k for k, _ in store.root["_tmp"].arrays()]


def test_stage_writes_then_skips_then_reruns_on_new_params(tmp_path):
    store = RunStore.create(tmp_path / "r.zarr")
    runs = []

    def run(params):
        with store.stage("a", params) as w:
            if w is None:
                return False
            runs.append(params)
            w.write_array("a/out", np.arange(10) * params["k"])
            w.summary["k"] = params["k"]
            return True

    assert run({"k": 2}) is True
    rec = store.record("a")
    assert rec["complete"] and rec["status"] == "complete" and rec["summary"] == {"k": 2}
    assert rec["outputs"] == ["a/out"] and "numpy" in rec["versions"] and rec["seconds"] >= 0
    np.testing.assert_array_equal(store.array("a/out")[:], np.arange(10) * 2)
    assert run({"k": 2}) is False  # identical parameters and inputs: skipped
    # a reopened store remembers
    assert RunStore.open(tmp_path / "r.zarr").record("a")["digest"] == rec["digest"]
    assert run({"k": 3}) is True
    np.testing.assert_array_equal(store.array("a/out")[:], np.arange(10) * 3)
    assert store.record("a")["digest"] != rec["digest"]
    assert runs == [{"k": 2}, {"k": 3}]
    assert _tmp_arrays(store) == []


def test_digest_chaining_reruns_downstream(tmp_path):
    store = RunStore.create(tmp_path / "r.zarr")

    def up(v):
        with store.stage("up", {"v": v}) as w:
            if w is not None:
                w.write_array("up", np.full(4, v))

    def down():
        with store.stage("down", {"p": 1}, inputs=["up"]) as w:
            if w is None:
                return None
            w.write_array("down", store.array("up")[:] + 1)
            return True

    with pytest.raises(StoreError, match="stage 'up' has not completed"):
        down()
    up(1)
    assert down() is True
    d1 = store.record("down")["digest"]
    assert down() is None
    up(1)  # unchanged upstream: downstream still up to date
    assert down() is None
    up(5)  # changed upstream: downstream digest changes and it re-runs
    assert down() is True
    assert store.record("down")["digest"] != d1
    np.testing.assert_array_equal(store.array("down")[:], np.full(4, 6))
    # extra inputs (file fingerprints, models) are part of the digest too
    assert store.stage_digest("x", {}, [], extra={"f": 1}) != store.stage_digest("x", {}, [], extra={"f": 2})
    assert store.stage_digest("x", {"a": 1, "b": 2}, []) == store.stage_digest("x", {"b": 2, "a": 1}, [])


def test_failing_stage_leaves_nothing_half_written(tmp_path):
    store = RunStore.create(tmp_path / "r.zarr")
    with store.stage("s", {"v": 1}) as w:
        w.write_array("out", np.arange(6))
    good = store.record("s")

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with store.stage("s", {"v": 2}) as w:
            arr = w.create_array("out", (100,), (10,), np.int64)
            w.create_array("other", (5,), (5,), np.float32)
            # a worker writes half of it through the URL, as on a cluster
            open_array(store.url, w.tmp_path("out"), mode="r+")[:50] = 7
            assert arr[:50].sum() == 350
            raise Boom("stage body failed")
    rec = store.record("s")
    assert rec["complete"] is False and rec["status"] == "failed" and rec["digest"] != good["digest"]
    assert not store.has("other")  # never created at its final name
    assert _tmp_arrays(store) == []
    assert not list((tmp_path / "r.zarr" / "_tmp").glob("*/zarr.json"))
    with pytest.raises(StoreError, match="stage 's' has not completed"):
        store.require("s")
    # the previous complete output was not replaced by the half-written one
    np.testing.assert_array_equal(store.array("out")[:], np.arange(6))
    # re-running after the failure works and completes
    with store.stage("s", {"v": 2}) as w:
        assert w is not None
        w.write_array("out", np.arange(3))
    assert store.is_complete("s")


def test_scratch_arrays_serve_the_stage_and_go_with_it(tmp_path):
    """A stage's scratch arrays (what its tasks read instead of scattered data) are readable through the URL
    while it runs and gone when it ends, completed or failed; they are never outputs."""
    store = RunStore.create(tmp_path / "r.zarr")
    with store.stage("s", {"v": 1}) as w:
        path = w.scratch_array("plan", np.arange(10, dtype=np.int64), chunk_rows=4)
        np.testing.assert_array_equal(open_array(store.url, path)[3:7], [3, 4, 5, 6])
        w.write_array("out", np.ones(3))
    assert store.record("s")["outputs"] == ["out"]
    assert _tmp_arrays(store) == [] and not (tmp_path / "r.zarr" / path).exists()

    with pytest.raises(RuntimeError, match="boom"):
        with store.stage("s", {"v": 2}) as w:
            path = w.scratch_array("plan", np.arange(5))
            assert (tmp_path / "r.zarr" / path).exists()
            raise RuntimeError("boom")
    assert _tmp_arrays(store) == [] and not (tmp_path / "r.zarr" / path).exists()


def test_killed_run_leftovers_are_cleaned(tmp_path):
    store = RunStore.create(tmp_path / "r.zarr")
    # what a killed process leaves: a running record and an array under _tmp
    store.root.create_array("_tmp/s__out__dead", shape=(4,), chunks=(4,), dtype="i8")
    store._set_record("s", {"complete": False, "status": "running", "digest": "x"})
    reopened = RunStore.open(tmp_path / "r.zarr")
    assert not reopened.is_complete("s")
    reopened.clean_tmp()
    assert _tmp_arrays(reopened) == []
    with reopened.stage("s", {}) as w:
        assert w is not None  # incomplete record: runs again
        w.write_array("out", np.ones(2))
    assert reopened.is_complete("s")


def test_invalidate_forces_rerun(tmp_path):
    store = RunStore.create(tmp_path / "r.zarr")
    for expected in (True, False):
        with store.stage("s", {}) as w:
            assert (w is not None) is expected
            if w:
                w.write_array("o", np.zeros(1))
    store.invalidate("s")
    with store.stage("s", {}) as w:
        assert w is not None
        w.write_array("o", np.zeros(1))


def test_create_refuses_existing_nonempty(tmp_path):
    RunStore.create(tmp_path / "r.zarr")
    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        RunStore.create(tmp_path / "r.zarr")
    s = RunStore.create(tmp_path / "r.zarr", overwrite=True)
    assert s.records() == {}


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="no such run store") as e:
        RunStore.open(tmp_path / "missing.zarr")
    assert "facecluster ingest" in _one_line(e)

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["something"] = 1
    with pytest.raises(StoreError, match="not a facecluster run store") as e:
        RunStore.open(tmp_path / "plain.zarr")
    _one_line(e)

    corrupt = tmp_path / "corrupt.zarr"
    RunStore.create(corrupt)
    (corrupt / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="not a readable facecluster run store") as e:
        RunStore.open(corrupt)
    _one_line(e)

    # a directory that is not a Zarr store: an error, and opening it writes nothing
    d = tmp_path / "docs"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(StoreError):
        RunStore.open(d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_missing_array_error(tmp_path):
    store = RunStore.create(tmp_path / "r.zarr")
    with pytest.raises(StoreError, match="no array 'knn/index'"):
        store.array("knn/index")
    with pytest.raises(StoreError, match="missing or unreadable"):
        open_array(store.url, "features")


def test_stores_written_with_the_old_zstd_codec_still_read_verify_and_feed_new_stages(tmp_path, monkeypatch):
    """0.7.8 changed the arrays' compressor (Blosc zstd level 3 -> LZ4): a store written before keeps its codec per
    array, reads back the same values, passes verify, and a stage run now reads it and writes LZ4 beside it."""
    import facecluster.pipeline.store as store_mod

    monkeypatch.setattr(store_mod, "store_compressor",
                        lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
    store = RunStore.create(tmp_path / "r.zarr")
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    with store.stage("up", {"v": 1}) as w:
        w.write_array("up", x, chunks=(1000, 16))
    monkeypatch.undo()  # the package's own compressor from here on

    store = RunStore.open(tmp_path / "r.zarr")
    with store.stage("down", {"p": 1}, inputs=["up"]) as w:
        w.write_array("down", store.array("up")[:] * 2, chunks=(1000, 16))

    def cname(name):
        blosc = [c for c in store.array(name).metadata.codecs if type(c).__name__ == "BloscCodec"]
        return str(blosc[0].cname.value if hasattr(blosc[0].cname, "value") else blosc[0].cname)

    assert cname("up") == "zstd" and cname("down") == "lz4"
    np.testing.assert_array_equal(store.array("up")[:], x)
    np.testing.assert_array_equal(store.array("down")[:], x * 2)
    problems, counts = store.verify()
    assert problems == [] and counts["arrays"] == 2 and counts["chunks"] == 6
