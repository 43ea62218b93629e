"""`facecluster verify RUN.zarr`: every stored chunk against its CRC-32C, every stage against its inputs."""

from __future__ import annotations

import click


@click.command("verify")
@click.argument("run", type=click.Path(file_okay=False))
def command(run):
    """Read every chunk of every array a stage recorded and check it against its checksum.

    Prints one line per problem - the array, the chunk and the command that
    re-computes it - and exits 2 if there is any; stale stages (computed from an
    input that was re-ingested or re-run since) are reported too. Reads only: it
    takes no lock and can run while a writer works.

    \b
    Example:
      facecluster verify run.zarr
    """
    from ..store import RunStore, StoreError

    store = RunStore.open(run, mode="r")
    problems, counts = store.verify()
    for line in problems:
        click.echo(line, err=True)
    note = (f"; {counts['unprotected']} arrays written before checksums (re-run their stages to protect them)"
            if counts["unprotected"] else "")
    if problems:
        raise StoreError(f"{store.url}: {len(problems)} problem(s) found in {counts['arrays']} arrays "
                         f"({counts['chunks']} chunks){note}")
    click.echo(f"{store.url}: ok - {counts['stages']} stages, {counts['arrays']} arrays, {counts['chunks']} chunks "
               f"checked{note}")
