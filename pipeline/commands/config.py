"""`facecluster config show`: the effective configuration."""

from __future__ import annotations

import json

import click

from ..config import Config


@click.group("config")
def command():
    """Inspect the configuration (defaults < TOML file < flags).

    \b
    Examples:
      facecluster config show > run.toml          # a documented starting point
      facecluster config show --config run.toml --set knn.k=30
    """


@command.command("show")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="TOML file to merge over the defaults.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one value (TOML syntax for the value), repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def show(config_path, sets, as_json):
    """Print the effective configuration with every key's help.

    \b
    Examples:
      facecluster config show
      facecluster config show --config run.toml --set knn.k=30
    """
    import tomllib

    overrides = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise click.BadParameter(f"{item!r}: expected SECTION.KEY=VALUE, e.g. knn.k=30", param_hint="--set")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = raw  # bare strings: --set knn.mode=ivf
    cfg = Config.load(config_path, overrides)
    click.echo(json.dumps(cfg.to_dict(), indent=2) if as_json else cfg.to_toml())
