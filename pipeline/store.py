"""The run store: one Zarr v3 group per run, with a record of every stage.

Layout of a run group (``RUN.zarr``)::

    features          N x d float32, row chunks of R rows (L2-normalised)
    labels            N int64 (optional: ground-truth identities)
    input_rows        N int64 (row of the original input for every face)
    knn/index, knn/sim
    graph/...         proposals/...   score/...   clusters
    _tmp/             arrays being written (never read as results)

Stage records live one per stage, in ``_records/<stage>`` (a Zarr group whose
attributes are the record), each replaced atomically on its own: two processes
that write different stages never lose each other's record. A record has the
stage's parameters, its ``upstream`` (for every input stage: that stage's digest,
run id and the digest of every array it wrote), the digest of all that
(``digest``), its own run id, the outputs it wrote with their data digests
(``arrays``), package versions, start/end time and ``complete``. Stores written by
0.1.4 keep their records in the root attribute ``facecluster`` and are still read.

Why this shape:

* An array is created under ``_tmp/`` and moved to its final name only when the
  stage finishes, so a crash never leaves a half-written array at a final name.
  The stage record is written last; on object stores, where a move is a copy, the
  record (not the presence of an array) is what says an output is complete.
* Every chunk carries a CRC-32C and every output array a table of them
  (:mod:`facecluster.pipeline.integrity`): a missing or altered chunk is an error naming the
  array, the chunk and the stage to re-run, never a silent fill value.
* A stage whose record matches its parameters and input digest (and whose outputs
  are intact) is skipped on a re-run. The input digest chains the upstream stages'
  run ids and data digests, so re-ingesting other data, or forcing an upstream
  stage, makes every later stage stale: it is recomputed by the pipeline and
  refused by export/report/evaluate.
* One writer at a time: a writer holds ``_lock`` (holder, host, pid, start time)
  for the whole command; a second writer fails with one line; readers take no lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .integrity import (ABSENT, CHECKSUM_CODEC, CRC_HEX, INTEGRITY_ATTR, CheckedStore, ChunkError, StoreError, Table,
                        array_digest, array_meta, chunk_message, chunk_name, chunk_problem, rerun_hint, scan_table)

log = logging.getLogger(__name__)

ATTR_KEY = "facecluster"


def store_compressor() -> zarr.codecs.BloscCodec:
    """The compressor of every array a stage writes (before the CRC-32C codec): Blosc LZ4, byte shuffle.

    Why not zstd (the format's choice up to 0.7.7, level 3): every stage after ingest reads whole chunks of
    ``features`` and ``knn`` (a score task decodes nearly every chunk of four arrays), and on 1M built-in faces
    (all 62 chunks of 16,384 rows, one thread) LZ4 decodes features 3.6-3.9x faster (3.3 against 0.85-0.92 GB/s),
    ``knn/index`` 3.4x, ``edges/prob`` 2.4x, and encodes 4.5-15x faster (``edges/prob`` 0.75 against 0.05 GB/s), for
    4-9% more bytes on disk (features 0.94 against 0.90 of raw, ``knn/index`` 0.38 against 0.35). One score task's
    reads: 5.80 -> 4.05 CPU-s; the stages' times moved within the machine's noise. Stores written before keep their
    codec (it is in each array's metadata) and read as before.
    """
    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


TMP_GROUP = "_tmp"
RECORDS_GROUP = "_records"
LOCK_GROUP = "_lock"
JOURNAL_GROUP = "_journal"
FORMAT_VERSION = 2
_VERSIONED_PACKAGES = ("facecluster", "numpy", "scipy", "dask", "distributed", "zarr", "faiss-cpu", "torch")


class LockedError(StoreError):
    """Another writer holds the run store's lock."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and numpy scalars/arrays converted, for digests."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))


def digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(canonical_json(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file or directory (size, mtime, head/tail hash).

    Hashing a 100 GB feature file on every run would cost minutes; size + mtime +
    the first and last MiB catch every realistic change (re-export, truncation,
    append) without reading the whole file.
    """
    p = Path(path)
    if p.is_dir():
        entries = []
        for root, _dirs, files in sorted(os.walk(p)):
            for f in sorted(files):
                fp = Path(root) / f
                st = fp.stat()
                entries.append((str(fp.relative_to(p)), st.st_size, st.st_mtime_ns))
        return {"path": str(p.resolve()), "dir": digest(entries)}
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if st.st_size > (2 << 20):
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()}


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def normalize_url(url: str | os.PathLike) -> str:
    """The form of a run store URL that workers get: local paths absolute, ``file://`` stripped.

    Workers started by hand have their own working directory, so a relative path
    would name a different (or no) store there; and zarr hands ``file://`` URLs to
    fsspec's LocalFileSystem, which does not create parent directories. Remote
    fsspec URLs (``s3://``, ``gs://``, ...) are passed through unchanged.
    """
    s = str(url)
    if is_local(s):
        return os.path.abspath(local_path(s))
    return s


def local_path(url: str) -> Path:
    s = str(url)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def checked_store(url: str, read_only: bool = False) -> CheckedStore:
    """The Zarr store of a run, with every chunk read checked against its array's integrity table."""
    url = normalize_url(url)
    if is_local(url):
        inner = zarr.storage.LocalStore(str(local_path(url)), read_only=read_only)
    else:
        inner = zarr.storage.FsspecStore.from_url(url, read_only=read_only)
    return CheckedStore(inner, url)


def open_array(url: str, name: str, mode: str = "r") -> zarr.Array:
    """Open one array of a run store; used on workers (they get the URL, not objects)."""
    try:
        return zarr.open_array(store=checked_store(url, read_only=mode == "r"), path=name, mode=mode)
    except (FileNotFoundError, KeyError, ValueError) as e:  # zarr raises several kinds
        raise StoreError(
            f"{url}: array {name!r} is missing or unreadable ({type(e).__name__}); "
            "check that the run store path is reachable from every worker and re-run the stage that writes it"
        ) from e


def _json_node(attributes: dict) -> Any:
    """A Zarr v3 group document holding ``attributes`` (records and the lock are such groups, so
    Zarr's own listing of the run sees nothing it does not recognise)."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": json.loads(canonical_json(attributes))}
    return default_buffer_prototype().buffer.from_bytes(json.dumps(doc, sort_keys=True).encode())


def _read_node(raw, key: str) -> dict | None:
    buf = sync(raw.get(key, default_buffer_prototype()))
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes()).get("attributes") or {}
    except ValueError:
        return None


def record_identity(rec: dict) -> dict:
    """What a downstream stage chains: the stage's input digest, its run id and the digest of each array it wrote."""
    return {"digest": rec.get("digest"), "run": rec.get("run"),
            "arrays": {k: v.get("digest") for k, v in sorted((rec.get("arrays") or {}).items())}}


def _process_alive(pid: int, started: str | None) -> bool:
    """True if ``pid`` runs here and is not a newer process that reused the number."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if started:
            t0 = _dt.datetime.fromisoformat(started).timestamp()
            return proc.create_time() <= t0 + 1.0
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


@dataclass
class StageWriter:
    """Handed to a stage's body: creates its output arrays under ``_tmp/``."""

    store: "RunStore"
    name: str
    tmp_arrays: dict[str, str] = field(default_factory=dict)  # final name -> tmp path
    summary: dict = field(default_factory=dict)
    scratch: list[str] = field(default_factory=list)  # paths of arrays only the stage's tasks read

    def create_array(self, name: str, shape, chunks, dtype, fill_value=None, attrs: dict | None = None) -> zarr.Array:
        """Create output array ``name`` at a temporary path; returns it (write via ``tmp_path``).

        Every chunk is stored with a CRC-32C (the ``crc32c`` codec after Blosc), which
        the store's integrity table and every read check.
        """
        tmp = f"{TMP_GROUP}/{self.name}__{name.replace('/', '__')}__{uuid.uuid4().hex[:8]}"
        arr = self._new_array(tmp, shape, chunks, dtype, fill_value)
        if attrs:
            arr.attrs.update(attrs)
        self.tmp_arrays[name] = tmp
        return arr

    def _new_array(self, path: str, shape, chunks, dtype, fill_value=None, compress: bool = True) -> zarr.Array:
        shape = tuple(int(s) for s in shape)
        chunks = tuple(max(1, min(int(c), max(int(s), 1))) for c, s in zip(chunks, shape))
        if fill_value is None:
            fill_value = -1 if np.dtype(dtype).kind == "i" else 0
        blosc = [store_compressor()] if compress else []
        return self.store.root.create_array(
            path,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            compressors=blosc + [CHECKSUM_CODEC()],
        )

    def scratch_array(self, name: str, data: np.ndarray, chunk_rows: int = 1 << 20) -> str:
        """Store ``data`` for the stage's own tasks to read (by the returned path, with :func:`open_array`);
        removed when the stage ends, whether it completes or fails, and never an output.

        Why not ``client.scatter``: scattered data lives on one worker, and a worker lost mid-stage takes it
        along, so every task that needed it fails for good; a task that reads its input from the store is
        simply run again elsewhere (lost-worker recovery).
        """
        data = np.asarray(data)
        path = f"{TMP_GROUP}/{self.name}__scratch__{name.replace('/', '__')}__{uuid.uuid4().hex[:8]}"
        arr = self._new_array(path, data.shape, (max(1, min(len(data), chunk_rows)),) + data.shape[1:], data.dtype)
        self.scratch.append(path)
        if data.size:
            arr[...] = data
        return path

    def scratch_space(self, name: str, shape, chunks, dtype) -> str:
        """An empty scratch array (removed with the stage, like :meth:`scratch_array`) that the stage's own
        tasks fill and read: for intermediate state too large to hold in a worker's memory between two tasks.
        Stored uncompressed (written once, read once or twice, then dropped), each chunk still CRC-checked."""
        path = f"{TMP_GROUP}/{self.name}__scratch__{name.replace('/', '__')}__{uuid.uuid4().hex[:8]}"
        self._new_array(path, shape, chunks, dtype, compress=False)
        self.scratch.append(path)
        return path

    def drop_scratch(self, path: str) -> None:
        """Remove one scratch array before the stage ends (its tasks are done with it). As at the stage's end
        (``RunStore._drop_scratch``) a failed removal does not fail the stage: the path stays listed, and the
        stage's end tries again."""
        if path in self.scratch:
            with contextlib.suppress(Exception):
                self.store._delete(path)
                self.scratch.remove(path)

    def tmp_path(self, name: str) -> str:
        return self.tmp_arrays[name]

    def write_array(self, name: str, data: np.ndarray, chunks=None, attrs: dict | None = None) -> None:
        """Create and fill a (small) output array in one go."""
        data = np.asarray(data)
        if chunks is None:
            chunks = (max(1, min(len(data), 1 << 20)),) + data.shape[1:] if data.ndim else ()
        arr = self.create_array(name, data.shape, chunks, data.dtype, attrs=attrs)
        if data.size:
            arr[...] = data


class RunStore:
    """A run's Zarr group plus its stage bookkeeping."""

    def __init__(self, url: str | os.PathLike, root: zarr.Group, read_only: bool = False):
        self.url = normalize_url(url)
        self.root = root
        self.read_only = read_only
        self._lock_depth = 0
        self._lock_token: str | None = None

    @property
    def _raw(self):
        """The unchecked store under the run (for records, the lock and integrity scans)."""
        st = self.root.store
        return st._store if isinstance(st, CheckedStore) else st

    # -- opening ---------------------------------------------------------------
    @classmethod
    def create(cls, url: str | os.PathLike, overwrite: bool = False) -> "RunStore":
        url = normalize_url(url)
        if is_local(url):
            p = local_path(url)
            if p.exists() and not overwrite and any(p.iterdir()):
                raise StoreError(f"{url}: already exists; pass --overwrite to replace it or choose another -o path")
        root = zarr.open_group(store=checked_store(url), mode="w" if overwrite else "a")
        root.attrs[ATTR_KEY] = {"format": FORMAT_VERSION, "created": now_iso(), "stages": {}}
        return cls(url, root)

    @classmethod
    def coerce(cls, run: "str | os.PathLike | RunStore", mode: str = "r") -> "RunStore":
        """``run`` itself when it is a RunStore, else the store opened at that path/URL."""
        return run if isinstance(run, RunStore) else cls.open(run, mode=mode)

    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "a") -> "RunStore":
        url = normalize_url(url)
        if is_local(url) and not local_path(url).exists():
            raise StoreError(f"{url}: no such run store; create one with `facecluster ingest FEATS -o {url}`")
        try:
            # "a" would create a group (a zarr.json) in any directory it is pointed at;
            # opening must never write, so an existing group is required ("r+")
            root = zarr.open_group(store=checked_store(url, read_only=mode == "r"), mode="r+" if mode == "a" else mode)
            meta = root.attrs.get(ATTR_KEY)
        except Exception as e:  # corrupt zarr.json, not a group, ...
            raise StoreError(f"{url}: not a readable facecluster run store ({e}); re-create it with `facecluster ingest`") from e
        if not isinstance(meta, dict) or "stages" not in meta:
            raise StoreError(f"{url}: is a Zarr group but not a facecluster run store; create one with `facecluster ingest`")
        return cls(url, root, read_only=mode == "r")

    # -- one writer at a time ------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Hold the run's writer lock for the block (re-entrant within this RunStore).

        Raises
        ------
        LockedError
            Another live process holds the lock (one line: who, where, since when).
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self._acquire(what)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            self._release()

    def lock_holder(self) -> dict | None:
        """The current lock holder's record ({holder, host, pid, started, token}), or None."""
        return (_read_node(self._raw, f"{LOCK_GROUP}/zarr.json") or {}).get("lock")

    def _lock_is_stale(self, holder: dict) -> bool:
        return holder.get("host") == socket.gethostname() and not _process_alive(int(holder.get("pid", -1)), holder.get("started"))

    def _acquire(self, what: str) -> None:
        if self.read_only:
            raise StoreError(f"{self.url}: opened read-only; cannot write stage {what!r}")
        token = uuid.uuid4().hex
        command = " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])[:200]
        mine = {"holder": command, "what": what, "host": socket.gethostname(), "pid": os.getpid(),
                "started": now_iso(), "token": token}
        for _attempt in range(2):
            sync(self._raw.set_if_not_exists(f"{LOCK_GROUP}/zarr.json", _json_node({"lock": mine})))
            holder = self.lock_holder()
            if holder and holder.get("token") == token:
                self._lock_token = token
                return
            if holder and self._lock_is_stale(holder):
                # the holder died (kill -9, power loss) on this host: its lock is void
                log.warning("%s: removing the stale lock of pid %s (%s, since %s)", self.url, holder.get("pid"),
                            holder.get("holder"), holder.get("started"))
                self._delete(LOCK_GROUP)
                continue
            break
        holder = holder or {}
        raise LockedError(f"{self.url}: in use by another writer (`{holder.get('holder')}`, pid {holder.get('pid')} on "
                          f"{holder.get('host')}, since {holder.get('started')}); wait until it finishes (export, "
                          f"evaluate and report need no lock) - if that process is gone, remove {self.url}/{LOCK_GROUP}")

    def _release(self) -> None:
        holder = self.lock_holder()
        if holder and holder.get("token") == self._lock_token:
            self._delete(LOCK_GROUP)
        self._lock_token = None

    # -- records ---------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self.root.attrs[ATTR_KEY])

    def _legacy_records(self) -> dict[str, dict]:
        """Records of a store written by 0.1.4 (all stages in the root attribute)."""
        return dict((self.root.attrs.get(ATTR_KEY) or {}).get("stages", {}))

    def _record_names(self) -> list[str]:
        async def names():
            return [n async for n in self._raw.list_dir(RECORDS_GROUP) if n != "zarr.json"]

        return sorted(sync(names()))

    def records(self) -> dict[str, dict]:
        out = self._legacy_records()
        for name in self._record_names():
            rec = self.record(name)
            if rec is not None:
                out[name] = rec
        return out

    def record(self, name: str) -> dict | None:
        """The stage's record as stored now (read fresh: another process may have written it)."""
        node = _read_node(self._raw, f"{RECORDS_GROUP}/{name}/zarr.json")
        if node is not None and "record" in node:
            return node["record"]
        return self._legacy_records().get(name)

    def _set_record(self, name: str, rec: dict) -> None:
        # one object per stage, replaced atomically: a concurrent writer of another stage keeps its record
        sync(self._raw.set_if_not_exists(f"{RECORDS_GROUP}/zarr.json", _json_node({})))
        sync(self._raw.set(f"{RECORDS_GROUP}/{name}/zarr.json", _json_node({"record": rec})))

    def is_complete(self, name: str) -> bool:
        rec = self.record(name)
        return bool(rec and rec.get("complete"))

    def require(self, name: str, hint: str | None = None) -> dict:
        rec = self.record(name)
        if not rec or not rec.get("complete"):
            raise StoreError(f"{self.url}: stage {name!r} has not completed; {hint or f'run it first (facecluster {name} {self.url})'}")
        return rec

    def upstream(self, name: str, inputs: list[str]) -> dict:
        """Identity of every input stage (digest, run id, data digests): what ``name``'s digest chains."""
        return {dep: record_identity(self.require(dep, f"run stage {dep!r} before {name!r}")) for dep in inputs}

    def stage_digest(self, name: str, params: dict, inputs: list[str], extra: Any = None) -> str:
        return digest(name, params, self.upstream(name, inputs), extra)

    def stale_reason(self, name: str) -> str | None:
        """Why ``name``'s stored result must not be used (incomplete, or an upstream stage changed since); None if fresh."""
        seen: set[str] = set()

        def why(stage: str) -> str | None:
            if stage in seen:
                return None
            seen.add(stage)
            rec = self.record(stage)
            if not rec:
                return f"stage {stage!r} has not run"
            if not rec.get("complete"):
                return f"stage {stage!r} did not complete ({rec.get('status')})"
            for dep, ident in (rec.get("upstream") or {}).items():
                dep_rec = self.record(dep)
                if not dep_rec or not dep_rec.get("complete") or record_identity(dep_rec) != ident:
                    return f"stage {stage!r} is stale: its input {dep!r} was re-run or changed since"
                r = why(dep)
                if r:
                    return r
            return None

        return why(name)

    def require_fresh(self, name: str, hint: str) -> dict:
        """The record of ``name``, refused (StoreError, one line) when it or anything upstream is stale."""
        r = self.stale_reason(name)
        if r:
            raise StoreError(f"{self.url}: {r}; {hint}")
        return self.record(name)

    def owner(self, array: str) -> tuple[str, dict] | None:
        """The stage record that last wrote ``array`` (``(name, record)``), or None.

        Several stages may write the same array (the threshold baseline and dedup both
        write ``clusters``); the one that finished last owns what is stored now. A
        failed run never moves its outputs into place, so only records that list the
        array in ``outputs`` (complete, or invalidated afterwards) count.
        """
        cands = [(rec.get("finished", ""), name, rec) for name, rec in self.records().items()
                 if array in (rec.get("outputs") or [])]
        if not cands:
            return None
        _, name, rec = max(cands, key=lambda c: c[0])
        return name, rec

    def require_fresh_array(self, array: str, hint: str) -> None:
        """Refuse (one line) an array whose writing stage, or one upstream of it, is incomplete or stale."""
        owner = self.owner(array)
        if owner is not None:
            self.require_fresh(owner[0], hint)

    # -- running a stage ---------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, params: dict, inputs: list[str] = (), extra: Any = None, force: bool = False) -> Iterator[StageWriter | None]:
        """Run a stage body, or yield ``None`` if an identical completed run exists.

        ``inputs`` are upstream stage names; ``extra`` is anything else the result
        depends on (input file fingerprints, model digests). The body creates its
        outputs with ``writer.create_array``; they are sealed (integrity table),
        moved into place and the record marked complete only if the body returns
        normally. A completed run whose outputs are damaged is re-run, not skipped.
        The writer lock is held throughout.
        """
        with self.writing(name):
            upstream = self.upstream(name, list(inputs))
            dig = digest(name, params, upstream, extra)
            rec = self.record(name)
            if not force and rec and rec.get("complete") and rec.get("digest") == dig:
                damage = self.output_damage(name, rec)
                if damage is None:
                    log.info("stage %s: up to date (digest %s), skipped", name, dig[:12])
                    yield None
                    return
                log.warning("stage %s: %s; re-running it", name, damage)
            writer = StageWriter(self, name)
            started = now_iso()
            run = uuid.uuid4().hex[:16]
            base = {"params": params, "inputs": list(inputs), "upstream": upstream, "digest": dig, "run": run,
                    "started": started, "versions": package_versions()}
            self._set_record(name, {**base, "complete": False, "status": "running"})
            try:
                yield writer
                arrays = {final: self._seal(tmp, name) for final, tmp in writer.tmp_arrays.items()}
            except BaseException:
                self._drop_tmp(writer)
                self._set_record(name, {**base, "complete": False, "status": "failed", "finished": now_iso()})
                raise
            self._drop_scratch(writer)
            for final, tmp in writer.tmp_arrays.items():
                self._move(tmp, final)
            finished = now_iso()
            t0 = _dt.datetime.fromisoformat(started)
            t1 = _dt.datetime.fromisoformat(finished)
            self._set_record(name, {**base, "complete": True, "status": "complete", "finished": finished,
                                    "seconds": (t1 - t0).total_seconds(), "outputs": sorted(writer.tmp_arrays),
                                    "arrays": arrays, "summary": writer.summary})

    def invalidate(self, name: str) -> None:
        rec = self.record(name)
        if rec:
            rec["complete"] = False
            rec["status"] = "invalidated"
            self._set_record(name, rec)

    # -- integrity -------------------------------------------------------------
    def _seal(self, tmp: str, stage: str) -> dict:
        """Record every stored chunk's CRC in the array's table; returns its record entry."""
        arr = zarr.open_array(store=self.root.store, path=tmp, mode="r+")
        table = scan_table(self._raw, tmp, arr, stage)
        arr.attrs[INTEGRITY_ATTR] = table.to_attr()
        return {"digest": array_digest(array_meta(arr), table), "chunks": table.n_chunks, "shape": list(arr.shape)}

    def _open_raw(self, name: str) -> zarr.Array | None:
        try:
            return zarr.open_array(store=self._raw, path=name, mode="r")
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def array_damage(self, name: str, entry: dict, stage: str, full: bool = False) -> list[str]:
        """What is wrong with output ``name`` of ``stage`` (one line each; empty when intact).

        ``full=False`` reads 4 bytes per chunk (presence and recorded CRC); ``full=True``
        reads every chunk and checks its CRC against its bytes.
        """
        arr = self._open_raw(name)
        if arr is None:
            return [f"{self.url}: array {name!r} is missing (written by stage {stage!r}); {rerun_hint(stage, self.url)}"]
        table = Table.from_attr(arr.attrs.get(INTEGRITY_ATTR))
        if table is None or array_digest(array_meta(arr), table) != entry.get("digest"):
            return [f"{self.url}: array {name!r} is not the one stage {stage!r} wrote (replaced, or its checksum table "
                    f"altered); {rerun_hint(stage, self.url)}"]
        now = scan_table(self._raw, name, arr, stage)
        out = []
        for i, coords in enumerate(np.ndindex(*table.grid) if table.grid else [()]):
            want, got = table.crcs[i * CRC_HEX:(i + 1) * CRC_HEX], now.crcs[i * CRC_HEX:(i + 1) * CRC_HEX]
            data = None
            if full and got != ABSENT:
                buf = sync(self._raw.get(f"{name}/{chunk_name(coords)}", default_buffer_prototype()))
                data = None if buf is None else buf.as_numpy_array()  # checked in place, as CheckedStore.get does
            problem = chunk_problem(table, coords, data, full=True) if full else (
                None if want == got else "is missing" if got == ABSENT else
                "was not written by the stage (an unexpected chunk)" if want == ABSENT else "is damaged (checksum mismatch)")
            if problem:
                out.append(chunk_message(self.url, name, coords, problem, stage))
        return out

    def output_damage(self, stage: str, rec: dict) -> str | None:
        """The first problem with a completed record's outputs (cheap check: 4 bytes per chunk), or None."""
        for name, entry in sorted((rec.get("arrays") or {}).items()):
            bad = self.array_damage(name, entry, stage, full=False)
            if bad:
                return bad[0]
        return None

    def verify(self) -> tuple[list[str], dict]:
        """Check every chunk of every recorded output against its CRC, and every stage's freshness.

        Returns (problems, counts): one line per problem (array, chunk, stage to re-run)
        and {"stages", "arrays", "chunks", "unprotected"} counted.
        """
        problems: list[str] = []
        counts = {"stages": 0, "arrays": 0, "chunks": 0, "unprotected": 0}
        for stage, rec in sorted(self.records().items()):
            counts["stages"] += 1
            if rec.get("superseded_by"):  # its outputs were replaced by a later stage (an add); `cluster` redoes it
                continue
            if not rec.get("complete"):
                problems.append(f"{self.url}: stage {stage!r} did not complete ({rec.get('status')}); "
                                f"{rerun_hint(stage, self.url)}")
                continue
            if "arrays" not in rec:
                counts["unprotected"] += len(rec.get("outputs") or [])
            for name, entry in sorted((rec.get("arrays") or {}).items()):
                counts["arrays"] += 1
                counts["chunks"] += int(entry.get("chunks", 0))
                problems += self.array_damage(name, entry, stage, full=True)
            why = self.stale_reason(stage)
            if why:
                problems.append(f"{self.url}: {why}; {rerun_hint(stage, self.url)}")
        return problems, counts

    # -- arrays ----------------------------------------------------------------
    def has(self, name: str) -> bool:
        try:
            self.root[name]
            return True
        except KeyError:
            return False

    def array(self, name: str) -> zarr.Array:
        """A result array, refused when it is not the one its stage recorded (replaced or re-tabled).

        Its chunks are then checked as they are read (see :class:`facecluster.pipeline.integrity.CheckedStore`).
        """
        try:
            a = self.root[name]
        except KeyError:
            raise StoreError(f"{self.url}: no array {name!r}; run the stage that writes it first") from None
        if not isinstance(a, zarr.Array):
            raise StoreError(f"{self.url}: {name!r} is a group, not an array")
        owner = self.owner(name)
        entry = ((owner[1].get("arrays") or {}).get(name) if owner else None)
        if entry is not None:
            table = Table.from_attr(a.attrs.get(INTEGRITY_ATTR))
            if table is None or array_digest(array_meta(a), table) != entry.get("digest"):
                raise ChunkError(f"{self.url}: array {name!r} is not the one stage {owner[0]!r} wrote (replaced, or its "
                                 f"checksum table altered); {rerun_hint(owner[0], self.url)}")
        return a

    def dask_array(self, name: str):
        import dask.array as da

        a = self.array(name)
        return da.from_zarr(a, chunks=a.chunks)

    def _delete(self, path: str) -> None:
        if is_local(self.url):
            p = local_path(self.url) / path
            if p.exists():
                shutil.rmtree(p)
        else:
            with contextlib.suppress(KeyError, FileNotFoundError):
                sync(self._raw.delete_dir(path))

    def _move(self, tmp: str, final: str) -> None:
        parent = final.rsplit("/", 1)[0] if "/" in final else ""
        if parent:
            self.root.require_group(parent)
        self._delete(final)
        if is_local(self.url):
            base = local_path(self.url)
            (base / final).parent.mkdir(parents=True, exist_ok=True)
            os.replace(base / tmp, base / final)
        else:  # object stores: copy + delete; the stage record marks completion
            import fsspec

            fs, root_path = fsspec.core.url_to_fs(self.url)
            fs.mv(f"{root_path.rstrip('/')}/{tmp}", f"{root_path.rstrip('/')}/{final}", recursive=True)

    def _drop_tmp(self, writer: StageWriter) -> None:
        for tmp in writer.tmp_arrays.values():
            with contextlib.suppress(Exception):
                self._delete(tmp)
        self._drop_scratch(writer)

    def _drop_scratch(self, writer: StageWriter) -> None:
        for path in writer.scratch:
            with contextlib.suppress(Exception):
                self._delete(path)
        writer.scratch.clear()

    def clean_tmp(self) -> None:
        """Remove leftovers of killed runs (called when a store is opened for writing; takes the lock).

        A commit that was under way (:meth:`commit`) is finished first: its arrays wait under ``_tmp/``.
        """
        with self.writing("clean"):
            self.finish_commit()
            with contextlib.suppress(Exception):
                self._delete(TMP_GROUP)

    # -- several arrays and records replaced as one ---------------------------------------
    def seal(self, writer: StageWriter) -> dict[str, dict]:
        """Seal every array of ``writer`` (integrity table); final name -> its record entry."""
        return {final: self._seal(tmp, writer.name) for final, tmp in writer.tmp_arrays.items()}

    def commit(self, writer: StageWriter, records: dict[str, dict]) -> None:
        """Move ``writer``'s sealed arrays into place and write ``records``, all or (after a crash) on the next
        writing command: a journal naming every move and record is written first, and :meth:`clean_tmp`
        finishes a journal it finds before removing ``_tmp/``. A stage replaces its own arrays only; an add
        replaces arrays of several stages, and a run must never hold some of them old and some new."""
        moves = {tmp: final for final, tmp in writer.tmp_arrays.items()}
        with self.writing(writer.name):
            sync(self._raw.set(f"{JOURNAL_GROUP}/zarr.json", _json_node({"journal": {"moves": moves, "records": records}})))
            self.finish_commit()

    def finish_commit(self) -> bool:
        """Finish a journalled commit (moves not yet done, then every record); False when none was pending."""
        node = _read_node(self._raw, f"{JOURNAL_GROUP}/zarr.json")
        if not node or "journal" not in node:
            return False
        journal = node["journal"]
        for tmp, final in journal["moves"].items():
            if self._open_raw(tmp) is not None:  # not moved yet (a move is delete-final then rename)
                self._move(tmp, final)
        for name, rec in journal["records"].items():
            self._set_record(name, rec)
        self._delete(JOURNAL_GROUP)
        log.info("%s: finished a commit of %d arrays and %d records", self.url, len(journal["moves"]), len(journal["records"]))
        return True
