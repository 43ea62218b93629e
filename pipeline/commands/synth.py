"""`facecluster synth N -o DIR`: write the built-in face-like dataset (train/test splits) to disk
(:func:`facecluster.pipeline.synth.write_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..synth import FORMATS, VARIANT_HELP, write_dataset


def _parse_params(items) -> dict:
    """``--param KEY=VALUE`` -> dict of SynthParams overrides (VALUE: JSON, or a comma list)."""
    from dataclasses import fields

    from facecluster.tasks.synth import SynthParams

    known = {f.name for f in fields(SynthParams)} - {"dim"}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}",
                                     param_hint="--param")
        try:
            val = json.loads(raw) if "," not in raw or raw.strip().startswith("[") else [json.loads(v) for v in raw.split(",")]
        except json.JSONDecodeError:
            raise click.BadParameter(f"{item!r}: VALUE must be a number (or LO,HI for family_cos)", param_hint="--param") from None
        out[key] = tuple(val) if isinstance(val, list) else val
    return out


@click.command("synth")
@click.argument("n", type=click.IntRange(min=2))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--dim", type=click.IntRange(min=8), default=256, show_default=True, help="Embedding dimension.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed -> identical files).")
@click.option("--test-fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Approximate share of faces in test/ (whole identities).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="npy", show_default=True,
              help="npy: features.npy + labels.npy; meta: features.bin (raw float32) + labels.meta.")
@click.option("--param", "param_items", multiple=True, metavar="KEY=VALUE",
              help="Generator knob override, repeatable (e.g. family_cos=0.5,0.8 spread_sigma=0.3); see tasks.synth.SynthParams.")
@click.option("--variant", type=click.Choice(list(VARIANT_HELP)), default="default", show_default=True,
              help="A named shift of the generator (--param overrides apply on top): "
                   + "; ".join(f"{k}: {v}" for k, v in VARIANT_HELP.items()) + ".")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder.")
def command(n, out_dir, dim, seed, test_fraction, fmt, param_items, variant, overwrite):
    """Write N synthetic face embeddings (train and test splits) to OUT.

    \b
    Identities have long-tailed sizes, look-alike families, several modes and
    their own spread, so one global similarity threshold cannot cluster them well.
    Examples:
      facecluster synth 20000 -o data/synth20k
      facecluster synth 1000000 -o data/synth1m --test-fraction 0.2
      facecluster synth 40000 -o data/scale40k --variant scale
    """
    from .. import progress as _progress

    desc = write_dataset(out_dir, n, dim=dim, seed=seed, test_fraction=test_fraction, fmt=fmt,
                         params=_parse_params(param_items), overwrite=overwrite, progress=_progress.progress_enabled(),
                         variant=variant)
    for split, s in desc["splits"].items():
        click.echo(f"{split}: {s['n']} faces, {s['identities']} identities -> {Path(out_dir) / split}")
    click.echo(f"wrote {Path(out_dir) / 'dataset.json'} ({desc['seconds']:.1f}s)")
