"""The PyTorch host of launch plans: allocates the plan's buffers and launches its steps through
Triton's JIT on the current stream (CPU tensors run under TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib
import re

import torch

from moexport.core.dtypes import torch_dtype
from moexport.core.errors import InternalError, MoexportError
from moexport.kernels.plan import Plan, evaluate

_SYMBOL = re.compile(r"^[A-Za-z_]\w*$")
_KERNELS: dict[str, object] = {}


def kernel(name: str):
    """The @triton.jit function of a step's kernel name ('cvmm.cvmm_kernel')."""
    if name not in _KERNELS:
        module, function = name.split(".")
        _KERNELS[name] = getattr(importlib.import_module(f"moexport.kernels.{module}"), function)
    return _KERNELS[name]


def bind_symbols(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Runtime symbols of a plan: read off the input shapes, then the derived ones."""
    symbols: dict[str, int] = {}
    for buf in plan.inputs:
        if buf.name not in shapes:
            continue
        shape = tuple(shapes[buf.name])
        if len(shape) != len(buf.shape):
            raise MoexportError(f"tensor {buf.name!r} of shape {shape}", f"must have {len(buf.shape)} dimensions",
                                f"expected {buf.shape}")
        for size, expr in zip(shape, buf.shape):
            if _SYMBOL.match(expr) and expr not in symbols:
                symbols[expr] = int(size)
    for name, expr in plan.derived:
        symbols[name] = evaluate(expr, symbols)
    for buf in plan.inputs:
        if buf.name in shapes:
            want = tuple(evaluate(e, symbols) for e in buf.shape)
            if tuple(shapes[buf.name]) != want:
                raise MoexportError(f"tensor {buf.name!r} of shape {tuple(shapes[buf.name])}",
                                    f"does not fit the plan {plan.name!r}", f"expected {want}")
    return symbols


def _dtype(name: str) -> torch.dtype:
    return torch.int32 if name == "int32" else torch_dtype(name)


def run_plan(plan: Plan, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Run `plan` on `tensors` (its inputs by name; optional ones may be None) and return its outputs.

    Raises:
        MoexportError: an input is missing or has the wrong shape or dtype.
    """
    shapes = tuple((n, tuple(t.shape)) for n, t in tensors.items() if t is not None)
    key = (id(plan), shapes)
    if key not in _PREPARED:
        _PREPARED[key] = _prepare(plan, dict(shapes))
    allocations, launches = _PREPARED[key]
    device = next(t.device for t in tensors.values() if t is not None)
    buffers: dict[str, torch.Tensor | None] = {}
    for buf in plan.inputs:
        t = tensors.get(buf.name)
        if t is not None and t.dtype != _dtype(buf.dtype):
            if buf.dtype != "int32" or t.is_floating_point():
                raise MoexportError(f"tensor {buf.name!r}", f"has dtype {t.dtype}, the plan needs {buf.dtype}")
            t = t.to(torch.int32)
        buffers[buf.name] = t if t is None or buf.strided else t.contiguous()
    for name, shape, dtype, zero in allocations:
        buffers[name] = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    for fn, grid, args, options in launches:
        fn[grid](**{n: (buffers[v] if kind else v) for n, kind, v in args}, **options)
    return {buf.name: buffers[buf.name] for buf in plan.outputs}


# (plan, input shapes) -> allocations and launches with every expression evaluated
_PREPARED: dict[tuple, tuple[list, list]] = {}


def _prepare(plan: Plan, shapes: dict[str, tuple[int, ...]]) -> tuple[list, list]:
    symbols = bind_symbols(plan, shapes)
    if plan.max_tokens is not None and plan.notes.get("decode") and symbols.get("N", 0) > plan.max_tokens:
        raise InternalError(f"decode plan for {plan.max_tokens} tokens given {symbols['N']}")
    allocations = [(buf.name, tuple(evaluate(e, symbols) for e in buf.shape), _dtype(buf.dtype), buf.zero)
                   for buf in (*plan.outputs, *plan.workspace)]
    names = {b.name for b in (*plan.inputs, *plan.outputs, *plan.workspace)}
    launches = []
    if symbols.get("N", 1) > 0 and symbols.get("S", 1) > 0:
        for step in plan.steps:
            args = [(name, value in names, value if value is None or value in names else evaluate(value, symbols))
                    for name, value in step.args.items()]
            options = dict(step.constexprs, num_warps=step.num_warps, num_stages=step.num_stages)
            launches.append((kernel(step.kernel), tuple(evaluate(g, symbols) for g in step.grid), args, options))
    return allocations, launches
