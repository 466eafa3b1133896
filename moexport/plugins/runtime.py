"""ONNX Runtime sessions for graphs with moexport ops, and the compiled op library.

On ONNX Runtime's CUDA execution provider, a graph whose moexport nodes carry compiled kernels (`moexport
fuse`) runs them through the op library `libmoexport_ort.so` (`ort_library()`, built with the package
from `ort_ops.cpp`), which `ort_session` registers. Everywhere else ONNX Runtime runs the nodes'
model-local function bodies, which it inlines when the session is created
(`session.disable_aot_function_inlining` must stay off). The library defines the op set for the CUDA
provider only, and ONNX Runtime no longer falls back to a function body once a library defines its
op, so it is registered for CUDA sessions alone.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import onnx

from moexport.core.errors import MoexportError
from moexport.core.onnx_files import ELEMENT_TYPES, load_model
from moexport.native import built_library, load
from moexport.opset import DOMAIN, attach_functions, check_opset_imports
from moexport.opset.functions import kernels_input

LIBRARY = "libmoexport_ort.so"


def _load(model: str | os.PathLike | onnx.ModelProto, *, load_external_data: bool,
          source: str | None = None) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, source or "the model"
    return load_model(model, load_external_data=load_external_data), str(Path(model))


def _needs_functions(model: onnx.ModelProto) -> bool:
    """True when some moexport node has no model-local function body (a graph not written by moexport)."""
    have = {(f.name, f.overload) for f in model.functions if f.domain == DOMAIN}
    return any(n.domain == DOMAIN and (n.op_type, n.overload) not in have for n in model.graph.node)


def ort_library() -> Path:
    """Path of the compiled op library, for `SessionOptions.register_custom_ops_library` (Python) or
    `Ort::SessionOptions::RegisterCustomOpsLibrary` (C++) in sessions with the CUDA execution provider.

    Raises:
        MoexportError: the library was not built when moexport was installed (no C++17 compiler).
    """
    return built_library(__file__, LIBRARY)


def compiled_calls() -> int:
    """How many moexport node executions ran on the compiled kernels in this process so far (0 where the
    library was never loaded)."""
    path = Path(__file__).with_name(LIBRARY)
    if not path.is_file():
        return 0
    counter = load(path).moexport_ort_compiled_calls
    counter.restype = ctypes.c_uint64
    return int(counter())


def carries_kernels(model: onnx.ModelProto) -> bool:
    """Whether some moexport node of `model` has compiled kernels attached."""
    return any(kernels_input(node) for node in model.graph.node)


def provider_name(provider: str | tuple[str, dict]) -> str:
    """An execution provider's name, given as ONNX Runtime takes it: a name or (name, options)."""
    return provider[0] if isinstance(provider, (tuple, list)) else provider


def _uses_cuda(providers: list) -> bool:
    return any(provider_name(p) == "CUDAExecutionProvider" for p in providers)


def ort_session(model: str | os.PathLike | onnx.ModelProto, *,
                providers: list[str | tuple[str, dict]] | None = None, threads: int | None = None,
                optimization: str | None = None, source: str | None = None):
    """An ONNX Runtime InferenceSession for a graph with moexport ops.

    With the CUDA execution provider, nodes that carry compiled kernels run them (the op library is
    registered); the session's `moexport_kernels` attribute says so. Elsewhere the function bodies run.

    Args:
        model: Path of an .onnx file (external data next to it) or a ModelProto. Moexport nodes
            without a function body get one (in a given ModelProto, in place).
        providers: Execution providers, names or (name, options). Defaults to ["CPUExecutionProvider"].
        threads: Intra-op threads. Defaults to ONNX Runtime's choice (all cores).
        optimization: Graph optimisation level: 'disable', 'basic', 'extended' or 'all'. Defaults to 'all'.
        source: How errors name a ModelProto (the file it was read from). Defaults to "the model".

    Raises:
        MoexportError: Unreadable file, unknown moexport op-set version, or a graph ONNX Runtime rejects.
    """
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    optimization = "all" if optimization is None else optimization
    if optimization not in levels:
        raise MoexportError(f"optimization={optimization!r}", "is not a level", f"use one of {', '.join(levels)}")
    proto, culprit = _load(model, load_external_data=False, source=source)
    check_opset_imports(proto, culprit)
    providers = providers or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
    kernels = _uses_cuda(providers) and carries_kernels(proto)
    if kernels:
        options.register_custom_ops_library(str(ort_library()))
    path = None if isinstance(model, onnx.ModelProto) else str(model)
    if _needs_functions(proto):
        if path is not None:  # ORT gets the graph with its bodies as bytes, so the weights must be in it
            proto, _ = _load(model, load_external_data=True)
        attach_functions(proto)
        if proto.ByteSize() > onnx.checker.MAXIMUM_PROTOBUF:
            raise MoexportError(culprit, "has moexport nodes without function bodies and is over 2 GB",
                                "run `moexport fuse` on it first, which writes the bodies")
        path = None
    try:
        session = ort.InferenceSession(proto.SerializeToString() if path is None else path, options,
                                       providers=providers)
    except Exception as error:  # ORT raises its own Fail/InvalidGraph types for a bad graph
        raise MoexportError(culprit, f"is rejected by ONNX Runtime: {error}") from None
    session.moexport_kernels = kernels
    return session


# torch dtype name -> ONNX element type, as IOBinding takes it (ONNX Runtime >= 1.20 binds bfloat16 so)
_ELEMENT_TYPES = {**ELEMENT_TYPES, "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32}


def run_with_tensors(session, inputs: dict, outputs: dict) -> None:
    """Run `session` on torch tensors where they lie (CUDA or CPU), writing into the given `outputs`:
    no copy through the host and no dtype numpy lacks (bfloat16) in the way.

    Args:
        session: An ONNX Runtime session (`ort_session`).
        inputs: Graph inputs by name, contiguous torch tensors.
        outputs: Graph outputs by name, contiguous torch tensors of the right shape and dtype.
    """
    import torch

    binding = session.io_binding()
    spare = []  # one element behind each empty tensor, alive until the run ends
    for bind, tensors in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
        for name, tensor in tensors.items():
            device = tensor.device
            if tensor.numel() == 0:  # ONNX Runtime refuses a null pointer, which is what an empty tensor has;
                spare.append(torch.empty(1, dtype=tensor.dtype, device=device))  # none of its elements is read
            pointer = spare[-1].data_ptr() if tensor.numel() == 0 else tensor.data_ptr()
            bind(name, device.type, device.index or 0, _ELEMENT_TYPES[str(tensor.dtype).removeprefix("torch.")],
                 list(tensor.shape), pointer)
    session.run_with_iobinding(binding)
