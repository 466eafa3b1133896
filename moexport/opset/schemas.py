"""The moexport ONNX op set (domain ``moexport``, version 1): names, attributes and schemas.

This module is the *contract* between the exporter, the function bodies, ONNX Runtime, the Triton
kernels and the TensorRT plugins. The schemas are registered with ``onnx.defs`` when this module is
imported (importing `moexport.opset` does), so ``onnx.checker`` and ONNX shape inference accept
graphs with these nodes.

Shapes are static functions of the input shapes and attributes; nothing is data dependent.
Index tensors are int32. ``T`` is float32, float16 or bfloat16.

``TopKDispatch(logits) -> gate, expert, sorted_expert, sorted_slot``
    logits [N, E] float32 router logits. Attributes: ``k`` (1 <= k <= E), ``selection``
    ('sigmoid' | 'softmax' | 'softmax_after_topk'; default 'sigmoid').
    Experts are ranked by logit, equal logits -> lower expert index first, the k slots of a token
    best first (`moexport.models.routing`). Slot j of token n is s = n*k + j. A NaN logit counts as
    -inf, in the ranking and in the gates (a row of NaN takes experts 0..k-1).
    gate [N, k] float32: sigmoid(logit) | softmax over all E, gathered | softmax over the k logits.
    expert [N, k] int32. sorted_expert [N*k] int32: the slots' experts in ascending order.
    sorted_slot [N*k] int32: the slots in that order, a *stable* sort (ascending slot within one
    expert), so sorted_expert[i] == expert.flat[sorted_slot[i]].

``CVMM(x, sorted_expert, src_row, dst_row, W, gate?) -> out``
    x [R, d_in] T; sorted_expert, src_row, dst_row [S] int32; W [E, d_in, d_out] T; optional
    gate [S] float32. Attributes: ``reduce`` (0 | 1; default 0), ``k`` (default 1).
    Row products are computed from T operands with float32 accumulation; out is float32.
    reduce=0: out [S, d_out], out[dst_row[s]] = (gate[s] *) x[src_row[s]] @ W[sorted_expert[s]];
    dst_row must be a permutation of 0..S-1.
    reduce=1: out [S/k, d_out], out[n] = sum over s with dst_row[s] // k == n, in increasing s, of
    (gate[s] *) x[src_row[s]] @ W[sorted_expert[s]]; S must be a multiple of k.

``SigmaMoE(x, expert_sel, keys, values, bias?, o_bias?) -> y, expert?``
    x [..., d] T; expert_sel [E, d] float32 or T (the router runs in float32 either way: a T weight is
    exact in it; `moexport fuse` stores T where T holds the weight exactly); keys [E, d, G] T;
    values [E, G, dv] T; optional bias [E, G] T and o_bias [dv] T. Attributes: ``k``,
    ``selection`` (as TopKDispatch), ``activation`` ('relu' | 'gelu' | 'silu'; default 'relu').
    y [..., dv] T = sum over the k selected experts e of gate_e * act(x @ keys[e] + bias[e]) @ values[e]
    + o_bias, computed as `moexport.models.sigma_moe` does (float32 logits and accumulation, the
    hidden activation rounded once to T, one final rounding). Optional expert [..., k] int64: the
    selected experts, best first (for routing checks).

Every op has a last optional input ``kernels`` (uint8 [bytes]): the compiled kernels of the node's
configuration (`moexport.kernels.bundle`), which `moexport fuse` attaches as an initializer shared by
the nodes of one configuration. Runtimes with the moexport kernels (the ONNX Runtime op library, the
TensorRT plugins) run them; the function bodies ignore it.

Every node may also carry string attributes ``plugin_namespace`` and ``plugin_version``: the TensorRT
ONNX parser uses them to find the plugin of the same name (and, with ``plugin_namespace`` present,
prefers a registered plugin over the model-local function; TensorRT >= 10.15).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto
from onnx.defs import OpSchema

from moexport.core.errors import MoexportError
from moexport.models.activations import ACTIVATIONS
from moexport.models.routing import SELECTIONS

DOMAIN = "moexport"
VERSION = 1
PLUGIN_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": str(VERSION)}
OPS = ("TopKDispatch", "CVMM", "SigmaMoE")

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _optional(name: str, default, description: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), description)


_K = OpSchema.Attribute("k", OpSchema.AttrType.INT, "Experts (slots) per token.", required=True)
_PLUGIN = [_optional("plugin_namespace", "", "TensorRT plugin namespace."),
           _optional("plugin_version", "", "TensorRT plugin version.")]
_SELECTION = _optional("selection", "sigmoid", f"One of {', '.join(SELECTIONS)}.")


def _formal(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    """A schema's input or output."""
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, param_option=option)


# The compiled kernels of the node's configuration (a kernel bundle, `moexport.kernels.bundle`), shared
# by the nodes of that configuration: read by the ONNX Runtime op library and the TensorRT plugins,
# ignored by the function bodies.
_KERNELS = _formal("kernels", "tensor(uint8)", optional=True)


def _dims(type_proto: onnx.TypeProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    tensor = type_proto.tensor_type
    return list(tensor.shape.dim) if tensor.HasField("shape") else None


def _tensor(elem_type: int, dims: list | None) -> onnx.TypeProto:
    """A tensor type; dims entries are ints, dim names, Dimension protos or None (unknown)."""
    proto = onnx.TypeProto()
    proto.tensor_type.elem_type = elem_type
    if dims is None:
        return proto
    shape = proto.tensor_type.shape
    shape.SetInParent()
    for dim in dims:
        new = shape.dim.add()
        if isinstance(dim, onnx.TensorShapeProto.Dimension):
            new.CopyFrom(dim)
        elif isinstance(dim, int):
            new.dim_value = dim
        elif isinstance(dim, str):
            new.dim_param = dim
    return proto


def _product(a, b: int):
    """a * b for a Dimension a (None when unknown)."""
    return a.dim_value * b if a.HasField("dim_value") else None


def _infer_topk_dispatch(ctx) -> None:
    k = ctx.get_attribute("k").i
    dims = _dims(ctx.get_input_type(0))
    n = dims[0] if dims is not None and len(dims) == 2 else None
    ctx.set_output_type(0, _tensor(TensorProto.FLOAT, [n, k]))
    ctx.set_output_type(1, _tensor(TensorProto.INT32, [n, k]))
    flat = [None if n is None else _product(n, k)]
    ctx.set_output_type(2, _tensor(TensorProto.INT32, flat))
    ctx.set_output_type(3, _tensor(TensorProto.INT32, flat))


def _int_attribute(ctx, name: str, default: int) -> int:
    attribute = ctx.get_attribute(name)
    return default if attribute is None else attribute.i


def _infer_cvmm(ctx) -> None:
    reduce, k = _int_attribute(ctx, "reduce", 0), _int_attribute(ctx, "k", 1)
    rows, weight = _dims(ctx.get_input_type(1)), _dims(ctx.get_input_type(4))
    d_out = weight[2] if weight is not None and len(weight) == 3 else None
    s = rows[0] if rows is not None and len(rows) == 1 else None
    if s is not None and reduce:
        s = s.dim_value // k if s.HasField("dim_value") else None
    ctx.set_output_type(0, _tensor(TensorProto.FLOAT, [s, d_out]))


def _infer_sigma_moe(ctx) -> None:
    x_type = ctx.get_input_type(0)
    dims, values = _dims(x_type), _dims(ctx.get_input_type(3))
    d_v = values[2] if values is not None and len(values) == 3 else None
    lead = None if dims is None else dims[:-1]
    ctx.set_output_type(0, _tensor(x_type.tensor_type.elem_type, None if lead is None else lead + [d_v]))
    if ctx.get_num_outputs() > 1:
        k = ctx.get_attribute("k").i
        ctx.set_output_type(1, _tensor(TensorProto.INT64, None if lead is None else lead + [k]))


def _schemas() -> list[OpSchema]:
    topk = OpSchema(
        "TopKDispatch", DOMAIN, VERSION, "Top-k routing by logit with a stable sort of the slots by expert.",
        inputs=[_formal("logits", "tensor(float)"), _KERNELS],
        outputs=[_formal("gate", "tensor(float)"), _formal("expert", "tensor(int32)"),
                 _formal("sorted_expert", "tensor(int32)"), _formal("sorted_slot", "tensor(int32)")],
        attributes=[_K, _SELECTION, *_PLUGIN])
    cvmm = OpSchema(
        "CVMM", DOMAIN, VERSION, "Conditional vector-matrix multiplication over expert-sorted rows.",
        inputs=[_formal("x", "T"), _formal("sorted_expert", "tensor(int32)"), _formal("src_row", "tensor(int32)"),
                _formal("dst_row", "tensor(int32)"), _formal("W", "T"),
                _formal("gate", "tensor(float)", optional=True), _KERNELS],
        outputs=[_formal("out", "tensor(float)")],
        type_constraints=[("T", _FLOATS, "Operand type.")],
        attributes=[_optional("reduce", 0, "0: write row dst_row; 1: sum into token dst_row // k."),
                    _optional("k", 1, "Slots per token (used by reduce=1)."), *_PLUGIN])
    sigma = OpSchema(
        "SigmaMoE", DOMAIN, VERSION, "The σ-MoE feed-forward layer.",
        inputs=[_formal("x", "T"), _formal("expert_sel", "R"), _formal("keys", "T"), _formal("values", "T"),
                _formal("bias", "T", optional=True), _formal("o_bias", "T", optional=True), _KERNELS],
        outputs=[_formal("y", "T"), _formal("expert", "tensor(int64)", optional=True)],
        type_constraints=[("T", _FLOATS, "Model dtype."),
                          ("R", _FLOATS, "Router weight: float32, or T (the model dtype), which float32 holds exactly.")],
        attributes=[_K, _SELECTION, _optional("activation", "relu", f"One of {', '.join(ACTIVATIONS)}."),
                    *_PLUGIN])
    topk.set_type_and_shape_inference_function(_infer_topk_dispatch)
    cvmm.set_type_and_shape_inference_function(_infer_cvmm)
    sigma.set_type_and_shape_inference_function(_infer_sigma_moe)
    return [topk, cvmm, sigma]


def register_schemas() -> None:
    """Register the op set with ``onnx.defs`` (idempotent)."""
    for schema in _schemas():
        if not onnx.defs.has(schema.name, schema.since_version, schema.domain):
            onnx.defs.register_schema(schema)


def check_opset_imports(model: onnx.ModelProto, culprit: str) -> None:
    """Raise a MoexportError when `model` imports a moexport op-set version this package does not know."""
    for opset in list(model.opset_import) + [i for f in model.functions for i in f.opset_import]:
        if opset.domain == DOMAIN and opset.version != VERSION:
            raise MoexportError(culprit, f"uses moexport op-set version {opset.version}",
                                f"this moexport implements version {VERSION}; export the model again or "
                                "upgrade moexport")


register_schemas()
