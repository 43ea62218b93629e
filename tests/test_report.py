"""`facecluster report`: sections from real run stores, metrics, and the page in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from facecluster.pipeline.cli import main
from facecluster.pipeline.errors import BadInput
from facecluster.pipeline.report import clustering_arrays, write_report
from facecluster.pipeline.store import RunStore
from facecluster.tasks.io import write_meta
from facecluster.tasks.metrics import evaluate

N, D, K, IDS = 600, 16, 10, 30


def _components(index, sim, th):
    n = index.shape[0]
    rows = np.repeat(np.arange(n), index.shape[1])
    keep = sim.ravel() >= th
    g = coo_matrix((np.ones(keep.sum()), (rows[keep], index.ravel()[keep])), shape=(n, n))
    return connected_components(g, directed=True, connection="weak")[1].astype(np.int64)


def build_run(path, stages=("ingest", "knn", "proposals", "score", "dedup", "baseline")):
    """A small real run: Gaussian identities, brute-force kNN, threshold components as proposals,
    their true IoU/IoP as scores, Algorithm-3 dedup, a threshold baseline. Real arrays, real records."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(IDS, D))
    labels = rng.integers(0, IDS, size=N).astype(np.int64)
    feats = (centers[labels] + 0.45 * rng.normal(size=(N, D))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    store = RunStore.create(path)
    with store.stage("ingest", {"chunk_rows": 128}) as w:
        w.write_array("features", feats, chunks=(128, D))
        w.write_array("labels", labels)
        w.write_array("input_rows", np.arange(N, dtype=np.int64))
        w.summary.update(n=N, dim=D, chunk_rows=128)
    if "knn" not in stages:
        return store, labels
    s = feats @ feats.T
    np.fill_diagonal(s, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(N), (N, N)), -s), axis=1)[:, :K]
    index, sim = order.astype(np.int64), np.take_along_axis(s, order, 1).astype(np.float32)
    with store.stage("knn", {"k": K}, inputs=["ingest"]) as w:
        w.write_array("knn/index", index, chunks=(128, K))
        w.write_array("knn/sim", sim, chunks=(128, K))
    if "proposals" not in stages:
        return store, labels
    members, setting, level = [], [], []
    for si, th in enumerate((0.75, 0.85)):
        for lv, t in enumerate((th, th - 0.1)):
            comp = _components(index, sim, t)
            for c in np.unique(comp):
                m = np.flatnonzero(comp == c)
                if 3 <= m.size <= 200:
                    members.append(m)
                    setting.append(si)
                    level.append(lv)
    offsets = np.concatenate([[0], np.cumsum([m.size for m in members])]).astype(np.int64)
    with store.stage("proposals", {"thresholds": [0.75, 0.85]}, inputs=["knn"]) as w:
        w.write_array("proposals/offsets", offsets)
        w.write_array("proposals/members", np.concatenate(members).astype(np.int64))
        w.write_array("proposals/setting", np.array(setting, np.int32))
        w.write_array("proposals/level", np.array(level, np.int32))
        w.summary["settings"] = [{"th": 0.75}, {"th": 0.85}]
    if "score" not in stages:
        return store, labels
    class_size = np.bincount(labels)
    iou, iop = [], []
    for m in members:
        maj = np.bincount(labels[m]).argmax()
        inter = np.sum(labels[m] == maj)
        iou.append(inter / (m.size + class_size[maj] - inter))
        iop.append(inter / m.size)
    with store.stage("score", {"model": "true-iou"}, inputs=["proposals"]) as w:
        w.write_array("score/iou", np.array(iou, np.float32))
        w.write_array("score/iop", np.array(iop, np.float32))
        w.write_array("score/segmented", np.array(iop, np.float32) < 0.9)
        w.write_array("score/keep", np.ones(offsets[-1], bool))
    clusters = np.full(N, -1, np.int64)
    score = np.full(N, np.nan, np.float32)
    for p in np.argsort(-np.array(iou), kind="stable"):
        m = members[p]
        free = m[clusters[m] < 0]
        clusters[free] = p
        score[free] = iou[p]
    rest = np.flatnonzero(clusters < 0)
    clusters[rest] = len(members) + np.arange(rest.size)
    clusters = np.unique(clusters, return_inverse=True)[1].astype(np.int64)
    with store.stage("dedup", {}, inputs=["score"]) as w:
        w.write_array("clusters", clusters)
        w.write_array("clusters_score", score)
    if "baseline" in stages:
        with store.stage("baseline", {"th": 0.8}, inputs=["knn"]) as w:
            w.write_array("baselines/threshold", _components(index, sim, 0.8))
    return store, labels


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    store, labels = build_run(d / "run.zarr")
    res = write_report(store, d / "run.report")
    return store, labels, res


def test_all_sections_and_metrics(full_run):
    store, labels, res = full_run
    assert res.not_run == []
    assert set(clustering_arrays(store)) == {"clusters", "baselines/threshold"}
    page = res.index.read_text()
    for name in ("cluster_sizes.png", "scores.png", "proposals.png", "knn_similarity.png",
                 "similarity_structure.png", "stage_times.png"):
        assert (res.index.parent / name).stat().st_size > 5000
        assert f'src="{name}"' in page
    for arr in ("clusters", "baselines/threshold"):
        want = evaluate(labels, np.asarray(store.array(arr)[...]))
        assert res.metrics[arr] == want
        # the quality table shows the same numbers as tasks.metrics
        quality = page.split('<section id="quality">')[1].split("</section>")[0]
        row = re.search(rf"<code>{re.escape(arr)}</code>.*?</tr>", quality, re.S).group(0)
        assert f"{want['pairwise_f']:.4f}" in row and f"{want['bcubed_f']:.4f}" in row and f"{want['nmi']:.4f}" in row
    saved = json.loads((res.index.parent / "metrics.json").read_text())
    assert saved["clusters"]["pairwise_f"] == pytest.approx(res.metrics["clusters"]["pairwise_f"])
    assert "not run" not in page
    for stage in ("ingest", "knn", "proposals", "score", "dedup", "baseline"):
        assert f"<b>{stage}</b>" in page
    assert "numpy" in page and "zarr" in page  # versions table
    n_seg = int(np.sum(np.asarray(store.array("score/iop")[...]) < 0.9))
    assert f"GCN-S refined {n_seg} of {store.array('score/iou').shape[0]} proposals and removed 0 of" in page


def test_partial_run_says_not_run(tmp_path, capsys):
    store, _ = build_run(tmp_path / "run.zarr", stages=("ingest", "knn"))
    res = write_report(store.url, tmp_path / "rep")
    assert set(res.not_run) == {"quality", "sizes", "scores", "proposals", "structure"}
    page = res.index.read_text()
    assert page.count("not run:") == 5 and "facecluster cluster" in page
    assert {p.name for p in res.images} == {"knn_similarity.png", "stage_times.png"}
    assert all(p.exists() for p in res.images)
    # re-running replaces the earlier report; a folder holding something else is refused
    write_report(store.url, tmp_path / "rep")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not an earlier facecluster report"):
        write_report(store.url, other)
    assert (other / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_with_gt_file(tmp_path, capsys):
    store, labels = build_run(tmp_path / "run.zarr", stages=("ingest", "knn", "proposals", "score", "dedup"))
    # a --gt file that differs from the stored labels: the table must use it
    gt = labels.copy()
    gt[:100] = 999
    write_meta(tmp_path / "gt.meta", gt)
    with pytest.raises(SystemExit) as e:
        main(["report", store.url, "--gt", str(tmp_path / "gt.meta")])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert (tmp_path / "run.report" / "index.html").exists()
    want = evaluate(gt, np.asarray(store.array("clusters")[...]))
    assert f"pairwise F {want['pairwise_f']:.4f}" in out
    write_meta(tmp_path / "short.meta", labels[:10])
    with pytest.raises(SystemExit) as e:
        main(["report", store.url, "--gt", str(tmp_path / "short.meta"), "-o", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "10 labels" in err and "600 faces" in err
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0 and "Examples:" in capsys.readouterr().out


# -- the page in a real browser ---------------------------------------------------------
_CHECK = """<script>
window.addEventListener('load', function () {
  var r = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    r.push({src: im.getAttribute('src'), complete: im.complete, w: im.naturalWidth, h: im.naturalHeight});
  }
  var pre = document.createElement('pre');
  pre.id = 'imgcheck';
  pre.textContent = 'IMGCHECK' + JSON.stringify(r) + 'ENDCHECK';
  document.body.appendChild(pre);
});
</script>"""


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium_args(tmp_path):
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chrome-profile'}", "--allow-file-access-from-files"]


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)")
def test_images_load_in_chromium(full_run, tmp_path):
    _, _, res = full_run
    rep = tmp_path / "page"
    shutil.copytree(res.index.parent, rep)
    page = (rep / "index.html").read_text()
    # a deliberately missing image: the check must see it fail, or it proves nothing
    control = '<img src="missing_control.png" alt="control">'
    (rep / "check.html").write_text(page.replace("</body>", control + _CHECK + "</body>"))
    proc = subprocess.run(_chromium_args(tmp_path) + ["--virtual-time-budget=10000", "--dump-dom",
                                                      (rep / "check.html").as_uri()],
                          capture_output=True, text=True, timeout=90)
    m = re.search(r'<pre id="imgcheck">IMGCHECK(.*?)ENDCHECK</pre>', proc.stdout, re.S)
    assert m, f"no image check in the dumped DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    imgs = json.loads(html.unescape(m.group(1)))
    assert imgs[-1]["src"] == "missing_control.png" and imgs[-1]["w"] == 0
    imgs = imgs[:-1]
    assert sorted(i["src"] for i in imgs) == sorted(p.name for p in res.images) and len(imgs) == 6
    bad = [i for i in imgs if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert bad == [], f"images that did not load: {bad}"
    # screenshot of the page (kept next to the report for a human look; not asserted pixel by pixel)
    shot = tmp_path / "screenshot.png"
    subprocess.run(_chromium_args(tmp_path) + ["--window-size=1200,3000", f"--screenshot={shot}",
                                               (rep / "index.html").as_uri()],
                   capture_output=True, text=True, timeout=90)
    assert shot.exists() and shot.stat().st_size > 10000
