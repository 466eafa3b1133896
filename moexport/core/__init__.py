"""Shared by every room: error types, dtype names and tolerances, progress, the accelerator registry,
file helpers (atomic writes, ONNX files).

Every room may import from here; nothing here imports from a room. The names below load their module
when first used: `moexport.core.dtypes` imports torch, which the command line's help need not wait for.
"""
from __future__ import annotations

import importlib

from moexport.core.errors import InternalError, MoexportError

_LAZY = {
    "DTYPES": "dtypes", "Tolerance": "dtypes", "TOLERANCES": "dtypes", "tolerance_for": "dtypes",
    "torch_dtype": "dtypes", "dtype_name": "dtypes", "progress": "progress", "write_atomically": "files",
}

__all__ = ["DTYPES", "TOLERANCES", "InternalError", "MoexportError", "Tolerance", "accel", "dtype_name", "progress",
           "tolerance_for", "torch_dtype", "write_atomically"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"moexport.core.{_LAZY[name]}"), name)
    if name == "accel":
        return importlib.import_module("moexport.core.accel")
    raise AttributeError(f"module 'moexport.core' has no attribute {name!r}")
