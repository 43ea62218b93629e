"""`facecluster proposals RUN.zarr`: the graph (maximum spanning forest) and multi-scale proposals."""

from __future__ import annotations

import dataclasses

import click

from ._common import config_option, dask_options, pass_config


def with_thresholds(cfg, thresholds):
    """Config with explicit level-0 thresholds (``--th``, repeatable) when any were given."""
    if not thresholds:
        return cfg
    return dataclasses.replace(cfg, proposals=dataclasses.replace(cfg.proposals, thresholds=tuple(thresholds)))


def format_summary(summary: dict) -> str:
    """Human-readable proposal statistics: threshold, per-setting counts and size distributions."""
    th = summary.get("threshold", {})
    lines = [f"threshold anchor {th.get('anchor', float('nan')):.4f} ({th.get('source', '?')})",
             f"{'set':>3} {'th0':>8} {'maxsz':>5} {'svmax':>5} {'SVs':>8} {'largest':>7} {'props':>7} "
             f"{'per level':>16} {'size med':>8} {'max':>5}"]
    for s in summary.get("settings", []):
        per_level = "/".join(str(v) for v in s["per_level"].values())
        sz = s["sizes"]
        lines.append(f"{s['id']:>3} {s['th0']:>8.5f} {s['max_size']:>5} {s['sv_max_size']:>5} {s['super_vertices']:>8} "
                     f"{s['largest_super_vertex']:>7} {s['proposals']:>7} {per_level:>16} "
                     f"{sz.get('median', 0):>8.1f} {sz.get('max', 0):>5}")
    sz = summary.get("sizes", {})
    lines.append(f"{summary.get('n_proposals', 0)} proposals ({summary.get('before_dedup', 0)} before removing "
                 f"duplicates), per level {summary.get('per_level', {})}, covering {summary.get('faces_covered', 0)} faces; "
                 f"size min {sz.get('min', 0)} / median {sz.get('median', 0):.1f} / max {sz.get('max', 0)}")
    for w in summary.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


@click.command("proposals")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["fast", "default", "thorough"]), default=None,
              help="Proposal settings: fast = 2, default = 8, thorough = 20.")
@click.option("--th", "thresholds", type=float, multiple=True,
              help="Explicit level-0 threshold, repeatable (default: derived from the data's kNN similarities).")
@click.option("--max-size", type=int, default=None, help="Largest super-vertex in faces (default 300).")
@click.option("--step", type=float, default=None, help="Threshold ladder step (default 0.05).")
@click.option("--min-size", type=int, default=None, help="Smallest proposal kept (default 2: pairs can cluster).")
@click.option("--max-proposal-size", type=int, default=None, help="Largest proposal kept (default 500).")
@click.option("--levels", type=int, default=None, help="Levels per setting (default 2).")
@click.option("--force", is_flag=True, help="Recompute even if the stored proposals are up to date.")
@config_option
@dask_options
@pass_config({"preset": "proposals.preset", "max_size": "proposals.max_size", "step": "proposals.step",
              "min_size": "proposals.min_size", "max_proposal_size": "proposals.max_proposal_size",
              "levels": "proposals.levels"})
def command(run, thresholds, force, cfg):
    """Super-vertices and multi-scale proposals of RUN (builds the graph first if needed).

    \b
    Examples:
      facecluster proposals run.zarr
      facecluster proposals run.zarr --preset thorough
      facecluster proposals run.zarr --th 0.6 --th 0.7 --max-size 300
    """
    from ..cluster import connect
    from ..run import ensure_graph
    from ..stages.proposals import run_proposals
    from ..store import RunStore

    cfg = with_thresholds(cfg, thresholds)
    store = RunStore.open(run)
    with connect(cfg.dask) as client:
        ensure_graph(store, cfg, client)
        summary = run_proposals(store, cfg, client, force=force)
    click.echo(format_summary(summary))
