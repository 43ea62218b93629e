"""`facecluster bench quality`: the learned method against its baselines, over training seeds.

On a labelled set split into training and test identities (the built-in dataset or
one of its variants, or your own features and labels split by identity), or on a
training set and a *different* test set (``--train-features``: distribution shift),
it trains one model per seed and clusters the test identities with each, beside:

* the threshold baseline with its threshold chosen *with the test labels* (the best
  any single threshold can do; the issue-5 bar),
* kNN + Infomap on the same kNN graph, its ``min_sim`` chosen with the labels, and at
  an automatic ``min_sim`` (no labels), when installed,
* dedup ranked by the *true* IoU (the bound of a perfect GCN-D on these proposals).

Both label-chosen grids sit on the test set's own kNN-similarity range and are
extended until the peak is inside (:mod:`facecluster.pipeline.baselines`); their whole curves are
saved. ``--baselines-only`` trains nothing: the baselines table of a set, cheaply.

Per seed it also measures the scorer itself on the test proposals (issue 5's goals):
Spearman between predicted and true IoU and IoP, and GCN-S node accuracy.

Why seeds: on small real sets pairwise F is decided by where a few faces of the
largest identities go, and one retraining moves it by up to ±0.01 on LFW; a
single-seed comparison says little. The test set's kNN, graph and proposals are
computed once and shared by every seed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import click
import numpy as np

from ..synth import VARIANT_HELP
from . import save_result

log = logging.getLogger(__name__)


def split_by_identity(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ids of the training and test identities (disjoint; rows keep their input order).

    The identities are permuted with ``seed``; the first ``int(n_ids * (1 - test_fraction))``
    are training identities.
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    perm = np.random.default_rng(seed).permutation(ids)
    train_ids = perm[: int(len(ids) * (1.0 - test_fraction))]
    is_train = np.isin(labels, train_ids)
    return np.flatnonzero(is_train), np.flatnonzero(~is_train)


def resample_sizes(labels: np.ndarray, lo: int, hi: int, seed: int) -> np.ndarray:
    """Rows (ascending) of a set whose identities all have ``lo``..``hi`` faces: identities with fewer than
    ``lo`` are dropped, those with more than ``hi`` keep ``hi`` faces drawn with ``seed``, the rest are whole.

    What ``bench quality --test-sizes`` applies to the test identities: a shift of the identity-size law on the
    same faces and face model (e.g. a model trained on LFW, where most people have one image, tested on people
    of 2-30 images each, the law of issue 17's held-out dataset).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # each identity's rows, ascending, one run per identity
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep = []
    for ident in np.flatnonzero(counts >= lo):
        rows = order[starts[ident]:starts[ident] + counts[ident]]
        keep.append(rows if counts[ident] <= hi else rng.choice(rows, hi, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def parse_sizes(text: str | None) -> tuple[int, int] | None:
    """``"LO-HI"`` (``--test-sizes``) as (LO, HI), 1 <= LO <= HI; None for None."""
    if text is None:
        return None
    try:
        lo, hi = (int(v) for v in str(text).split("-"))
    except ValueError:
        raise click.BadParameter(f"must be LO-HI faces per identity, e.g. 2-30; got {text!r}",
                                 param_hint="--test-sizes") from None
    if not 1 <= lo <= hi:
        raise click.BadParameter(f"needs 1 <= LO <= HI, got {text!r}", param_hint="--test-sizes")
    return lo, hi


def _prepare(wd: Path, features, labels, n: int, dim: int, test_fraction: float, split_seed: int,
             ingest_cfg=None, variant: str = "default", train_features=None, train_labels=None,
             test_sizes: tuple[int, int] | None = None) -> dict:
    """The train and test sets as ``{"train": (features, labels), "test": (features, labels)}`` paths.

    Without ``train_features``: one labelled set (``features``, or the built-in ``variant``
    written under ``wd/data``) split into disjoint training and test identities. With it:
    that set is the training set, whole, and the test set is ``features`` whole (or the
    built-in variant's test split).
    """
    from ..synth import write_dataset
    from ..errors import BadInput
    from ..stages.ingest import run_ingest
    from ..store import RunStore

    data = wd / "data"
    if features is None:
        write_dataset(data, n, dim=dim, seed=split_seed, test_fraction=test_fraction, overwrite=True, variant=variant)
        out = {s: (data / s / "features.npy", data / s / "labels.npy") for s in ("train", "test")}
    elif train_features is not None:
        out = {"test": (features, labels)}
    else:
        # ingest validates and L2-normalises any supported input format once; the split reads it back
        run_ingest(features, str(wd / "all.zarr"), labels=labels, cfg=ingest_cfg, overwrite=True)  # e.g. drop_invalid
        full = RunStore.open(str(wd / "all.zarr"))
        feats, labs = full.array("features")[:], full.array("labels")[:]
        tr, te = split_by_identity(labs, test_fraction, split_seed)
        if len(tr) == 0 or len(te) == 0:
            raise BadInput(f"{labels}: {len(np.unique(labs))} identities cannot be split into training and test "
                           f"identities at --test-fraction {test_fraction}; use a set with more identities")
        data.mkdir(parents=True, exist_ok=True)
        out = {}
        for s, rows in (("train", tr), ("test", te)):
            np.save(data / f"{s}_f.npy", feats[rows])
            np.save(data / f"{s}_l.npy", labs[rows])
            out[s] = (data / f"{s}_f.npy", data / f"{s}_l.npy")
    if train_features is not None:
        out["train"] = (train_features, train_labels)
    if test_sizes is not None:
        # read back through ingest (any input format, validated and normalised once), then keep the rows of
        # identities resampled to the size range; the training set is left as it is
        run_ingest(out["test"][0], str(wd / "test_source.zarr"), labels=out["test"][1], cfg=ingest_cfg, overwrite=True)
        src = RunStore.open(str(wd / "test_source.zarr"))
        feats, labs = src.array("features")[:], src.array("labels")[:]
        rows = resample_sizes(labs, *test_sizes, seed=split_seed)
        if len(np.unique(labs[rows])) < 2:
            raise BadInput(f"{out['test'][1]}: fewer than 2 test identities have {test_sizes[0]} or more faces; "
                           f"lower --test-sizes' LO or use a set with more faces per identity")
        data.mkdir(parents=True, exist_ok=True)
        np.save(data / "test_sized_f.npy", feats[rows])
        np.save(data / "test_sized_l.npy", labs[rows])
        out["test"] = (data / "test_sized_f.npy", data / "test_sized_l.npy")
    return out


def check_same_dim(stores: dict, paths: dict, builtin_test: bool) -> None:
    """BadInput (one line, both files, the fix) when the train and test features differ in dimension."""
    from ..errors import BadInput

    if "train" not in stores:
        return
    dims = {s: int(st.array("features").shape[1]) for s, st in stores.items()}
    if dims["train"] != dims["test"]:
        fix = f"pass --dim {dims['train']} for the built-in test set" if builtin_test \
            else "use two sets embedded by the same face model (one dimension)"
        raise BadInput(f"{paths['train'][0]}: training features are {dims['train']}-d but the test features "
                       f"{paths['test'][0]} are {dims['test']}-d; {fix}")


def run_baselines(test, cfg, client, gt: np.ndarray) -> tuple[dict, dict]:
    """The label-chosen threshold, label-chosen and automatic kNN + Infomap on a run with its graph.

    Returns
    -------
    table : {row name: evaluate() metrics}, the threshold first.
    record : the sweeps (whole curves, peak inside or not), the anchor and every
        automatic-min_sim rule's metrics, for the JSON result.
    """
    from facecluster.tasks.baselines import AUTO_MIN_SIM
    from facecluster.tasks.metrics import evaluate

    from ..baselines import auto_threshold, infomap_auto, infomap_general, infomap_peer, oracle_threshold
    from ..stages.proposals import graph_anchor

    th = oracle_threshold(test, cfg, client)
    table = {f"threshold (best th={th.best:g}, chosen with labels)": evaluate(gt, th.result)}
    record = {"anchor": graph_anchor(test)["anchor"], "threshold": th.to_dict()}
    auto_th, auto_labels = auto_threshold(test, cfg, client)  # what `--method threshold` without --th gives
    table[f"threshold (automatic P >= {auto_th:g}, the general model's cut, no labels)"] = evaluate(gt, auto_labels)
    peer = infomap_peer(test, client)
    if peer is not None:
        table[f"kNN + Infomap (best min_sim={peer.best:g}, chosen with labels)"] = evaluate(gt, peer.result)
        record["infomap"] = peer.to_dict()
        auto = infomap_auto(test, client)
        record["infomap_auto"] = {r: {"min_sim": a["min_sim"], **evaluate(gt, a["labels"])} for r, a in auto.items()}
        table[f"kNN + Infomap (automatic min_sim={auto[AUTO_MIN_SIM]['min_sim']:.3f}, {AUTO_MIN_SIM})"] = \
            record["infomap_auto"][AUTO_MIN_SIM]
        record["auto_rule"] = AUTO_MIN_SIM
        gen = infomap_general(test, cfg, client)
        info = gen["info"]
        record["infomap_general"] = {"min_sim": gen["min_sim"], "info": info, **evaluate(gt, gen["labels"])}
        how = (f"where the general model's P crosses {info['level']:g}" if info.get("rule") == "prob_level"
               else "Otsu: no edge's P near the general model's level")
        table[f"kNN + Infomap (min_sim={gen['min_sim']:.3f} {how}; --method infomap's default, no labels)"] = \
            record["infomap_general"]
    return table, record


def baseline_line(record: dict) -> str:
    """One line: each label-chosen parameter, its grid, and whether the peak is inside it."""
    parts = [f"Otsu anchor {record['anchor']:.3f}"]
    for key, name in (("threshold", "threshold"), ("infomap", "Infomap min_sim")):
        if key in record:
            sw = record[key]
            parts.append(f"{name} {sw['best']:g} on [{sw['grid'][0]:g}, {sw['grid'][1]:g}] step {sw['step']:g} "
                         + ("(peak inside)" if sw["peak_inside"] else f"(PEAK AT EDGE: {sw['note']})"))
    for rule, m in record.get("infomap_auto", {}).items():
        parts.append(f"Infomap at {rule} min_sim {m['min_sim']:.3f}: pairwise F {m['pairwise_f']:.4f}")
    return "; ".join(parts)


HELD_OUT_KEYS = {"spearman_iou": "Spearman(pred, true IoU)", "spearman_iop": "Spearman(pred, true IoP)",
                 "gcns_node_acc": "GCN-S node accuracy", "gcns_node_acc_impure": "on impure proposals"}


def held_out_scorer(store, model_dir, data: dict) -> dict:
    """How well the models score proposals of identities they never saw (issue 5's goals).

    ``spearman_iou`` / ``spearman_iop``: between the score stage's stored predictions
    (the deterministic scorer dedup ranks by) and the true IoU / IoP from the labels;
    ``gcns_node_acc`` (every proposal) and ``gcns_node_acc_impure`` (proposals with
    more than one identity): GCN-S membership with the deterministic seed vertex, the
    measures training validates on. ``data`` is ``load_training_data`` of ``store``.
    """
    from facecluster.tasks.gcn import spearman, eval_gcns

    from ..model_files import load_models

    tg = data["targets"]
    iou, iop = store.array("score/iou")[:], store.array("score/iop")[:]
    _, gcns, _ = load_models(model_dir, data["dim"], store.url)
    acc = eval_gcns(gcns, data["batch"], data["labels"][data["members"]], np.arange(len(iou)))
    return {"spearman_iou": spearman(iou, tg["iou"]), "spearman_iop": spearman(iop, tg["iop"]),
            "gcns_node_acc": acc["node_acc"], "gcns_node_acc_impure": acc["node_acc_impure"],
            "proposals": int(len(iou)), "impure_proposals": int((tg["iop"] < 1.0).sum())}


def spearman_ceiling(truth: np.ndarray) -> float:
    """The largest Spearman correlation with ``truth`` that predictions without exact ties can reach.

    Many proposals are pure (IoP exactly 1; on the built-in split 87% of the test
    proposals), and a continuous prediction must break those ties, which caps
    Spearman well below 1 (0.57 for the built-in split's IoP). Measured by breaking
    the ties at random (seeded).
    """
    from facecluster.tasks.gcn import spearman

    truth = np.asarray(truth, np.float64)
    return spearman(truth, truth + 1e-9 * np.random.default_rng(0).random(len(truth)))


def held_out_edges(store, gt: np.ndarray) -> dict:
    """The edge scorer on a labelled run's kNN edges: ROC-AUC (and the cosine's), calibration in 10 bins."""
    from facecluster.tasks.edges import calibration, roc_auc

    idx = store.array("knn/index")[:]
    ok = idx >= 0
    same = (gt[:, None] == gt[np.maximum(idx, 0)])[ok]
    p = store.array("edges/prob")[:][ok]
    return {"auc": roc_auc(p, same), "auc_cosine": roc_auc(store.array("knn/sim")[:][ok], same),
            "calibration": calibration(p, same), "edges": int(ok.sum())}


def _summary(rows: list[dict], key: str) -> dict:
    v = np.array([r[key] for r in rows], dtype=np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "std": float(v.std())}


@click.command("quality")
@click.option("--features", type=click.Path(exists=True), default=None,
              help="Labelled features of your own (any format `ingest` reads); default: the built-in dataset. "
                   "With --train-features: the test set, whole.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None, help="Labels of --features.")
@click.option("--train-features", type=click.Path(exists=True), default=None,
              help="Train on this labelled set (whole) and test on another: --features (whole) or the built-in "
                   "(--variant) test split. Same dimension as the test set.")
@click.option("--train-labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Labels of --train-features.")
@click.option("--variant", type=click.Choice(list(VARIANT_HELP)), default="default", show_default=True,
              help="Built-in dataset: a named shift of the generator (as `facecluster synth --variant`): "
                   + "; ".join(f"{k}: {v}" for k, v in VARIANT_HELP.items()) + ".")
@click.option("--n", type=int, default=40_000, show_default=True, help="Built-in dataset: faces over both splits.")
@click.option("--dim", type=int, default=256, show_default=True, help="Built-in dataset: feature dimension.")
@click.option("--test-fraction", type=float, default=0.5, show_default=True, help="Share of identities held out for testing.")
@click.option("--split-seed", type=int, default=0, show_default=True,
              help="Seed of the identity split (--features), or of the built-in dataset.")
@click.option("--test-sizes", default=None, metavar="LO-HI",
              help="Resample the test identities to LO..HI faces each (fewer: dropped; more: a seeded subsample "
                   "of HI), leaving the training set as it is: a shift of the identity-size law, e.g. 2-30.")
@click.option("--seeds", default="0,1,2,3", show_default=True, help="Training seeds, comma-separated: one model each.")
@click.option("--model", "given_model", default=None,
              help="Evaluate this model directory instead of training one per seed (nothing is trained; --seeds "
                   "ignored); `general`: the general model shipped in the package.")
@click.option("--baselines-only", is_flag=True,
              help="Train nothing: only the test set's kNN and graph, and the threshold and Infomap baselines.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML configuration (e.g. [gcn] relative, ensemble; [proposals] preset).")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default="bench-quality", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON result (default bench-quality.json).")
def command(features, labels, train_features, train_labels, variant, n, dim, test_fraction, split_seed, test_sizes,
            seeds, given_model, baselines_only, config_path, workers, workdir, out):
    """GCN-D and GCN-D+S over training seeds vs the label-chosen threshold, Infomap and the true-IoU bound.

    The threshold's and Infomap's grids span the test set's own kNN similarities and are
    extended until the best point is inside; the JSON result holds their whole curves and
    the automatic-min_sim Infomap under every candidate rule.

    \b
    Examples:
      facecluster bench quality
      facecluster bench quality --features lfw/features.npy --labels lfw/labels.npy --seeds 0,1,2,3,4,5,6,7
      facecluster bench quality --config ensemble4.toml --seeds 0,4,8
      facecluster bench quality --variant scale --baselines-only
      facecluster bench quality --train-features lfw/features.npy --train-labels lfw/labels.npy --dim 128
      facecluster bench quality --train-features a/f.npy --train-labels a/l.npy --features b/f.npy --labels b/l.npy
      facecluster bench quality --model general --features lfw/features.npy --labels lfw/labels.npy --split-seed 1
      facecluster bench quality --features lfw/features.npy --labels lfw/labels.npy --test-sizes 2-30 --seeds 0
    """
    from facecluster.tasks.dedup import dedup
    from facecluster.tasks.metrics import evaluate

    from ..cluster import connect
    from ..config import Config
    from ..evaluation import format_table
    from ..errors import BadInput
    from ..stages.dedup import run_dedup
    from ..stages.graph import run_graph
    from ..stages.ingest import run_ingest
    from ..run import run_cluster
    from ..stages.knn import run_knn
    from ..store import RunStore
    from ..model_files import GENERAL_MODEL_DIR, read_model_config
    from ..train import ensure_proposals, load_training_data, train

    try:
        seed_list = [] if baselines_only else [int(s) for s in str(seeds).split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    if not seed_list and not baselines_only:
        raise click.BadParameter("give at least one seed (or --baselines-only to train nothing)", param_hint="--seeds")
    if not 0.0 < test_fraction < 1.0:
        raise click.BadParameter(f"must be in (0, 1), got {test_fraction}", param_hint="--test-fraction")
    if features is not None and labels is None:
        raise BadInput(f"{features}: bench quality needs the labels of these features; pass --labels FILE")
    if train_features is not None and train_labels is None:
        raise BadInput(f"{train_features}: bench quality needs the labels of the training features; "
                       "pass --train-labels FILE")
    if train_labels is not None and train_features is None:
        raise BadInput(f"{train_labels}: --train-labels needs --train-features (the features they label)")
    if features is not None and variant != "default":
        raise click.BadParameter("a variant of the built-in dataset cannot apply to --features", param_hint="--variant")
    given = None
    if given_model is not None:
        if baselines_only or train_features is not None:
            raise BadInput("--model evaluates a given model: it trains nothing, so it takes neither --baselines-only "
                           "nor --train-features")
        given = GENERAL_MODEL_DIR if given_model == "general" else Path(given_model)
        read_model_config(given)  # a bad directory fails before any data is made
        seed_list = [0]
    # the full chain: the GCN-D and GCN-D + GCN-S rows dedup over every proposal, also where the model's output is
    # its communities
    cfg = Config.load(config_path, {"dask.n_workers": workers, "edges.output_only": False})
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = parse_sizes(test_sizes)
    paths = _prepare(wd, features, labels, n, dim, test_fraction, split_seed, cfg.ingest, variant,
                     train_features, train_labels, sizes)
    stores = {}
    for s, (f, lab) in paths.items():
        if s == "train" and (baselines_only or given is not None) and train_features is None:
            continue  # nothing is trained; a --train-features set is still ingested for its dimension check
        run_ingest(f, str(wd / f"{s}.zarr"), labels=lab, cfg=cfg.ingest, overwrite=True)
        stores[s] = RunStore.open(str(wd / f"{s}.zarr"))
    check_same_dim(stores, paths, builtin_test=features is None)
    test = stores["test"]
    gt = test.array("labels")[:]
    builtin = f"built-in dataset ({variant}), n={n}, dim={dim}"
    result = {"source": str(features) if features else builtin,
              "train_source": (f"none: the given model {given}" if given is not None else
                               str(train_features) if train_features else "same set, other identities"),
              "variant": None if features else variant,
              "n_train": int(stores["train"].array("features").shape[0]) if "train" in stores else 0,
              "n_test": int(len(gt)), "test_fraction": test_fraction, "split_seed": split_seed,
              "test_sizes": list(sizes) if sizes else None, "seeds": seed_list,
              "baselines_only": bool(baselines_only), "gcn": cfg.gcn.to_dict(), "baselines": {}, "by_seed": []}
    click.echo(f"{result['source']}: {result['n_train']} training faces ({result['train_source']}), "
               f"{result['n_test']} test faces" + (f" (identities resampled to {sizes[0]}-{sizes[1]} faces)" if sizes else "")
               + f"; {len(seed_list)} training seeds", err=True)
    with connect(cfg.dask, quiet=True) as client:
        if baselines_only or given is not None:
            run_knn(test, cfg, client)
            run_graph(test, cfg, client)
        else:
            for store in stores.values():
                ensure_proposals(store, cfg, client)
        base, record = run_baselines(test, cfg, client, gt)
        bar = next(iter(base.values()))  # the label-chosen threshold: the bar every seed is counted against
        result.update(record)
        click.echo(baseline_line(record), err=True)
        result["baselines"] = base
        ceilings = []
        for seed in seed_list:
            scfg = dataclasses.replace(cfg, gcn=dataclasses.replace(cfg.gcn, seed=seed))
            t = time.perf_counter()
            if given is not None:
                model, meta = given, read_model_config(given)
            else:
                model = wd / f"model_seed{seed}"
                meta = train(stores["train"], model, scfg, client, echo=log.info)
            t_train = time.perf_counter() - t
            # the whole chain on the test run (knn is reused; with an edge scorer, every seed has its own
            # edge probabilities, communities and proposals)
            run_cluster(test, scfg, client, str(model), echo=log.info)
            attach = (meta.get("edges") or {}).get("attach") if scfg.edges.attach else None
            run_dedup(test, scfg, client, use_gcns=False, out="clusters_gcnd", attach=attach)
            source = meta.get("output", {}).get("source", "proposals")
            if source != "proposals":  # the model's output is its communities: GCN-D + GCN-S dedup on its own
                run_dedup(test, scfg, client, out="clusters_gcnds", attach=attach)
            test_data = load_training_data(test, read_model_config(model)["spec"])  # this seed's test proposals
            row = {"seed": seed, "train_seconds": round(t_train, 1), "output": meta.get("output"),
                   "segmentation": meta["segmentation"], "val_pairwise_f_d": meta["metrics"].get("val_pairwise_f_d"),
                   "learned (the model's output)": evaluate(gt, test.array("clusters")[:]),
                   "GCN-D": evaluate(gt, test.array("clusters_gcnd")[:]),
                   "GCN-D + GCN-S": evaluate(gt, test.array("clusters" if source == "proposals" else "clusters_gcnds")[:]),
                   "dedup by true IoU": evaluate(gt, dedup(len(gt), test_data["offsets"], test_data["members"],
                                                           test_data["targets"]["iou"])),
                   "held_out": held_out_scorer(test, model, test_data)}
            ceilings.append({f"spearman_{k}": spearman_ceiling(test_data["targets"][k]) for k in ("iou", "iop")})
            if meta.get("edges"):
                row["communities"] = evaluate(gt, test.array("communities/labels")[:, 0])  # at the model's floor
                row["edge_scorer"] = held_out_edges(test, gt)
                row["edges"] = {"floor": meta["edges"]["floor"], "attach": meta["edges"]["attach"],
                                "merge": meta["edges"].get("merge"), "balance": meta["edges"].get("balance"),
                                "attached": test.record("dedup")["summary"].get("attached")}
            result["by_seed"].append(row)
            h = row["held_out"]
            learned = row["learned (the model's output)"]["pairwise_f"]
            floor_note = f"; floor {row['edges']['floor']}" if meta.get("edges") else ""
            click.echo(f"seed {seed}: learned ({source}{floor_note}) pairwise F {learned:.4f}, "
                       f"GCN-D {row['GCN-D']['pairwise_f']:.4f}, GCN-D + GCN-S "
                       f"{row['GCN-D + GCN-S']['pairwise_f']:.4f}; test proposals: Spearman IoU {h['spearman_iou']:.3f}, "
                       f"IoP {h['spearman_iop']:.3f}, GCN-S node accuracy {h['gcns_node_acc']:.3f} "
                       f"(impure {h['gcns_node_acc_impure']:.3f}) (trained in {t_train:.0f}s)", err=True)
    rows = result["by_seed"]
    if not rows:  # --baselines-only
        result["seconds"] = round(time.perf_counter() - t0, 1)
        path = save_result("quality", result, out)
        click.echo(format_table(base))
        click.echo(f"baselines only (nothing trained); result in {path}")
        return
    result["held_out_ceiling"] = {k: float(np.mean([c[k] for c in ceilings])) for k in ceilings[0]}
    methods = (("learned (the model's output)", "GCN-D", "GCN-D + GCN-S", "dedup by true IoU")
               + (("communities",) if "communities" in rows[0] else ()))
    result["summary"] = {m: {k: _summary([r[m] for r in rows], k) for k in ("pairwise_f", "bcubed_f")} for m in methods}
    if "edge_scorer" in rows[0]:
        result["summary"]["edge_scorer"] = {"auc": _summary([r["edge_scorer"] for r in rows], "auc"),
                                            "auc_cosine": rows[0]["edge_scorer"]["auc_cosine"]}
    result["summary"]["held_out"] = {k: _summary([r["held_out"] for r in rows], k) for k in HELD_OUT_KEYS}
    result["seeds_above_threshold_pairwise"] = int(sum(r["learned (the model's output)"]["pairwise_f"] > bar["pairwise_f"]
                                                       for r in rows))
    result["outputs_chosen"] = [(r.get("output") or {}).get("source", "proposals") for r in rows]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = save_result("quality", result, out)
    table = dict(base)
    for r in rows:
        for m in methods:
            table[f"{m}, seed {r['seed']}"] = r[m]
    click.echo(format_table(table))
    if "edge_scorer" in result["summary"]:
        e = result["summary"]["edge_scorer"]
        click.echo(f"edge scorer on the test edges: ROC-AUC mean {e['auc']['mean']:.4f} (min {e['auc']['min']:.4f}); "
                   f"cosine alone {e['auc_cosine']:.4f}; calibration (predicted -> observed) seed {rows[0]['seed']}: "
                   + ", ".join(f"{b['predicted']:.2f}->{b['observed']:.2f}" for b in rows[0]["edge_scorer"]["calibration"]
                               if b["edges"]))
    for m in methods:
        s = result["summary"][m]
        click.echo(f"{m} over {len(rows)} seeds: pairwise F mean {s['pairwise_f']['mean']:.4f} "
                   f"(min {s['pairwise_f']['min']:.4f}, max {s['pairwise_f']['max']:.4f}), "
                   f"BCubed F mean {s['bcubed_f']['mean']:.4f}")
    ho = result["summary"]["held_out"]
    ceil = result["held_out_ceiling"]
    click.echo("held-out proposals, mean (min-max) over seeds: " + ", ".join(
        f"{name} {ho[k]['mean']:.3f} ({ho[k]['min']:.3f}-{ho[k]['max']:.3f})"
        + (f" [ceiling without ties {ceil[k]:.3f}]" if k in ceil else "") for k, name in HELD_OUT_KEYS.items()))
    click.echo(f"the learned output (chosen per seed: {', '.join(result['outputs_chosen'])}) above the label-chosen "
               f"threshold's pairwise F {bar['pairwise_f']:.4f} in "
               f"{result['seeds_above_threshold_pairwise']} of {len(rows)} seeds; result in {path}")
