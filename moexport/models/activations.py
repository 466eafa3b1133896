"""Hidden activations supported by every implementation (PyTorch, Triton, ONNX, TensorRT)."""
from __future__ import annotations

import torch.nn.functional as F

from moexport.core.errors import MoexportError

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # the exact, erf-based GELU (ONNX Gelu, approximate="none")
    "silu": F.silu,
}


def activation_fn(name: str):
    """The function of an activation name."""
    if name not in ACTIVATIONS:
        raise MoexportError(f"activation={name!r}", "is not supported", f"use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
