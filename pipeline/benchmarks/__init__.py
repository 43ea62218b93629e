"""`facecluster bench NAME`: one module per benchmark, each exposing a click ``command``.

Benchmarks print ratios measured within one run (never absolute timings compared
across runs: machines are shared and noisy) and save their results as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

BENCHMARKS = {
    "knn": "kNN: distributed exact vs single-process faiss; IVF speed-up and edge recall; memory per worker.",
    "proposals": "Super-vertices on >= 1M faces vs scipy connected components; bytes per edge.",
    "cluster": "Proposals scored per second per worker; end-to-end time by stage; peak memory.",
    "scaling": "1 vs 2 worker processes for each stage.",
}


def save_result(name: str, result: dict, out: str | os.PathLike | None) -> Path:
    """Write a benchmark result (with machine facts) as JSON; returns the path."""
    path = Path(out) if out else Path(f"bench-{name}.json")
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}, **result}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
