"""Writing output files whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def write_atomically(target: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary name beside `target`, then rename it to `target`.

    The rename is atomic within one folder, so `target` is either the old file or the whole new one,
    never a half-written file; the temporary file is removed when `write` fails.

    Example::

        write_atomically(folder / "report.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
