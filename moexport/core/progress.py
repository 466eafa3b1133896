"""Progress display for long steps (export of a big model, engine build, benchmarks, training)."""
from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def progress(description: str, total: int | None = None, *, enabled: bool | None = None):
    """Yield an `advance(n=1, description=None)` callable that drives a rich progress bar on stderr.

    A spinner and the elapsed time move while a long step runs (a trace, a build), so the bar shows
    work going on; `advance(0, description=...)` names the step before it starts.

    Args:
        description: What is being done, e.g. "tracing TransformerLM".
        total: Number of steps, or None for an indeterminate bar.
        enabled: Show the bar. Defaults to True when stderr is a terminal or MOEXPORT_PROGRESS=1.
    """
    if enabled is None:
        enabled = sys.stderr.isatty() or os.environ.get("MOEXPORT_PROGRESS") == "1"
    if not enabled:
        yield lambda n=1, description=None: None
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    # stderr: results go to stdout, and the exporter silences stdout (torch.onnx prints) while tracing.
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        yield advance
