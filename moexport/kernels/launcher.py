"""Run an AOT-compiled plan (`moexport.kernels.aot`) through the CUDA driver API: no Triton JIT.

This is what the ORT and TensorRT plugins (a later issue) are to do in C++: load each step's cubin,
lay out the workspace from the manifest's shape expressions, and launch the steps in order on the
caller's stream (memsets for zero-filled buffers first). Here the tensors are torch tensors for
convenience; only their device pointers are used.
"""
from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import torch

from moexport.core.errors import InternalError, MoexportError
from moexport.kernels.host import bind_symbols, buffer_dtype, pack_workspace
from moexport.kernels.plan import evaluate


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise InternalError(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def symbols_of(manifest: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Runtime symbols of a manifest from its input shapes, each shape checked (`host.bind_symbols`)."""
    return bind_symbols([(b["name"], b["shape"]) for b in manifest["inputs"]], manifest["derived"], shapes,
                        manifest["plan"])


def workspace_layout(manifest: dict, symbols: dict[str, int]) -> tuple[dict[str, tuple[int, int]], int]:
    """Byte offset and size of each workspace buffer in one allocation (as the host lays it out), and
    the total size."""
    sizes = [math.prod(evaluate(e, symbols) for e in b["shape"]) * buffer_dtype(b["dtype"]).itemsize
             for b in manifest["workspace"]]
    offsets, total = pack_workspace(sizes)
    return {b["name"]: (offset, nbytes) for b, offset, nbytes in zip(manifest["workspace"], offsets, sizes)}, total


class AOTRunner:
    """Loads the cubins of one manifest and runs the plan.

    Args:
        manifest: Path of the `<plan>.json` written by `compile_plan`.
    """

    def __init__(self, manifest: str | Path):
        from cuda.bindings import driver

        self.driver = driver
        # the primary context of the current device: the one PyTorch (and the CUDA runtime) use
        _check(driver.cuInit(0))
        device = _check(driver.cuDeviceGet(torch.cuda.current_device()))
        _check(driver.cuCtxSetCurrent(_check(driver.cuDevicePrimaryCtxRetain(device))))
        path = Path(manifest)
        self.manifest = json.loads(path.read_text())
        self.functions = []
        for step in self.manifest["steps"]:
            module = _check(driver.cuModuleLoadData((path.parent / step["cubin"]).read_bytes()))
            function = _check(driver.cuModuleGetFunction(module, step["entry"].encode()))
            if step["shared"] > 48 * 1024:
                _check(driver.cuFuncSetAttribute(
                    function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    step["shared"]))
            self.functions.append((module, function))

    def run(self, inputs: dict[str, torch.Tensor | None], *, stream: int | None = None) -> dict[str, torch.Tensor]:
        """Run the plan on CUDA tensors (inputs by name) and return its outputs.

        Args:
            inputs: The manifest's inputs, contiguous, on one CUDA device; optional ones may be None.
            stream: A CUstream handle. Defaults to torch's current stream.
        """
        m = self.manifest
        for buf in m["inputs"]:
            t = inputs.get(buf["name"])
            if t is not None and (not t.is_cuda or t.data_ptr() % 16):
                raise MoexportError(f"tensor {buf['name']!r}", "must be a CUDA tensor aligned to 16 bytes")
        device = next(t.device for t in inputs.values() if t is not None)
        symbols = symbols_of(m, {n: t.shape for n, t in inputs.items() if t is not None})
        stream = torch.cuda.current_stream(device).cuda_stream if stream is None else stream
        pointers = {n: (0 if t is None else t.data_ptr()) for n, t in inputs.items()}
        outputs = {}
        for buf in m["outputs"]:
            shape = [evaluate(e, symbols) for e in buf["shape"]]
            outputs[buf["name"]] = torch.empty(shape, dtype=buffer_dtype(buf["dtype"]), device=device)
            pointers[buf["name"]] = outputs[buf["name"]].data_ptr()
        layout, total = workspace_layout(m, symbols)
        workspace = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        for name, (offset, _) in layout.items():
            pointers[name] = workspace.data_ptr() + offset
        for buf in (*m["outputs"], *m["workspace"]):
            nbytes = layout[buf["name"]][1] if buf["name"] in layout else outputs[buf["name"]].nbytes
            if buf["zero"] and nbytes:
                _check(self.driver.cuMemsetD8Async(self.driver.CUdeviceptr(pointers[buf["name"]]), 0, nbytes,
                                                   self.driver.CUstream(stream)))
        # a call without tokens (or rows) launches nothing, as in the Python host and the native launcher
        # (moexport/native/bundle.cpp): some grids (the gather experts kernel's) do not depend on the count
        if any(symbols.get(count, 1) <= 0 for count in ("N", "S")):
            return outputs
        for step, (_, function) in zip(m["steps"], self.functions):
            self._launch(step, function, pointers, symbols, stream)
        return outputs

    def _launch(self, step, function, pointers, symbols, stream) -> None:
        grid = [evaluate(g, symbols) for g in step["grid"]] + [1] * (3 - len(step["grid"]))
        if min(grid) <= 0:
            return
        values = []
        for arg in step["args"]:
            if arg["kind"] == "pointer":
                values.append(ctypes.c_uint64(pointers[arg["buffer"]]))
            else:
                values.append(ctypes.c_int32(evaluate(arg["value"], symbols)))
        values += [ctypes.c_uint64(0) for _ in range(step["hidden_pointers"])]  # scratch: unused
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        d = self.driver
        config = d.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = step["block"]
        config.sharedMemBytes = step["shared"]
        config.hStream = d.CUstream(stream)
        if step.get("launch_pdl"):  # programmatic dependent launch: it may start while the previous step runs
            pdl = d.CUlaunchAttribute()
            pdl.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            pdl.value.programmaticStreamSerializationAllowed = 1
            config.attrs = [pdl]
            config.numAttrs = 1
        _check(d.cuLaunchKernelEx(config, function, ctypes.addressof(params), 0))
