"""Building TensorRT engines from moexport ONNX files.

Backends, in order of preference: TensorRT >= 10 (``import tensorrt``), else TensorRT-RTX
(``pip install tensorrt-rtx``, ``import tensorrt_rtx``), whose ahead-of-time phase builds an engine on
a machine without a GPU; that is how CI shows a graph is TensorRT-parsable. Without the op-set
plugins, graphs with moexport nodes build only where the parser can fall back to the model-local
function bodies, and TensorRT-RTX cannot (its ``NonZero`` needs a plugin): build the portable form
there.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import onnx

from moexport.core.dtypes import dtype_name
from moexport.core.errors import MoexportError
from moexport.core.files import write_atomically
from moexport.core.onnx_files import load_model
from moexport.core.progress import progress

# input name -> one static shape, or (min, opt, max) shapes
Shapes = dict[str, tuple[int, ...] | tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _backend_module():
    """The TensorRT Python module to build with: tensorrt (>= 10), else tensorrt_rtx, else None."""
    try:
        trt = importlib.import_module("tensorrt")
        if int(trt.__version__.split(".")[0]) >= 10:
            return trt
    except ImportError:
        pass
    try:
        return importlib.import_module("tensorrt_rtx")
    except ImportError:
        return None


def engine_backend() -> str | None:
    """'tensorrt' or 'tensorrt_rtx': what `build_engine` would use here; None when neither is installed."""
    module = _backend_module()
    return None if module is None else module.__name__


def _bounds(name: str, value) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of one input from its `shapes` entry: one shape stands for all three."""
    sequence = (tuple, list)
    if isinstance(value, sequence) and all(isinstance(d, int) for d in value):
        return (tuple(value),) * 3
    if isinstance(value, sequence) and len(value) == 3 and all(isinstance(b, sequence) for b in value):
        return tuple(tuple(b) for b in value)
    raise MoexportError(f"shapes[{name!r}] = {value!r}", "is neither one shape nor (min, opt, max) shapes",
                        "give a full shape such as (1, 8, 16), or three of them")


def _profile_shapes(model: onnx.ModelProto, shapes: Shapes | None) -> Shapes:
    """(min, opt, max) per graph input: given ones checked, static inputs filled in."""
    shapes = {name: _bounds(name, value) for name, value in (shapes or {}).items()}
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise MoexportError(f"shapes for {sorted(unknown)}", "name no graph input",
                            f"graph inputs: {', '.join(i.name for i in inputs)}")
    for value in inputs:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if value.name not in shapes:
            if None in dims:
                raise MoexportError(f"input {value.name!r}", f"has dynamic dims {dims} and no shapes given",
                                    f"pass shapes={{{value.name!r}: (min, opt, max)}}, each a full shape")
            shapes[value.name] = (tuple(dims),) * 3
        for shape in shapes[value.name]:
            if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
                raise MoexportError(f"shapes[{value.name!r}] = {shapes[value.name]}", f"do not fit the input's dims {dims}")
    return shapes


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, dtype: str | None = None,
                 shapes: Shapes | None = None, workspace_mb: int | None = None,
                 show_progress: bool | None = None) -> Path:
    """Parse an ONNX file and build a serialized TensorRT engine.

    Args:
        onnx_path: The .onnx file (external data next to it).
        engine_path: Output engine file, written atomically.
        dtype: Precision to allow beyond the graph's own: 'float32', 'float16' or 'bfloat16'
            (TensorRT's FP16/BF16 flags; TensorRT-RTX networks are strongly typed and use the graph's
            types). Defaults to 'float32'.
        shapes: Optimisation profile, input name -> (min, opt, max) shapes, or one shape for a fixed
            size. Required for inputs with dynamic dims.
        workspace_mb: Workspace memory pool limit. Defaults to TensorRT's.
        show_progress: Show a progress bar. Defaults to when stderr is a terminal.

    Returns:
        The engine path.

    Raises:
        MoexportError: No TensorRT, unreadable ONNX, unsupported nodes, bad shapes or a failed build.
    """
    dtype = dtype_name("float32" if dtype is None else dtype)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise MoexportError(str(onnx_path), "does not exist")
    if not engine_path.parent.is_dir():
        raise MoexportError(str(engine_path), "is in a folder that does not exist")
    trt = _backend_module()
    if trt is None:
        raise MoexportError("TensorRT", "is not installed",
                            "install TensorRT >= 10, or `pip install tensorrt-rtx` to build engines without a GPU")
    model = load_model(onnx_path, load_external_data=False)
    profile_shapes = _profile_shapes(model, shapes)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    with progress(f"building a {trt.__name__} engine", enabled=show_progress) as advance:
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
            raise MoexportError(str(onnx_path), f"is not parsed by {trt.__name__} {trt.__version__}: {errors}")
        config = builder.create_builder_config()
        flag = {"float16": "FP16", "bfloat16": "BF16"}.get(dtype)
        if flag and hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if workspace_mb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        advance(description="building")
        engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise MoexportError(str(onnx_path), f"{trt.__name__} {trt.__version__} failed to build an engine",
                            "run with a verbose TensorRT logger for the reason")
    write_atomically(engine_path, lambda tmp: tmp.write_bytes(memoryview(engine)))
    return engine_path
