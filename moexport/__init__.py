"""moexport: σ-MoE / PKM / Top-K models to ONNX, ONNX Runtime and TensorRT, with proof of parity.

The names below load their room when first used, so that ``import moexport`` and ``moexport -h``
start in a fraction of a second (torch, onnx and onnxscript are imported by the rooms that need them).
"""
from __future__ import annotations

import importlib

from moexport.core import accel
from moexport.core.errors import InternalError, MoexportError

__version__ = "0.1.0"

# On CUDA inputs the models ask `core.accel` for a faster σ-MoE; the kernels room offers one when it is
# imported, which happens at the first such call.
accel.provide("sigma_moe", "moexport.kernels")

_LAZY = {
    "load_checkpoint": "moexport.checkpoints",
    "save_checkpoint": "moexport.checkpoints",
    "from_preset": "moexport.models",
    "export_onnx": "moexport.exporter",
    "fuse": "moexport.exporter",
}
_ROOMS = ("checkpoints", "kernels", "models")

__all__ = ["InternalError", "MoexportError", "__version__", "checkpoints", "export_onnx", "from_preset", "fuse",
           "kernels", "load_checkpoint", "models", "save_checkpoint"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _ROOMS:
        return importlib.import_module(f"moexport.{name}")
    raise AttributeError(f"module 'moexport' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
