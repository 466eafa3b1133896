"""The dispatch and portable forms of a σ-MoE layer, and the lowering of ``SigmaMoE`` nodes to them.

`lower` replaces each ``SigmaMoE`` node by its *dispatch* form (router MatMul, ``TopKDispatch``, two
``CVMM``) or its *portable* form (standard ops only), rewriting the layer's parameters into the
layouts that form uses. The same trace functions are the templates that `moexport.exporter.surgeon`
matches to fuse graphs back into ``SigmaMoE``.

Forms and their cost (measured on 2 CPU cores, see bench/results/onnx_cpu.md):

- the dispatch form runs the op set's ``TopKDispatch`` and ``CVMM`` (their function bodies in ONNX
  Runtime, the op-set kernels where registered): k/E of the dense expert FLOPs.
- the portable form is *dense-masked*: every expert's hidden units are computed and multiplied by a
  [.., E] gate mask that is zero outside the selected experts. Static shapes, only MatMul-class ops,
  parsable by any TensorRT; E/k times the expert FLOPs. A per-slot gather of expert weights would only
  pay for fewer than E/k tokens and moves k·d·G weights per token, so it is not emitted.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper
from onnxscript import ir

from moexport.core.errors import MoexportError
from moexport.opset.bodies import INT64, activate, as_float, const, round_to, route, unflatten
from moexport.opset.functions import (
    IR_DTYPES,
    SIGNATURES,
    attach_functions,
    build_function,
    config_key,
    culprit,
    default_opset,
    node_config,
    tensor_types,
)
from moexport.opset.schemas import DOMAIN, PLUGIN_ATTRIBUTES

# Domain of the temporary function that a SigmaMoE node is replaced by before inlining.
EXPANSION_DOMAIN = "moexport.expansion"
# Name of a layer's expert indices [..., k] in exported graphs: "experts" (a lone layer) or "experts.<path>".
EXPERTS_PREFIX = "experts"


def layer_output_name(prefix: str, module_path: str) -> str:
    """Name of a per-layer output: `prefix` for a model that is one layer (path ""), else `prefix.<path>`."""
    return f"{prefix}.{module_path}" if module_path else prefix


def routing_name(module_path: str) -> str:
    """Name of the expert indices of the σ-MoE layer at `module_path`."""
    return layer_output_name(EXPERTS_PREFIX, module_path)


def is_routing_name(name: str) -> bool:
    """Whether a tensor name is that of a layer's expert indices (see `routing_name`)."""
    return name == EXPERTS_PREFIX or name.startswith(EXPERTS_PREFIX + ".")


def dispatch_form(op, x, router_w, keys, values, bias=None, o_bias=None, *, k: int, selection: str,
                  activation: str, dtype: ir.DataType, opset: int, with_expert: bool, d_model: int, **_):
    """A σ-MoE layer as router MatMul -> TopKDispatch -> CVMM -> activation -> CVMM.

    Parameter layouts: router_w [d, E] float32, keys [E, d, G] T, values [E, G, dv] T, bias [E, G]
    float32, o_bias [dv] float32.
    """
    moe = op.builder.opset(DOMAIN, 1)
    flat = op.Reshape(x, const(op, [-1, d_model], np.int64))
    logits = op.MatMul(as_float(op, flat, dtype), router_w)
    gate, expert, sorted_expert, sorted_slot = moe.TopKDispatch(
        logits, k=k, selection=selection, **PLUGIN_ATTRIBUTES, _outputs=4)
    src_row = op.Div(sorted_slot, const(op, k, np.int32))
    hidden = moe.CVMM(flat, sorted_expert, src_row, sorted_slot, keys, reduce=0, k=k, **PLUGIN_ATTRIBUTES)
    if bias is not None:
        hidden = op.Add(hidden, op.Gather(bias, op.Reshape(expert, const(op, [-1], np.int64))))
    hidden = round_to(op, activate(op, hidden, activation, opset), dtype)
    slot_gate = op.Gather(op.Reshape(gate, const(op, [-1], np.int64)), sorted_slot)
    out = moe.CVMM(hidden, sorted_expert, sorted_slot, sorted_slot, values, slot_gate, reduce=1, k=k,
                   **PLUGIN_ATTRIBUTES)
    if o_bias is not None:
        out = op.Add(out, o_bias)
    return unflatten(op, x, out, expert, values, k=k, dtype=dtype, with_expert=with_expert)


def dispatch_route(op, logits: ir.Value, *, k: int, selection: str) -> tuple[ir.Value, ir.Value]:
    """`route` as one TopKDispatch node (what the graph surgeon's routing fusion leaves)."""
    gate, expert, _, _ = op.builder.opset(DOMAIN, 1).TopKDispatch(logits, k=k, selection=selection,
                                                                    **PLUGIN_ATTRIBUTES, _outputs=4)
    return gate, expert


def portable_form(op, x, router_w, w1, w2, b1=None, o_bias=None, *, k: int, selection: str, activation: str,
                  dtype: ir.DataType, opset: int, with_expert: bool, n_experts: int, expert_size: int,
                  routing=route, **_):
    """A σ-MoE layer in standard ops, dense-masked, any input rank.

    Parameter layouts: router_w [d, E] float32, w1 [d, E*G] T (column e*G+g), w2 [E*G, dv] T,
    b1 [E*G] T, o_bias [dv] T. `routing` is `route` (standard ops) or `dispatch_route`.
    """
    logits = op.MatMul(as_float(op, x, dtype), router_w)
    gate, expert = routing(op, logits, k=k, selection=selection)
    chosen = op.Equal(op.Unsqueeze(expert, [-1]), const(op, np.arange(n_experts), np.int32))     # [..., k, E]
    mask = op.ReduceSum(op.Where(chosen, op.Unsqueeze(gate, [-1]), const(op, 0.0, np.float32)), [-2], keepdims=0)
    hidden = op.MatMul(x, w1)
    if b1 is not None:
        hidden = op.Add(hidden, b1)
    column_expert = const(op, np.repeat(np.arange(n_experts), expert_size), np.int64)
    weight = round_to(op, op.Gather(mask, column_expert, axis=-1), dtype)
    y = op.MatMul(op.Mul(activate(op, hidden, activation, opset), weight), w2)
    if o_bias is not None:
        y = op.Add(y, o_bias)
    return (y, op.Cast(expert, to=INT64)) if with_expert else y


FORMS = ("dispatch", "portable")


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or the first of name_1, name_2, ... not in `taken`; the choice is added to `taken`."""
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    taken.add(candidate)
    return candidate


def form_parameters(form: str, params: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    """A σ-MoE layer's parameters (SigmaMoE layouts) in the layouts of `form` (see the form functions above)."""
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


def router_weight(weight: np.ndarray, model_dtype: np.dtype) -> np.ndarray:
    """A router weight in the model dtype where that dtype holds it exactly (every half-precision export:
    the router was in that dtype before the export widened it), else in float32. SigmaMoE takes either
    and routes in float32 alike; the kernels read half the bytes of a half-precision weight, and the
    route kernel multiplies it at the half rate (a float32 one it splits into half-precision parts)."""
    weight = weight.astype(np.float32)
    if model_dtype != np.float32:
        narrow = weight.astype(model_dtype)
        if np.array_equal(narrow.astype(np.float32), weight):
            return narrow
    return weight


def sigma_moe_parameters(form: str, params: dict[str, np.ndarray | None], n_experts: int) -> dict[str, np.ndarray | None]:
    """The inverse of `form_parameters`: SigmaMoE layouts from the layouts of `form`."""
    router_w = params["router_w"]
    model_dtype = (params["keys"] if form == "dispatch" else params["w1"]).dtype
    expert_sel = np.ascontiguousarray(router_weight(router_w.T, model_dtype))
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
                  expert_size: int, routing=route) -> onnx.FunctionProto:
    """A function whose body is the dispatch or portable form of a SigmaMoE node of this configuration.

    `routing` (portable form only): `route` or `dispatch_route`.
    """
    trace = dispatch_form if form == "dispatch" else portable_form
    settings = {"routing": routing, "k": config["k"], "selection": config["selection"], "activation": config["activation"],
                "dtype": IR_DTYPES[config["dtype"]], "opset": opset,
                "with_expert": config["with_expert"], "d_model": d_model, "n_experts": config["n_experts"],
                "expert_size": expert_size}
    return build_function(lambda op, *values: trace(op, *values, **settings), FORM_INPUTS[form], present,
                          domain=EXPANSION_DOMAIN, name="SigmaMoE",
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
        node.domain, node.overload = EXPANSION_DOMAIN, function.overload
        if advance:
            advance()
    if not functions:
        return attach_functions(model)
    model.functions.extend(functions.values())
    model.opset_import.append(helper.make_opsetid(EXPANSION_DOMAIN, 1))
    inlined = onnx.inliner.inline_selected_functions(model, [(EXPANSION_DOMAIN, "SigmaMoE")])
    model.CopyFrom(inlined)
    kept = [f for f in model.functions if f.domain != EXPANSION_DOMAIN]
    del model.functions[:]
    model.functions.extend(kept)
    imports = [o for o in model.opset_import if o.domain != EXPANSION_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    remove_unused_initializers(model.graph)
    return attach_functions(model)


def _initializer(node: onnx.NodeProto, name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if name == "":
        return None
    if name not in inits:
        raise MoexportError(culprit(node), f"parameter {name!r} is not an initializer",
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
