"""The two exception types of moexport.

`MoexportError` is the user's fault (a file, tensor or option is wrong): the CLI prints its message and
exits with status 1, no traceback. `InternalError` is ours (a broken invariant): it is deliberately not
a subclass, so the CLI lets it through with its traceback and the bug gets reported.

Messages have the shape ``<culprit> | <problem>`` followed, where it helps, by ``Note: <what was
expected or how to fix it>``.
"""
from __future__ import annotations


class MoexportError(Exception):
    """A problem with the user's input: a file, tensor, option or graph."""

    def __init__(self, culprit: str, problem: str, note: str | None = None):
        self.culprit, self.problem, self.note = str(culprit), problem, note
        message = f"{culprit} | {problem}"
        if note:
            message += f"\n  Note: {note}"
        super().__init__(message)


class InternalError(Exception):
    """A bug in moexport: an invariant that should hold did not."""


def first_line(error: Exception) -> str:
    """The first non-blank line of an error's message (its type name when there is none)."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def some_names(names: list[str], limit: int = 5) -> str:
    """The first `limit` names, quoted, and how many more there are: for messages about many tensors."""
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
