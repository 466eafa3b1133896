"""Triton kernels for σ-MoE: routing, CVMM grouped GEMMs, the gather path, and their AOT compilation.

Importing this package does not import triton: the functions below load their modules when first
used, and the `SigmaMoE` fast path is registered with `moexport.core.accel` for CUDA inputs when
triton is installed. `python -c "import moexport"` stays fast and works without triton or CUDA.
"""
from __future__ import annotations

import importlib
import importlib.util

from moexport.core import accel

_LAZY = {
    "sigma_moe_forward": "moexport.kernels.ops",
    "topk_dispatch": "moexport.kernels.ops",
    "cvmm": "moexport.kernels.ops",
    "compile_plan": "moexport.kernels.aot",
    "AOTRunner": "moexport.kernels.launcher",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moexport.kernels' has no attribute {name!r}")


def _fast_sigma_moe(layer, x):
    from moexport.kernels.ops import sigma_moe

    return sigma_moe(layer, x)


_TRITON = importlib.util.find_spec("triton") is not None
accel.register("sigma_moe", _fast_sigma_moe, applies=lambda x: _TRITON and x.is_cuda)
