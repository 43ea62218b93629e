"""Peer clustering methods run on the same kNN graph, for side-by-side comparison.

kNN + Infomap is the field's strongest untrained baseline (93.9 pairwise F on
MS1M 584K, vs 85.7-88.6 for GCN-D/GCN-S). ``infomap`` is a dependency of facecluster
(the learned method's communities run it too); these kernels raise ImportError with the
fix when an installation lacks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np

from .components import max_by_key, node_positions

# Undirected links from which a worker's Infomap problem runs in a child process
# (:mod:`facecluster.tasks.infomap_child`: Infomap holds the GIL for its whole run, which would
# silence the worker's heartbeats). Below it a run takes seconds and starting a process would
# cost more than it saves; the partition is the same either way.
CHILD_LINKS = 1_000_000


def knn_edge_list(index: np.ndarray, sim: np.ndarray, min_sim: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed kNN edges (i -> index[i, j]) with similarity >= ``min_sim``; padding (-1) and self dropped."""
    n, k = index.shape
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    dst = index.reshape(-1).astype(np.int64)
    w = sim.reshape(-1).astype(np.float64)
    keep = (dst >= 0) & (dst != src) & (w >= min_sim)
    return src[keep], dst[keep], w[keep]


def same_cut(dtype, floor: float):
    """The smallest value of ``dtype`` that is >= ``floor`` read as float64: ``w >= same_cut(w.dtype, floor)``
    keeps exactly what ``w.astype(float64) >= floor`` keeps, without the float64 copy of ``w`` (numpy compares a
    float32 array with a Python float in float32, where float32(floor) may round below ``floor``)."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        return floor
    cut = dtype.type(floor)
    return cut if float(cut) >= floor else np.nextafter(cut, dtype.type(np.inf))


def undirected_links(n: int, src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Each undirected link once, with the larger weight of i->j / j->i: an (L, 3) float64 array of
    (low id, high id, weight) in (low, high) order, as Infomap's bulk loader takes it.

    Why an array: Infomap's list path turns every link into Python objects first (three lists of L
    ints and floats, then L tuples), which at 10^7 links is gigabytes beside the graph itself; the
    array path hands the same links, in the same order, to the same C++ network (same partition).
    The pair is one int64 key (low * n + high, exact below n = 3e9), so one sort orders it and the larger
    weight of a pair is a ``maximum.reduceat`` over its run (a two-key ``lexsort`` took 8.9 s of a
    686k-face component's 25M directed edges; this 5 s, the same array).
    """
    src, dst, weight = np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(weight, np.float64)
    key, wmax = max_by_key(np.minimum(src, dst) * np.int64(n) + np.maximum(src, dst), weight)
    links = np.empty((len(key), 3), np.float64)
    links[:, 0], links[:, 1] = np.divmod(key, np.int64(max(n, 1)))
    links[:, 2] = wmax
    return links


def infomap_clusters(n: int, src: np.ndarray, dst: np.ndarray, weight: np.ndarray, seed: int = 42,
                     trials: int = 1) -> np.ndarray:
    """Two-level Infomap on a weighted undirected graph; returns a label per node (0..C-1).

    Nodes without edges are singletons. Labels are renumbered by first occurrence so
    the output is deterministic for a given seed.
    """
    return infomap_modules(n, undirected_links(n, src, dst, weight), seed=seed, trials=trials)


def infomap_modules(n: int, links: np.ndarray, seed: int = 42, trials: int = 1) -> np.ndarray:
    """:func:`infomap_clusters` on the links of :func:`undirected_links` (the caller may free its edge arrays
    before Infomap builds its network)."""
    return run_network(infomap_network(n, links, seed=seed, trials=trials), n)


def infomap_args(seed: int = 42, trials: int = 1) -> str:
    """The engine arguments of a two-level undirected run, as Infomap's Python facade renders
    ``Infomap(two_level=True, silent=True, seed=seed, num_trials=trials, directed=False)`` (the tests compare the
    two paths' modules)."""
    return (f" --silent --two-level --flow-model undirected --seed {int(seed)}"
            + (f" --num-trials {int(trials)}" if int(trials) != 1 else ""))


def infomap_engine():
    """Infomap's C++ engine class (``infomap._swig.InfomapWrapper``, what the facade's ``Infomap`` drives), or
    None where this installation's infomap lacks it (the facade is used then: the same partition).

    Why the engine directly: per run the facade validates and renders its ~100 options in Python several
    times (constructor and run) and builds a Result; on a small component that is most of the run
    (measured: 0.9-1.3 ms per 2-60-node component through the facade, 0.45-0.55 ms through the engine,
    0.24 ms of it Infomap's own search), and the communities stage at 1M faces solves ~160,000 such
    components. The engine gets the argument string the facade would render (:func:`infomap_args`) and
    the same nodes and links in the same order; tests compare the modules with the facade's."""
    try:
        from infomap._swig import InfomapWrapper
    except ImportError:
        return None
    needed = ("addNode", "addLinksFromNumpy2D", "run", "getModules")
    return InfomapWrapper if all(hasattr(InfomapWrapper, m) for m in needed) else None


def infomap_network(n: int, links: np.ndarray, seed: int = 42, trials: int = 1, engine: bool = True):
    """A two-level undirected Infomap holding ``n`` nodes and ``links`` (copied into its network: the caller
    may drop them before :func:`run_network`). ``engine=False``: through the facade even where
    :func:`infomap_engine` is available (the tests' reference)."""
    try:
        import infomap
    except ImportError:  # pragma: no cover - depends on the optional extra
        raise ImportError("Infomap is missing from this installation: pip install 'infomap>=2.16,<3' "
                          "(a dependency of facecluster)") from None
    core = infomap_engine() if engine else None
    if core is None:
        im = infomap.Infomap(two_level=True, silent=True, seed=seed, num_trials=trials, directed=False)
        im.add_nodes(range(n))
        im.add_links(links)
        return im
    net = core(infomap_args(seed, trials))
    for node in range(n):
        net.addNode(node)
    links = np.ascontiguousarray(links, np.float64)
    if len(links):
        net.addLinksFromNumpy2D(links, links.shape[0], links.shape[1], "f", 8)
    return net


def run_network(im, n: int) -> np.ndarray:
    """Run an :func:`infomap_network`; its modules as labels 0..C-1 numbered by first node (nodes Infomap
    left out are singletons)."""
    if hasattr(im, "getModules"):  # the engine: run with no arguments of its own, as the facade runs it
        im.run("")
        modules = im.getModules(1, False)
    else:
        im.run()
        # Infomap.get_modules, not the Result that infomap >= 2.16 returns from run(): reading that
        # Result's modules goes through a SWIG iterator that, with faiss imported in the same process,
        # crashed the interpreter (segfault in faiss' swigfaiss __next__, from infomap/result.py, in
        # training's choose_levels). get_modules is deprecated in 2.16 (a warning) and removed in 3.0,
        # hence infomap < 3 in pyproject.toml; its deprecation warning is silenced here, where the choice is made.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Infomap\.get_modules is deprecated")
            modules = im.get_modules(depth_level=1)
    labels = np.full(n, -1, dtype=np.int64)
    if len(modules):
        labels[np.fromiter(modules.keys(), np.int64, len(modules))] = np.fromiter(modules.values(), np.int64,
                                                                                  len(modules))
    missing = labels < 0
    labels[missing] = labels.max(initial=-1) + 1 + np.arange(int(missing.sum()))
    _, first_idx, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first_idx), dtype=np.int64)
    rank[np.argsort(first_idx, kind="stable")] = np.arange(len(first_idx))
    return rank[inv]


def run_infomap_child(n: int, links_path: str, seed: int = 42, trials: int = 1) -> np.ndarray:
    """:func:`infomap_modules` of the links saved (``np.save``) at ``links_path``, run in a child process
    (:mod:`facecluster.tasks.infomap_child`; the same partition), this thread waiting on it with the GIL free.
    The child maps the file rather than copying it, and writes its modules beside it."""
    out_path = os.path.join(os.path.dirname(links_path), "modules.npy")
    cmd = [sys.executable, "-m", "facecluster.tasks.infomap_child", links_path, str(int(n)), str(int(seed)),
           str(int(trials)), out_path, str(os.getpid())]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0 or not os.path.exists(out_path):
        why = (f"killed by signal {-proc.returncode} (SIGKILL: out of memory?)" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"Infomap's child process on {n} nodes failed ({why})" + (": " + " | ".join(tail) if tail else ""))
    return np.load(out_path)


def solve_links(n: int, links: np.ndarray, seed: int = 42, apart: bool | None = None) -> np.ndarray:
    """Infomap modules of ``links`` (:func:`undirected_links`) here, or in a child process (``apart``; by
    default from :data:`CHILD_LINKS` links on): the same partition either way.

    The links go to the child through a ``.npy`` file in the temporary directory (``TMPDIR``). Pass them
    as a temporary (``solve_links(n, undirected_links(...))``): this function then holds the only
    reference and drops it once the file is written, so this process holds no copy while Infomap runs.
    """
    if apart is None:
        apart = len(links) >= CHILD_LINKS
    if not apart:
        return infomap_modules(n, links, seed=seed)
    with tempfile.TemporaryDirectory(prefix="facecluster-infomap-") as tmp:
        links_path = os.path.join(tmp, "links.npy")
        np.save(links_path, np.ascontiguousarray(links, np.float64))
        del links
        return run_infomap_child(n, links_path, seed=seed)


def infomap_by_component(nodes: np.ndarray, comp: np.ndarray, index: np.ndarray, weight: np.ndarray,
                         floor: float, seed: int = 42, joint: bool = False) -> np.ndarray:
    """Infomap run separately on each connected component of a group of whole components (or on the group at once).

    Parameters
    ----------
    nodes : (n,) ascending global ids of every node of the components.
    comp : (n,) component id of each node.
    index, weight : (n, k) the nodes' kNN rows and edge weights; edges with
        ``weight >= floor`` are used (at the floor the components are closed: every
        such edge joins two nodes of one component).
    seed : Infomap's seed, the same for every component.
    joint : one Infomap run over the whole group (its modules split by component
        afterwards by the caller) instead of one per component. The two-level map
        equation is not additive over components: its index codebook is shared by every
        module of a run, so a component solved alone is split more finely than in a
        whole-graph run (measured on 100k built-in faces at the automatic min_sim:
        pairwise F 0.733 per component, 0.776 whole graph, 0.776 in joint groups of
        >= 25,000 nodes). The result then depends on the grouping: callers keep it fixed.

    Returns
    -------
    (n,) int64 module of each node, numbered 0.. within its component (``joint``:
    within the group). Each component is its own Infomap problem, so any grouping of
    components into calls gives the same modules (and, components being disconnected,
    close to the partition of one whole-graph run).
    """
    nodes = np.asarray(nodes, np.int64)
    comp = np.asarray(comp, np.int64)
    index = np.asarray(index)
    n = len(index)
    if n == 0:
        return np.zeros(0, np.int64)
    # only the edges above the floor are ever materialised (a giant component's task holds them all:
    # an n x k int64 source array beside them would double its memory)
    weight = np.asarray(weight)
    keep = (index >= 0) & (weight >= same_cut(weight.dtype, floor))
    src = np.nonzero(keep)[0]
    dst, w = np.asarray(index[keep], np.int64), np.asarray(weight[keep], np.float64)
    del keep
    dst = node_positions(nodes, dst)
    if (dst < 0).any():
        raise ValueError("infomap_by_component: an edge above the floor leaves the components given")
    if joint or (n and (comp == comp[0]).all()):  # one component: nothing to split
        links = [undirected_links(n, src, dst, w)]
        del src, dst, w  # a giant component's task: its directed edges go before Infomap's network comes
        return solve_links(n, links.pop(), seed=seed)  # popped: solve_links holds the only reference
    module = np.zeros(n, np.int64)
    # every component's undirected links at once, in node-position order: a component's members ascend (a
    # stable sort by component), so a node's place among them keeps that order, and the component's slice of
    # these links, renumbered, is exactly its own undirected_links (the per-component numpy calls cost as much
    # as Infomap itself on the ~20-face components that make up most of a floor's problems)
    order = np.argsort(comp, kind="stable")
    sorted_comp = comp[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_comp[1:] != sorted_comp[:-1]]))
    sizes = np.diff(np.append(starts, n))
    local = np.empty(n, np.int64)
    local[order] = np.arange(n, dtype=np.int64) - np.repeat(starts, sizes)
    links = undirected_links(n, src, dst, w)
    del src, dst, w
    low = links[:, 0].astype(np.int64)
    l_comp = comp[low]
    l_order = np.argsort(l_comp, kind="stable")
    links, low, l_comp = links[l_order], low[l_order], l_comp[l_order]
    links[:, 0] = local[low]
    links[:, 1] = local[links[:, 1].astype(np.int64)]
    del low, l_order
    first_comp = sorted_comp[starts]
    cut = np.searchsorted(l_comp, first_comp, "left"), np.searchsorted(l_comp, first_comp, "right")
    for s, m, a, b in zip(starts, sizes, *cut):
        # a component of one face is its own module; one of two faces (one link) is one module: the map
        # equation of two modules codes each step twice (index and module codebooks) where one module codes
        # it once, so Infomap never splits it (tested against Infomap over link weights). At 1M faces 36,369 of the
        # four floors' 163,168 multi-face components have two faces, ~0.45 ms each through the engine
        if m < 3:
            continue
        members = order[s:s + m]
        module[members] = solve_links(int(m), links[a:b], seed=seed)
    return module
