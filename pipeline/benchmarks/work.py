"""Work-bound estimates for `bench cluster`: each stage's multiply-adds at this machine's measured GEMM rate.

A stage's "work bound" is the time its dense arithmetic alone would take at the
float32 GEMM rate the workers reach in the same run (torch matmul, 4096 x 256 @
256 x 50,000, on every worker at once with its thread count): the distance between
a stage's time and its bound is selection, bookkeeping, decoding and memory
traffic. Counted: kNN (the IVF assignment and list scans, or N^2 for exact), the
edge scorer's MLP per kNN edge, the proposals' level-1 kNN per group of settings
sharing a cut, and the GCN forwards of score (padded shapes, as run). Graph,
communities and dedup do no dense arithmetic (bound shown as "-").
"""

from __future__ import annotations

import time

import numpy as np


def gemm_rate(seconds: float = 1.0, precision: str = "float32", m: int = 4096, d: int = 256, n: int = 50_000) -> float:
    """FLOP/s of an (m x d) @ (d x n) torch matmul in this process with the task thread count (run on every worker
    with ``client.run``: all at once, the rate they share). ``precision`` "bfloat16": the exact kNN kernel's
    candidate GEMM (its tiles are ``BF16_TILE`` queries against the database rows)."""
    import torch

    from ..cluster import worker_threads

    torch.set_num_threads(worker_threads())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
    a, b = torch.randn(m, d).to(dtype), torch.randn(d, n).to(dtype)
    torch.mm(a, b)  # warm-up
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2.0 * m * d * n * reps / (time.perf_counter() - t0)


def _linear_macs(module) -> int:
    """Multiply-adds of one sample through a module's Linear layers."""
    from torch import nn

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def knn_flop(s: dict) -> float:
    n, d = float(s.get("n", 0)), float(s.get("dim", 0))
    if s.get("mode") == "ivf":
        nlist, nprobe = float(s["nlist"]), float(s["nprobe"])
        return 2.0 * n * d * (nlist + n * nprobe / nlist)
    return 2.0 * n * n * d


def edges_flop(s: dict, model_dir: str) -> float:
    from ..model_files import load_edge_scorer

    return 2.0 * float(s.get("edges", 0)) * _linear_macs(load_edge_scorer(model_dir)[0])


def proposals_flop(s: dict, dim: int) -> float:
    """Level-1 kNN of each group of settings sharing a cut: exact up to 50k nodes; above, the similarities of the
    candidate pairs from the face graph the cut task computed (``level1_pairs`` in the setting's summary)."""
    from ..stages.proposals import cut_key

    groups = {}
    for st in s.get("settings", []):
        if st.get("source") != "communities" and st.get("levels", 1) > 1:
            n = float(st.get("super_vertices", 0))
            groups[cut_key(st)] = n * n if st.get("level1_pairs") is None else float(st["level1_pairs"])
    return float(sum(2.0 * dim * pairs for pairs in groups.values()))


def score_flop(offsets: np.ndarray, segmented: int, model_dir: str, dim: int, block: int = 4096) -> float:
    """GCN-D forwards as run (size buckets, fixed proposals per forward, per block), GCN-S on the segmented share."""
    from facecluster.tasks.gcn import bucket_of, input_dim, props_per_forward

    from ..model_files import read_model_config

    meta = read_model_config(model_dir)
    hidden = list(meta["hidden"])
    din = input_dim(dim, meta["spec"])
    sizes = np.diff(np.asarray(offsets, np.int64))
    buckets = np.array([bucket_of(int(x)) for x in np.unique(sizes)])
    bucket = buckets[np.searchsorted(np.unique(sizes), sizes)] if len(sizes) else np.zeros(0, np.int64)

    def forward(n_pad: int, per: int, d0: int) -> float:
        dims, f = [d0, *hidden], 0.0
        for a, b in zip(dims[:-1], dims[1:]):
            f += 2.0 * 2 * per * n_pad * a * b + 2.0 * per * n_pad * n_pad * b  # self + neighbour Linear, A @ H
        return f

    total = 0.0
    for q in range(0, len(sizes), block):
        bb = bucket[q:q + block]
        for n_pad in np.unique(bb):
            per = props_per_forward(int(n_pad))
            total += -(-int((bb == n_pad).sum()) // per) * forward(int(n_pad), per, din)
    total *= int(meta.get("ensemble", 1))
    if len(sizes) and segmented:
        total += total / int(meta.get("ensemble", 1)) * segmented / len(sizes) * (din + 2) / din
    return total


def stage_flop(name: str, summary: dict, store, model_dir: str) -> float | None:
    """The dense arithmetic of one stage of `bench cluster` (None: the stage does none)."""
    dim = int(store.array("features").shape[1])
    if name == "knn":
        return knn_flop(summary)
    if name == "edges":
        return edges_flop(summary, model_dir)
    if name == "proposals":
        return proposals_flop(summary, dim)
    if name == "score":
        return score_flop(store.array("proposals/offsets")[:], int(summary.get("segmented", 0)), model_dir, dim)
    return None


def busy_shares(records: list[dict], workers: list[str], seconds: float) -> dict[str, float]:
    """Each worker's share of a stage's wall time spent computing tasks (Dask task-stream records)."""
    busy = {w: 0.0 for w in workers}
    for r in records:
        for ss in r.get("startstops", ()):
            if ss.get("action") == "compute":
                busy[r["worker"]] = busy.get(r["worker"], 0.0) + ss["stop"] - ss["start"]
    return {w: round(b / max(seconds, 1e-9), 3) for w, b in sorted(busy.items())}


def single_process_faiss(x: np.ndarray, k: int, threads: int, q: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Baseline: one process, faiss IndexFlatIP over all rows of ``x``, ``threads`` OpenMP threads.

    Searches ``q`` (default: every row of ``x``) for k+1 neighbours (self included);
    returns (search seconds, neighbour ids).
    """
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    t = time.perf_counter()
    _, idx = index.search(x if q is None else np.ascontiguousarray(q), k + 1)
    return time.perf_counter() - t, idx
