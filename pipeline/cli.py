"""The ``facecluster`` command line.

Commands live in :mod:`facecluster.pipeline.commands` (one module each) and are imported only
when invoked, so ``facecluster --help`` does not pay for torch/faiss imports.

Exit codes: 0 success, 2 bad input (file, option, run store), 1 any other failure.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading

import click

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, BadInput

# command name -> (module in pipeline.commands, one-line help shown by `facecluster --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "Run the whole pipeline on the built-in dataset and print a comparison table."),
    "synth": ("synth", "Write the built-in face-like dataset (train and test splits) to a folder."),
    "ingest": ("ingest", "Validate, L2-normalise and store features (and labels) in a run store."),
    "knn": ("knn", "Chunk-wise cosine kNN on Dask workers (exact or IVF), and the affinity graph."),
    "proposals": ("proposals", "Super-vertices and multi-scale cluster proposals."),
    "train": ("train", "Learn GCN-D (IoU, IoP) and GCN-S from a labelled run."),
    "cluster": ("cluster", "knn -> proposals -> GCN-D -> GCN-S -> dedup: one cluster id per face."),
    "add": ("add", "Add new faces to a clustered run; re-clusters only what they touch."),
    "evaluate": ("evaluate", "Pairwise / BCubed F-score and NMI of a clustering against ground truth."),
    "export": ("export", "Write cluster ids as .meta, .npy, Parquet or CSV."),
    "report": ("report", "HTML report with plots of a run."),
    "verify": ("verify", "Check every chunk of a run against its checksums, and every stage's freshness."),
    "bench": ("bench", "Benchmarks: throughput and ratios, printed and saved as JSON."),
    "config": ("config", "Show the effective configuration (defaults, TOML file, flags)."),
}

EPILOG = """\b
Exit codes: 0 ok, 2 bad input (the message names the file and the fix), 1 other failure.
Quick start:  facecluster demo
Docs: README.md"""


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if _module_exists(COMMANDS[name][0])]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _module_exists(COMMANDS[name][0]):
            return None
        mod = importlib.import_module(f"facecluster.pipeline.commands.{COMMANDS[name][0]}")
        return mod.command

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(mod: str) -> bool:
    return os.path.exists(os.path.join(os.path.dirname(__file__), "commands", f"{mod}.py"))


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facecluster")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, verbose, debug):
    """facecluster: cluster face embeddings into identities by learning to cluster (GCN-D/GCN-S on Dask)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # Dask's own INFO chatter (scheduler/nanny start and stop) drowns our one-line output;
    # it is shown from -vv on. Named one by one: importing distributed later sets the parent
    # "distributed" logger back to INFO (its config's default), so a child without its own level
    # inherits INFO - "distributed.batched" logged a CommClosedError traceback at every shutdown
    # where the scheduler closed a worker's stream mid-send (bench quality / bench cluster).
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core",
                 "distributed.http.proxy", "distributed.worker", "distributed.batched", "distributed.comm"):
        logging.getLogger(name).setLevel(logging.ERROR if verbose < 2 else logging.INFO)


def _stop_zarr_loop(timeout: float = 10.0) -> None:
    """Stop zarr's background event loop before interpreter exit.

    zarr's own atexit hook joins its I/O thread for only 0.2 s and then closes the
    loop; on a loaded machine the thread is still running and the exit prints
    "RuntimeError: Cannot close a running event loop" after our one-line message.
    Stopping it here with a longer join leaves zarr's hook nothing to do.
    """
    try:
        from zarr.core import sync
    except ImportError:
        return
    loop, thread = sync.loop[0], sync.iothread[0]
    if loop is None:
        return
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(timeout=timeout)
    if thread is None or not thread.is_alive():
        loop.close()
        sync.loop[0] = None
        sync.iothread[0] = None


@contextlib.contextmanager
def interrupts_delivered():
    """Within this block a Ctrl-C always reaches the main thread as a KeyboardInterrupt.

    Python drops an exception raised where it cannot propagate (a gc callback, a finaliser, a weakref
    callback) and hands it to ``sys.unraisablehook``, so a SIGINT whose handler runs there is lost and the
    command goes on. Seen in CI: the signal landed while the main thread ran distributed's GC diagnosis
    callback (the LocalCluster's scheduler installs it in this process), and ``facecluster cluster`` did not
    exit. The hook sends SIGINT to the main thread again, from another thread, so that it is raised after the
    callback has returned (and wakes a main thread blocked in a wait; 10 ms later, because sent at once it
    arrived while the hook itself still waited for its thread to start, and was dropped again); other
    unraisable errors go to the previous hook."""
    previous = sys.unraisablehook
    main_thread = threading.main_thread().ident

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            resend = threading.Timer(0.01, signal.pthread_kill, args=(main_thread, signal.SIGINT))
            resend.daemon = True
            resend.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def main(argv=None):
    """Console-script entry point (see :func:`_main`); stops zarr's I/O loop cleanly on the way out."""
    try:
        with interrupts_delivered():
            _main(argv)
    finally:
        _stop_zarr_loop()


def _main(argv=None):
    """Console-script entry point: maps exceptions to one-line messages and exit codes."""
    from .config import ConfigError
    from .store import StoreError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        # click turns Ctrl-C into Abort (standalone_mode=False); the command asks no questions,
        # so this is an interrupt: the same one line and exit 130 as a KeyboardInterrupt
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_BAD_INPUT if isinstance(e, click.UsageError) else e.exit_code)
    except (BadInput, ConfigError, StoreError) as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # one line, not a wall of Dask traceback; --debug shows it
        if debug:
            raise
        click.echo(f"error: {type(e).__name__}: {e} (re-run with --debug for the traceback)", err=True)
        sys.exit(EXIT_FAILURE)
    sys.exit(0)
