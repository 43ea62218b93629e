"""`facecluster train RUN.zarr --out MODEL_DIR`: learn GCN-D (IoU, IoP) and GCN-S from a labelled run."""

from __future__ import annotations

import click

from ._common import config_option, dask_options, pass_config


@click.command("train")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default from [gcn], 20).")
@click.option("--lr", type=float, default=None, help="Learning rate (default from [gcn], 0.001).")
@click.option("--hidden", default=None, help="Graph-conv widths, comma-separated (default 128,64).")
@click.option("--seed", type=int, default=None, help="Training seed (default 0).")
@click.option("--ensemble", type=click.IntRange(1, 16), default=None,
              help="GCN-D models averaged (default from [gcn], 1); N x training and GCN-D scoring time.")
@config_option
@dask_options
@pass_config({"epochs": "gcn.epochs", "lr": "gcn.lr", "seed": "gcn.seed", "ensemble": "gcn.ensemble"})
def command(run, out, hidden, cfg):
    """Train GCN-D and GCN-S on RUN (needs labels); runs knn/graph/proposals first when needed.

    Proposals are split by identity into training and validation (disjoint
    identities); per-epoch loss and validation metrics are printed, the best epoch
    is kept. Writes OUT/gcnd.pt, OUT/gcns.pt and OUT/config.json.

    \b
    Examples:
      facecluster train train.zarr --out model/
      facecluster train train.zarr --out model/ --epochs 20 --lr 0.002
      facecluster train train.zarr --out model/ --ensemble 4
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
    store = RunStore.open(run)
    if not store.has("labels"):
        from ..errors import BadInput

        raise BadInput(f"{run}: has no labels; training needs a labelled run (`facecluster ingest FEATS --labels L -o {run}`)")
    with connect(cfg.dask) as client:  # the upstream stages (and the edge scorer's) run on the cluster
        meta = train(store, out, cfg, client, echo=lambda s: click.echo(s, err=True))
    m = meta["metrics"]
    click.echo(f"model written to {out}: validation Spearman IoU {m.get('val_spearman_iou', float('nan')):.3f}, "
               f"IoP {m.get('val_spearman_iop', float('nan')):.3f}, GCN-S node accuracy "
               f"{m.get('val_gcns_node_acc', float('nan')):.3f} (impure proposals "
               f"{m.get('val_gcns_node_acc_impure', float('nan')):.3f}); {meta['seconds']:.0f}s")
