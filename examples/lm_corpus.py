"""The byte-level English corpus of `train_lm.py`: the Python 3.11 documentation sources from Debian.

Source: Debian bookworm's package ``python3.11-doc`` (section doc, main archive). It ships the
reStructuredText sources of the whole Python documentation (tutorial, language reference, library
reference, HOWTOs, "What's New") under ``/usr/share/doc/python3.11/html/_sources/``: 497 files,
11.0 MB of English prose with code examples, almost pure ASCII. Licence: the Python Software
Foundation License (PSF-2.0), which covers Python's documentation; the package's
``/usr/share/doc/python3.11-doc/copyright`` has the full text.

Building it is reproducible and needs only apt:

    apt-get update && apt-get download python3.11-doc     # the .deb, any user
    dpkg-deb -x python3.11-doc_*.deb unpacked/            # no installation

`prepare()` does exactly this (or takes a .deb you already have), then concatenates the sources in
sorted path order. Whole files are held out, chosen by a hash of their path (crc32 % 20 == 0: 17 files,
0.54 MB, about 5%), so the held-out text is unseen documents rather than the tail of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import zlib
from pathlib import Path

import torch

from moexport.core.errors import MoexportError
from moexport.core.files import write_atomically

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
LICENCE = "PSF-2.0 (Python Software Foundation License), see /usr/share/doc/python3.11-doc/copyright"
HELDOUT_EVERY = 20
SAMPLE_FILE = "library/shelve.rst.txt"  # held out; the start of it is the package's text sample
SAMPLE_BYTES = 4096
SPLITS = ("train", "heldout")


def _run(command: list[str], cwd: Path) -> str:
    try:
        return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise MoexportError(command[0], "is not installed", "the corpus is built with Debian's apt and dpkg") from None
    except subprocess.CalledProcessError as error:
        raise MoexportError(" ".join(command), f"failed: {error.stderr.strip()[-400:]}",
                            f"run `apt-get update` first, or download {PACKAGE} elsewhere and pass --deb") from None


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def is_heldout(relative_path: str) -> bool:
    """Whether a source file (path relative to the _sources folder) belongs to the held-out split."""
    return zlib.crc32(relative_path.encode()) % HELDOUT_EVERY == 0


def prepare(data_dir: str | os.PathLike, *, deb: str | os.PathLike | None = None) -> Path:
    """Build ``<data_dir>/{train,heldout}.txt``, ``sample.txt`` and ``manifest.json`` once.

    Args:
        data_dir: Folder for the corpus (created). Nothing is done if its manifest already exists.
        deb: A downloaded ``python3.11-doc`` .deb. Defaults to downloading one with ``apt-get download``.

    Returns:
        The folder.
    """
    out = Path(data_dir)
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        scratch = Path(scratch)
        if deb is None:
            _run(["apt-get", "download", PACKAGE], cwd=scratch)
            deb = next(scratch.glob(f"{PACKAGE}_*.deb"))
        deb = Path(deb).resolve()
        if not deb.is_file():
            raise MoexportError(f"--deb {deb}", "no such file", f"download it with `apt-get download {PACKAGE}`")
        _run(["dpkg-deb", "-x", str(deb), str(scratch / "unpacked")], cwd=scratch)
        root = scratch / "unpacked" / SOURCES
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*.rst.txt"))
        if not files:
            raise MoexportError(str(deb), f"has no reStructuredText sources under /{SOURCES}",
                                f"expected Debian bookworm's {PACKAGE}")
        texts = {name: (root / name).read_bytes() for name in files}
        splits = {split: [name for name in files if is_heldout(name) == (split == "heldout")] for split in SPLITS}
        for split, names in splits.items():
            _write_atomic(out / f"{split}.txt", b"".join(texts[name] for name in names))
        sample = texts[SAMPLE_FILE][:SAMPLE_BYTES]
        _write_atomic(out / "sample.txt", sample[:sample.rindex(b"\n") + 1])
        manifest = {
            "package": PACKAGE,
            "version": _run(["dpkg-deb", "-f", str(deb), "Version"], cwd=scratch).strip(),
            "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            "licence": LICENCE,
            "sources": f"/{SOURCES}/**/*.rst.txt",
            "heldout_rule": f"crc32(relative path) % {HELDOUT_EVERY} == 0",
            "sample": f"first bytes of {SAMPLE_FILE} (held out), cut at a line end",
            **{f"{split}_files": names for split, names in splits.items()},
            **{f"{split}_bytes": (out / f"{split}.txt").stat().st_size for split in SPLITS},
        }
        _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return out


def load(data_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The splits of a prepared corpus as uint8 tensors: {"train": ..., "heldout": ...}."""
    data = {}
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.txt"
        if not path.is_file():
            raise MoexportError(str(path), "is missing",
                                "build the corpus first: python examples/train_lm.py --prepare-only")
        data[split] = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return data
