"""Kernel bundles: every compiled kernel one op configuration needs, in one byte string.

A fused ONNX file carries one bundle per distinct configuration (op, layer shape, dtype, attributes)
as a uint8 initializer that all its nodes of that configuration share; the native launcher
(`moexport/native/bundle.cpp`, used by the ONNX Runtime op library and the TensorRT plugins) reads
it, picks the plan of a call's token count and launches it on the runtime's stream. So a deployment
needs the runtime and the op library: no Python, no Triton.

Layout: the 8 magic bytes ``MOEXKB01``, the manifest's length (uint64, little-endian), the manifest
(JSON), then the images (each 16-byte aligned, zlib-compressed). The manifest holds

- ``op``, ``config`` (what the node must match), ``key`` (a digest of everything else: equal
  configurations share one bundle), ``op_inputs`` / ``op_outputs`` (the plan buffer each op input
  and output binds, "" for none), ``select`` (the symbol plans are chosen by: ``N`` tokens or ``S``
  rows);
- ``plans``: one launch plan (`moexport.kernels.plan`) per token bucket, each valid up to its
  ``max_tokens``, the last also beyond where ``unbounded`` (dispatched plans are; the gather path's
  programs hold all of a bucket's tokens at once, so it is not); buffers, derived symbols and steps
  as `aot.compile_plan` writes them, a step naming its kernel by index;
- ``kernels``: per distinct kernel its entry name and one image per target: a cubin per architecture
  (Triton emits arch-specific code from sm_90 on, so an sm_90 cubin runs on sm_90 alone), and PTX
  for architectures below sm_90, which the driver compiles for any newer GPU; ``pdl`` says whether
  the image has the programmatic-dependent-launch instructions (images for GPUs before sm_90 do not,
  and their steps launch normally).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

from moexport.core.errors import MoexportError
from moexport.core.files import write_atomically
from moexport.kernels import plan as plans
from moexport.kernels.aot import PTX_VERSION, argument_layout, compile_step, plan_buffers, step_identity
from moexport.kernels.configs import bucket

MAGIC = b"MOEXKB01"
FORMAT = 1
# Ampere (sm_80 cubins run on sm_86 and sm_89 too, and sm_80 PTX on every newer GPU) and Hopper (sm_90:
# H100, H200, GH200), which the shipped configs were measured on.
DEFAULT_ARCHS = (80, 90)
# Plans for every power-of-two token count up to this; dispatched plans also serve larger counts.
DEFAULT_MAX_TOKENS = 65536
_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class OpKernels:
    """What a bundle is built from: an op configuration and its launch plans, one per token bucket."""

    op: str
    config: dict[str, Any]
    plans: tuple  # (Plan, ...) in increasing max_tokens
    select: str  # the symbol plans are chosen by
    op_inputs: tuple[str, ...]
    op_outputs: tuple[str, ...]

    def plan_for(self, n: int):
        """The plan a call of `n` tokens (or rows, see `select`) runs, as the native launcher picks it: the
        first whose max_tokens holds them, else the last (which the launcher runs beyond only where
        it is unbounded)."""
        return next((p for p in self.plans if n <= p.max_tokens), self.plans[-1])


def _buckets(max_tokens: int) -> list[int]:
    if max_tokens < 1:
        raise MoexportError(f"max_tokens={max_tokens}", "must be at least 1")
    top = bucket(max_tokens)
    return [1 << e for e in range(top.bit_length())]


def _distinct(builder, buckets: list[int]) -> tuple:
    """The plans of consecutive buckets, those with equal steps and buffers merged into the larger one."""
    kept: list = []
    for n in buckets:
        plan = builder(n)
        if kept and (kept[-1].steps, kept[-1].inputs, kept[-1].outputs, kept[-1].workspace) == (
                plan.steps, plan.inputs, plan.outputs, plan.workspace):
            kept[-1] = plan
        else:
            kept.append(plan)
    return tuple(kept)


def sigma_moe_kernels(shape: plans.MoEShape, *, router_dtype: str = "float32", expert_output: bool = False,
                      max_tokens: int = DEFAULT_MAX_TOKENS) -> OpKernels:
    """The SigmaMoE op of a layer shape, its router weight in `router_dtype`: float32 or the layer's dtype
    (the op set takes either)."""
    if router_dtype not in ("float32", shape.dtype):
        raise MoexportError(f"router_dtype={router_dtype!r}", f"must be float32 or the layer's dtype ({shape.dtype})")
    shape = dataclasses.replace(shape, router_dtype=None if router_dtype == shape.dtype else router_dtype)
    built = _distinct(lambda n: plans.sigma_moe_plan(shape, n, expert_output=expert_output), _buckets(max_tokens))
    config = {"d_model": shape.d, "n_experts": shape.n_experts, "expert_size": shape.expert_size,
              "v_dim": shape.v_dim, "k": shape.k, "dtype": shape.dtype, "selection": shape.selection,
              "activation": shape.activation, "bias": shape.bias, "expert_output": expert_output,
              "router_dtype": router_dtype}
    return OpKernels("SigmaMoE", config, built, "N", ("x", "expert_sel", "keys", "values", "bias", "o_bias", ""),
                     ("y", "experts" if expert_output else ""))


def topk_dispatch_kernels(n_experts: int, k: int, selection: str, *,
                          max_tokens: int = DEFAULT_MAX_TOKENS) -> OpKernels:
    """The TopKDispatch op."""
    built = _distinct(lambda n: plans.topk_dispatch_plan(n_experts, k, selection, n), _buckets(max_tokens))
    return OpKernels("TopKDispatch", {"n_experts": n_experts, "k": k, "selection": selection}, built, "N",
                     ("logits", ""), ("gate", "expert", "sorted_expert", "sorted_slot"))


def cvmm_kernels(n_experts: int, d_in: int, d_out: int, dtype: str, *, reduce: bool, k: int, gate: bool,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> OpKernels:
    """The CVMM op (float32 output, as the op set has it); `max_tokens` bounds its rows."""
    built = _distinct(lambda n: plans.cvmm_plan(n_experts, d_in, d_out, dtype, reduce=reduce, k=k, gate=gate,
                                                n_rows=n, out_dtype="float32"), _buckets(max_tokens))
    config = {"n_experts": n_experts, "d_in": d_in, "d_out": d_out, "dtype": dtype, "reduce": int(reduce), "k": k,
              "gate": gate}
    return OpKernels("CVMM", config, built, "S", ("x", "sorted_expert", "src_row", "dst_row", "w",
                                                  "gate" if gate else "", ""), ("out",))


def build_bundle(kernels: OpKernels, *, archs: tuple[int, ...] = DEFAULT_ARCHS,
                 ptx_version: int = PTX_VERSION, jobs: int | None = None) -> bytes:
    """Compile every kernel of `kernels`' plans for `archs` and pack them into one bundle.

    Args:
        kernels: The op configuration and its plans (`sigma_moe_kernels`, ...).
        archs: Compute capabilities, e.g. (90,). Each gets cubins; those below 90 also PTX, which the
            driver compiles for newer GPUs.
        ptx_version: PTX ISA version of the PTX (major*10+minor), low enough for the drivers deployed.
        jobs: Compiler processes (Triton's compiler is single-threaded). Defaults to the CPU count.

    Built bundles are kept in a cache (`cache_folder`): the same configuration compiled again, by this
    process or another (fusing a model twice, test workers), is read from there; one process builds,
    the others wait for it.

    Raises:
        MoexportError: an architecture Triton cannot compile these kernels for.
    """
    archs = tuple(sorted(set(archs)))
    folder = cache_folder()
    if folder is None:
        return _build(kernels, archs=archs, ptx_version=ptx_version, jobs=jobs)
    path = folder / f"{_cache_key(kernels, archs, ptx_version)}.bundle"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file():
            data = _build(kernels, archs=archs, ptx_version=ptx_version, jobs=jobs)
            write_atomically(path, lambda tmp: tmp.write_bytes(data))
            return data
    return path.read_bytes()


def cache_folder() -> Path | None:
    """Where built bundles are kept: $MOEXPORT_CACHE_DIR, else moexport/bundles in the user's cache
    folder ($XDG_CACHE_HOME or ~/.cache); MOEXPORT_CACHE_DIR=off keeps none."""
    folder = os.environ.get("MOEXPORT_CACHE_DIR")
    if folder == "off":
        return None
    if folder:
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moexport" / "bundles"


def _cache_key(kernels: OpKernels, archs: tuple[int, ...], ptx_version: int) -> str:
    """A digest of what a bundle is built from: the plans, the targets, the compiler and the kernels' source."""
    import triton

    digest = hashlib.sha256(pickle.dumps((FORMAT, kernels, archs, ptx_version, triton.__version__)))
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


def _build(kernels: OpKernels, *, archs: tuple[int, ...], ptx_version: int, jobs: int | None) -> bytes:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _build_in_child(kernels, archs=archs, ptx_version=ptx_version, jobs=jobs)
    import triton

    identities: dict[tuple, int] = {}
    sources: list[tuple] = []  # (plan, step) of each distinct kernel
    manifest_plans = []
    for i, plan in enumerate(kernels.plans):
        steps = []
        for step in plan.steps:
            identity = step_identity(plan, step)
            if identity not in identities:
                identities[identity] = len(sources)
                sources.append((plan, step))
            steps.append({"kernel": identities[identity], "grid": list(step.grid), "block": [32 * step.num_warps, 1, 1],
                          "args": argument_layout(plan, step), "launch_pdl": step.launch_pdl})
        unbounded = i == len(kernels.plans) - 1 and plan.notes.get("mode") != "gather"
        manifest_plans.append({"max_tokens": plan.max_tokens, "unbounded": unbounded, **plan_buffers(plan),
                               "steps": steps})
    blobs = bytearray()
    manifest_kernels = []
    tasks = [(plan, step, sm, ptx_version) for plan, step in sources for sm in archs]
    results = iter(_compile_all(tasks, jobs))
    for plan, step in sources:
        images, entry = [], None
        for sm in archs:
            compiled = next(results)
            if isinstance(compiled, str):
                raise MoexportError(f"--arch {sm}", f"cannot be compiled for ({step.kernel}: {compiled})",
                                    "Triton compiles these kernels for sm_80 and newer")
            entry = compiled.entry
            targets = [("cubin", compiled.cubin)] + ([("ptx", compiled.ptx.encode())] if sm < 90 else [])
            for target, raw in targets:
                packed = zlib.compress(raw, 9)
                blobs.extend(b"\0" * (-len(blobs) % _ALIGN))
                images.append({"target": target, "sm": sm, "offset": len(blobs), "size": len(packed),
                               "raw_size": len(raw), "shared": compiled.shared,
                               "hidden_pointers": compiled.hidden_pointers, "pdl": compiled.pdl})
                blobs.extend(packed)
        manifest_kernels.append({"name": step.kernel, "entry": entry, "images": images})
    manifest = {"format": FORMAT, "op": kernels.op, "config": kernels.config, "select": kernels.select,
                "op_inputs": list(kernels.op_inputs), "op_outputs": list(kernels.op_outputs),
                "archs": list(archs), "triton": triton.__version__, "ptx_version": ptx_version,
                "kernels": manifest_kernels, "plans": manifest_plans}
    body = json.dumps(manifest, sort_keys=True).encode()
    manifest["key"] = hashlib.sha256(body + bytes(blobs)).hexdigest()[:16]
    return pack_bundle(manifest, bytes(blobs))


def pack_bundle(manifest: dict, blobs: bytes) -> bytes:
    """A bundle's bytes: the magic, the manifest's length, the manifest, the images' blob."""
    text = json.dumps(manifest, sort_keys=True).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + blobs


def _compile_task(task: tuple):
    """One (plan, step, sm, ptx_version): its CompiledStep, or the compiler's last line (exceptions from
    the compiler do not always cross a process boundary)."""
    plan, step, sm, ptx_version = task
    try:
        return compile_step(plan, step, sm=sm, ptx_version=ptx_version)
    except Exception as error:  # noqa: BLE001 - Triton's compiler errors are long internal dumps
        lines = str(error).strip().splitlines()
        return (lines[-1] if lines else type(error).__name__)[:200]


def _compile_all(tasks: list[tuple], jobs: int | None) -> list:
    """`_compile_task` of every task, in order; in several compiler processes where there are enough tasks.

    The processes are fresh interpreters given their share of the tasks in a file (not a
    multiprocessing pool, which would import the caller's __main__ again in each)."""
    jobs = min(jobs or os.cpu_count() or 1, len(tasks))
    if jobs < 2 or len(tasks) < 4:
        return [_compile_task(task) for task in tasks]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import pickle, sys; from moexport.kernels.bundle import _compile_task; tasks = pickle.load(open("
            "sys.argv[1], 'rb')); sys.stdout.buffer.write(pickle.dumps([_compile_task(t) for t in tasks]))")
    results: list = [None] * len(tasks)
    with tempfile.TemporaryDirectory(prefix="moexport-compile-") as folder:
        workers = []
        for i in range(jobs):
            share = Path(folder) / f"tasks{i}.pickle"
            share.write_bytes(pickle.dumps(tasks[i::jobs]))
            workers.append(subprocess.Popen([sys.executable, "-c", code, str(share)], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=env))
        for i, worker in enumerate(workers):
            out, err = worker.communicate()
            if worker.returncode:
                lines = err.decode(errors="replace").strip().splitlines()
                raise MoexportError("compiling kernels", "failed in a compiler process", lines[-1] if lines else None)
            results[i::jobs] = pickle.loads(out)
    return results


def read_bundle(data: bytes) -> dict:
    """The manifest of a bundle (its images are not decoded).

    Raises:
        MoexportError: the bytes are not a bundle of a known format.
    """
    return unpack_bundle(data)[0]


def unpack_bundle(data: bytes) -> tuple[dict, bytes]:
    """A bundle's manifest and its images' blob (`pack_bundle` the other way).

    Raises:
        MoexportError: the bytes are not a bundle of a known format.
    """
    data = bytes(data)
    if len(data) < 16 or data[:8] != MAGIC:
        raise MoexportError("kernel bundle", "is not one (wrong magic bytes)")
    (length,) = struct.unpack("<Q", data[8:16])
    if length > len(data) - 16:
        raise MoexportError("kernel bundle", "is truncated")
    manifest = json.loads(data[16:16 + length])
    if manifest.get("format") != FORMAT:
        raise MoexportError("kernel bundle", f"has format {manifest.get('format')}; this moexport reads {FORMAT}")
    return manifest, data[16 + length:]


def _build_in_child(kernels: OpKernels, **options) -> bytes:
    """Under TRITON_INTERPRET=1 the kernels are interpreter objects, which cannot be compiled; a child
    process without the variable compiles them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import pickle, sys; from moexport.kernels.bundle import _build; "
            "kernels, options = pickle.load(sys.stdin.buffer); sys.stdout.buffer.write(_build(kernels, **options))")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps((kernels, options)), env=env,
                          capture_output=True)
    if done.returncode:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise MoexportError(f"compiling the {kernels.op} kernels", "failed in the compiler process",
                            message[-1] if message else None)
    return done.stdout
