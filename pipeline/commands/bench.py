"""`facecluster bench NAME`: benchmarks (see pipeline/benchmarks/)."""

from __future__ import annotations

import importlib
import os

import click

from ..benchmarks import BENCHMARKS


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py"))


class BenchGroup(click.Group):
    def list_commands(self, ctx):
        return [n for n in BENCHMARKS if _exists(n)]

    def get_command(self, ctx, name):
        if name not in BENCHMARKS or not _exists(name):
            return None
        return importlib.import_module(f"facecluster.pipeline.benchmarks.{name}").command

    def format_commands(self, ctx, formatter):
        rows = [(n, BENCHMARKS[n]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Benchmarks"):
                formatter.write_dl(rows)


@click.group("bench", cls=BenchGroup)
def command():
    """Benchmarks: throughput and ratios measured in one run, printed and saved as JSON.

    \b
    Examples:
      facecluster bench knn
      facecluster bench proposals --n 1000000
      facecluster bench cluster --n 100000
      facecluster bench scaling --n 50000
    """
