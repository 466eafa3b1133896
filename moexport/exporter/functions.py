"""Model-local functions of the op set, and the lowering of ``SigmaMoE`` nodes to the other forms.

`attach_functions` gives every moexport node of a model the function body of its configuration
(`moexport.exporter.bodies`), told apart by the ``overload`` field, so that ONNX Runtime (or any
runtime without our kernels) inlines and runs it. `lower` replaces each ``SigmaMoE`` node by its
dispatch form (``TopKDispatch`` + ``CVMM``) or its portable form (standard ops only), rewriting the
layer's parameters into the layouts that form uses.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnxscript
from onnx import helper, numpy_helper
from onnxscript import ir

from moexport.core.errors import MoexportError
from moexport.exporter import bodies
from moexport.exporter.opset import DOMAIN, OPS, PLUGIN_ATTRIBUTES, VERSION
from moexport.models.activations import ACTIVATIONS
from moexport.models.routing import SELECTIONS

# Formal inputs, outputs and attribute defaults of each op (the schema, as the bodies need it).
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]] = {
    "TopKDispatch": (("logits",), ("gate", "expert", "sorted_expert", "sorted_slot"),
                     {"k": 1, "selection": "sigmoid"}),
    "CVMM": (("x", "sorted_expert", "src_row", "dst_row", "W", "gate"), ("out",), {"reduce": 0, "k": 1}),
    "SigmaMoE": (("x", "expert_sel", "keys", "values", "bias", "o_bias"), ("y", "expert"),
                 {"k": 1, "selection": "sigmoid", "activation": "relu"}),
}
_OPTIONAL = ("gate", "bias", "o_bias")  # the optional inputs of the op set
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.BFLOAT16: "bfloat16"}
_IR_DTYPES = {name: ir.DataType(elem_type) for elem_type, name in _DTYPES.items()}


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


def _culprit(node: onnx.NodeProto) -> str:
    """How errors name a node: by its name, else (nodes need none) by its first output."""
    return f"node {node.name or (node.output or [''])[0]!r} ({node.op_type})"


def node_config(node: onnx.NodeProto, types: dict[str, tuple[int, tuple]]) -> dict[str, Any]:
    """The configuration a moexport node's function body is specialised for.

    Raises:
        MoexportError: An unknown attribute value, or weights whose type and shape are not known.
    """
    inputs, outputs, defaults = SIGNATURES[node.op_type]
    attributes = {**defaults, **{n: v for n, v in _attributes(node).items() if n not in PLUGIN_ATTRIBUTES}}
    culprit = _culprit(node)
    unknown = set(attributes) - set(defaults)
    if unknown:
        raise MoexportError(culprit, f"has unknown attribute(s) {', '.join(sorted(unknown))}",
                            f"{node.op_type} takes {', '.join(defaults)}, plugin_namespace and plugin_version")
    present = [i < len(node.input) and node.input[i] != "" for i in range(len(inputs))]
    config = {"op_type": node.op_type, **attributes,
              "optional": tuple(name for name, here in zip(inputs, present) if here and name in _OPTIONAL)}
    if node.op_type != "TopKDispatch":
        weight = node.input[inputs.index("W" if node.op_type == "CVMM" else "keys")]
        if weight not in types or len(types[weight][1]) != 3 or not isinstance(types[weight][1][0], int):
            raise MoexportError(culprit, f"weight {weight!r} has no known type and [E, d, G] shape",
                                "weights must be initializers or graph inputs with static shapes")
        elem_type, dims = types[weight]
        if elem_type not in _DTYPES:
            raise MoexportError(culprit, f"weight {weight!r} has element type "
                                f"{onnx.TensorProto.DataType.Name(elem_type)}", f"use one of {', '.join(_DTYPES.values())}")
        config.update(n_experts=dims[0], dtype=_DTYPES[elem_type])
    if node.op_type == "SigmaMoE":
        config["with_expert"] = len(node.output) > 1 and node.output[1] != ""
    _check_config(config, culprit)
    return config


def _check_config(config: dict[str, Any], culprit: str) -> None:
    choices = {"selection": SELECTIONS, "activation": tuple(ACTIVATIONS), "reduce": (0, 1)}
    for name, allowed in choices.items():
        if name in config and config[name] not in allowed:
            raise MoexportError(culprit, f"{name}={config[name]!r} is not supported",
                                f"use one of {', '.join(map(str, allowed))}")
    if config["k"] < 1 or config["k"] > config.get("n_experts", config["k"]):
        raise MoexportError(culprit, f"k={config['k']} is out of range",
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
        settings["dtype"] = _IR_DTYPES[settings["dtype"]]
    if op_type == "SigmaMoE":
        settings["opset"] = opset
    trace = {"TopKDispatch": bodies.topk_dispatch, "CVMM": bodies.cvmm, "SigmaMoE": bodies.sigma_moe}[op_type]
    present = [name not in _OPTIONAL or name in config["optional"] for name in inputs]
    while not present[-1]:
        present.pop()
    return build_function(lambda op, *values: trace(op, *values, **settings), inputs, present, domain=DOMAIN,
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
            raise MoexportError(_culprit(node), f"has op type moexport::{node.op_type}, which is not in the op set",
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


FORMS = ("dispatch", "portable")


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or the first of name_1, name_2, ... not in `taken`; the choice is added to `taken`."""
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    taken.add(candidate)
    return candidate


def form_parameters(form: str, params: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    """A σ-MoE layer's parameters (SigmaMoE layouts) in the layouts of `form` (see `bodies`)."""
    keys, values, bias, o_bias = params["keys"], params["values"], params["bias"], params["o_bias"]
    n_experts, d_model, expert_size = keys.shape
    router_w = np.ascontiguousarray(params["expert_sel"].astype(np.float32).T)
    if form == "dispatch":
        as_float = (lambda a: None if a is None else a.astype(np.float32))
        return {"router_w": router_w, "keys": keys, "values": values, "bias": as_float(bias), "o_bias": as_float(o_bias)}
    return {"router_w": router_w,
            "w1": np.ascontiguousarray(keys.transpose(1, 0, 2).reshape(d_model, n_experts * expert_size)),
            "w2": values.reshape(n_experts * expert_size, values.shape[2]),
            "b1": None if bias is None else bias.reshape(-1), "o_bias": o_bias}


def sigma_moe_parameters(form: str, params: dict[str, np.ndarray | None], n_experts: int) -> dict[str, np.ndarray | None]:
    """The inverse of `form_parameters`: SigmaMoE layouts from the layouts of `form`."""
    router_w = params["router_w"]
    expert_sel = np.ascontiguousarray(router_w.T.astype(np.float32))
    if form == "dispatch":
        keys = params["keys"]
        cast = (lambda a: None if a is None else a.astype(keys.dtype))
        return {"expert_sel": expert_sel, "keys": keys, "values": params["values"], "bias": cast(params["bias"]),
                "o_bias": cast(params["o_bias"])}
    w1, w2, b1 = params["w1"], params["w2"], params["b1"]
    d_model, expert_size = w1.shape[0], w1.shape[1] // n_experts
    return {"expert_sel": expert_sel,
            "keys": np.ascontiguousarray(w1.reshape(d_model, n_experts, expert_size).transpose(1, 0, 2)),
            "values": w2.reshape(n_experts, expert_size, w2.shape[1]),
            "bias": None if b1 is None else b1.reshape(n_experts, expert_size), "o_bias": params["o_bias"]}


FORM_INPUTS = {"dispatch": ("x", "router_w", "keys", "values", "bias", "o_bias"),
               "portable": ("x", "router_w", "w1", "w2", "b1", "o_bias")}


def form_function(form: str, config: dict[str, Any], present: list[bool], *, opset: int, d_model: int,
                  expert_size: int, routing=bodies.route) -> onnx.FunctionProto:
    """A function whose body is the dispatch or portable form of a SigmaMoE node of this configuration.

    `routing` (portable form only): `bodies.route` or `bodies.dispatch_route`.
    """
    trace = bodies.dispatch_form if form == "dispatch" else bodies.portable_form
    settings = {"routing": routing, "k": config["k"], "selection": config["selection"], "activation": config["activation"],
                "dtype": _IR_DTYPES[config["dtype"]], "opset": opset,
                "with_expert": config["with_expert"], "d_model": d_model, "n_experts": config["n_experts"],
                "expert_size": expert_size}
    return build_function(lambda op, *values: trace(op, *values, **settings), FORM_INPUTS[form], present,
                          domain=bodies.EXPANSION_DOMAIN, name="SigmaMoE",
                          overload=f"{form}.{config_key(config)}.d{d_model}.g{expert_size}",
                          opset=opset)


def lower(model: onnx.ModelProto, form: str, *, advance=None) -> onnx.ModelProto:
    """Replace every SigmaMoE node of `model` by its `form` ('dispatch' or 'portable'), in place.

    The layer's parameters must be initializers; the rewritten layouts are added as new initializers
    (named after the layer's keys) and initializers nobody uses any more are removed.

    Args:
        model: The model, changed in place.
        form: One of `FORMS`.
        advance: Called once per lowered layer (progress). Defaults to none.

    Returns:
        `model`, its moexport nodes with function bodies (`attach_functions`).

    Raises:
        MoexportError: An unknown form, a SigmaMoE node with a bad attribute, or a parameter that is
            not an initializer.
    """
    if form not in FORMS:
        raise MoexportError(f"form={form!r}", "is not a form to lower to", f"use one of {', '.join(FORMS)}")
    graph, opset = model.graph, default_opset(model)
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for name in (i for n in graph.node for i in n.input):
        uses[name] = uses.get(name, 0) + 1
    types, taken = tensor_types(graph), set(inits) | {o for n in graph.node for o in n.output}
    functions = {}
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != "SigmaMoE":
            continue
        config = node_config(node, types)
        names = dict(zip(SIGNATURES["SigmaMoE"][0][1:], list(node.input[1:]) + [""] * 6))
        params = {name: _initializer(node, source, inits) for name, source in names.items()}
        converted = form_parameters(form, params)
        prefix = re.sub(r"keys$", "", names["keys"])
        new_inputs = [node.input[0]]
        for name in FORM_INPUTS[form][1:]:
            array = converted[name]
            if array is None or array is params.get(name):
                new_inputs.append("" if array is None else names[name])
                continue
            if names.get(name) and uses[names[name]] == 1:  # replaced in place: the old layout goes
                graph.initializer.remove(inits.pop(names[name]))
                taken.discard(names[name])
            new_inputs.append(unique_name(prefix + name, taken))
            graph.initializer.append(numpy_helper.from_array(array, new_inputs[-1]))
        while new_inputs[-1] == "":
            new_inputs.pop()
        function = form_function(form, config, [n != "" for n in new_inputs], opset=opset,
                                 d_model=params["keys"].shape[1], expert_size=params["keys"].shape[2])
        functions[function.overload] = function
        del node.input[:], node.attribute[:]
        node.input.extend(new_inputs)
        node.domain, node.overload = bodies.EXPANSION_DOMAIN, function.overload
        if advance:
            advance()
    if not functions:
        return attach_functions(model)
    model.functions.extend(functions.values())
    model.opset_import.append(helper.make_opsetid(bodies.EXPANSION_DOMAIN, 1))
    inlined = onnx.inliner.inline_selected_functions(model, [(bodies.EXPANSION_DOMAIN, "SigmaMoE")])
    model.CopyFrom(inlined)
    kept = [f for f in model.functions if f.domain != bodies.EXPANSION_DOMAIN]
    del model.functions[:]
    model.functions.extend(kept)
    imports = [o for o in model.opset_import if o.domain != bodies.EXPANSION_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    remove_unused_initializers(model.graph)
    return attach_functions(model)


def _initializer(node: onnx.NodeProto, name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if name == "":
        return None
    if name not in inits:
        raise MoexportError(_culprit(node), f"parameter {name!r} is not an initializer",
                            "the dispatch and portable forms rewrite the layer's weights, so they must be constant")
    return numpy_helper.to_array(inits[name])


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop the initializers that no node (nor a subgraph of one) reads and no graph output names."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:  # subgraphs may read outer-scope initializers
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                used |= {i for n in attribute.g.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
