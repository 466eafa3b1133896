"""Running graphs with moexport ops: ONNX Runtime (CPU and any other provider) and `onnx.reference`.

ONNX Runtime executes the moexport nodes through their model-local function bodies, which it inlines
when the session is created (`session.disable_aot_function_inlining` must stay off). A registered
custom-op kernel of the same domain and name would take precedence over the function; the compiled
C++/CUDA kernel library is a separate issue, and no Python kernel (onnxruntime-extensions) is used,
since it could not be deployed.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from moexport.core.errors import MoexportError
from moexport.exporter.export import load_model
from moexport.exporter.functions import attach_functions
from moexport.exporter.opset import DOMAIN, check_opset_imports
from moexport.plugins.reference import REFERENCE_OPS


def _load(model: str | os.PathLike | onnx.ModelProto, *, load_external_data: bool) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "the model"
    return load_model(model, load_external_data=load_external_data), str(Path(model))


def _needs_functions(model: onnx.ModelProto) -> bool:
    """True when some moexport node has no model-local function body (a graph not written by moexport)."""
    have = {(f.name, f.overload) for f in model.functions if f.domain == DOMAIN}
    return any(n.domain == DOMAIN and (n.op_type, n.overload) not in have for n in model.graph.node)


def ort_session(model: str | os.PathLike | onnx.ModelProto, *, providers: list[str] | None = None,
                threads: int | None = None, optimization: str | None = None):
    """An ONNX Runtime InferenceSession for a graph with moexport ops.

    Args:
        model: Path of an .onnx file (external data next to it) or a ModelProto. Moexport nodes
            without a function body get one (in a given ModelProto, in place).
        providers: Execution providers. Defaults to ["CPUExecutionProvider"].
        threads: Intra-op threads. Defaults to ONNX Runtime's choice (all cores).
        optimization: Graph optimisation level: 'disable', 'basic', 'extended' or 'all'. Defaults to 'all'.

    Raises:
        MoexportError: Unreadable file, unknown moexport op-set version, or a graph ONNX Runtime rejects.
    """
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    optimization = "all" if optimization is None else optimization
    if optimization not in levels:
        raise MoexportError(f"optimization={optimization!r}", "is not a level", f"use one of {', '.join(levels)}")
    proto, culprit = _load(model, load_external_data=False)
    check_opset_imports(proto, culprit)
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
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
        return ort.InferenceSession(proto.SerializeToString() if path is None else path, options,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph types for a bad graph
        raise MoexportError(culprit, f"is rejected by ONNX Runtime: {error}") from None


def reference_evaluator(model: str | os.PathLike | onnx.ModelProto):
    """An `onnx.reference.ReferenceEvaluator` that runs the moexport ops with their NumPy references."""
    from onnx.reference import ReferenceEvaluator

    proto, culprit = _load(model, load_external_data=True)
    check_opset_imports(proto, culprit)
    return ReferenceEvaluator(proto, new_ops=REFERENCE_OPS)
