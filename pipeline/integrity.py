"""Chunk integrity of a run store: checksums per chunk, a table of them per array, checked on every read.

Every array a stage writes is encoded with Zarr's ``crc32c`` codec, so each stored
chunk ends with the CRC-32C of its (compressed) bytes. When the stage completes,
the store *seals* each output: it reads the last four bytes of every stored chunk
(one small read per chunk, not a re-read of the data) into a table kept in the
array's attributes, and the table's digest goes into the stage record.

Every read goes through :class:`CheckedStore`, which compares a chunk with that
table. Without it Zarr reads a missing chunk as its fill value, and a truncated
chunk fails deep inside Blosc without naming the array; with it both are one
:class:`ChunkError` naming the run, the array, the chunk and the stage to re-run.

Arrays without a table (being written under ``_tmp/``, or written by 0.1.4) are
read unchecked, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import dataclass

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

INTEGRITY_ATTR = "facecluster_integrity"
CRC_HEX = 8  # hex digits of one CRC-32C in a table
ABSENT = "-" * CRC_HEX  # a chunk the stage never stored (all fill value: Zarr skips writing it)
CHECKSUM_CODEC = zarr.codecs.Crc32cCodec


class StoreError(RuntimeError):
    """A run store is missing, corrupt or lacks a stage's output."""


class ChunkError(StoreError):
    """A stored chunk is missing, altered or unexpected; the message names array, chunk and fix."""


def rerun_hint(stage: str | None, url: str) -> str:
    """The command that recomputes ``stage``'s outputs (a damaged stage is re-run, not skipped)."""
    if stage == "ingest":
        return f"re-run `facecluster ingest FEATS -o {url}` with the original features (or verify with `facecluster verify {url}`)"
    if stage == "knn":
        return f"re-run `facecluster knn {url}` (or `facecluster cluster {url} ...`, which re-runs it)"
    if stage in ("graph", "proposals"):
        return f"re-run `facecluster proposals {url}` (or `facecluster cluster {url} ...`)"
    if stage is None:
        return f"re-run the stage that writes it (see `facecluster verify {url}`)"
    return f"re-run `facecluster cluster {url} ...` with the same options (it re-runs stage {stage!r})"


def chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """``"knn/index/c/3/0"`` -> ``("knn/index", (3, 0))``; None for a key that is not a chunk."""
    parts = key.split("/")
    i = len(parts) - 1
    while i >= 0 and parts[i].isdigit():
        i -= 1
    if i < 0 or parts[i] != "c":
        return None
    return "/".join(parts[:i]), tuple(int(p) for p in parts[i + 1:])


def chunk_name(coords: tuple[int, ...]) -> str:
    return "c/" + "/".join(str(c) for c in coords) if coords else "c"


def trailer_hex(data) -> str:
    """The chunk's last four bytes in hex (``data``: bytes, or a uint8 array)."""
    return bytes(data[-4:]).hex()


def body_matches_trailer(data) -> bool:
    """True if the chunk's last four bytes are the CRC-32C of the rest (what the codec appended).

    ``data``: bytes, or a uint8 array (a store buffer's own memory). The CRC reads the body in place: a copy of it
    (``bytes(data[:-4])``) cost as much again as the CRC and the read's own copy together on every chunk read."""
    if len(data) < 4:
        return False
    body = np.frombuffer(data, np.uint8)[:-4]
    body.flags.writeable = False  # google_crc32c takes read-only buffers only
    return np.uint32(google_crc32c.value(body)).tobytes() == bytes(data[-4:])


@dataclass(frozen=True)
class Table:
    """The CRC-32C trailer of every chunk of one array as written, in C order of the chunk grid."""

    grid: tuple[int, ...]
    crcs: str  # CRC_HEX hex digits per chunk, ABSENT for a chunk left at the fill value
    stage: str | None

    def expected(self, coords: tuple[int, ...]) -> str | None:
        """The recorded trailer of chunk ``coords``; None when it was never stored (or lies outside the grid)."""
        if len(coords) != len(self.grid) or any(c >= g for c, g in zip(coords, self.grid)):
            return None
        i = int(np.ravel_multi_index(coords, self.grid)) if self.grid else 0
        v = self.crcs[i * CRC_HEX:(i + 1) * CRC_HEX]
        return None if v == ABSENT else v

    @property
    def n_chunks(self) -> int:
        return sum(1 for i in range(0, len(self.crcs), CRC_HEX) if self.crcs[i:i + CRC_HEX] != ABSENT)

    def to_attr(self) -> dict:
        return {"grid": list(self.grid), "crc32c": self.crcs, "stage": self.stage}

    @classmethod
    def from_attr(cls, a) -> "Table | None":
        if not isinstance(a, dict) or "crc32c" not in a:
            return None
        return cls(tuple(int(g) for g in a["grid"]), str(a["crc32c"]), a.get("stage"))


def array_digest(meta: dict, table: Table) -> str:
    """Digest of an array's data as stored: shape, dtype, chunking and every chunk's CRC-32C."""
    h = hashlib.sha256()
    h.update(json.dumps([meta.get("shape"), meta.get("data_type"), meta.get("chunk_grid"), meta.get("fill_value")],
                        sort_keys=True, default=str).encode())
    h.update(table.crcs.encode())
    return h.hexdigest()[:32]


def _table_from_meta_bytes(raw) -> Table | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw.to_bytes())
    except ValueError:
        return None
    if doc.get("node_type") != "array":
        return None
    return Table.from_attr((doc.get("attributes") or {}).get(INTEGRITY_ATTR))


class CheckedStore(WrapperStore):
    """A Zarr store that refuses a chunk which differs from its array's integrity table.

    The table is taken from the array's ``zarr.json``, which Zarr reads whenever an
    array is opened, so a re-written array is checked against its new table.
    """

    def __init__(self, store, url: str = ""):
        super().__init__(store)
        self.url = url
        self._tables: dict[str, Table | None] = {}

    def _with_store(self, store):
        return type(self)(store, self.url)

    async def _table(self, array: str) -> Table | None:
        if array not in self._tables:
            key = f"{array}/zarr.json" if array else "zarr.json"
            self._tables[array] = _table_from_meta_bytes(await self._store.get(key, default_buffer_prototype()))
        return self._tables[array]

    async def get(self, key, prototype=None, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if key == "zarr.json" or key.endswith("/zarr.json"):
            self._tables[key[:-len("zarr.json")].rstrip("/")] = _table_from_meta_bytes(buf)
            return buf
        ck = chunk_key(key)
        if ck is None:
            return buf
        array, coords = ck
        table = await self._table(array)
        if table is not None:
            problem = chunk_problem(table, coords, None if buf is None else buf.as_numpy_array(), full=byte_range is None)
            if problem:
                raise ChunkError(chunk_message(self.url, array, coords, problem, table.stage))
        return buf


def chunk_problem(table: Table, coords: tuple[int, ...], data: "bytes | np.ndarray | None", full: bool = True) -> str | None:
    """Why a stored chunk does not match its table (None when it does)."""
    want = table.expected(coords)
    if data is None:
        return "is missing" if want is not None else None
    if want is None:
        return "was not written by the stage (an unexpected chunk)"
    if full and (trailer_hex(data) != want or not body_matches_trailer(data)):
        return f"is damaged (checksum mismatch, {len(data)} bytes)"
    return None


def chunk_message(url: str, array: str, coords: tuple[int, ...], problem: str, stage: str | None) -> str:
    who = f" (written by stage {stage!r})" if stage else ""
    return f"{url}: array {array!r} chunk {chunk_name(coords)} {problem}{who}; {rerun_hint(stage, url)}"


def grid_of(arr: zarr.Array) -> tuple[int, ...]:
    return tuple(math.ceil(s / c) if c else 0 for s, c in zip(arr.shape, arr.chunks))


async def _trailers(inner, prefix: str) -> dict[tuple[int, ...], str]:
    """Chunk coords -> CRC trailer (hex) of every chunk stored under array ``prefix``."""
    keys = []
    async for k in inner.list_prefix(f"{prefix}/c"):
        ck = chunk_key(k)
        if ck is not None and ck[0] == prefix:
            keys.append((k, ck[1]))
    out = {}
    sem = asyncio.Semaphore(64)

    async def one(k, coords):
        async with sem:
            buf = await inner.get(k, default_buffer_prototype(), SuffixByteRequest(4))
        if buf is not None:
            out[coords] = buf.to_bytes().hex()

    await asyncio.gather(*(one(k, c) for k, c in keys))
    return out


def scan_table(inner, path: str, arr: zarr.Array, stage: str | None) -> Table:
    """The table of what is stored now under array ``path`` (one 4-byte read per chunk)."""
    grid = grid_of(arr)
    found = sync(_trailers(inner, path))
    n = int(np.prod(grid)) if grid else 1
    cells = [ABSENT] * n
    for coords, crc in found.items():
        if len(coords) == len(grid) and all(c < g for c, g in zip(coords, grid)):
            cells[int(np.ravel_multi_index(coords, grid)) if grid else 0] = crc
    return Table(grid, "".join(cells), stage)


def array_meta(arr: zarr.Array) -> dict:
    return arr.metadata.to_dict()
