"""The PyTorch host of launch plans: allocates the plan's buffers and launches its steps on the
current stream (CPU tensors run under TRITON_INTERPRET=1).

The first call for a plan and input shapes launches through Triton's JIT (`fn[grid](...)`), which
compiles and returns each step's compiled kernel. Later calls on CUDA launch those compiled kernels
directly with their arguments laid out once (pointers as integers, the workspace one allocation):
the same kernels and arguments, without Triton's per-call binding and specialisation (tens of
microseconds per launch with Triton 3.6). Triton's launch hooks (profilers), MOEXPORT_JIT_LAUNCH=1
or an input pointer not aligned like the first call's send a call back through the JIT.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import warnings
from collections.abc import Sequence

import torch

from moexport.core.dtypes import torch_dtype
from moexport.core.errors import MoexportError
from moexport.kernels.plan import Plan, evaluate

_SYMBOL = re.compile(r"^[A-Za-z_]\w*$")
_KERNELS: dict[str, object] = {}
_ALIGN = 256  # byte alignment of each workspace buffer inside the one allocation
_MAX_PREPARED = 512


def kernel(name: str):
    """The @triton.jit function of a step's kernel name ('grouped.cvmm_kernel')."""
    if name not in _KERNELS:
        module, function = name.split(".")
        _KERNELS[name] = getattr(importlib.import_module(f"moexport.kernels.{module}"), function)
    return _KERNELS[name]


def bind_symbols(inputs: Sequence[tuple[str, Sequence[str]]], derived: Sequence[Sequence[str]],
                 shapes: dict[str, tuple[int, ...]], plan_name: str) -> dict[str, int]:
    """Runtime symbols of a plan (or of its AOT manifest): read off the input shapes, (name, shape
    expressions) per input, then the derived ones; every given input's shape is checked against them."""
    symbols: dict[str, int] = {}
    for name, exprs in inputs:
        if name not in shapes:
            continue
        shape = tuple(shapes[name])
        if len(shape) != len(exprs):
            raise MoexportError(f"tensor {name!r} of shape {shape}", f"must have {len(exprs)} dimensions",
                                f"expected {tuple(exprs)}")
        for size, expr in zip(shape, exprs):
            if _SYMBOL.match(expr) and expr not in symbols:
                symbols[expr] = int(size)
    for name, expr in derived:
        symbols[name] = evaluate(expr, symbols)
    for name, exprs in inputs:
        if name in shapes:
            want = tuple(evaluate(e, symbols) for e in exprs)
            if tuple(shapes[name]) != want:
                raise MoexportError(f"tensor {name!r} of shape {tuple(shapes[name])}",
                                    f"does not fit the plan {plan_name!r}", f"expected {want}")
    return symbols


def pack_workspace(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Byte offsets of buffers of these sizes in one allocation (each aligned to _ALIGN), and its size."""
    offsets, total = [], 0
    for nbytes in sizes:
        offsets.append(total)
        total += -(-nbytes // _ALIGN) * _ALIGN
    return offsets, total


def buffer_dtype(name: str) -> torch.dtype:
    """The torch dtype of a plan buffer's dtype name ('float32', 'int32', 'int64', 'float16', 'bfloat16')."""
    return {"int32": torch.int32, "int64": torch.int64}.get(name) or torch_dtype(name)


class _Prepared:
    """One plan at one set of input shapes: every expression evaluated, the workspace laid out,
    and (after the first CUDA call) each step's compiled launcher with its argument template."""

    def __init__(self, plan: Plan, shapes: dict[str, tuple[int, ...]]):
        self.plan = plan  # held, so that id(plan) in the cache key is not reused by another plan
        symbols = bind_symbols([(b.name, b.shape) for b in plan.inputs], plan.derived, shapes, plan.name)
        shape_of = lambda buf: tuple(evaluate(e, symbols) for e in buf.shape)  # noqa: E731
        self.outputs = [(b.name, shape_of(b), buffer_dtype(b.dtype), b.zero) for b in plan.outputs]
        shapes_dtypes = [(shape_of(b), buffer_dtype(b.dtype)) for b in plan.workspace]
        offsets, self.workspace_bytes = pack_workspace([math.prod(s) * d.itemsize for s, d in shapes_dtypes])
        self.workspace = [(b.name, offset, shape, dtype, b.zero)
                          for b, offset, (shape, dtype) in zip(plan.workspace, offsets, shapes_dtypes)]
        names = {b.name for b in (*plan.inputs, *plan.outputs, *plan.workspace)}
        self.steps = []
        if symbols.get("N", 1) > 0 and symbols.get("S", 1) > 0:
            for step in plan.steps:
                args = {name: (value in names, value if value is None or value in names
                                      else evaluate(value, symbols)) for name, value in step.args.items()}
                options = dict(step.constexprs, num_warps=step.num_warps, num_stages=step.num_stages)
                if "PDL" in options:  # the instructions exist from sm_90 on
                    options["PDL"] = _pdl_supported()
                if step.launch_pdl and _pdl_supported():
                    options["launch_pdl"] = True
                grid = tuple(evaluate(g, symbols) for g in step.grid)
                self.steps.append((kernel(step.kernel), grid, args, options))
        self.inputs = [(b.name, buffer_dtype(b.dtype), b.strided) for b in plan.inputs]
        self.fast: list | None = None  # compiled launchers, once a CUDA call has compiled every step
        self.aligned: dict[str, bool] = {}  # input name -> was 16-byte aligned when compiled

    def record(self, compiled: list, pointers: dict[str, int]) -> None:
        """Lay out each step's arguments for its compiled launcher (Triton's order: every parameter,
        constexprs included; buffers as integer device pointers, filled in per call)."""
        fast = []
        in_workspace = {name: offset for name, offset, *_ in self.workspace}
        for (fn, grid, args, options), kernel_ in zip(self.steps, compiled):
            # slots: (argument index, tensor name) of inputs and outputs; (index, offset) of workspace views
            template, slots, workspace_slots = [], [], []
            for i, name in enumerate(fn.arg_names):
                if name in args:
                    is_buffer, value = args[name]
                    if is_buffer and value in in_workspace:
                        workspace_slots.append((i, in_workspace[value]))
                    elif is_buffer:
                        slots.append((i, value))
                    template.append(None if is_buffer else value)
                else:
                    template.append(options[name])
            grid3 = (*grid, 1, 1)[:3]
            fast.append((kernel_.run, grid3, kernel_.function, kernel_.packed_metadata, template, slots,
                         workspace_slots))
        self.fast = fast
        self.aligned = {name: ptr % 16 == 0 for name, ptr in pointers.items()}


def _pdl_supported() -> bool:
    """Whether this Triton launches with programmatic dependent launch (a compile option since 3.4;
    the interpreter ignores it) and the GPU has it (sm_90+): otherwise steps launch normally."""
    global _PDL
    if _PDL is None:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions
            _PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__ and (
                os.environ.get("TRITON_INTERPRET") == "1" or
                (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9))
        except ImportError:
            _PDL = False
    return _PDL


_PDL: bool | None = None
_PREPARED: dict[tuple, _Prepared] = {}
_DIRECT_BROKEN = False  # set when a launcher rejected a direct launch
_KNOBS = None  # triton.knobs once imported, False without it


def _direct_launch() -> bool:
    """Whether calls may launch the compiled kernels directly: not when MOEXPORT_JIT_LAUNCH=1 (every
    call through Triton's JIT, for comparison) nor while Triton launch hooks are set (profilers);
    recent Triton (3.6, 3.9) keeps the hooks in chains that are never None but may be empty."""
    global _KNOBS
    if _DIRECT_BROKEN or os.environ.get("MOEXPORT_JIT_LAUNCH") == "1":
        return False
    if _KNOBS is None:  # imported once: an import per call is a few microseconds of host time
        try:
            from triton import knobs as _KNOBS
        except ImportError:  # triton before 3.4: no knobs
            _KNOBS = False
    if _KNOBS is False:
        return False
    hooks = (_KNOBS.runtime.launch_enter_hook, _KNOBS.runtime.launch_exit_hook)
    return not any(h is not None and getattr(h, "calls", True) for h in hooks)


def run_plan(plan: Plan, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Run `plan` on `tensors` (its inputs by name; optional ones may be None) and return its outputs.

    The callers (`ops`) pass every input the plan's steps read: a missing one is not checked here.

    Raises:
        MoexportError: an input has the wrong shape or dtype.
    """
    device = next(t.device for t in tensors.values() if t is not None)
    shapes = tuple((n, tuple(t.shape)) for n, t in tensors.items() if t is not None)
    key = (id(plan), shapes, device)
    prepared = _PREPARED.get(key)
    if prepared is None:
        if len(_PREPARED) >= _MAX_PREPARED:
            _PREPARED.clear()
        prepared = _PREPARED[key] = _Prepared(plan, dict(shapes))
    buffers: dict[str, torch.Tensor | None] = {}
    for name, dtype, strided in prepared.inputs:
        t = tensors.get(name)
        if t is not None and t.dtype != dtype:
            if dtype != torch.int32 or t.is_floating_point():
                raise MoexportError(f"tensor {name!r}", f"has dtype {t.dtype}, the plan needs {dtype}")
            t = t.to(torch.int32)
        buffers[name] = t if t is None or strided else t.contiguous()
    for name, shape, dtype, zero in prepared.outputs:
        buffers[name] = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    workspace = torch.empty(max(prepared.workspace_bytes, 1), dtype=torch.uint8, device=device)
    if prepared.fast is not None and _direct_launch() and _launch_direct(prepared, buffers, workspace, device):
        return {name: buffers[name] for name, *_ in prepared.outputs}
    compiled = launch_jit(prepared, buffers, workspace)
    if device.type == "cuda" and prepared.fast is None and _direct_launch():
        inputs = {n: buffers[n].data_ptr() for n, *_ in prepared.inputs if buffers[n] is not None}
        prepared.record(compiled, inputs)
    return {name: buffers[name] for name, *_ in prepared.outputs}


def launch_jit(prepared: _Prepared, buffers: dict, workspace: torch.Tensor) -> list:
    """Launch the plan's steps through Triton's JIT on `buffers` (inputs and outputs by name), with the
    workspace buffers laid out in `workspace` (added to `buffers`); returns the compiled kernels."""
    for name, offset, shape, dtype, zero in prepared.workspace:
        buffers[name] = _view(workspace, offset, shape, dtype)
        if zero:
            buffers[name].zero_()
    return [fn[grid](**{n: (buffers[v] if is_buffer else v) for n, (is_buffer, v) in args.items()}, **options)
            for fn, grid, args, options in prepared.steps]


def _launch_direct(prepared: _Prepared, buffers: dict, workspace: torch.Tensor, device: torch.device) -> bool:
    """Launch the recorded compiled kernels; False (nothing launched) when an input is not aligned as
    when they were compiled. A launcher that rejects the call (a Triton whose launcher signature
    differs) turns direct launches off for the process, with a warning, and the call goes through
    the JIT after zero-filled outputs are cleared again."""
    global _DIRECT_BROKEN
    pointers = {n: t.data_ptr() for n, t in buffers.items() if t is not None}
    if not all((pointers[n] % 16 == 0) == ok for n, ok in prepared.aligned.items() if n in pointers):
        return False
    base = workspace.data_ptr()
    for name, offset, shape, dtype, zero in prepared.workspace:
        if zero:
            _view(workspace, offset, shape, dtype).zero_()
    stream = torch._C._cuda_getCurrentRawStream(device.index)
    try:
        for run, (g0, g1, g2), function, metadata, template, slots, workspace_slots in prepared.fast:
            values = list(template)
            for i, name in slots:
                values[i] = pointers[name]
            for i, offset in workspace_slots:
                values[i] = base + offset
            run(g0, g1, g2, stream, function, metadata, None, None, None, *values)
    except Exception as error:  # noqa: BLE001 - any launcher failure: fall back to the JIT, loudly
        warnings.warn(f"moexport kernels: direct launches turned off ({type(error).__name__}: {error})")
        _DIRECT_BROKEN = True
        for name, _, _, zero in prepared.outputs:
            if zero:
                buffers[name].zero_()
        return False
    return True


def _view(workspace: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return workspace[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
