"""Building TensorRT engines from moexport ONNX files.

Backends, in order of preference: TensorRT >= 10 (``import tensorrt``), else TensorRT-RTX
(``pip install tensorrt-rtx``, ``import tensorrt_rtx``), whose ahead-of-time phase builds an engine on
a machine without a GPU (it cannot run one there: TensorRT-RTX engines run on RTX GPUs only).

A graph with moexport nodes (the fused form, or the dispatch form, fused with kernels) is built with
the moexport plugins (`libmoexport_trt.so`): TensorRT parses the graph of `plugin_graph`, in which
each node's compiled kernels are plugin fields, and the engine runs them with no Python and no
Triton. Its network is strongly typed: the kernels fix the precision of the σ-MoE layers, so export
in the precision wanted. A graph of standard ops only (the portable form) is built as it is.
"""
from __future__ import annotations

import importlib
import os
import shlex
from pathlib import Path

import onnx

from moexport.core.dtypes import dtype_name
from moexport.core.errors import MoexportError
from moexport.core.files import write_atomically
from moexport.core.onnx_files import load_model
from moexport.core.progress import progress
from moexport.opset import check_opset_imports
from moexport.trt_plugins.graph import PluginBundle, moexport_nodes, plugin_graph
from moexport.trt_plugins.library import register_plugins, trt_library

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


def _check_precision(dtype: str | None, bundles: list[PluginBundle], culprit: str) -> None:
    """A precision asked of a plugin graph must be the one its kernels were compiled for."""
    compiled = sorted({b.config["dtype"] for b in bundles if "dtype" in b.config})
    if dtype is not None and compiled and compiled != [dtype]:
        raise MoexportError(culprit, f"has σ-MoE kernels compiled for {', '.join(compiled)}, not {dtype}",
                            f"the engine runs them in the precision of the graph: export the model in {dtype} "
                            "(moexport export --fp16 / --bf16) and fuse it again, or build without the flag")


def _logger(trt):
    """A TensorRT logger that keeps the errors (the plugins report theirs through it) for the message."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)

    return Logger()


def _monitor(trt, advance):
    """A TensorRT progress monitor that names the build phase on the progress bar."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            advance(0, description=f"building: {phase_name.lower()}")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            advance()

    return Monitor()


def _failure(logger, fallback: str) -> str:
    """The reason TensorRT gave: the plugins' messages first (they name the node), then TensorRT's."""
    ours = [m for m in logger.errors if "(SigmaMoE)" in m or "(TopKDispatch)" in m or "(CVMM)" in m]
    return "; ".join(dict.fromkeys(ours or logger.errors[-3:])) or fallback


class _Parsed:
    """A graph parsed into a TensorRT network, with what building it needs."""

    def __init__(self, onnx_path: Path, dtype: str | None):
        self.trt = trt = _backend_module()
        if trt is None:
            raise MoexportError("TensorRT", "is not installed", "install TensorRT >= 10, or `pip install tensorrt-rtx` "
                                "to build engines without a GPU")
        self.model = model = load_model(onnx_path, load_external_data=False)
        check_opset_imports(model, str(onnx_path))
        self.plugins = bool(moexport_nodes(model))
        self.bundles = plugin_graph(model, onnx_path.parent) if self.plugins else []
        _check_precision(dtype, self.bundles, str(onnx_path))
        self.library = register_plugins(trt) if self.plugins else None
        self.logger = _logger(trt)
        self.builder = trt.Builder(self.logger)
        strongly_typed = self.plugins and trt.__name__ == "tensorrt"  # TensorRT-RTX networks always are
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        self.network = self.builder.create_network(flags)
        self.parser = trt.OnnxParser(self.network, self.logger)
        parsed = self.parser.parse(_serialized(model, onnx_path), str(onnx_path)) if self.plugins \
            else self.parser.parse_from_file(str(onnx_path))
        if not parsed:
            errors = "; ".join(str(self.parser.get_error(i)) for i in range(min(self.parser.num_errors, 3)))
            raise MoexportError(str(onnx_path), f"is not parsed by {trt.__name__} {trt.__version__}: "
                                f"{_failure(self.logger, errors) if self.plugins else errors}")


def plugin_layers(onnx_path: str | os.PathLike) -> list[dict[str, str]]:
    """The plugin layers of the network TensorRT parses from an ONNX file, as `build_engine` parses it.

    Returns:
        Per PLUGIN_V3 layer, in network order: its name, the plugin's name, version and namespace, and
        the plugin's metadata string (for moexport's: op, attributes, kernel bundle key, and
        "(shared)" where the engine gets the bundle's bytes with another layer).

    Raises:
        MoexportError: As `build_engine` does while parsing.
    """
    parsed = _Parsed(Path(onnx_path), None)
    trt, layers = parsed.trt, []
    for i in range(parsed.network.num_layers):
        layer = parsed.network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # the network hands out its layers as ILayer
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        build = layer.plugin.get_capability_interface(trt.PluginCapabilityType.BUILD)
        layers.append({"layer": layer.name, "plugin": core.plugin_name, "version": core.plugin_version,
                       # (metadata strings came with TensorRT 10.x; earlier bindings have none)
                       "namespace": core.plugin_namespace, "metadata": getattr(build, "metadata_string", "") or ""})
    return layers


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, dtype: str | None = None,
                 shapes: Shapes | None = None, workspace_mb: int | None = None,
                 timing_cache: str | os.PathLike | None = None, embed_plugin: bool | None = None,
                 save_onnx: str | os.PathLike | None = None, show_progress: bool | None = None) -> Path:
    """Parse an ONNX file and build a serialized TensorRT engine.

    Args:
        onnx_path: The .onnx file (external data next to it).
        engine_path: Output engine file, written atomically.
        dtype: Precision: 'float32', 'float16' or 'bfloat16'. For a graph of standard ops, TensorRT's
            FP16/BF16 flags (TensorRT-RTX networks are strongly typed and use the graph's types); a
            graph with moexport nodes runs in the precision its kernels were compiled for, which this
            must match. Defaults to the graph's own.
        shapes: Optimisation profile, input name -> (min, opt, max) shapes, or one shape for a fixed
            size (e.g. batch × sequence bounds of input_ids). Required for inputs with dynamic dims.
        workspace_mb: Workspace memory pool limit. Defaults to TensorRT's.
        timing_cache: A timing cache file: read when it exists, written after the build. Defaults to none.
        embed_plugin: Serialise the plugin library into the engine, so that it runs where the library
            is not installed (TensorRT loads it from the engine). Defaults to False.
        save_onnx: Also write the graph TensorRT parsed (kernels as plugin fields), e.g. for trtexec
            (`trtexec_command`). Must lie beside `onnx_path` when that has external data. Defaults to none.
        show_progress: Show a progress bar. Defaults to when stderr is a terminal.

    Returns:
        The engine path.

    Raises:
        MoexportError: No TensorRT, unreadable ONNX, moexport nodes without kernels, bad shapes or
            precision, or a failed build (with the plugins' or TensorRT's reason).
    """
    dtype = None if dtype is None else dtype_name(dtype)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise MoexportError(str(onnx_path), "does not exist")
    for output in (engine_path, save_onnx):
        if output is not None and not Path(output).parent.is_dir():
            raise MoexportError(str(output), "is in a folder that does not exist")
    if _backend_module() is None:
        raise MoexportError("TensorRT", "is not installed",
                            "install TensorRT >= 10, or `pip install tensorrt-rtx` to build engines without a GPU")
    profile_shapes = _profile_shapes(load_model(onnx_path, load_external_data=False), shapes)
    with progress("building a TensorRT engine", enabled=show_progress) as advance:
        advance(0, description="parsing")
        parsed = _Parsed(onnx_path, dtype)
        trt, builder = parsed.trt, parsed.builder
        config = builder.create_builder_config()
        flag = {"float16": "FP16", "bfloat16": "BF16"}.get(dtype)
        if flag and not parsed.plugins and hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if workspace_mb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if embed_plugin and parsed.library is not None:
            config.plugins_to_serialize = [str(parsed.library)]
        cache = _timing_cache(config, timing_cache)
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        monitor = _monitor(trt, advance)  # kept alive while TensorRT calls it
        config.progress_monitor = monitor
        engine = builder.build_serialized_network(parsed.network, config)
    if engine is None:
        raise MoexportError(str(onnx_path), f"{trt.__name__} {trt.__version__} failed to build an engine: "
                            f"{_failure(parsed.logger, 'no reason given')}")
    if cache is not None:
        write_atomically(Path(timing_cache), lambda tmp: tmp.write_bytes(memoryview(cache.serialize())))
    write_atomically(engine_path, lambda tmp: tmp.write_bytes(memoryview(engine)))
    if save_onnx is not None:
        _save_parsed(parsed.model, onnx_path, Path(save_onnx))
    return engine_path


def _serialized(model: onnx.ModelProto, culprit: Path) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError:  # protobuf's 2 GB limit, with the kernels added as attributes
        raise MoexportError(str(culprit), "is over 2 GB with its kernels as plugin fields",
                            "save it with its weights as external data (onnx.save(..., save_as_external_data=True))"
                            ) from None


def _timing_cache(config, path: str | os.PathLike | None):
    """The builder's timing cache, read from `path` where that exists; None without a path."""
    if path is None:
        return None
    path = Path(path)
    if not path.parent.is_dir():
        raise MoexportError(str(path), "is in a folder that does not exist")
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if cache is None:
        raise MoexportError(str(path), "is not a timing cache this TensorRT reads", "delete it to start a new one")
    config.set_timing_cache(cache, False)
    return cache


def _save_parsed(model: onnx.ModelProto, source: Path, target: Path) -> None:
    external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    if external and target.parent.resolve() != source.parent.resolve():
        raise MoexportError(str(target), f"must lie beside {source.name}, whose weights it refers to (external data)")
    write_atomically(target, lambda tmp: tmp.write_bytes(_serialized(model, source)))


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, shapes: Shapes | None = None,
                    dtype: str | None = None, plugins: bool = True, embed_plugin: bool | None = None,
                    timing_cache: str | os.PathLike | None = None, workspace_mb: int | None = None) -> str:
    """The trtexec command (TensorRT >= 10) that builds the engine `build_engine` builds with these options.

    Args:
        onnx_path: The graph trtexec parses: for a graph with moexport nodes, the one `build_engine`
            writes with `save_onnx` (kernels as plugin fields).
        engine_path: The engine file.
        shapes, dtype, embed_plugin, timing_cache, workspace_mb: As for `build_engine`.
        plugins: Whether the graph has moexport nodes (the plugin library is loaded, the network
            strongly typed). Defaults to True.
    """
    words = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if plugins:
        library = trt_library()
        words += [f"--dynamicPlugins={library}", "--stronglyTyped"]
        if embed_plugin:
            words.append(f"--setPluginsToSerialize={library}")
    elif dtype in ("float16", "bfloat16"):
        words.append("--fp16" if dtype == "float16" else "--bf16")
    bounds = {name: _bounds(name, value) for name, value in (shapes or {}).items()}
    for i, option in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
        if bounds:
            words.append(f"{option}=" + ",".join(f"{name}:{_dims(b[i])}" for name, b in bounds.items()))
    if workspace_mb is not None:
        words.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if timing_cache is not None:
        words.append(f"--timingCacheFile={timing_cache}")
    return shlex.join(words)
