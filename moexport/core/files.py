"""Writing output files whole or not at all, and checking where they go before any work is done."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from moexport.core.errors import MoexportError


def write_atomically(target: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary name beside `target`, then rename it to `target`.

    The rename is atomic within one folder, so `target` is either the old file or the whole new one,
    never a half-written file; the temporary file is removed when `write` fails. The file gets the
    permissions of any new file (0666 less the umask), whatever mode the writer created it with.

    Example::

        write_atomically(folder / "report.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create their files 0600
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    # The umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before any expensive work, that a file can be written at `path`; return it as a Path.

    Raises:
        MoexportError: `path` is a folder, its folder does not exist or is a file, or nothing can be
            written there (permissions, a read-only file system).
    """
    path = Path(path)
    if path.is_dir():
        raise MoexportError(path, "is a folder", f"give a file name, e.g. {path / 'model.onnx'}")
    parent = path.parent
    if not parent.exists():
        raise MoexportError(path, "is in a folder that does not exist", f"create {parent} first")
    if not parent.is_dir():
        raise MoexportError(path, f"is under {parent}, which is a file, not a folder")
    _probe(parent, path)
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """Check, before any expensive work, that files can be written into the folder `path` (created
    later where it does not exist yet); return it as a Path.

    Raises:
        MoexportError: `path` is a file, lies under a file, or nothing can be written there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MoexportError(path, "is a file, not a folder", "give the name of a folder to write into")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MoexportError(path, f"cannot be created: {existing} is a file, not a folder")
    _probe(existing, path)
    return path


def _probe(folder: Path, target: Path) -> None:
    """Create and remove a nameless file in `folder`: the one test that also holds for root, to whom
    os.access says yes on a read-only file system or under /proc."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise MoexportError(target, f"cannot be written: nothing can be created in {folder} "
                            f"({error.strerror or error})", "choose a location you can write to") from None
