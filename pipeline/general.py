"""The general model: an edge scorer, GCN-D and GCN-S trained on the package's own generator only.

``facecluster train --general --out DIR`` (:func:`train_general`) draws ``worlds`` randomised
settings of the built-in generator (:func:`facecluster.tasks.synth.general_worlds`: similarity
scales from SFace-like to dlib-like, spreads, identity-size laws from all-singletons-and-pairs to
hundreds of faces, every identity of 2-30 faces, dimensions 32-512, no families to large
look-alike families), makes a labelled run of each and trains on all of them at once:

* the edge scorer on every world's kNN edges; each world's inputs are read on its *own*
  similarity scale (``facecluster.tasks.edges.run_edge_inputs``), which is what lets one scorer
  serve every scale. Out-of-fold probabilities (two folds of identities in every world, dealt by
  size) choose the loss weighting, the communities floor and the attach level by their mean
  pairwise + BCubed F over the worlds (:func:`facecluster.tasks.edges.choose_levels_over`);
* GCN-D and GCN-S on the joined proposals of every world (identities never shared), with a node
  input spec free of the feature dimension (:data:`GENERAL_GCN`: no feature column, the learned
  P as the edge weight), so the model loads on a run of any dimension (``config.json`` ``"dim":
  null``).

No real face goes in; the result is a function of the recipe (:class:`GeneralRecipe`) and the
configuration, bit for bit (fixed seeds, one torch thread, seeded Infomap, stages that do not depend
on the chunking). The package ships the default recipe's model in
:data:`facecluster.pipeline.model_files.GENERAL_MODEL_DIR`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .errors import BadInput
from .model_files import FORMAT, model_digest, save_edge_scorer, save_models
from .stages.ingest import run_ingest
from .stages.knn import run_knn
from .store import RunStore
from .train import (EDGE_FOLDS, attached_communities, ensure_proposals, fit_gcn_models, identity_split, input_spec,
                    load_training_data, output_choice, size_stratified_folds, validation_faces, write_training_edges)

log = logging.getLogger(__name__)

#: [gcn] settings of the general model: no feature column (the model must load on any dimension) and the
#: learned P as the only edge weight (the cosine inputs of ``weights = "both"`` carry the face model's scale)
GENERAL_GCN = {"gcn.relative": "none", "gcn.weights": "prob"}


@dataclass(frozen=True)
class GeneralRecipe:
    """What the general model trains on and how long: ``worlds`` generator settings of ``faces`` faces each,
    from ``seed``; ``epochs`` of GCN-D and GCN-S ([gcn] epochs); the edge scorer's loss weighting
    ([edges] balance).

    Sized to train in minutes on 2 cores (36,000 faces). ``balance`` "none": with "auto" the first,
    larger recipe (16 worlds of 4,000 faces) measured the plain loss ahead on the out-of-fold
    communities (mean pairwise + BCubed F 1.5954 against 1.5905 face-balanced), at a third of the
    edge scorer's cost. ``epochs`` 6: that recipe's GCN-D reached validation Spearman(IoU) 0.82 in
    its second epoch, and 20 epochs x 3 fits of its 387k vertices would have taken an hour here.
    """

    worlds: int = 12
    faces: int = 3000
    seed: int = 0
    epochs: int = 6
    balance: str = "none"

    def __post_init__(self):
        if self.worlds < 1 or self.faces < 50 or self.seed < 0 or self.epochs < 1:
            raise BadInput(f"general model recipe: need worlds >= 1, faces >= 50, seed >= 0, epochs >= 1 (got "
                           f"{self.worlds}, {self.faces}, {self.seed}, {self.epochs})")
        if self.balance not in ("auto", "face", "none"):
            raise BadInput(f"general model recipe: balance must be auto, face or none, got {self.balance!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def general_config(cfg: Config, recipe: GeneralRecipe | None = None) -> Config:
    """``cfg`` with the general model's [gcn] input settings (:data:`GENERAL_GCN`), the edge scorer on, and
    the recipe's epochs and loss weighting."""
    recipe = recipe or GeneralRecipe()
    return Config.from_dict(cfg.to_dict(), {**GENERAL_GCN, "edges.learn": True, "gcn.epochs": recipe.epochs,
                                            "edges.balance": recipe.balance})


def make_world_runs(recipe: GeneralRecipe, workdir: Path, cfg: Config, client, echo) -> list[tuple[dict, RunStore]]:
    """One labelled run (ingested, kNN done) per world of the recipe: [(world description, store)]."""
    from facecluster.tasks.synth import general_worlds, make_faces

    runs = []
    for i, (law, p) in enumerate(general_worlds(recipe.worlds, recipe.seed)):
        seed = 1000 * recipe.seed + i
        x, y = make_faces(recipe.faces, p.dim, seed=seed, params=p)
        d = workdir / f"world{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "features.npy", x)
        np.save(d / "labels.npy", y)
        run_ingest(d / "features.npy", str(d / "run.zarr"), labels=d / "labels.npy", cfg=cfg.ingest, overwrite=True)
        store = RunStore.open(str(d / "run.zarr"))
        run_knn(store, cfg, client)
        sizes = np.bincount(y)
        desc = {"world": i, "law": law, "seed": seed, "faces": int(len(y)), "identities": int((sizes > 0).sum()),
                "singleton_identities": int((sizes == 1).sum()), "largest_identity": int(sizes.max()),
                "params": p.to_dict()}
        echo(f"world {i}: {law}, {p.dim}-d, face_shift {p.face_shift:.2f}, {desc['identities']} identities "
             f"(largest {desc['largest_identity']})")
        runs.append((desc, store))
    return runs


def train_general_edges(stores: list[RunStore], out_dir: Path, cfg: Config, echo) -> tuple[dict, list[np.ndarray]]:
    """The edge scorer over every world; writes ``edges.pt``. Returns its ``edges`` table and each world's
    out-of-fold probabilities (as :func:`facecluster.pipeline.train.train_edge_scorer`, over several runs)."""
    import torch

    from facecluster.tasks.edges import (INPUT_NAMES, adapted_prob, calibration, choose_cut_over, choose_infomap_level_over,
                                         choose_levels_over, face_balanced_weights, fit_adaptation, fit_edge_scorer, predict_edges,
                                         roc_auc, run_edge_inputs)

    e, g = cfg.edges, cfg.gcn
    fit = dict(hidden=tuple(e.hidden), epochs=e.epochs, lr=e.lr, batch_size=e.batch_size)
    xs, same, w_face, fold, train_edge, shapes, idx_all, lab_all, cos_all, sim_all = [], [], [], [], [], [], [], [], [], []
    for w, store in enumerate(stores):
        labels = store.array("labels")[:]
        index, sim = store.array("knn/index")[:], store.array("knn/sim")[:]
        x, _ = run_edge_inputs(index, sim)  # this world's own similarity scale
        n, k = index.shape
        ok = (index >= 0).reshape(-1)
        dst = np.maximum(index.reshape(-1), 0)
        row = np.repeat(np.arange(n), k)
        sm = labels[row] == labels[dst]
        fold_of_face = size_stratified_folds(labels, EDGE_FOLDS, g.seed + w)
        tr_faces, _ = identity_split(labels, g.val_fraction, g.seed + w)
        is_tr = np.zeros(n, bool)
        is_tr[tr_faces] = True
        xs.append(x.reshape(-1, x.shape[-1])[ok])
        same.append(sm[ok])
        w_face.append(face_balanced_weights(row, sm & ok, ok)[ok])
        fold.append(fold_of_face[row[ok]])
        train_edge.append(is_tr[row[ok]])
        cos_all.append(sim.reshape(-1)[ok])
        shapes.append((n, k, ok))
        idx_all.append(index)
        sim_all.append(sim)
        lab_all.append(labels)
    x, same, fold, train_edge = (np.concatenate(a) for a in (xs, same, fold, train_edge))
    del xs
    weights = {"none": None, "face": np.concatenate(w_face)}
    bounds = np.cumsum([0] + [len(c) for c in cos_all])

    def per_world(flat: np.ndarray) -> list[np.ndarray]:
        out = []
        for w, (n, k, ok) in enumerate(shapes):
            full = np.zeros(n * k, np.float32)
            full[ok] = flat[bounds[w]:bounds[w + 1]]
            out.append(full.reshape(n, k))
        return out

    def out_of_fold(weight) -> np.ndarray:
        oof = np.zeros(len(same), np.float32)
        for f in range(EDGE_FOLDS):
            inside, outside = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            if len(inside) == 0 or len(outside) == 0:
                continue
            m_f, _ = fit_edge_scorer(x, same, outside, inside, seed=g.seed + 1 + f, weight=weight, **fit)
            oof[inside] = predict_edges(m_f, x[inside])
        return oof

    tried = {}
    for balance in (("none", "face") if e.balance == "auto" else (e.balance,)):
        t = time.perf_counter()
        oof = out_of_fold(weights[balance])
        probs = per_world(oof)
        levels = choose_levels_over([(i, p, lab, np.arange(len(lab))) for i, p, lab in zip(idx_all, probs, lab_all)])
        tried[balance] = (oof, probs, levels)
        echo(f"edge scorer, {balance} loss: out-of-fold communities mean pairwise + BCubed F {levels['score']:.4f} at "
             f"floor {levels['floor']}, merge {levels['merge']}, attach {levels['attach']} ({time.perf_counter() - t:.0f}s)")
    balance = max(tried, key=lambda b: tried[b][2]["score"])  # "none" first: a tie keeps the plain loss
    oof, probs, levels = tried[balance]
    # the levels of runs whose P the edges stage adapts ([edges] adapt): chosen the same way on each world's
    # out-of-fold P adapted on that world's own edges (every row is in a 3,000-face world's scale sample)
    adapted_oof = np.array(oof, copy=True)
    for a, b in zip(bounds[:-1], bounds[1:]):
        ad = fit_adaptation(x[a:b], oof[a:b])
        if ad:
            adapted_oof[a:b] = adapted_prob(x[a:b], ad, oof[a:b])
    adapted_probs = per_world(adapted_oof)
    adapt_levels = choose_levels_over([(i, p, lab, np.arange(len(lab))) for i, p, lab in zip(idx_all, adapted_probs, lab_all)])
    echo(f"edge scorer: adapted out-of-fold communities mean pairwise + BCubed F {adapt_levels['score']:.4f} at floor "
         f"{adapt_levels['floor']}, merge {adapt_levels['merge']}, attach {adapt_levels['attach']}")

    def cut_and_infomap_level(run_probs: list[np.ndarray], what: str) -> tuple[dict, dict]:
        """The components cut of `--method threshold` without --th (:func:`facecluster.pipeline.methods.cluster_threshold`)
        and the P level of `--method infomap`'s cosine floor without --min-sim
        (:func:`facecluster.pipeline.stages.infomap.resolve_min_sim`), chosen on ``run_probs``."""
        cut = choose_cut_over(list(zip(idx_all, run_probs, lab_all)))
        echo(f"edge scorer: {what}out-of-fold components mean pairwise + BCubed F {cut['score']:.4f} at P >= {cut['level']}")
        level = choose_infomap_level_over(list(zip(idx_all, sim_all, run_probs, lab_all)))
        echo(f"edge scorer: {what}out-of-fold cosine kNN + Infomap mean pairwise + BCubed F {level['score']:.4f} at the "
             f"cosine where P crosses {level['level']}")
        return cut, level

    adapt_cut, adapt_infomap = cut_and_infomap_level(adapted_probs, "adapted ")
    cut, infomap_level = cut_and_infomap_level(probs, "")
    tr, va = np.flatnonzero(train_edge), np.flatnonzero(~train_edge)
    torch.manual_seed(g.seed)
    model, history = fit_edge_scorer(x, same, tr, va, seed=g.seed, weight=weights[balance], **fit)
    pv = predict_edges(model, x[va]) if len(va) else np.zeros(0, np.float32)
    cos = np.concatenate(cos_all)
    table = {"inputs": list(INPUT_NAMES), "hidden": list(e.hidden), "balance": balance, "floor": levels["floor"],
             "merge": levels["merge"] if e.merge else None, "attach": levels["attach"] if e.attach else None,
             "cut": cut["level"], "infomap_level": infomap_level["level"],
             "adapt_levels": {"floor": adapt_levels["floor"], "merge": adapt_levels["merge"] if e.merge else None,
                              "attach": adapt_levels["attach"] if e.attach else None,
                              "cut": adapt_cut["level"], "infomap_level": adapt_infomap["level"]},
             "metrics": {"val_auc": roc_auc(pv, same[va]) if len(va) else None,
                         "val_calibration": calibration(pv, same[va]) if len(va) else [],
                         "out_of_fold_auc": roc_auc(oof, same), "out_of_fold_calibration": calibration(oof, same),
                         "out_of_fold_auc_by_world": [roc_auc(oof[a:b], same[a:b]) for a, b in zip(bounds[:-1], bounds[1:])],
                         "cosine_auc_by_world": [roc_auc(cos[a:b], same[a:b]) for a, b in zip(bounds[:-1], bounds[1:])],
                         "train_edges": int(len(tr)), "val_edges": int(len(va)), "history": history,
                         "levels": levels, "cut": cut, "infomap_level": infomap_level, "adapt_levels": adapt_levels,
                         "adapt_cut": adapt_cut, "adapt_infomap_level": adapt_infomap,
                         "balance_scores": {b: tried[b][2]["score"] for b in tried}}}
    save_edge_scorer(out_dir, model)
    echo(f"edge scorer: validation ROC-AUC {table['metrics']['val_auc']:.4f}, out-of-fold "
         f"{table['metrics']['out_of_fold_auc']:.4f}; communities floor {table['floor']}, merge level {table['merge']}, "
         f"attach level {table['attach']}, "
         f"loss balance {balance}")
    return table, probs


def joined_training_data(stores: list[RunStore], spec: dict) -> dict:
    """:func:`facecluster.pipeline.train.load_training_data` of several runs as one: faces, labels and
    identities renumbered so that no two runs share any (``dim`` None: the runs' dimensions differ)."""
    from facecluster.tasks.gcn import concat_batches

    parts, face_off, label_off = [], 0, 0
    for store in stores:
        d = load_training_data(store, spec)
        uniq, lab = np.unique(d["labels"], return_inverse=True)
        maj = np.searchsorted(uniq, d["targets"]["majority"])
        parts.append({"labels": lab + label_off, "members": d["members"] + face_off, "sizes": np.diff(d["offsets"]),
                      "targets": {**d["targets"], "majority": maj + label_off},
                      "batch": dataclasses.replace(d["batch"], members=d["batch"].members + face_off), "k": d["k"]})
        face_off += len(d["labels"])
        label_off += len(uniq)
    sizes = np.concatenate([p["sizes"] for p in parts])
    # GCN-S reads the cosine of each member to a seed member (ProposalBatch.unit): zero-padding the
    # rows of every world to the largest dimension keeps every cosine as it is
    width = max(p["batch"].unit.shape[1] for p in parts)
    for p in parts:
        u = p["batch"].unit
        if u.shape[1] < width:
            p["batch"] = dataclasses.replace(p["batch"], unit=np.pad(u, ((0, 0), (0, width - u.shape[1]))))
    return {"labels": np.concatenate([p["labels"] for p in parts]),
            "members": np.concatenate([p["members"] for p in parts]),
            "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            "targets": {key: np.concatenate([p["targets"][key] for p in parts]) for key in parts[0]["targets"]},
            "batch": concat_batches([p["batch"] for p in parts]), "dim": None, "k": parts[0]["k"]}


def train_general(out_dir: str | os.PathLike, cfg: Config, client, recipe: GeneralRecipe | None = None,
                  echo=None, workdir: str | os.PathLike | None = None) -> dict:
    """Train the general model into ``out_dir``; returns the metadata written to its ``config.json``.

    Parameters
    ----------
    out_dir : the model directory to write.
    cfg : Config; its [gcn] input settings are replaced by :data:`GENERAL_GCN`.
    client : distributed.Client for the worlds' stages (kNN, communities, graph, proposals).
    recipe : the worlds (default :class:`GeneralRecipe()`, the shipped model's).
    echo : callable(str) for progress lines (default: logging).
    workdir : where the worlds' runs are written (default: a temporary folder, removed afterwards;
        the Dask workers must reach it).
    """
    import torch

    echo = echo or log.info
    recipe = recipe or GeneralRecipe()
    cfg = general_config(cfg, recipe)
    torch.set_num_threads(max(1, cfg.dask.threads_per_worker))  # as train(): the result must not follow the core count
    out = Path(out_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facecluster-general-", dir=workdir) as tmp:
        runs = make_world_runs(recipe, Path(tmp), cfg, client, echo)
        worlds, stores = [d for d, _ in runs], [s for _, s in runs]
        t1 = time.perf_counter()
        echo(f"{len(stores)} worlds generated, kNN done in {t1 - t0:.0f}s")
        edges, probs = train_general_edges(stores, out, cfg, echo)
        (out / "config.json").unlink(missing_ok=True)  # the communities stage reads the floor from here
        (out / "config.json.tmp").write_text(json.dumps({"edges": edges}, default=str))
        os.replace(out / "config.json.tmp", out / "config.json")
        for store, prob in zip(stores, probs):
            write_training_edges(store, prob, out)
            ensure_proposals(store, cfg, client, out, edges_written=True)
        t2 = time.perf_counter()
        echo(f"edge scorer, communities and proposals of every world in {t2 - t1:.0f}s")
        spec = input_spec(cfg)
        data = joined_training_data(stores, spec)
        echo(f"GCN training data: {len(data['batch'].sizes)} proposals, {len(data['batch'].members)} vertices "
             f"over {len(data['labels'])} faces")
        fit = fit_gcn_models(data, cfg, echo, "the general model's worlds")
        seg, va, tg = fit["seg"], fit["val"], data["targets"]
        output = {"source": "proposals"}
        if cfg.edges.communities and len(va) and seg["val_pairwise_f_ds"] is not None:
            comms, off = [], 0
            for store in stores:
                c = attached_communities(store, edges)
                comms.append(c + off)
                off += int(c.max()) + 1
            faces = validation_faces(data["batch"], data["labels"], tg["majority"], va)
            output = output_choice(data["labels"], np.concatenate(comms), seg, faces)
            echo(f"output on validation faces: communities {output['val_pairwise_f_communities']:.4f} / "
                 f"{output['val_bcubed_f_communities']:.4f}, dedup over all proposals "
                 f"{output['val_pairwise_f_dedup']:.4f} / {output['val_bcubed_f_dedup']:.4f} -> {output['source']}")
    metrics = {key: v for key, v in fit["metrics"].items() if not key.endswith("_seconds")}  # bit-for-bit files
    g = cfg.gcn
    meta = {"format": FORMAT, "dim": None, "k": data["k"], "hidden": list(g.hidden), "spec": spec,
            "ensemble": g.ensemble, "gcn": g.to_dict(), "knn": cfg.knn.to_dict(), "proposals": cfg.proposals.to_dict(),
            "segmentation": {"iop_range": seg["iop_range"], "keep_prob": seg["keep_prob"]},
            "run": None, "metrics": metrics, "edges": edges, "output": output,
            "general": {"recipe": recipe.to_dict(), "worlds": worlds}, "history": fit["history"]}
    save_models(out, fit["gcnd"], fit["gcns"], meta)
    echo(f"general model written to {out} (digest {model_digest(out)}) in {time.perf_counter() - t0:.0f}s")
    return meta
