"""`facecluster bench add`: adding 5% of the faces to a clustered run, against clustering all of them afresh.

Setup (not timed): the built-in dataset, ``--n`` faces (``facecluster.tasks.synth.make_faces``) in a
seeded random order, the first 95% and the last 5% written as two feature files; for the learned
method a model trained on a disjoint labelled split (``--train-n`` faces). Both runs search kNN the same
way, exact below ``knn.ivf_min_n`` faces in all and through IVF lists from there (the add then searches
the new faces through the 95% run's stored lists and nprobe).

Timed, on one LocalCluster of ``--workers`` processes x 1 thread:

* ingest + cluster of the first 95% (the run the add extends);
* ``facecluster add`` of the last 5% (the add), with each worker's peak RSS (sampled every 0.2 s);
* ingest + cluster of all 100% in one go (the full run the add saves): the ratio add / full is the
  goal (<= 0.20 at 1M faces).

Both partitions are scored against the identities (pairwise and BCubed F), so the price in quality of
adding instead of re-clustering is in the same result.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import click
import numpy as np

from . import MemorySampler, save_result

log = logging.getLogger(__name__)


def _cluster(url: str, feats: Path, cfg, client, method: str, model: str | None) -> float:
    from ..methods import run_method
    from ..stages.ingest import run_ingest
    from ..store import RunStore

    t0 = time.perf_counter()
    run_ingest(feats, url, cfg=cfg.ingest, overwrite=True)
    run_method(RunStore.open(url), cfg, client, method, {"model": model, "force": False})
    return time.perf_counter() - t0


@click.command("add")
@click.option("--n", type=int, default=1_000_000, show_default=True, help="Faces in all (95% clustered, 5% added).")
@click.option("--share", type=float, default=0.05, show_default=True, help="Share of the faces added.")
@click.option("--method", type=click.Choice(["gcn", "threshold"]), default="gcn", show_default=True)
@click.option("--train-n", type=int, default=20_000, show_default=True, help="Faces of the training split (gcn).")
@click.option("--epochs", type=int, default=5, show_default=True, help="Training epochs (setup, not timed).")
@click.option("--dim", type=int, default=256, show_default=True)
@click.option("--knn-mode", type=click.Choice(["auto", "exact", "ivf"]), default="auto", show_default=True,
              help="kNN search of both runs (auto: IVF from knn.ivf_min_n faces in all).")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Order of the faces (which 5% are added).")
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-add", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON result (default bench-add.json).")
def command(n, share, method, train_n, epochs, dim, knn_mode, workers, seed, workdir, out):
    """Time of adding 5% of the faces as a share of clustering all of them afresh; peak memory per worker.

    \b
    Examples:
      facecluster bench add --n 200000
      facecluster bench add                      # 1M faces: about an hour on 2 cores
      facecluster bench add --n 100000 --method threshold
    """
    from ..additions import run_add
    from ..cluster import connect
    from ..config import Config
    from ..stages.ingest import run_ingest
    from ..store import RunStore
    from ..train import train
    from facecluster.tasks.metrics import bcubed_f, pairwise_f
    from facecluster.tasks.synth import make_faces, make_splits

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    # one kNN mode for the 95% run and the full run, chosen by the full run's size: the base run would
    # otherwise fall under knn.ivf_min_n and be searched exactly while the full run uses IVF lists
    if knn_mode == "auto":
        knn_mode = "ivf" if n >= Config.from_dict({}).knn.ivf_min_n else "exact"
    cfg = Config.from_dict({"dask": {"n_workers": workers}, "gcn": {"epochs": epochs}, "knn": {"mode": knn_mode}})
    feats, labels = make_faces(n, dim=dim, seed=2)
    order = np.random.default_rng(seed).permutation(n)
    feats, labels = feats[order], labels[order]
    m = max(1, int(round(n * share)))
    np.save(wd / "old.npy", feats[:n - m])
    np.save(wd / "new.npy", feats[n - m:])
    np.save(wd / "all.npy", feats)
    del feats
    model = None
    result = {"n": n, "added": m, "share": share, "method": method, "dim": dim, "workers": workers, "seed": seed,
              "knn_mode": knn_mode}
    with connect(cfg.dask, quiet=True) as client:
        if method == "gcn":
            model = str(wd / "model")
            tf, tl = make_splits(2 * train_n, dim=dim, seed=1)["train"]
            np.save(wd / "train_f.npy", tf)
            np.save(wd / "train_l.npy", tl)
            run_ingest(wd / "train_f.npy", str(wd / "train.zarr"), labels=wd / "train_l.npy", overwrite=True)
            train(RunStore.open(str(wd / "train.zarr")), model, cfg, client, echo=log.info)
        url = str(wd / "run.zarr")
        shutil.rmtree(url, ignore_errors=True)
        t_base = _cluster(url, wd / "old.npy", cfg, client, method, model)
        click.echo(f"cluster of {n - m} faces: {t_base:.1f}s", err=True)
        with MemorySampler(client) as mem:
            t0 = time.perf_counter()
            summary = run_add(RunStore.open(url), str(wd / "new.npy"), cfg, client, model_dir=model,
                              echo=lambda s: click.echo(s, err=True))
            t_add = time.perf_counter() - t0
        added = np.asarray(RunStore.open(url).array("clusters")[:])
        click.echo(f"add of {m} faces: {t_add:.1f}s", err=True)
        full_url = str(wd / "full.zarr")
        shutil.rmtree(full_url, ignore_errors=True)
        t_full = _cluster(full_url, wd / "all.npy", cfg, client, method, model)
        full = np.asarray(RunStore.open(full_url).array("clusters")[:])
        click.echo(f"cluster of all {n} faces: {t_full:.1f}s", err=True)
    quality = {}
    for name, lab in (("add", added), ("full", full)):
        quality[name] = {"pairwise_f": round(pairwise_f(labels, lab)[2], 4), "bcubed_f": round(bcubed_f(labels, lab)[2], 4)}
    result.update({"cluster_95_seconds": round(t_base, 2), "add_seconds": round(t_add, 2), "full_seconds": round(t_full, 2),
                   "add_over_full": round(t_add / t_full, 3), "add_steps_seconds": summary["seconds"],
                   "add_knn_search": summary.get("knn_search"), "entering_pairs": summary.get("entering_pairs"),
                   "reclustered": summary["reclustered"], "old_lists_changed": summary["old_lists_changed"],
                   "edges_scored": summary.get("edges_scored"), "joined_old_clusters": summary.get("joined_old_clusters"),
                   "old_cluster_ids_kept": summary["old_cluster_ids_kept"], "old_clusters": summary["old_clusters"],
                   "memory": mem.summary(), "quality_vs_identities": quality})
    path = save_result("add", result, out)
    click.echo(f"add {m} to {n - m} faces ({method}): {t_add:.1f}s = {t_add / t_full:.3f} of the full run's {t_full:.1f}s "
               f"(goal <= 0.20); {summary['reclustered']} faces re-clustered; peak RSS per worker "
               f"{mem.summary()['peak_rss_mib_per_worker']} MiB; pairwise F add {quality['add']['pairwise_f']} / full "
               f"{quality['full']['pairwise_f']}, BCubed F {quality['add']['bcubed_f']} / {quality['full']['bcubed_f']}; "
               f"result in {path}")
