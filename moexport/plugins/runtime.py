"""ONNX Runtime sessions for graphs with moexport ops.

ONNX Runtime executes the moexport nodes through their model-local function bodies, which it inlines
when the session is created (`session.disable_aot_function_inlining` must stay off), wherever no
registered kernel of the same domain and name takes precedence.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from moexport.core.errors import MoexportError
from moexport.core.onnx_files import load_model
from moexport.opset import DOMAIN, attach_functions, check_opset_imports


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
