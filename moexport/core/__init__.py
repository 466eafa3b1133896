"""Shared by every room: error types, dtype names and tolerances, progress, the accelerator registry,
atomic file writes.

Every room may import from here; nothing here imports from a room.
"""
from moexport.core.errors import InternalError, MoexportError
from moexport.core.dtypes import DTYPES, Tolerance, TOLERANCES, tolerance_for, torch_dtype, dtype_name
from moexport.core import accel
from moexport.core.files import write_atomically
from moexport.core.progress import progress

__all__ = [
    "MoexportError",
    "InternalError",
    "DTYPES",
    "Tolerance",
    "TOLERANCES",
    "tolerance_for",
    "torch_dtype",
    "dtype_name",
    "accel",
    "progress",
    "write_atomically",
]
