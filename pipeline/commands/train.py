"""`facecluster train RUN.zarr --out MODEL_DIR`: learn GCN-D (IoU, IoP) and GCN-S from a labelled run;
`facecluster train --general --out MODEL_DIR`: the general model, from the package's own generator."""

from __future__ import annotations

import click

from ._common import config_option, dask_options, pass_config


@click.command("train")
@click.argument("run", type=click.Path(file_okay=False), required=False)
@click.option("--general", is_flag=True,
              help="Train the general model (no RUN): on labelled worlds of the built-in generator over randomised "
                   "similarity scales, spreads, identity-size laws, dimensions and families; no real face. With the "
                   "defaults it reproduces the model shipped in the package bit for bit.")
@click.option("--worlds", type=click.IntRange(1, 256), default=None, help="--general: generator worlds (default 12).")
@click.option("--world-faces", type=click.IntRange(50, 1_000_000), default=None,
              help="--general: faces per world (default 3000).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default from [gcn], 20; --general: the recipe's 6).")
@click.option("--lr", type=float, default=None, help="Learning rate (default from [gcn], 0.001).")
@click.option("--hidden", default=None, help="Graph-conv widths, comma-separated (default 128,64).")
@click.option("--seed", type=int, default=None, help="Training seed (default 0).")
@click.option("--ensemble", type=click.IntRange(1, 16), default=None,
              help="GCN-D models averaged (default from [gcn], 1); N x training and GCN-D scoring time.")
@config_option
@dask_options
@pass_config({"epochs": "gcn.epochs", "lr": "gcn.lr", "seed": "gcn.seed", "ensemble": "gcn.ensemble"})
def command(run, general, worlds, world_faces, out, hidden, cfg):
    """Train GCN-D and GCN-S on RUN (needs labels); runs knn/graph/proposals first when needed.

    Proposals are split by identity into training and validation (disjoint
    identities); per-epoch loss and validation metrics are printed, the best epoch
    is kept. Writes OUT/gcnd.pt, OUT/gcns.pt and OUT/config.json.

    \b
    Examples:
      facecluster train train.zarr --out model/
      facecluster train train.zarr --out model/ --epochs 20 --lr 0.002
      facecluster train train.zarr --out model/ --ensemble 4
      facecluster train --general --out general/        # the shipped general model, bit for bit
    """
    from ..cluster import connect
    from ..store import RunStore
    from ..train import train

    if hidden:
        try:
            widths = [int(x) for x in hidden.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"--hidden must be comma-separated integers, got {hidden!r}") from None
        from ..config import Config

        cfg = Config.from_dict(cfg.to_dict(), {"gcn.hidden": widths})
    from ..errors import BadInput

    if general:
        if run:
            raise BadInput(f"{run}: --general trains on generated faces only; drop RUN (or drop --general to train on it)")
        return train_general_command(out, worlds, world_faces, click.get_current_context().params.get("epochs"), cfg)
    if run is None:
        raise BadInput("train: give a labelled RUN.zarr, or --general for the general model")
    if worlds is not None or world_faces is not None:
        raise BadInput("--worlds and --world-faces are options of --general")
    store = RunStore.open(run)
    if not store.has("labels"):
        raise BadInput(f"{run}: has no labels; training needs a labelled run (`facecluster ingest FEATS --labels L -o {run}`)")
    with connect(cfg.dask) as client:  # the upstream stages (and the edge scorer's) run on the cluster
        meta = train(store, out, cfg, client, echo=lambda s: click.echo(s, err=True))
    m = meta["metrics"]
    click.echo(f"model written to {out}: validation Spearman IoU {m.get('val_spearman_iou', float('nan')):.3f}, "
               f"IoP {m.get('val_spearman_iop', float('nan')):.3f}, GCN-S node accuracy "
               f"{m.get('val_gcns_node_acc', float('nan')):.3f} (impure proposals "
               f"{m.get('val_gcns_node_acc_impure', float('nan')):.3f}); {meta['seconds']:.0f}s")


def train_general_command(out, worlds, world_faces, epochs, cfg) -> None:
    from ..cluster import connect
    from ..general import GeneralRecipe, train_general
    from ..model_files import model_digest

    defaults = GeneralRecipe()
    recipe = GeneralRecipe(worlds=worlds or defaults.worlds, faces=world_faces or defaults.faces,
                           epochs=epochs or defaults.epochs)
    with connect(cfg.dask) as client:
        meta = train_general(out, cfg, client, recipe, echo=lambda s: click.echo(s, err=True))
    m = meta["metrics"]
    click.echo(f"general model written to {out} (digest {model_digest(out)}): {recipe.worlds} worlds of {recipe.faces} "
               f"faces; validation pairwise / BCubed F {m.get('val_pairwise_f_ds', float('nan')):.3f} / "
               f"{m.get('val_bcubed_f_ds', float('nan')):.3f}; output {meta['output']['source']}")
