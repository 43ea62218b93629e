"""A child process that runs one Infomap problem: ``python -m facecluster.tasks.infomap_child LINKS N SEED TRIALS OUT``.

Why a process of its own: Infomap's ``run()`` holds the GIL for its whole run (measured: a
200k-node graph kept a ticking Python thread silent for 70 of its 76 s). In a Dask worker that
silences the worker's event loop too, so it sends no heartbeat, and past the scheduler's
``worker-ttl`` (5 minutes by default) the worker is removed and its task rescheduled: a giant
component's Infomap at 1M faces was lost that way, 600 s apart, again and again. The worker's
task thread waits on this process instead, with the GIL free.

Reads the (L, 3) float64 links of :func:`facecluster.tasks.peers.undirected_links` from the
``.npy`` file LINKS, writes the (N,) int64 modules of :func:`facecluster.tasks.peers.infomap_modules`
to the ``.npy`` file OUT (through a temporary name, so OUT is whole or absent).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import numpy as np

from .peers import infomap_network, run_network

PR_SET_DEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the process that started it dies (a worker killed
    mid-task leaves no Infomap run behind it). Elsewhere nothing is arranged."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    links_path, n, seed, trials, out_path, parent = argv
    die_with_parent(int(parent))
    links = np.load(links_path, mmap_mode="r")  # file pages, not this process' own memory
    network = infomap_network(int(n), links, seed=int(seed), trials=int(trials))
    del links  # unmapped before the run: the network holds its own copy (its pages counted ~1 KB per face)
    modules = run_network(network, int(n))
    tmp = out_path + ".part.npy"
    np.save(tmp, modules)
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
