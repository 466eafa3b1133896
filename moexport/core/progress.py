"""Progress display for long steps (export of a big model, engine build, benchmarks, training)."""
from __future__ import annotations

import contextlib
import os
import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def progress(description: str, total: int | None = None, *, enabled: bool | None = None):
    """Yield an `advance(n=1, description=None)` callable that drives a rich progress bar.

    Args:
        description: What is being done, e.g. "exporting layers".
        total: Number of steps, or None for an indeterminate bar.
        enabled: Show the bar. Defaults to True when stderr is a terminal or MOEXPORT_PROGRESS=1.
    """
    if enabled is None:
        enabled = sys.stderr.isatty() or os.environ.get("MOEXPORT_PROGRESS") == "1"
    if not enabled:
        yield lambda n=1, description=None: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        yield advance
