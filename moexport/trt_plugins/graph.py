"""The graph TensorRT parses: moexport nodes as plugins, their compiled kernels as plugin fields.

TensorRT's ONNX parser makes a node of domain ``moexport`` the plugin of that name (namespace
moexport, version 1) and passes the node's attributes as plugin fields, typed by the attribute: an
INT becomes a kINT32 field, a STRING (any bytes) a kCHAR field of its bytes and a closing NUL, a
TENSOR a field of its element type, uint8 excluded (onnx-tensorrt, ``loadFields`` in
onnxOpImporters.cpp). Inputs, initializers included, become tensors. So the kernels, which the op
set carries as a last input (a uint8 initializer shared by the nodes of one configuration), move
into STRING attributes: the first node of each configuration gets the bundle (``kernels``), the
others an empty one, and every node the bundle's key (``kernels_key``); the plugins look bundles up
by key in the process, and an engine holds each bundle once, with the plugin of its first node.

The moexport function bodies are dropped: the parser could prefer a node's model-local function to
its plugin. The user's file is never changed; `plugin_graph` edits the model it is given.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx
from onnx import external_data_helper, helper, numpy_helper

from moexport.core.errors import MoexportError
from moexport.core.onnx_files import load_model
from moexport.kernels.bundle import read_bundle
from moexport.opset import DOMAIN, PLUGIN_ATTRIBUTES
from moexport.opset.functions import KERNELS, SIGNATURES, culprit

KERNELS_KEY = "kernels_key"


@dataclasses.dataclass
class PluginBundle:
    """One kernel bundle as the engine gets it: its key, op and config, size, and the nodes using it
    (the first of which brings its bytes)."""

    key: str
    op: str
    config: dict
    bytes: int
    nodes: list[str]


def moexport_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in SIGNATURES]


def uses_plugins(path: str | os.PathLike) -> bool:
    """Whether `build_engine` builds the ONNX file at `path` with the moexport plugins (it has moexport nodes).

    Raises:
        MoexportError: The file does not exist or is not a readable ONNX model.
    """
    return bool(moexport_nodes(load_model(path, load_external_data=False)))


def _bundle_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    if external_data_helper.uses_external_data(tensor):
        external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
    return numpy_helper.to_array(tensor).tobytes()


def plugin_graph(model: onnx.ModelProto, base_dir: str | Path) -> list[PluginBundle]:
    """Turn `model` (in place) into the graph TensorRT parses with the moexport plugins.

    Args:
        model: A graph whose moexport nodes carry compiled kernels (`moexport fuse`), loaded with or
            without its external data; nodes that this function rewrote already stay as they are.
        base_dir: The folder of the model's file (external data).

    Returns:
        The bundles, in the order of the nodes that bring them.

    Raises:
        MoexportError: A moexport node without compiled kernels, or with an empty input before a
            present one (the parser would hand the plugin a missing tensor).
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    bundles: dict[str, PluginBundle] = {}  # by initializer name (or key, in a graph this function wrote)
    for node in moexport_nodes(model):
        formal = SIGNATURES[node.op_type][0]
        index = formal.index(KERNELS)
        name = node.input[index] if index < len(node.input) else ""
        attributes = {a.name: a for a in node.attribute}
        if not name and KERNELS_KEY in attributes:  # a graph this function wrote (--save-onnx): as it is
            data = attributes[KERNELS].s if KERNELS in attributes else b""
            if data:
                manifest = read_bundle(data)
                bundles[manifest["key"]] = PluginBundle(manifest["key"], manifest["op"], manifest["config"], len(data),
                                                        [])
            if attributes[KERNELS_KEY].s.decode() in bundles:
                bundles[attributes[KERNELS_KEY].s.decode()].nodes.append(node.name or node.output[0])
            continue
        if name not in initializers:
            raise MoexportError(culprit(node), "carries no compiled kernels, which the TensorRT plugins run",
                                "fuse the model with them (moexport fuse, where Triton is installed); or export "
                                "the portable form (--mode portable), which TensorRT builds without plugins")
        data = b""  # the bundle's bytes go to its first node only
        if name not in bundles:
            data = _bundle_bytes(initializers[name], base_dir)
            manifest = read_bundle(data)
            bundles[name] = PluginBundle(manifest["key"], manifest["op"], manifest["config"], len(data), [])
        bundle = bundles[name]
        bundle.nodes.append(node.name or node.output[0])
        del node.input[index:]
        while node.input and node.input[-1] == "":
            node.input.pop()
        if "" in node.input:
            missing = formal[list(node.input).index("")]
            raise MoexportError(culprit(node), f"has no input {missing!r} but inputs after it",
                                "TensorRT plugins take no missing inputs in between; fuse the model again, which "
                                "fills a missing bias with zeros")
        kept = [a for a in node.attribute if a.name not in (KERNELS, KERNELS_KEY, *PLUGIN_ATTRIBUTES)]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend([helper.make_attribute(KERNELS, data), helper.make_attribute(KERNELS_KEY, bundle.key),
                               *(helper.make_attribute(k, v) for k, v in PLUGIN_ATTRIBUTES.items())])
    kept = [t for t in graph.initializer if t.name not in bundles]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    functions = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(functions)
    return list(bundles.values())
