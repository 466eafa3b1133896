"""The TensorRT plugins driven as TensorRT drives them, where there is no TensorRT to run an engine.

`libmoexport_trt_harness.so` (harness.cpp) opens a plugin library with dlopen and makes TensorRT's
calls on its plugins, one entry point each, with TensorRT's argument structs (mirrored here with
ctypes). `PluginHarness.prepare` makes them in TensorRT's order, from the ONNX parser's plugin to an
execution context's: createPlugin from the node's attributes (build phase), getOutputDataTypes,
supportsFormatCombination for every input and output, configurePlugin and getWorkspaceSize for the
profile, getFieldsToSerialize, createPlugin from those fields (runtime phase, as an engine is
deserialised), attachToContext and onShapeChange; the returned `PluginCall` is enqueue, on the
caller's CUDA stream with the caller's device pointers (torch tensors). On a machine without a GPU
every step but enqueue runs, and enqueue fails as TensorRT would see it: a status and a message.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from moexport.core.errors import MoexportError
from moexport.native import built_library, load
from moexport.trt_plugins.library import trt_library

HARNESS = "libmoexport_trt_harness.so"
NAMESPACE, VERSION = "moexport", "1"
MAX_DIMS = 8


class Dims(ctypes.Structure):
    _fields_ = [("nbDims", ctypes.c_int32), ("d", ctypes.c_int64 * MAX_DIMS)]


class PluginTensorDesc(ctypes.Structure):
    _fields_ = [("dims", Dims), ("type", ctypes.c_int32), ("format", ctypes.c_int32), ("scale", ctypes.c_float)]


class DynamicPluginTensorDesc(ctypes.Structure):
    _fields_ = [("desc", PluginTensorDesc), ("min", Dims), ("max", Dims), ("opt", Dims)]


class PluginField(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.c_void_p), ("type", ctypes.c_int32),
                ("length", ctypes.c_int32)]


class PluginFieldCollection(ctypes.Structure):
    _fields_ = [("nbFields", ctypes.c_int32), ("fields", ctypes.POINTER(PluginField))]


# nvinfer1::DataType and PluginFieldType values (NvInferRuntimeBase.h, NvInferPluginBase.h)
DATA_TYPES = {"float32": 0, "float16": 1, "int32": 3, "bfloat16": 7, "int64": 8}
FIELD_INT32, FIELD_CHAR, FIELD_UNKNOWN = 5, 6, 8
# bytes of one element of a field type (a field's length counts elements): float16, float32, float64,
# int8, int16, int32, char, Dims, unknown, bf16, int64
_FIELD_BYTES = {0: 2, 1: 4, 2: 8, 3: 1, 4: 2, 5: 4, 6: 1, 7: ctypes.sizeof(Dims), 8: 1, 9: 2, 10: 8}
LINEAR = 0
BUILD, RUNTIME = 0, 1

_SIGNATURES = {  # entry point: (restype, argtypes)
    "open": (ctypes.c_void_p, [ctypes.c_char_p]),
    "creator": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]),
    "field_names": (ctypes.POINTER(PluginFieldCollection), [ctypes.c_void_p]),
    "create": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(PluginField), ctypes.c_int32,
                                 ctypes.c_int32]),
    "destroy": (None, [ctypes.c_void_p]),
    "core": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int32]),
    "nb_outputs": (ctypes.c_int32, [ctypes.c_void_p]),
    "output_types": (ctypes.c_int32, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32,
                                      ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]),
    "supports": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(DynamicPluginTensorDesc),
                                  ctypes.c_int32, ctypes.c_int32]),
    "configure": (ctypes.c_int32, [ctypes.c_void_p, ctypes.POINTER(DynamicPluginTensorDesc), ctypes.c_int32,
                                   ctypes.POINTER(DynamicPluginTensorDesc), ctypes.c_int32]),
    "workspace": (ctypes.c_uint64, [ctypes.c_void_p, ctypes.POINTER(DynamicPluginTensorDesc), ctypes.c_int32,
                                    ctypes.POINTER(DynamicPluginTensorDesc), ctypes.c_int32]),
    "metadata": (ctypes.c_char_p, [ctypes.c_void_p]),
    "serialize": (ctypes.POINTER(PluginFieldCollection), [ctypes.c_void_p]),
    "attach": (ctypes.c_void_p, [ctypes.c_void_p]),
    "shape_change": (ctypes.c_int32, [ctypes.c_void_p, ctypes.POINTER(PluginTensorDesc), ctypes.c_int32,
                                      ctypes.POINTER(PluginTensorDesc), ctypes.c_int32]),
    "enqueue": (ctypes.c_int32, [ctypes.c_void_p, ctypes.POINTER(PluginTensorDesc), ctypes.POINTER(PluginTensorDesc),
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                 ctypes.c_void_p]),
    "errors": (ctypes.c_char_p, []),
}


def harness_library() -> Path:
    """Path of the harness library.

    Raises:
        MoexportError: it was not built when moexport was installed (no C++17 compiler).
    """
    return built_library(__file__, HARNESS)


def dims(shape: Sequence[int]) -> Dims:
    if len(shape) > MAX_DIMS:
        raise MoexportError(f"shape {list(shape)}", f"has more than {MAX_DIMS} dimensions")
    out = Dims()
    out.nbDims = len(shape)
    for i, d in enumerate(shape):
        out.d[i] = d
    return out


def tensor_desc(dtype: str, shape: Sequence[int]) -> PluginTensorDesc:
    return PluginTensorDesc(dims(shape), DATA_TYPES[dtype], LINEAR, -1.0)


def dynamic_desc(dtype: str, low: Sequence[int], high: Sequence[int]) -> DynamicPluginTensorDesc:
    """A profile's view of a tensor: -1 where min and max differ (as TensorRT gives it to configurePlugin)."""
    wild = [a if a == b else -1 for a, b in zip(low, high)]
    return DynamicPluginTensorDesc(tensor_desc(dtype, wild), dims(low), dims(high), dims(high))


def _array(kind, items):
    return (kind * max(1, len(items)))(*items)


class PluginHarness:
    """A plugin library (default: moexport's) opened as TensorRT opens it, with its logger finder set."""

    def __init__(self, library: str | Path | None = None):
        self.lib = load(harness_library())
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, f"moexport_harness_{name}")
            fn.restype, fn.argtypes = restype, argtypes
        path = str(library or trt_library())
        self.handle = self.lib.moexport_harness_open(path.encode())
        if not self.handle:
            raise MoexportError(path, f"cannot be opened as a plugin library: {self.errors()}")

    def errors(self) -> str:
        """What the plugins logged as errors since the last call."""
        return (self.lib.moexport_harness_errors() or b"").decode(errors="replace")

    def creator(self, op: str):
        creator = self.lib.moexport_harness_creator(self.handle, op.encode(), VERSION.encode(), NAMESPACE.encode())
        if not creator:
            raise MoexportError(f"plugin {NAMESPACE}::{op} version {VERSION}", "has no creator in the library")
        return creator

    def field_names(self, op: str) -> list[str]:
        names = self.lib.moexport_harness_field_names(self.creator(op)).contents
        return [names.fields[i].name.decode() for i in range(names.nbFields)]

    def create(self, op: str, name: str, fields: list[tuple[str, int, bytes]], *, phase: int = BUILD) -> Plugin:
        """createPlugin of `op`'s creator with fields (name, PluginFieldType, bytes) in `phase`.

        Raises:
            MoexportError: the creator returned no plugin; the message is the plugin's.
        """
        keep = [(n.encode(), ctypes.create_string_buffer(data, len(data))) for n, _, data in fields]
        array = _array(PluginField, [PluginField(n, ctypes.cast(buf, ctypes.c_void_p), kind,
                                                 len(data) // _FIELD_BYTES[kind])
                                     for (n, buf), (_, kind, data) in zip(keep, fields)])
        handle = self.lib.moexport_harness_create(self.creator(op), name.encode(), array, len(fields), phase)
        if not handle:
            raise MoexportError(f"node {name!r} ({op})", f"createPlugin failed: {self.errors()}")
        return Plugin(self, handle, op, name)


def node_fields(attributes: dict[str, Any]) -> list[tuple[str, int, bytes]]:
    """A node's attributes as TensorRT's ONNX parser passes them: INT as kINT32, STRING (str or bytes)
    as kCHAR with a closing NUL (onnx-tensorrt `loadFields`)."""
    fields = []
    for name, value in attributes.items():
        if isinstance(value, int):
            fields.append((name, FIELD_INT32, int(value).to_bytes(4, "little", signed=True)))
        else:
            data = value.encode() if isinstance(value, str) else bytes(value)
            fields.append((name, FIELD_CHAR, data + b"\0"))
    return fields


class Plugin:
    """One plugin object; each method is one TensorRT call, raising MoexportError where it fails."""

    def __init__(self, harness: PluginHarness, handle: int, op: str, name: str):
        self.harness, self.handle, self.op, self.name = harness, handle, op, name
        self.lib = harness.lib

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.moexport_harness_destroy(self.handle)
            self.handle = None

    def _fail(self, call: str):
        raise MoexportError(f"node {self.name!r} ({self.op})", f"{call} failed: {self.harness.errors()}")

    def core(self) -> tuple[str, str, str]:
        """(name, version, namespace) of IPluginV3OneCore."""
        return tuple(self.lib.moexport_harness_core(self.handle, i).decode() for i in range(3))

    @property
    def nb_outputs(self) -> int:
        n = self.lib.moexport_harness_nb_outputs(self.handle)
        if n < 0:
            self._fail("getNbOutputs")
        return n

    def output_types(self, input_dtypes: Sequence[str]) -> list[str]:
        names = {v: k for k, v in DATA_TYPES.items()}
        out = (ctypes.c_int32 * max(1, self.nb_outputs))()
        ins = _array(ctypes.c_int32, [DATA_TYPES[d] for d in input_dtypes])
        if self.lib.moexport_harness_output_types(self.handle, out, self.nb_outputs, ins, len(input_dtypes)):
            self._fail("getOutputDataTypes")
        return [names[t] for t in out[: self.nb_outputs]]

    def supports(self, pos: int, in_out: Sequence[DynamicPluginTensorDesc], nb_inputs: int) -> bool:
        array = _array(DynamicPluginTensorDesc, list(in_out))
        return bool(self.lib.moexport_harness_supports(self.handle, pos, array, nb_inputs, len(in_out) - nb_inputs))

    def configure(self, inputs: Sequence[DynamicPluginTensorDesc], outputs: Sequence[DynamicPluginTensorDesc]):
        if self.lib.moexport_harness_configure(self.handle, _array(DynamicPluginTensorDesc, list(inputs)), len(inputs),
                                               _array(DynamicPluginTensorDesc, list(outputs)), len(outputs)):
            self._fail("configurePlugin")

    def workspace_size(self, inputs: Sequence[DynamicPluginTensorDesc],
                       outputs: Sequence[DynamicPluginTensorDesc]) -> int:
        return int(self.lib.moexport_harness_workspace(self.handle, _array(DynamicPluginTensorDesc, list(inputs)),
                                                       len(inputs), _array(DynamicPluginTensorDesc, list(outputs)),
                                                       len(outputs)))

    @property
    def metadata(self) -> str:
        return (self.lib.moexport_harness_metadata(self.handle) or b"").decode()

    def serialize(self) -> list[tuple[str, int, bytes]]:
        """getFieldsToSerialize, copied: (name, PluginFieldType, bytes)."""
        collection = self.lib.moexport_harness_serialize(self.handle)
        if not collection:
            self._fail("getFieldsToSerialize")
        c = collection.contents
        return [(f.name.decode(), f.type, ctypes.string_at(f.data, f.length * _FIELD_BYTES[f.type]))
                for f in (c.fields[i] for i in range(c.nbFields))]

    def deserialize(self) -> Plugin:
        """The plugin an engine would create from this one's serialised fields (runtime phase)."""
        return self.harness.create(self.op, self.name, self.serialize(), phase=RUNTIME)

    def attach(self) -> Plugin:
        handle = self.lib.moexport_harness_attach(self.handle)
        if not handle:
            self._fail("attachToContext")
        return Plugin(self.harness, handle, self.op, self.name)

    def shape_change(self, inputs: Sequence[PluginTensorDesc], outputs: Sequence[PluginTensorDesc]):
        if self.lib.moexport_harness_shape_change(self.handle, _array(PluginTensorDesc, list(inputs)), len(inputs),
                                                  _array(PluginTensorDesc, list(outputs)), len(outputs)):
            self._fail("onShapeChange")


class PluginCall:
    """enqueue of an attached plugin with fixed tensors: calling it launches on `stream` (a cudaStream_t)."""

    def __init__(self, plugin: Plugin, in_descs, out_descs, inputs: Sequence[int], outputs: Sequence[int],
                 workspace: int, workspace_bytes: int):
        self.plugin, self.workspace_bytes = plugin, workspace_bytes
        self._args = (plugin.handle, _array(PluginTensorDesc, list(in_descs)), _array(PluginTensorDesc, list(out_descs)),
                      _array(ctypes.c_void_p, list(inputs)), _array(ctypes.c_void_p, list(outputs)), workspace)
        self._enqueue = plugin.lib.moexport_harness_enqueue

    def __call__(self, stream: int = 0) -> None:
        if self._enqueue(*self._args, stream):
            self.plugin._fail("enqueue")


def _shape_dtype(tensor) -> tuple[str, tuple[int, ...]]:
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)


def prepare(harness: PluginHarness, op: str, name: str, attributes: dict[str, Any], inputs: Sequence,
            outputs: Sequence, *, largest: Sequence[Sequence[int]] | None = None, workspace=None) -> PluginCall:
    """TensorRT's calls from the ONNX parser's plugin to an execution context's, for one node.

    Args:
        harness: The opened plugin library.
        op: SigmaMoE, TopKDispatch or CVMM.
        name: The node's name.
        attributes: The node's attributes as `moexport build` gives them to the parser (the op's,
            `kernels`, `kernels_key`).
        inputs: The op's inputs present, contiguous torch tensors (device memory for enqueue).
        outputs: Its outputs, contiguous torch tensors of the right shapes and dtypes.
        largest: The profile's largest input shapes. Defaults to the inputs' shapes.
        workspace: Allocates the workspace: bytes -> (address, keep-alive object). Defaults to a torch
            uint8 tensor on the inputs' device.

    Returns:
        The enqueue call.

    Raises:
        MoexportError: a call failed (the plugin's message), or the plugin disagrees with the tensors.
    """
    import torch

    plugin = harness.create(op, name, node_fields(attributes))
    in_types = [_shape_dtype(t) for t in inputs]
    out_types = [_shape_dtype(t) for t in outputs]
    if plugin.nb_outputs != len(outputs):
        raise MoexportError(f"node {name!r} ({op})", f"has {plugin.nb_outputs} outputs; {len(outputs)} given")
    types = plugin.output_types([d for d, _ in in_types])
    if types != [d for d, _ in out_types]:
        raise MoexportError(f"node {name!r} ({op})", f"gives outputs of types {types}; the tensors are "
                            f"{[d for d, _ in out_types]}")
    largest = [s for _, s in in_types] if largest is None else [tuple(s) for s in largest]
    dyn_in = [dynamic_desc(d, s, high) for (d, s), high in zip(in_types, largest)]
    dyn_out = [dynamic_desc(d, s, s) for d, s in out_types]
    for pos in range(len(dyn_in) + len(dyn_out)):
        if not plugin.supports(pos, dyn_in + dyn_out, len(dyn_in)):
            raise MoexportError(f"node {name!r} ({op})", f"does not support the linear {(in_types + out_types)[pos][0]} "
                                f"tensor at position {pos}")
    plugin.configure(dyn_in, dyn_out)
    size = plugin.workspace_size(dyn_in, dyn_out)
    context = plugin.deserialize().attach()
    in_descs = [tensor_desc(d, s) for d, s in in_types]
    out_descs = [tensor_desc(d, s) for d, s in out_types]
    context.shape_change(in_descs, out_descs)
    if workspace is None:
        device = inputs[0].device
        buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        address, keep = buffer.data_ptr(), buffer
    else:
        address, keep = workspace(size)
    call = PluginCall(context, in_descs, out_descs, [t.data_ptr() for t in inputs], [t.data_ptr() for t in outputs],
                      address, size)
    call.keep = (keep, list(inputs), list(outputs), plugin)
    return call
