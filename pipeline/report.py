"""HTML report of a run: a self-contained folder (``index.html`` + PNG plots).

Sections, each drawn only from what the run store holds (a section whose data is
absent says "not run" and which command produces it):

* overview (faces, dimension, stages and their status),
* quality table: pairwise / BCubed P/R/F, NMI and cluster counts for every
  clustering in the run (``clusters`` and any other 1-D integer per-face array,
  e.g. a threshold baseline) against the ground truth (``labels`` or ``--gt``),
* cluster-size distribution (log-log), one curve per clustering and the truth,
* predicted IoU / IoP histograms (``score/iou``, ``score/iop``),
* proposals per setting and level, and their sizes (``proposals/...``),
* kNN similarity of the first and the k-th neighbour (``knn/sim``),
* similarity structure of a few of the largest clusters (``features``),
* time per stage, and every stage's parameters, summary and package versions.

Plots use matplotlib's ``Figure`` with the Agg canvas directly, never pyplot, so
building a report does not switch the backend of a notebook or GUI session.
Arrays are read chunk by chunk where they scale with N x k.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput
from .store import RunStore, is_local, local_path

log = logging.getLogger(__name__)

# Arrays that are inputs or intermediate results, never a clustering to evaluate.
_NOT_METHODS = ("features", "labels", "input_rows")
_NOT_METHOD_GROUPS = ("_tmp", "knn", "graph", "proposals", "score")

_METRIC_COLUMNS = [
    ("pairwise_precision", "pairwise P"), ("pairwise_recall", "pairwise R"), ("pairwise_f", "pairwise F"),
    ("bcubed_precision", "BCubed P"), ("bcubed_recall", "BCubed R"), ("bcubed_f", "BCubed F"),
    ("nmi", "NMI"), ("n_clusters", "clusters"), ("n_singletons", "singletons"), ("max_cluster", "largest"),
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #eee} .notrun{color:#888;font-style:italic}
.muted{color:#666;font-size:.9em} pre{margin:0;white-space:pre-wrap;font-size:.85em}
.kv{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8em;word-break:break-word} summary{cursor:pointer;color:#235}
"""


@dataclass
class Section:
    """One section of the report: a title, HTML body and the PNGs it references."""

    key: str
    title: str
    body: str = ""
    images: list[str] = field(default_factory=list)
    ran: bool = True


def _esc(x) -> str:
    return html.escape(str(x))


def _not_run(key: str, title: str, what: str, how: str) -> Section:
    return Section(key, title, f'<p class="notrun">not run: {_esc(what)} ({_esc(how)}).</p>', ran=False)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return _esc(v)


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{v}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(figsize=(8, 3.6)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, format="png", bbox_inches="tight")  # tight: no clipped tick labels
    return name


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{_esc(name)}" alt="{_esc(alt)}"></p>'


# -- data access -------------------------------------------------------------------
def n_faces(store: RunStore) -> int | None:
    """Number of faces of the run (from ``features``), None before ingest."""
    return int(store.array("features").shape[0]) if store.has("features") else None


def clustering_arrays(store: RunStore) -> dict[str, str]:
    """Every clustering of the run: ``{array path: stage that wrote it}``.

    A clustering is any 1-D integer array of N entries outside the input and
    intermediate arrays (``features``, ``labels``, ``input_rows``, ``knn/``,
    ``graph/``, ``proposals/``, ``score/``) whose writing stage completed;
    ``clusters`` (the pipeline's result) comes first.
    """
    import zarr

    n = n_faces(store)
    if n is None:
        return {}
    from .export import owning_record

    found = {}
    for path, obj in store.root.members(max_depth=None):
        if not isinstance(obj, zarr.Array) or path in _NOT_METHODS or path.split("/", 1)[0] in _NOT_METHOD_GROUPS:
            continue
        if obj.ndim != 1 or obj.shape[0] != n or obj.dtype.kind not in "iu":
            continue
        owner = owning_record(store, path)
        if owner is None:
            found[path] = "?"
        elif owner[1].get("complete"):
            method = (owner[1].get("params") or {}).get("method")
            found[path] = owner[0] + (f" ({method})" if method and method != owner[0] else "")
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "clusters", kv[0])))


def ground_truth(store: RunStore, gt: str | os.PathLike | None = None) -> tuple[np.ndarray | None, str | None]:
    """Ground-truth labels per face: a ``--gt`` file (per face or per input row), else ``labels``."""
    n = n_faces(store)
    if gt is not None:
        from facecluster.tasks.io import read_labels

        try:
            lab = read_labels(gt)
        except ValueError as e:
            raise BadInput(str(e)) from None
        if n is not None and lab.shape[0] != n:
            # Ingest may have dropped invalid rows: labels of the input file are per input row.
            if store.has("input_rows"):
                rows = np.asarray(store.array("input_rows")[...], dtype=np.int64)
                if rows.size and rows.max() < lab.shape[0]:
                    return lab[rows], str(gt)
            raise BadInput(f"{gt}: {lab.shape[0]} labels but the run has {n} faces; give the labels of the ingested input")
        return lab, str(gt)
    if store.has("labels"):
        return np.asarray(store.array("labels")[...], dtype=np.int64), "labels (stored at ingest)"
    return None, None


def _iter_rows(arr, cols=None):
    """Row blocks of a 2-D zarr array, one storage chunk of rows at a time."""
    step = int(arr.chunks[0]) if arr.chunks[0] else 1 << 16
    for r0 in range(0, arr.shape[0], step):
        blk = arr[r0:r0 + step]
        yield blk if cols is None else blk[:, cols]


# -- sections ----------------------------------------------------------------------
def _overview(store: RunStore, methods: dict, gt_src: str | None) -> Section:
    recs = store.records()
    rows = []
    if store.has("features"):
        f = store.array("features")
        rows.append(["faces (N)", _fmt(int(f.shape[0]))])
        rows.append(["dimension (d)", _fmt(int(f.shape[1]) if f.ndim == 2 else "?")])
    if store.has("knn/sim"):
        rows.append(["neighbours (k)", _fmt(int(store.array("knn/sim").shape[1]))])
    if store.has("proposals/offsets"):
        rows.append(["proposals", _fmt(int(store.array("proposals/offsets").shape[0]) - 1)])
    for m, stage in methods.items():
        c = np.asarray(store.array(m)[...])
        rows.append([f"clusters in <code>{_esc(m)}</code> ({_esc(stage)})", _fmt(int(np.unique(c).size))])
    rows.append(["ground truth", _esc(gt_src or "none")])
    stages = ", ".join(f"{_esc(k)}: {_esc(v.get('status', '?'))}" for k, v in recs.items()) or "none"
    rows.append(["stages", stages])
    meta = store.meta
    rows.append(["run store", f"<code>{_esc(store.url)}</code> (created {_esc(meta.get('created', '?'))})"])
    return Section("overview", "Overview", _table(["", ""], rows))


def _quality(store: RunStore, methods: dict, gt: np.ndarray | None, gt_src: str | None) -> tuple[Section, dict]:
    title = "Quality against ground truth"
    if gt is None:
        return _not_run("quality", title, "no ground truth in this run",
                        "ingest with --labels, or pass --gt LABELS to `facecluster report`"), {}
    if not methods:
        return _not_run("quality", title, "no clustering in this run", "run `facecluster cluster RUN` first"), {}
    from facecluster.tasks.metrics import evaluate

    results = {}
    rows = []
    for m, stage in methods.items():
        res = evaluate(gt, np.asarray(store.array(m)[...]))
        results[m] = res
        rows.append([f"<code>{_esc(m)}</code>", _esc(stage)] + [_fmt(res[k]) for k, _ in _METRIC_COLUMNS])
    any_res = next(iter(results.values()))
    header = ["clustering", "stage"] + [h for _, h in _METRIC_COLUMNS]
    body = (_table(header, rows, numeric=set(range(2, len(header))))
            + f'<p class="muted">Ground truth: {_esc(gt_src)} — {any_res["gt_n_clusters"]} identities, '
              f'{any_res["gt_n_singletons"]} singletons, largest {any_res["gt_max_cluster"]}. '
              "Pairwise and BCubed precision/recall/F and NMI (arithmetic normalisation) from tasks.metrics.</p>")
    return Section("quality", title, body), results


def _cluster_sizes(store: RunStore, methods: dict, gt: np.ndarray | None, out: Path) -> Section:
    title = "Cluster-size distribution"
    if not methods:
        return _not_run("sizes", title, "no clustering in this run", "run `facecluster cluster RUN` first")
    fig = _figure((8, 4.2))
    ax = fig.add_subplot()
    series = [(m, np.asarray(store.array(m)[...])) for m in methods]
    if gt is not None:
        series.append(("ground truth", gt))
    rows = []
    markers = "os^vD<>p"
    for i, (name, lab) in enumerate(series):
        _, sizes = np.unique(lab, return_counts=True)
        size_vals, n_of = np.unique(sizes, return_counts=True)
        ax.loglog(size_vals, n_of, marker=markers[i % len(markers)], linestyle="-" if name != "ground truth" else "--",
                  markersize=4, label=name, alpha=0.85)
        rows.append([_esc(name), _fmt(int(sizes.size)), _fmt(int(np.sum(sizes == 1))), _fmt(float(np.median(sizes))),
                     _fmt(int(sizes.max()))])
    ax.set_xlabel("cluster size (faces)")
    ax.set_ylabel("number of clusters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    img = _save(fig, out, "cluster_sizes.png")
    body = _img(img, "cluster-size distribution, log-log") + _table(
        ["clustering", "clusters", "singletons", "median size", "largest"], rows, numeric={1, 2, 3, 4})
    return Section("sizes", title, body, [img])


def _scores(store: RunStore, out: Path) -> Section:
    title = "Predicted IoU / IoP of proposals"
    have = [n for n in ("score/iou", "score/iop") if store.has(n)]
    if not have:
        return _not_run("scores", title, "no proposal scores in this run", "run `facecluster cluster RUN --model MODEL` (GCN-D)")
    fig = _figure((8, 3.4))
    rows = []
    for i, name in enumerate(have):
        v = np.asarray(store.array(name)[...], dtype=np.float64)
        v = v[np.isfinite(v)]
        ax = fig.add_subplot(1, len(have), i + 1)
        ax.hist(v, bins=50, range=(0.0, 1.0) if v.size == 0 or (v.min() >= 0 and v.max() <= 1) else None,
                color="C0" if i == 0 else "C1")
        ax.set_xlabel(f"predicted {name.split('/')[1].upper()}")
        ax.set_ylabel("proposals")
        if v.size:
            rows.append([_esc(name), _fmt(int(v.size)), _fmt(float(v.mean())), _fmt(float(np.median(v))),
                         _fmt(float(v.min())), _fmt(float(v.max()))])
    img = _save(fig, out, "scores.png")
    body = _img(img, "predicted IoU and IoP histograms") + _table(
        ["array", "proposals", "mean", "median", "min", "max"], rows, numeric={1, 2, 3, 4, 5})
    if store.has("score/segmented"):
        seg = np.asarray(store.array("score/segmented")[...], dtype=bool)
        text = f"GCN-S refined {int(seg.sum())} of {seg.size} proposals"
        if store.has("score/keep"):
            keep = np.asarray(store.array("score/keep")[...], dtype=bool)
            text += f" and removed {int((~keep).sum())} of {keep.size} memberships"
        rng = ((store.record("score") or {}).get("params") or {}).get("iop_range")
        if rng:
            text += f" (proposals with predicted IoP in {rng})"
        body += f'<p class="muted">{_esc(text)}.</p>'
    return Section("scores", title, body, [img])


def _proposals(store: RunStore, out: Path) -> Section:
    title = "Proposals per setting and level"
    if not store.has("proposals/offsets"):
        return _not_run("proposals", title, "no proposals in this run", "run `facecluster proposals RUN` or `facecluster cluster RUN`")
    off = np.asarray(store.array("proposals/offsets")[...], dtype=np.int64)
    sizes = np.diff(off)
    p = sizes.size
    setting = np.asarray(store.array("proposals/setting")[...]) if store.has("proposals/setting") else np.zeros(p, np.int32)
    level = np.asarray(store.array("proposals/level")[...]) if store.has("proposals/level") else np.zeros(p, np.int32)
    if p == 0:
        return Section("proposals", title, "<p>The proposals stage ran and produced 0 proposals "
                       "(no component reached the minimum size at the thresholds used).</p>")
    settings = np.unique(setting)
    levels = np.unique(level)
    fig = _figure((9, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    bottom = np.zeros(settings.size)
    for lv in levels:
        counts = np.array([np.sum((setting == s) & (level == lv)) for s in settings], dtype=float)
        ax.bar([str(s) for s in settings], counts, bottom=bottom, label=f"level {lv}")
        bottom += counts
    ax.set_xlabel("proposal setting")
    ax.set_ylabel("proposals")
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    bins = np.unique(np.logspace(0, np.log10(max(sizes.max(), 2)) + 0.01, 30).astype(int))
    ax2.hist(sizes, bins=bins)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("proposal size (faces)")
    ax2.set_ylabel("proposals")
    img = _save(fig, out, "proposals.png")
    rows = []
    for s in settings:
        for lv in levels:
            sel = (setting == s) & (level == lv)
            if sel.any():
                sz = sizes[sel]
                rows.append([_fmt(int(s)), _fmt(int(lv)), _fmt(int(sel.sum())), _fmt(float(sz.mean())), _fmt(int(sz.max()))])
    rec = store.record("proposals") or {}
    settings_desc = (rec.get("summary") or {}).get("settings")
    extra = ""
    if isinstance(settings_desc, list) and settings_desc and all(isinstance(x, dict) for x in settings_desc):
        # one row per setting, scalar fields only (nested stats stay in the parameters table)
        keys = [k for k in settings_desc[0] if not isinstance(settings_desc[0][k], (dict, list))]
        extra = ('<p class="muted">Settings (from the proposals record):</p>' +
                 _table(keys, [[_fmt(x.get(k, "")) for k in keys] for x in settings_desc]))
    elif settings_desc is not None:
        extra = f'<p class="muted">Settings (from the proposals record):</p><pre>{_esc(json.dumps(settings_desc))}</pre>'
    covered = int(np.unique(np.asarray(store.array("proposals/members")[...])).size) if store.has("proposals/members") else None
    n = n_faces(store)
    cov = f" Faces covered by at least one proposal: {covered} of {n}." if covered is not None and n else ""
    body = (_img(img, "proposals per setting and proposal sizes")
            + f'<p class="muted">{p} proposals, {int(off[-1])} memberships.{cov}</p>'
            + _table(["setting", "level", "proposals", "mean size", "largest"], rows, numeric={0, 1, 2, 3, 4}) + extra)
    return Section("proposals", title, body, [img])


def _knn(store: RunStore, out: Path) -> Section:
    title = "kNN similarity"
    if not store.has("knn/sim"):
        return _not_run("knn", title, "no kNN in this run", "run `facecluster knn RUN` or `facecluster cluster RUN`")
    sim = store.array("knn/sim")
    k = int(sim.shape[1])
    first, kth = [], []
    for blk in _iter_rows(sim):
        first.append(np.asarray(blk[:, 0], dtype=np.float32))
        kth.append(np.asarray(blk[:, k - 1], dtype=np.float32))
    first = np.concatenate(first) if first else np.zeros(0, np.float32)
    kth = np.concatenate(kth) if kth else np.zeros(0, np.float32)
    fig = _figure((8, 3.6))
    ax = fig.add_subplot()
    lo = float(min(first.min(initial=1.0), kth.min(initial=1.0)))
    bins = np.linspace(min(lo, 0.0), 1.0, 60)
    ax.hist(first, bins=bins, alpha=0.6, label="1st neighbour")
    ax.hist(kth, bins=bins, alpha=0.6, label=f"{k}-th neighbour")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("faces")
    ax.legend()
    img = _save(fig, out, "knn_similarity.png")
    rows = [[_esc(name), _fmt(float(np.mean(v))), *(_fmt(float(q)) for q in np.quantile(v, [0.05, 0.5, 0.95]))]
            for name, v in (("1st neighbour", first), (f"{k}-th neighbour", kth)) if v.size]
    body = (_img(img, "first and k-th neighbour similarity") +
            _table(["", "mean", "5%", "median", "95%"], rows, numeric={1, 2, 3, 4}) +
            '<p class="muted">Where these sit tells whether the proposal thresholds suit the features: '
            "thresholds above the 1st-neighbour similarity of most faces leave them unclustered.</p>")
    return Section("knn", title, body, [img])


def similarity_blocks(store: RunStore, labels: np.ndarray, n_clusters: int = 6, max_per_cluster: int = 40,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine similarity of the faces of the largest clusters, grouped by cluster.

    Parameters
    ----------
    store : RunStore
        Run holding ``features``.
    labels : numpy.ndarray
        Cluster id per face.
    n_clusters : int
        How many of the largest clusters to include.
    max_per_cluster : int
        At most this many faces per cluster (seeded sample, sorted ids).
    seed : int
        Seed of the sample.

    Returns
    -------
    sim : numpy.ndarray
        (m, m) float32 cosine similarities, faces ordered cluster by cluster.
    cluster_of : numpy.ndarray
        (m,) cluster id of each row.
    faces : numpy.ndarray
        (m,) face id of each row (to look up e.g. true identities).
    """
    ids, sizes = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, -sizes))[:n_clusters]
    rng = np.random.default_rng(seed)
    pick, cl = [], []
    for c in ids[order]:
        members = np.flatnonzero(labels == c)
        if members.size > max_per_cluster:
            members = np.sort(rng.choice(members, max_per_cluster, replace=False))
        pick.append(members)
        cl.append(np.full(members.size, c))
    idx = np.concatenate(pick) if pick else np.zeros(0, np.int64)
    feats = np.asarray(store.array("features").get_orthogonal_selection((idx, slice(None))), dtype=np.float32)
    return feats @ feats.T, (np.concatenate(cl) if cl else np.zeros(0, np.int64)), idx


def plot_similarity_blocks(ax, sim: np.ndarray, cluster_of: np.ndarray, title: str = "",
                           identities: np.ndarray | None = None) -> None:
    """Draw :func:`similarity_blocks` output as a heat map with cluster boundaries.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Axes to draw into (a colour bar, and the identity strip, are appended beside it).
    sim, cluster_of : numpy.ndarray
        As returned by :func:`similarity_blocks`.
    title : str
        Axes title.
    identities : numpy.ndarray, optional
        True identity of each row: drawn as a colour strip on the left, so an impure
        cluster shows several colours within its block.
    """
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    im = ax.imshow(sim, vmin=-0.2, vmax=1.0, cmap="viridis", interpolation="nearest")
    bounds = np.flatnonzero(np.diff(cluster_of)) + 0.5
    for b in bounds:
        ax.axhline(b, color="w", lw=0.8)
        ax.axvline(b, color="w", lw=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    # axes appended to this one share its height exactly, so strip rows line up with heat-map rows
    divider = make_axes_locatable(ax)
    if identities is not None and len(identities):
        strip = divider.append_axes("left", size="4%", pad=0.04)
        codes = np.unique(identities, return_inverse=True)[1]
        strip.imshow(codes.reshape(-1, 1) % 20, aspect="auto", cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        for b in bounds:
            strip.axhline(b, color="k", lw=0.8)
        strip.set_xticks([])
        strip.set_yticks([])
        strip.set_ylabel("true identity", fontsize=8)
    cax = divider.append_axes("right", size="4%", pad=0.08)
    ax.figure.colorbar(im, cax=cax, label="cosine similarity")


def _structure(store: RunStore, methods: dict, gt: np.ndarray | None, out: Path) -> Section:
    title = "Similarity structure of the largest clusters"
    if not methods or not store.has("features"):
        return _not_run("structure", title, "no clustering in this run", "run `facecluster cluster RUN` first")
    m = next(iter(methods))
    lab = np.asarray(store.array(m)[...])
    sim, cl, faces = similarity_blocks(store, lab)
    fig = _figure((6.4, 5.4))
    ax = fig.add_subplot()
    plot_similarity_blocks(ax, sim, cl, f"largest clusters in '{m}' (≤40 faces each)",
                           identities=gt[faces] if gt is not None else None)
    img = _save(fig, out, "similarity_structure.png")
    note = ""
    if gt is not None and cl.size:
        # purity of each shown cluster: share of its sampled faces with the majority identity
        pur = []
        for c in np.unique(cl):
            g = gt[np.flatnonzero(lab == c)]
            pur.append(np.bincount(np.unique(g, return_inverse=True)[1]).max() / g.size)
        note = f'<p class="muted">Majority-identity share of these clusters: {", ".join(f"{p:.2f}" for p in pur)}.</p>'
    body = (_img(img, "cosine similarity within and between the largest clusters") +
            '<p class="muted">Bright blocks on the diagonal: faces of a cluster resemble each other; '
            "bright off-diagonal blocks: clusters that may be one identity. The strip on the left (with ground truth) "
            "colours faces by true identity: several colours in one block = an impure cluster.</p>" + note)
    return Section("structure", title, body, [img])


def _times(store: RunStore, out: Path) -> Section:
    title = "Time per stage"
    recs = [(k, v) for k, v in store.records().items() if v.get("seconds") is not None]
    if not recs:
        return _not_run("times", title, "no completed stage", "run `facecluster ingest` first")
    recs.sort(key=lambda kv: kv[1].get("started", ""))
    names = [k for k, _ in recs]
    secs = [float(v["seconds"]) for _, v in recs]
    fig = _figure((8, 0.5 + 0.45 * len(names) + 0.8))
    ax = fig.add_subplot()
    ax.barh(names[::-1], secs[::-1], color="C2")
    for y, s in enumerate(secs[::-1]):
        ax.text(s, y, f" {s:.2f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds (wall clock, from the stage records)")
    ax.set_xlim(0, max(secs) * 1.2 if max(secs) > 0 else 1)
    img = _save(fig, out, "stage_times.png")
    total = sum(secs)
    body = _img(img, "time per stage") + f'<p class="muted">Total {total:.2f} s over {len(names)} stages.</p>'
    return Section("times", title, body, [img])


def _rounded(v):
    """Floats to 4 significant digits, recursively: for display only (records keep full precision)."""
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x) for x in v]
    return v


def _kv(d) -> str:
    """HTML of ``key = value`` lines; long values fold into a <details> element so the table stays readable."""
    if not d:
        return ""
    lines = []
    for k, v in sorted(d.items()):
        v = _rounded(v)
        text = json.dumps(v, sort_keys=True, default=str)
        if len(text) <= 100:
            lines.append(f"<div>{_esc(k)} = {_esc(text)}</div>")
        else:
            what = f"[{len(v)} items]" if isinstance(v, list) else f"{{{len(v)} keys}}" if isinstance(v, dict) else "..."
            lines.append(f"<details><summary>{_esc(k)} = {_esc(what)}</summary>"
                         f"<pre>{_esc(json.dumps(v, sort_keys=True, indent=1, default=str))}</pre></details>")
    return "".join(lines)


def _params(store: RunStore) -> Section:
    title = "Parameters and versions"
    recs = store.records()
    if not recs:
        return _not_run("params", title, "no stage recorded", "run `facecluster ingest` first")
    rows = []
    versions = {}
    for name, rec in sorted(recs.items(), key=lambda kv: kv[1].get("started", "")):
        versions.update(rec.get("versions") or {})
        secs = rec.get("seconds")
        rows.append([f"<b>{_esc(name)}</b>", _esc(rec.get("status", "?")), _esc(rec.get("started", "")),
                     _fmt(float(secs)) if secs is not None else "", f'<div class="kv">{_kv(rec.get("params"))}</div>',
                     f'<div class="kv">{_kv(rec.get("summary"))}</div>'])
    body = _table(["stage", "status", "started", "seconds", "parameters", "summary"], rows, numeric={3})
    if versions:
        body += "<h3>Package versions</h3>" + _table(["package", "version"], [[_esc(k), _esc(v)] for k, v in sorted(versions.items())])
    return Section("params", title, body)


# -- assembly ----------------------------------------------------------------------
def default_dir(run_url: str) -> Path:
    """``RUN.report/`` next to ``RUN.zarr``."""
    if not is_local(run_url):
        raise BadInput(f"{run_url}: the run store is remote; give the report folder with -o DIR")
    base = local_path(run_url.rstrip("/"))
    stem = base.name[:-5] if base.name.endswith(".zarr") else base.name
    return base.with_name(f"{stem}.report")


def render_html(title: str, sections: list[Section]) -> str:
    """The page: a header, a table of contents and every section."""
    toc = " · ".join(f'<a href="#{s.key}">{_esc(s.title)}</a>' + ("" if s.ran else " <span class='notrun'>(not run)</span>")
                     for s in sections)
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>',
             f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head><body>',
             f"<h1>{_esc(title)}</h1>",
             f'<p class="muted">Generated {_esc(_dt.datetime.now().isoformat(timespec="seconds"))} by facecluster.</p>',
             f"<p>{toc}</p>"]
    for s in sections:
        parts.append(f'<section id="{s.key}"><h2>{_esc(s.title)}</h2>\n{s.body}</section>')
    parts.append("</body></html>")
    return "\n".join(parts)


@dataclass
class ReportResult:
    """What :func:`write_report` wrote."""

    index: Path
    sections: list[Section]
    metrics: dict

    @property
    def images(self) -> list[Path]:
        return [self.index.parent / i for s in self.sections for i in s.images]

    @property
    def not_run(self) -> list[str]:
        return [s.key for s in self.sections if not s.ran]


def write_report(run, out_dir: str | os.PathLike | None = None, gt: str | os.PathLike | None = None) -> ReportResult:
    """Write the HTML report of a run into a folder (``index.html`` + PNGs).

    Parameters
    ----------
    run : str, path-like or RunStore
        The run store (``RUN.zarr``).
    out_dir : str or path-like, optional
        Folder to write (default ``RUN.report/`` next to the store). It is built under
        a temporary name and renamed; an existing earlier report there is replaced,
        any other non-empty folder is refused.
    gt : str or path-like, optional
        Ground-truth labels (``.npy``/``.meta``); default: the run's ``labels``.

    Returns
    -------
    ReportResult
        Path of ``index.html``, the sections (with ``ran``) and the metrics per clustering.

    Raises
    ------
    BadInput
        Unreadable store, bad ``--gt`` file, or an output folder holding something else.
    """
    store = RunStore.coerce(run)
    out = Path(out_dir) if out_dir is not None else default_dir(store.url)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").exists())):
        raise BadInput(f"{out}: exists and is not an earlier facecluster report; choose another folder with -o DIR")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        methods = clustering_arrays(store)
        for m in methods:  # a stale clustering would be reported as if it described this run's faces
            store.require_fresh_array(m, f"re-run `facecluster cluster {store.url}` before the report")
        gt_arr, gt_src = ground_truth(store, gt)
        quality, metrics = _quality(store, methods, gt_arr, gt_src)
        sections = [
            _overview(store, methods, gt_src),
            quality,
            _cluster_sizes(store, methods, gt_arr, tmp),
            _scores(store, tmp),
            _proposals(store, tmp),
            _knn(store, tmp),
            _structure(store, methods, gt_arr, tmp),
            _times(store, tmp),
            _params(store),
        ]
        name = local_path(store.url.rstrip("/")).name if is_local(store.url) else store.url
        (tmp / "index.html").write_text(render_html(f"facecluster report: {name}", sections), encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("report written to %s (%d sections, not run: %s)", out / "index.html", len(sections),
             ", ".join(s.key for s in sections if not s.ran) or "none")
    return ReportResult(out / "index.html", sections, metrics)
