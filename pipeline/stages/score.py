"""Stage "score": GCN-D (predicted IoU, IoP) on every proposal, then GCN-S on the uncertain ones.

One Dask task per range of proposals (``gcn.score_batch`` proposals, by default
:func:`task_bounds`: few tasks of up to ``TASK_BYTES`` of member rows). A task reads
only what it needs from the store by URL: its slice of ``proposals/offsets`` and
``members``, and the ``features`` / ``knn`` rows of those members (orthogonal
selection of the sorted unique ids, once per task), so no worker holds the feature
matrix; it builds and scores them ``BUILD_ROWS`` member rows at a time. The models are loaded once per
worker process (module-level cache keyed by model directory + digest) and torch
uses the worker's thread count.

Determinism: ``facecluster.tasks.gcn.score_batch`` runs every proposal in a forward of fixed adjacency
shape (size bucket x fixed proposal count; the linear maps on the forward's real nodes), and the
forwards are formed within fixed blocks of :func:`score_block` proposals and at most ``BLOCK_MEMBERS``
members (:func:`block_bounds`: by proposal index and size, whatever the tasks), so a proposal's
scores are bitwise the same for any task size or worker count (tested), which
dedup's tie-breaking needs.

Outputs: ``score/iou``, ``score/iop`` (P float32), ``score/segmented`` (P bool: GCN-S
ran on it), ``score/keep`` (M bool, aligned with ``proposals/members``: False where
GCN-S removed the member).
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import numpy as np

from ..cluster import heap_reuse
from ..config import Config
from ..model_files import check_dim, edge_weight_array, load_models, model_digest, read_model_config
from ..progress import wait_futures
from ..store import RunStore, open_array

log = logging.getLogger(__name__)

STAGE = "score"
_MODELS: dict = {}  # (model_dir, digest) -> (gcnd, gcns, meta); one load per worker process


def _models(model_dir: str, digest: str):
    key = (os.path.abspath(model_dir), digest)
    if key not in _MODELS:
        _MODELS.clear()  # one model per worker at a time
        _MODELS[key] = load_models(model_dir)
        log.info("score: loaded model %s (%s) in pid %d", model_dir, digest[:12], os.getpid())
    return _MODELS[key]


def model_loads() -> int:
    """Models currently cached in this process (tests check one load per worker)."""
    return len(_MODELS)


TASK_BYTES = 1 << 30  # member rows (features + kNN rows) one score task reads and holds
BUILD_ROWS = 1 << 16  # member rows one ``build_batch`` call expands (its n x k temporaries)
SCORE_BLOCK, MIN_BLOCK = 4096, 512  # proposals per forward block, at most / at least (see score_block)
BLOCK_MEMBERS = 1 << 18  # members per forward block, at most (a larger proposal is a block alone; see block_bounds)


def score_block(n_prop: int) -> int:
    """Proposals per forward block of a run: P / 8 within ``MIN_BLOCK``..``SCORE_BLOCK``.

    A function of the run alone (never of the workers), so scores do not depend on
    them. P / 8: small runs still make 8 blocks to share among workers; and it is what
    0.3.0 and earlier used as proposals per task on 2 workers, so runs scored
    with 2 workers keep their scores bit for bit (all 367,531 at 1M faces checked).
    """
    return int(min(SCORE_BLOCK, max(MIN_BLOCK, -(-int(n_prop) // 8))))


def block_bounds(offsets: np.ndarray, block: int, max_members: int | None = None) -> np.ndarray:
    """Bounds of the forward blocks: consecutive proposals, at most ``block`` of them and at most ``max_members``
    members in all (a larger proposal is a block alone). A function of the run alone, like :func:`score_block`.

    Why a member bound: a block's inputs are built and held at once (about 4 KB per member with k = 80), and
    ``block`` proposals of the largest sizes came first: on planted lists at 300k faces the first block held
    1.06M members and its task peaked at 6 GB. Where every block is under the bound the blocks are the plain
    ``block``-proposal ones (so runs without such blocks keep their scores bit for bit).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n, block = len(offsets) - 1, max(1, int(block))
    max_members = BLOCK_MEMBERS if max_members is None else max_members
    out, a = [0], 0
    while a < n:
        fit = int(np.searchsorted(offsets, offsets[a] + int(max_members), side="right")) - 1
        a = max(a + 1, min(a + block, n, fit))
        out.append(a)
    return np.asarray(out if n > 0 else [0], np.int64)


def row_bytes(dim: int, k: int, spec: dict) -> int:
    """Bytes of one member's rows a score task holds: feature, kNN ids, edge weights (and cosines)."""
    return 4 * dim + 8 * k + 4 * k * (2 if spec.get("weights") == "both" else 1)


def score_task(url: str, model_dir: str, digest: str, blocks: list[int], iop_range, keep_prob: float,
               segment: bool = True, build_rows: int = BUILD_ROWS) -> dict:
    """Worker task: score proposals ``[blocks[0], blocks[-1])``, whole blocks of :func:`block_bounds` (``blocks``:
    their bounds); returns their outputs.

    The rows of all the task's members are read once (each read decodes nearly every
    chunk of its array, whatever the task's size). Each block is then built ``build_rows``
    member rows at a time (a proposal's inputs do not depend on its batch) and scored as one
    batch, so the task's memory is its rows plus one block's inputs and one build's temporaries.

    Why blocks: ``score_batch`` runs fixed-shape forwards of proposals grouped by size
    within its batch, and a proposal's last bit can depend on its slot in a forward
    (the 64 -> 2 head GEMM; measured at 1M faces: 1 proposal in 4,096 changed in the
    last bit when its batch changed). Fixed blocks make every forward's members a
    function of the run alone (proposal index and sizes), so the scores are bitwise the same
    for any task split or worker count (:func:`score_block`, :func:`block_bounds`).
    """
    import torch

    from facecluster.tasks.gcn import build_batch, concat_batches, score_batch

    from ..cluster import worker_threads

    t0 = time.process_time()
    blocks = [int(x) for x in blocks]
    p0, p1 = blocks[0], blocks[-1]
    torch.set_num_threads(worker_threads())
    gcnd, gcns, meta = _models(model_dir, digest)
    off = open_array(url, "proposals/offsets")[p0:p1 + 1]
    members = open_array(url, "proposals/members")[int(off[0]):int(off[-1])]
    off = off - off[0]
    ids, inv = np.unique(members, return_inverse=True)  # sorted: row locality in the store
    names = ["features", "knn/index", edge_weight_array(meta["spec"])]
    names += ["knn/sim"] if meta["spec"].get("weights") == "both" else []
    rows = [open_array(url, name).get_orthogonal_selection((ids, slice(None))) for name in names]
    if iop_range is None:  # the model's validation tuning found GCN-S does not help
        segment, iop_range = False, (1.0, 0.0)
    outs = []
    for q0, q1 in zip(blocks[:-1], blocks[1:]):
        q0, q1 = q0 - p0, q1 - p0
        parts = []
        for a, b in row_batches(off[q0:q1 + 1], build_rows):
            a, b = a + q0, b + q0
            sel = inv[off[a]:off[b]]
            parts.append(build_batch(np.diff(off[a:b + 1]), members[off[a]:off[b]], *(r[sel] for r in rows[:3]),
                                     meta["spec"], knn_cos=rows[3][sel] if len(rows) > 3 else None))
        batch = parts[0] if len(parts) == 1 else concat_batches(parts)
        outs.append(score_batch(gcnd, batch, gcns if segment else None, tuple(iop_range), keep_prob))
        del parts, batch
    cat = (lambda key, dt: np.concatenate([o[key] for o in outs]) if outs else np.zeros(0, dt))
    return {"p0": p0, "iou": cat("iou", np.float32), "iop": cat("iop", np.float32),
            "segmented": cat("segmented", bool), "keep": cat("keep", bool), "members": int(off[-1]),
            "cpu_seconds": time.process_time() - t0}


def row_batches(offsets: np.ndarray, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive proposal ranges ``[a, b)`` of a CSR with at most ``max_rows`` members each.

    A proposal larger than ``max_rows`` is a range of its own.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    out, a, n = [], 0, len(offsets) - 1
    while a < n:
        b = max(a + 1, int(np.searchsorted(offsets, offsets[a] + max_rows, side="right")) - 1)
        out.append((a, min(b, n)))
        a = out[-1][1]
    return out


def task_bounds(offsets: np.ndarray, n_workers: int, bytes_per_row: int, per: int | None = None,
                task_bytes: int = TASK_BYTES, block: int = SCORE_BLOCK, max_members: int | None = None) -> list[int]:
    """Proposal bounds of the score tasks, on whole blocks (:func:`block_bounds`): ``per`` proposals each (rounded
    up to whole blocks of ``block``), or by default about equal member counts.

    Why few large tasks: every task's reads decode nearly every chunk of ``features``
    and ``knn`` (a proposal's members are scattered over the store), 2.4 s of CPU
    per task at 1M faces whatever its size, so the task count is what the reads
    cost. The default is the fewest tasks whose member rows fit ``task_bytes``, at
    least 2 per worker and a multiple of the worker count (so no worker waits on a
    last lone task), as far as there are blocks.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_prop = len(offsets) - 1
    bb = block_bounds(offsets, block, max_members)
    if per:
        step = -(-int(per) // max(1, int(block)))  # blocks per task
        return sorted({*(int(x) for x in bb[::step]), max(n_prop, 0)})
    w = max(1, int(n_workers))
    rows = int(offsets[-1]) if n_prop else 0
    n_tasks = max(2 * w, -(-rows * int(bytes_per_row) // int(task_bytes)))
    n_tasks = -(-n_tasks // w) * w
    cuts = np.searchsorted(offsets, np.linspace(0, rows, n_tasks + 1)[1:-1], side="left")
    j = np.clip(np.searchsorted(bb, cuts), 1, len(bb) - 1)
    cuts = np.where(cuts - bb[j - 1] <= bb[j] - cuts, bb[j - 1], bb[j])  # the nearest block bound
    return sorted({0, n_prop, *(int(c) for c in cuts if 0 < c < n_prop)})


def segmentation_params(cfg: Config, meta: dict) -> tuple[list | None, float]:
    """GCN-S (iop_range, keep_prob): [gcn] values when set, else the model's validation-tuned ones.

    ``iop_range`` None means GCN-S is skipped (training found it did not help on the
    validation identities). Models without a tuned record fall back to (0.3, 0.7) / 0.5.
    """
    tuned = meta.get("segmentation") or {"iop_range": [0.3, 0.7], "keep_prob": 0.5}
    g = cfg.gcn
    rng = list(g.iop_range) if g.iop_range is not None else tuned.get("iop_range")
    kp = float(g.keep_prob) if g.keep_prob is not None else float(tuned.get("keep_prob", 0.5))
    return (None if rng is None else [float(x) for x in rng]), kp


def run_score(store: RunStore, model_dir: str, cfg: Config, client, force: bool = False) -> dict:
    """Score every proposal with the model in ``model_dir`` (stage "score", input "proposals").

    Raises
    ------
    BadInput : when the model directory is incomplete or its feature dimension
        differs from the run's.
    """
    store.require("proposals", f"run `facecluster proposals {store.url}` first")
    meta = read_model_config(model_dir)
    check_dim(meta, store.array("features").shape[1], model_dir, store.url)
    digest = model_digest(model_dir)
    g = cfg.gcn
    iop_range, keep_prob = segmentation_params(cfg, meta)
    params = {"segment": g.segment, "iop_range": iop_range, "keep_prob": keep_prob}
    extra = {"model": os.path.abspath(model_dir), "model_digest": digest}
    inputs = ["proposals"] + (["edges"] if edge_weight_array(meta["spec"]) == "edges/prob" else [])
    with store.stage(STAGE, params, inputs=inputs, extra=extra, force=force) as w:
        if w is None:
            return store.record(STAGE).get("summary", {})
        n_prop = store.array("proposals/offsets").shape[0] - 1
        token = uuid.uuid4().hex[:8]
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        spec = meta["spec"]
        offsets = store.array("proposals/offsets")[:]
        block = int(g.score_batch) if g.score_batch else score_block(n_prop)  # an explicit one: as in 0.3.0
        bounds = task_bounds(offsets, n_workers, row_bytes(store.array("features").shape[1],
                                                           store.array("knn/index").shape[1], spec), g.score_batch,
                             block=block)
        blocks = block_bounds(offsets, block)
        model_dir = os.path.abspath(model_dir)
        t0 = time.perf_counter()
        with heap_reuse(client):  # its temporaries reuse freed heap instead of fresh pages (cluster.HEAP_REUSE_THRESHOLD)
            futs = [client.submit(score_task, store.url, model_dir, digest,
                                  blocks[(blocks >= a) & (blocks <= b)].tolist(), iop_range, keep_prob, g.segment,
                                  BUILD_ROWS, key=f"score-{a}-{token}")
                    for a, b in zip(bounds[:-1], bounds[1:])]
            res = wait_futures(futs, "score")
        seconds = time.perf_counter() - t0
        cat = (lambda k: np.concatenate([r[k] for r in res]) if res else np.zeros(0))
        iou = cat("iou").astype(np.float32)
        iop = cat("iop").astype(np.float32)
        seg = cat("segmented").astype(bool) & g.segment & (iop_range is not None)
        keep = cat("keep").astype(bool)
        w.write_array("score/iou", iou)
        w.write_array("score/iop", iop)
        w.write_array("score/segmented", seg)
        w.write_array("score/keep", keep)
        summary = {"n_proposals": int(n_prop), "tasks": len(futs),
                   "proposals_per_task": int(np.max(np.diff(bounds), initial=0)),
                   # per task, in task order: where the stage's time goes when one worker idles at the end
                   "task_members": [int(r["members"]) for r in res],
                   "task_cpu_seconds": [round(float(r["cpu_seconds"]), 2) for r in res],
                   "seconds": round(seconds, 3),
                   "proposals_per_s": round(n_prop / max(seconds, 1e-9), 1),
                   "proposals_per_s_per_worker": round(n_prop / max(seconds, 1e-9) / n_workers, 1),
                   "segmented": int(seg.sum()), "members_removed": int((~keep).sum()),
                   "mean_iou": float(iou.mean()) if len(iou) else None, "model": model_dir,
                   "iop_range": iop_range, "keep_prob": keep_prob,
                   "model_metrics": meta.get("metrics", {})}
        w.summary.update(summary)
        return summary
