"""Progress for stages: one bar per stage on a terminal, quiet otherwise.

Stages submit futures and wait through :func:`wait_futures`, which shows a rich
progress bar (tasks done / total) when stderr is a terminal or when
``FACECLUSTER_PROGRESS=1``, and logs a line per stage otherwise (CI, pipes).
It also checks for errors as they happen: the first failed task raises at once
instead of after every other task has run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Sequence

log = logging.getLogger(__name__)


def progress_enabled() -> bool:
    env = os.environ.get("FACECLUSTER_PROGRESS")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def wait_futures(futures: Sequence, label: str, gather: bool = True, release: bool = False):
    """Wait for ``futures`` (distributed futures), showing progress; return their results in order.

    With ``gather=False`` the futures are only waited on (results stay on the workers). With ``release=True``
    (needs ``gather=False`` and a list) the list is emptied and each future dropped once it is done, so a
    result that other tasks have consumed is freed then, not when the last of ``futures`` ends.
    """
    from distributed import as_completed

    if release and (gather or not isinstance(futures, list)):
        raise ValueError("wait_futures(release=True) takes a list and gather=False")
    total = len(futures)
    pending = as_completed(futures) if total else []
    if release:
        futures.clear()  # from here on only ``pending`` holds them, and it lets each go once it is yielded
    else:
        futures = list(futures)
    t0 = time.perf_counter()
    if total:
        if progress_enabled():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            with Progress(TextColumn(f"[bold]{label:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TimeRemainingColumn(), transient=False) as bar:
                task = bar.add_task(label, total=total)
                for fut in pending:
                    if fut.status == "error":
                        fut.result()  # raises the task's exception
                    bar.advance(task)
        else:
            for fut in pending:
                if fut.status == "error":
                    fut.result()
    log.info("%s: %d tasks in %.2fs", label, total, time.perf_counter() - t0)
    if not gather:
        return None
    client = futures[0].client if futures else None
    return client.gather(futures) if client else []
