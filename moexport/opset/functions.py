"""Model-local functions of the op set: the configuration of a node and its function body.

`attach_functions` gives every moexport node of a model the function body of its configuration
(`moexport.opset.bodies`), told apart by the ``overload`` field, so that ONNX Runtime (or any
runtime without our kernels) inlines and runs it.
"""
from __future__ import annotations

from typing import Any

import onnx
import onnxscript
from onnx import helper
from onnxscript import ir

from moexport.core.errors import MoexportError
from moexport.core.onnx_files import FLOAT_TYPES
from moexport.models.activations import ACTIVATIONS
from moexport.models.routing import SELECTIONS
from moexport.opset import bodies
from moexport.opset.schemas import DOMAIN, OPS, PLUGIN_ATTRIBUTES, VERSION

# Formal inputs, outputs and attribute defaults of each op (the schema, as the bodies need it).
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]] = {
    "TopKDispatch": (("logits", "kernels"), ("gate", "expert", "sorted_expert", "sorted_slot"),
                     {"k": 1, "selection": "sigmoid"}),
    "CVMM": (("x", "sorted_expert", "src_row", "dst_row", "W", "gate", "kernels"), ("out",), {"reduce": 0, "k": 1}),
    "SigmaMoE": (("x", "expert_sel", "keys", "values", "bias", "o_bias", "kernels"), ("y", "expert"),
                 {"k": 1, "selection": "sigmoid", "activation": "relu"}),
}
_OPTIONAL = ("gate", "bias", "o_bias")  # the optional inputs of the op set that take part in the computation
KERNELS = "kernels"  # every op's last input: its compiled kernels, which the function bodies ignore


def kernels_input(node: onnx.NodeProto) -> str:
    """The name of a moexport node's compiled kernels (its `kernels` input), or "" where it has none."""
    if node.domain != DOMAIN or node.op_type not in SIGNATURES:
        return ""
    index = SIGNATURES[node.op_type][0].index(KERNELS)
    return node.input[index] if index < len(node.input) else ""
IR_DTYPES = {name: ir.DataType(elem_type) for elem_type, name in FLOAT_TYPES.items()}


def tensor_types(graph: onnx.GraphProto) -> dict[str, tuple[int, tuple]]:
    """name -> (element type, dims) of the initializers, inputs and typed values of a graph."""
    table = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        table[value.name] = (tensor.elem_type, dims)
    for init in graph.initializer:
        table[init.name] = (init.data_type, tuple(init.dims))
    return table


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {name: v.decode() if isinstance(v, bytes) else v for name, v in values.items()}


def culprit(node: onnx.NodeProto) -> str:
    """How errors name a node: by its name, else (nodes need none) by its first output."""
    return f"node {node.name or (node.output or [''])[0]!r} ({node.op_type})"


def node_config(node: onnx.NodeProto, types: dict[str, tuple[int, tuple]]) -> dict[str, Any]:
    """The configuration a moexport node's function body is specialised for.

    Raises:
        MoexportError: An unknown attribute value, or weights whose type and shape are not known.
    """
    inputs, outputs, defaults = SIGNATURES[node.op_type]
    attributes = {**defaults, **{n: v for n, v in _attributes(node).items() if n not in PLUGIN_ATTRIBUTES}}
    where = culprit(node)
    unknown = set(attributes) - set(defaults)
    if unknown:
        raise MoexportError(where, f"has unknown attribute(s) {', '.join(sorted(unknown))}",
                            f"{node.op_type} takes {', '.join(defaults)}, plugin_namespace and plugin_version")
    present = [i < len(node.input) and node.input[i] != "" for i in range(len(inputs))]
    config = {"op_type": node.op_type, **attributes,
              "optional": tuple(name for name, here in zip(inputs, present) if here and name in _OPTIONAL)}
    if node.op_type != "TopKDispatch":
        weight = node.input[inputs.index("W" if node.op_type == "CVMM" else "keys")]
        if weight not in types or len(types[weight][1]) != 3 or not isinstance(types[weight][1][0], int):
            raise MoexportError(where, f"weight {weight!r} has no known type and [E, d, G] shape",
                                "weights must be initializers or graph inputs with static shapes")
        elem_type, dims = types[weight]
        if elem_type not in FLOAT_TYPES:
            raise MoexportError(where, f"weight {weight!r} has element type "
                                f"{onnx.TensorProto.DataType.Name(elem_type)}", f"use one of {', '.join(FLOAT_TYPES.values())}")
        config.update(n_experts=dims[0], dtype=FLOAT_TYPES[elem_type])
    if node.op_type == "SigmaMoE":
        config["with_expert"] = len(node.output) > 1 and node.output[1] != ""
    _check_config(config, where)
    return config


def _check_config(config: dict[str, Any], where: str) -> None:
    choices = {"selection": SELECTIONS, "activation": tuple(ACTIVATIONS), "reduce": (0, 1)}
    for name, allowed in choices.items():
        if name in config and config[name] not in allowed:
            raise MoexportError(where, f"{name}={config[name]!r} is not supported",
                                f"use one of {', '.join(map(str, allowed))}")
    if config["k"] < 1 or config["k"] > config.get("n_experts", config["k"]):
        raise MoexportError(where, f"k={config['k']} is out of range",
                            f"1 <= k <= n_experts ({config.get('n_experts', '?')})")


def config_key(config: dict[str, Any]) -> str:
    """The function overload name of a configuration, e.g. 'float32.e16.k4.sigmoid.relu.expert'."""
    parts = [config.get("dtype"), config.get("n_experts") and f"e{config['n_experts']}", f"k{config['k']}",
             config.get("selection"), config.get("activation"),
             "reduce" if config.get("reduce") else None, *config["optional"],
             "expert" if config.get("with_expert") else None]
    return ".".join(str(p) for p in parts if p)


def _strip(function: onnx.FunctionProto) -> onnx.FunctionProto:
    """Drop onnxscript's per-node tracing metadata (namespaces, class hierarchy)."""
    for node in function.node:
        del node.metadata_props[:]
    del function.value_info[:]
    return function


def build_function(trace, inputs: tuple[str, ...], present: list[bool], *, domain: str, name: str,
                   overload: str, opset: int, attributes: dict[str, Any] | None = None) -> onnx.FunctionProto:
    """Trace `trace(op, *values)` into a FunctionProto (absent optional inputs are passed as None)."""
    values = [ir.Value(name=n) if here else None for n, here in zip(inputs, present)]
    imports = {"": opset} if domain == DOMAIN else {"": opset, DOMAIN: VERSION}
    function = onnxscript.build_function(trace, values, domain=domain, name=name, opset_imports=imports,
                                         attributes=[ir.Attr(n, _attr_type(v), v) for n, v in (attributes or {}).items()])
    proto = _strip(ir.serde.serialize_function(function))
    proto.overload = overload
    del proto.input[:]
    proto.input.extend(inputs[:len(present)])
    return proto


def _attr_type(value) -> ir.AttributeType:
    return ir.AttributeType.STRING if isinstance(value, str) else ir.AttributeType.INT


def function_body(config: dict[str, Any], opset: int) -> onnx.FunctionProto:
    """The FunctionProto implementing a moexport node of this configuration."""
    op_type = config["op_type"]
    inputs, _, defaults = SIGNATURES[op_type]
    settings = {n: v for n, v in config.items() if n not in ("op_type", "optional")}
    if "dtype" in settings:
        settings["dtype"] = IR_DTYPES[settings["dtype"]]
    if op_type == "SigmaMoE":
        settings["opset"] = opset
    trace = {"TopKDispatch": bodies.topk_dispatch, "CVMM": bodies.cvmm, "SigmaMoE": bodies.sigma_moe}[op_type]
    # every formal input, `kernels` too (so a node may pass it), which the body leaves unread
    present = [name not in _OPTIONAL or name in config["optional"] for name in inputs]
    return build_function(lambda op, *values: trace(op, *values[:-1], **settings), inputs, present, domain=DOMAIN,
                          name=op_type, overload=config_key(config), opset=opset,
                          attributes={**defaults, **{n: "" for n in PLUGIN_ATTRIBUTES}})


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the standard ONNX op set (what the bodies it gets are written in)."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every moexport node the function body of its configuration; drop stale moexport functions."""
    types, opset = tensor_types(model.graph), default_opset(model)
    functions = {}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type not in OPS:
            raise MoexportError(culprit(node), f"has op type moexport::{node.op_type}, which is not in the op set",
                                f"the moexport op set version {VERSION} has {', '.join(OPS)}")
        config = node_config(node, types)
        node.overload = config_key(config)
        functions.setdefault((node.op_type, node.overload), config)
    kept = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(kept + [function_body(config, opset) for config in functions.values()])
    if functions and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    if functions and model.ir_version < 10:
        model.ir_version = 10  # function overloads
    return model
