"""Compiled kernels for the moexport nodes of a graph: what lets a fused file run on the op libraries.

`attach_kernels` compiles, for every distinct node configuration (op, weight shapes, dtype,
attributes), one kernel bundle (`moexport.kernels.bundle`) and stores it once in the graph, as a
uint8 initializer that each node of that configuration takes as its last input ``kernels``. The ONNX
Runtime op library and the TensorRT plugins run those kernels; everything else (the function
bodies, `onnx.reference`, ONNX Runtime without the library) ignores the input.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from moexport.core.errors import MoexportError
from moexport.core.onnx_files import FLOAT_TYPES
from moexport.exporter.forms import unique_name
from moexport.kernels import bundle as bundles
from moexport.kernels.plan import MoEShape
from moexport.opset import DOMAIN, node_config
from moexport.opset.functions import KERNELS, SIGNATURES, culprit, kernels_input, tensor_types

BUNDLE_PREFIX = "moexport.kernels."


@dataclass
class KernelsReport:
    """What `attach_kernels` compiled: per bundle its op, nodes and size; nodes it left without kernels."""

    archs: tuple[int, ...] = ()
    bundles: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(b["bytes"] for b in self.bundles)

    def __str__(self) -> str:
        if not self.bundles and not self.skipped:
            return "no compiled kernels: the graph has no moexport node"
        targets = ", ".join(f"sm_{sm}" for sm in self.archs)
        nodes = sum(b["nodes"] for b in self.bundles)
        lines = [f"compiled kernels for {targets}: {len(self.bundles)} bundle(s), {self.total_bytes / 1e6:.2f} MB, "
                 f"shared by {nodes} node(s)"]
        lines += [f"not compiled: {reason}" for reason in self.skipped]
        return "\n".join(lines)


def triton_available() -> bool:
    """Whether kernels can be compiled here (Triton is the compiler; `pip install 'moexport[triton]'`)."""
    return importlib.util.find_spec("triton") is not None


def _shape(types: dict, name: str) -> tuple | None:
    entry = types.get(name)
    return None if entry is None or not all(isinstance(d, int) for d in entry[1]) else entry[1]


def _sigma_moe(node: onnx.NodeProto, config: dict, types: dict, zero_bias: Callable[[str, tuple, int], str],
               max_tokens: int) -> bundles.OpKernels:
    names = dict(zip(SIGNATURES["SigmaMoE"][0], list(node.input) + [""] * 7))
    n_experts, d, expert_size = _shape(types, names["keys"])
    values = _shape(types, names["values"])
    if values is None or len(values) != 3:
        raise MoexportError(culprit(node), f"values {names['values']!r} have no static [E, G, v_dim] shape")
    router = FLOAT_TYPES.get(types.get(names["expert_sel"], (None,))[0])
    if router not in ("float32", config["dtype"]):
        raise MoexportError(culprit(node), f"has a router weight of type {router or 'unknown'}",
                            f"the op set takes float32 or the layer's dtype ({config['dtype']})")
    if bool(names["bias"]) != bool(names["o_bias"]):  # the kernels add both or neither: zeros are exact
        elem_type = types[names["keys"]][0]
        if not names["bias"]:
            node.input[4] = zero_bias(f"{names['keys']}.zero_bias", (n_experts, expert_size), elem_type)
        else:
            while len(node.input) < 6:
                node.input.append("")
            node.input[5] = zero_bias(f"{names['keys']}.zero_o_bias", (values[2],), elem_type)
    shape = MoEShape(d, n_experts, expert_size, values[2], config["k"], config["dtype"], config["selection"],
                     config["activation"], bool(names["bias"] or names["o_bias"]))
    return bundles.sigma_moe_kernels(shape, router_dtype=router, expert_output=config["with_expert"],
                                     max_tokens=max_tokens)


def _op_kernels(node: onnx.NodeProto, types: dict, zero_bias, max_tokens: int) -> bundles.OpKernels:
    config = node_config(node, types)
    if node.op_type == "SigmaMoE":
        return _sigma_moe(node, config, types, zero_bias, max_tokens)
    if node.op_type == "TopKDispatch":
        logits = types.get(node.input[0], (None, ()))[1]
        if len(logits) != 2 or not isinstance(logits[1], int):
            raise MoexportError(culprit(node), "has logits without a static number of experts [N, E]")
        return bundles.topk_dispatch_kernels(logits[1], config["k"], config["selection"], max_tokens=max_tokens)
    _, d_in, d_out = _shape(types, node.input[4])
    return bundles.cvmm_kernels(config["n_experts"], d_in, d_out, config["dtype"], reduce=bool(config["reduce"]),
                                k=config["k"], gate="gate" in config["optional"], max_tokens=max_tokens * config["k"])


def attach_kernels(model: onnx.ModelProto, *, archs: tuple[int, ...] | None = None, max_tokens: int | None = None,
                   advance: Callable[..., None] | None = None) -> KernelsReport:
    """Compile the kernels of every moexport node of `model` and attach them (in place).

    Nodes that already carry kernels get new ones; bundles no node uses any more are removed. A node
    whose kernels cannot be built (e.g. a dimension that is not static) keeps running on its function
    body, and the report says why.

    Args:
        model: The graph (weights as initializers), changed in place.
        archs: GPU compute capabilities, e.g. (90,). Defaults to `moexport.kernels.bundle.DEFAULT_ARCHS`.
        max_tokens: Token counts the plans are chosen for; dispatched plans also serve more. Defaults
            to `moexport.kernels.bundle.DEFAULT_MAX_TOKENS`.
        advance: Called once per compiled bundle (progress).

    Raises:
        MoexportError: Triton is not installed, or an architecture the kernels cannot be compiled for.
    """
    archs = tuple(sorted(set(bundles.DEFAULT_ARCHS if archs is None else archs)))
    max_tokens = bundles.DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not triton_available():
        raise MoexportError("compiling kernels", "needs Triton, which is not installed",
                            "pip install 'moexport[triton]', or fuse without kernels (--no-kernels)")
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = tensor_types(inferred.graph)
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}

    def zero_bias(name: str, shape: tuple, elem_type: int) -> str:
        name = unique_name(name, taken)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), name))
        return name

    report = KernelsReport(archs=archs)
    built: dict[tuple, str] = {}  # configuration -> initializer name
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in SIGNATURES:
            continue
        formal = SIGNATURES[node.op_type][0]
        try:
            kernels = _op_kernels(node, types, zero_bias, max_tokens)
        except MoexportError as error:
            report.skipped.append(f"{culprit(node)}: {error.problem}")
            continue
        key = (kernels.op, repr(sorted(kernels.config.items())), max_tokens)
        if key not in built:
            data = bundles.build_bundle(kernels, archs=archs)
            name = unique_name(f"{BUNDLE_PREFIX}{kernels.op}.{bundles.read_bundle(data)['key']}", taken)
            graph.initializer.append(numpy_helper.from_array(np.frombuffer(data, np.uint8), name))
            built[key] = name
            report.bundles.append({"name": name, "op": kernels.op, "nodes": 0, "bytes": len(data)})
            if advance:
                advance()
        while len(node.input) < len(formal):
            node.input.append("")
        node.input[formal.index(KERNELS)] = built[key]
        next(b for b in report.bundles if b["name"] == built[key])["nodes"] += 1
    _drop_unused_bundles(graph)
    return report


def detach_kernels(model: onnx.ModelProto) -> None:
    """Take the compiled kernels off every moexport node of `model` (in place) and drop their bundles."""
    for node in model.graph.node:
        if kernels_input(node):
            del node.input[SIGNATURES[node.op_type][0].index(KERNELS):]
            while node.input and node.input[-1] == "":
                node.input.pop()
    _drop_unused_bundles(model.graph)


def _drop_unused_bundles(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if not t.name.startswith(BUNDLE_PREFIX) or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def kernel_bundles(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The kernel bundles a graph carries: name, op, config, targets, bytes and the nodes that use each."""
    users: dict[str, list[str]] = {}
    for node in model.graph.node:
        if kernels_input(node):
            users.setdefault(kernels_input(node), []).append(node.name or node.output[0])
    found = []
    for tensor in model.graph.initializer:
        if tensor.name in users:
            data = numpy_helper.to_array(tensor).tobytes()
            manifest = bundles.read_bundle(data)
            found.append({"name": tensor.name, "op": manifest["op"], "config": manifest["config"],
                          "archs": manifest["archs"], "bytes": len(data), "nodes": users[tensor.name]})
    return found
