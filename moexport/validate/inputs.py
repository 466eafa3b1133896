"""Inputs for parity checks: seeded random data, identical for every runner, and a real text sample.

Random token ids exercise every vocabulary entry; the shipped text sample exercises what trained
models actually see (real text routes far less uniformly than random ids, and that is where near-ties
in top-k hide).
"""
from __future__ import annotations

import importlib.resources
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch
from polygraphy.common import TensorMetadata
from polygraphy.comparator import DataLoader

from moexport.core.errors import MoexportError

DEFAULT_BATCH, DEFAULT_SEQ = 2, 64
BYTE_VOCAB = 256


def sample_text() -> bytes:
    """The English text sample shipped with moexport (held out from the demo model's training data)."""
    resource = importlib.resources.files("moexport") / "data" / "sample.txt"
    if not resource.is_file():
        raise MoexportError("moexport/data/sample.txt", "is missing from the installation",
                            "reinstall moexport; the package ships it as package data")
    return resource.read_bytes()


def concrete_metadata(metadata: TensorMetadata, shapes: dict[str, tuple[int, ...]]) -> TensorMetadata:
    """Replace dynamic dimensions: batch (first) -> 2, sequence (second) -> 64, unless `shapes` says otherwise."""
    unknown = set(shapes) - set(metadata)
    if unknown:
        raise MoexportError(f"--shapes {', '.join(sorted(unknown))}", "names no input of the model",
                            f"inputs are: {', '.join(metadata)}")
    out = TensorMetadata()
    for name, (dtype, shape) in metadata.items():
        if name in shapes:
            concrete = shapes[name]
            fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
            if len(concrete) != len(shape) or any(f not in (None, c) for f, c in zip(fixed, concrete)):
                raise MoexportError(f"--shapes {name}:{list(concrete)}", f"does not fit the input's shape "
                                    f"{['?' if f is None else f for f in fixed]}", "? marks a dynamic dimension")
        else:
            defaults = (DEFAULT_BATCH, DEFAULT_SEQ)
            concrete = tuple(d if isinstance(d, int) and d > 0 else (defaults[i] if i < 2 else 1)
                             for i, d in enumerate(shape))
        out.add(name, dtype, concrete)
    return out


def make_inputs(metadata: TensorMetadata, *, seed: int = 1, iterations: int = 2, vocab_size: int | None = None,
                use_text: bool = True, bfloat16: Iterable[str] = ()) -> list[OrderedDict[str, np.ndarray]]:
    """Feed dicts: `iterations` of seeded random data, then (for byte-level LMs) the text sample.

    Args:
        metadata: Concrete input metadata (see `concrete_metadata`).
        seed: Seed of the random data; the same seed gives the same inputs for every runner.
        iterations: Number of random feed dicts.
        vocab_size: Vocabulary size bounding token ids (`input_ids`).
        use_text: Add one feed dict made of the text sample when the model reads raw bytes.
        bfloat16: Float32 inputs that stand for bfloat16 ones: their values are rounded to bfloat16, so
            a reference fed the float32 array sees what the artifact sees.
    """
    val_range = {"": (-2.0, 2.0)}
    if "input_ids" in metadata and vocab_size:
        val_range["input_ids"] = (0, vocab_size - 1)
    loader = DataLoader(seed=seed, iterations=iterations, input_metadata=metadata, val_range=val_range)
    feeds = [OrderedDict((name, np.asarray(value)) for name, value in loader[i].items()) for i in range(iterations)]
    for feed in feeds:
        for name in set(bfloat16) & set(feed):
            feed[name] = torch.from_numpy(feed[name]).to(torch.bfloat16).float().numpy()
    if use_text and "input_ids" in metadata and vocab_size == BYTE_VOCAB:
        batch, seq = metadata["input_ids"].shape
        text = np.frombuffer(sample_text(), dtype=np.uint8)
        rows = [np.resize(text[i * seq:], seq) for i in range(batch)]
        feed = OrderedDict((name, value.copy()) for name, value in feeds[0].items())
        feed["input_ids"] = np.stack(rows).astype(np.int64)
        feeds.append(feed)
    return feeds
