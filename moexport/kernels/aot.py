"""Ahead-of-time compilation of a launch plan to cubin + PTX, on a machine without a GPU.

`compile_plan(plan, out_dir)` compiles every step's kernel with `triton.compile` for one SM and
writes, next to the binaries, `<plan>.json`: the plan (buffers with shape expressions, derived
symbols, steps in order) and per step what a launcher needs and nothing else: the cubin and PTX
files, the entry name, the grid as expressions of the runtime symbols, block size, dynamic shared
memory, the argument layout (buffer pointers and 32-bit integers in order, then the number of
Triton's hidden scratch pointers, passed as null: no plan kernel uses scratch memory), and whether
to launch it with programmatic dependent launch (`launch_pdl`: it may start while the step before
it runs, and waits for its results itself; a normal launch is equally correct, only slower). It is the
file the ORT and TensorRT plugins (a later issue) are to read; `moexport.kernels.launcher.AOTRunner`
runs it from Python through the CUDA driver API.

The PTX ISA version is capped (`ptx_version`) so that drivers older than the compiling Triton's
ptxas still load the PTX; the cubin is what is meant to be loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from moexport.core.errors import MoexportError
from moexport.core.files import write_atomically
from moexport.kernels.host import kernel
from moexport.kernels.plan import Plan

_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}
MANIFEST_VERSION = 1
# PTX ISA version written into PTX (CUDA 12.4): drivers older than the compiling Triton's ptxas load it
PTX_VERSION = 84
# Shared memory a block may opt in to, by compute capability (CUDA's tables; sm_80 and sm_90 the
# defaults' targets): a kernel compiled for an architecture must fit it, else it cannot launch there.
SHARED_OPT_IN = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _signature(plan: Plan, step) -> tuple[dict, dict, list[dict]]:
    """Triton signature, constexprs and the launcher's argument layout of one step."""
    signature, constexprs, layout = {}, {}, []
    for name in kernel(step.kernel).arg_names:
        if name in step.constexprs:
            signature[name], constexprs[name] = "constexpr", step.constexprs[name]
        elif step.args.get(name) is None:
            signature[name], constexprs[name] = "constexpr", None
        elif _is_buffer(plan, step.args[name]):
            signature[name] = "*" + _TRITON_TYPES[plan.buffer(step.args[name]).dtype]
            layout.append({"name": name, "kind": "pointer", "buffer": step.args[name]})
        else:
            signature[name] = "i32"
            layout.append({"name": name, "kind": "i32", "value": step.args[name]})
    return signature, constexprs, layout


def _entry_params(ptx: str, entry: str) -> int:
    """Parameters of the PTX entry: the user arguments plus Triton's hidden scratch pointers (two in
    Triton 3.5+: global and profile scratch), which launchers pass as null."""
    return ptx.split(f".entry {entry}(")[1].split(")")[0].count(".param")


def _is_buffer(plan: Plan, name: str) -> bool:
    try:
        plan.buffer(name)
        return True
    except KeyError:
        return False


def _write(path: Path, data: bytes | str) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data))


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One step's kernel compiled for one GPU architecture: its binaries and what a launcher needs."""

    cubin: bytes
    ptx: str
    entry: str
    shared: int  # dynamic shared memory, bytes
    args: list  # argument layout: {"name", "kind": "pointer", "buffer"} or {"name", "kind": "i32", "value"}
    hidden_pointers: int  # Triton's scratch pointers after the arguments, passed as null
    constexprs: dict
    pdl: bool  # built with the programmatic-dependent-launch instructions (sm_90+): may launch with PDL


def argument_layout(plan: Plan, step) -> list[dict]:
    """A step's runtime arguments in order: buffer pointers and 32-bit integer expressions."""
    return [{k: v for k, v in arg.items() if k != "name"} for arg in _signature(plan, step)[2]]


def step_identity(plan: Plan, step) -> tuple:
    """What a step's compiled kernel depends on: steps of equal identity share one binary per architecture."""
    signature, constexprs, _ = _signature(plan, step)
    return (step.kernel, tuple(signature.items()), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            step.num_warps, step.num_stages, step.launch_pdl)


def compile_step(plan: Plan, step, *, sm: int, ptx_version: int) -> CompiledStep:
    """Compile one step's kernel with `triton.compile` for compute capability `sm` (no GPU needed).

    Raises:
        MoexportError: the kernel needs global scratch memory (no plan kernel should).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, layout = _signature(plan, step)
    pdl = sm >= 90  # before sm_90 there are no PDL instructions: the kernel is built without them
    if "PDL" in constexprs:
        constexprs = dict(constexprs, PDL=pdl)
    # signature is in argument order: tt.divisibility marks the pointer arguments by position
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    source = triton.compiler.ASTSource(fn=kernel(step.kernel), signature=signature, constexprs=constexprs,
                                       attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    options = {"num_warps": step.num_warps, "num_stages": step.num_stages, "ptx_version": ptx_version,
               "enable_fp_fusion": True, **({"launch_pdl": True} if step.launch_pdl and pdl else {})}
    compiled = triton.compile(source, target=GPUTarget("cuda", sm, 32), options=options)
    # the plans keep within SHARED_BUDGET by an estimate; where Triton's layout needs more than this
    # architecture offers, fewer pipeline stages (the grid and block, all the launcher knows, stay)
    while compiled.metadata.shared > SHARED_OPT_IN.get(sm, compiled.metadata.shared) and options["num_stages"] > 1:
        options["num_stages"] -= 1
        compiled = triton.compile(source, target=GPUTarget("cuda", sm, 32), options=options)
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise MoexportError(f"kernel {step.kernel}", "needs scratch memory, which AOT plans do not provide")
    ptx = compiled.asm["ptx"]
    return CompiledStep(compiled.asm["cubin"], ptx, meta.name, meta.shared, layout,
                        _entry_params(ptx, meta.name) - len(layout),
                        {k: v for k, v in constexprs.items() if v is not None}, pdl)


def compile_plan(plan: Plan, out_dir: str | os.PathLike, *, sm: int | None = None,
                 ptx_version: int | None = None, name: str | None = None) -> Path:
    """Compile every kernel of `plan` for one GPU architecture; write binaries and `<plan>.json`.

    Args:
        plan: A launch plan (`moexport.kernels.plan`).
        out_dir: Folder for the files (created).
        sm: Compute capability as an integer, e.g. 90 for Hopper. Defaults to 90.
        ptx_version: PTX ISA version written into the PTX, as major*10+minor. Defaults to 84
            (CUDA 12.4), which every Hopper driver since 550 loads.
        name: File stem of the manifest, e.g. 'sigma_moe_4096'. Defaults to the plan's name.

    Returns:
        The manifest path.

    Raises:
        MoexportError: a kernel needs global scratch memory (no plan kernel should).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_child(plan, out_dir, sm=sm, ptx_version=ptx_version, name=name)
    import triton

    sm = 90 if sm is None else sm
    ptx_version = PTX_VERSION if ptx_version is None else ptx_version
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = []
    for index, step in enumerate(plan.steps):
        compiled = compile_step(plan, step, sm=sm, ptx_version=ptx_version)
        stem = f"{name or plan.name}_{index:02d}_{step.kernel.replace('.', '_')}_{hashlib.sha256(compiled.cubin).hexdigest()[:10]}"
        _write(out / f"{stem}.cubin", compiled.cubin)
        _write(out / f"{stem}.ptx", compiled.ptx)
        steps.append({"kernel": step.kernel, "entry": compiled.entry, "cubin": f"{stem}.cubin", "ptx": f"{stem}.ptx",
                      "grid": list(step.grid), "block": [32 * step.num_warps, 1, 1], "shared": compiled.shared,
                      "args": compiled.args, "hidden_pointers": compiled.hidden_pointers,
                      "launch_pdl": step.launch_pdl and compiled.pdl, "constexprs": compiled.constexprs})
    manifest = {"version": MANIFEST_VERSION, "plan": plan.name, "sm": sm, "ptx_version": ptx_version,
                "triton": triton.__version__, "max_tokens": plan.max_tokens,
                "expressions": "integers, + - * // ( ), cdiv(a, b), min(a, b), max(a, b) over the symbols",
                **plan_buffers(plan), "steps": steps}
    path = out / f"{name or plan.name}.json"
    _write(path, json.dumps(manifest, indent=1))
    return path


def plan_buffers(plan: Plan) -> dict:
    """A plan's buffers and derived symbols as manifests hold them."""
    return {"inputs": [dataclasses.asdict(b) for b in plan.inputs],
            "outputs": [dataclasses.asdict(b) for b in plan.outputs],
            "workspace": [dataclasses.asdict(b) for b in plan.workspace],
            "derived": [list(d) for d in plan.derived]}


def _compile_in_child(plan: Plan, out_dir, **options) -> Path:
    """Under TRITON_INTERPRET=1 the kernels are interpreter objects, which cannot be compiled; a
    child process without the variable compiles them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import pickle, sys; from moexport.kernels.aot import compile_plan; "
            "plan, out, options = pickle.load(sys.stdin.buffer); print(compile_plan(plan, out, **options))")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((plan, str(out_dir), options)),
                          env=env, capture_output=True)
    if done.returncode:
        raise MoexportError(f"AOT compilation of plan {plan.name!r}", "failed in the compiler process",
                            done.stderr.decode(errors="replace")[-2000:])
    return Path(done.stdout.decode().strip().splitlines()[-1])
