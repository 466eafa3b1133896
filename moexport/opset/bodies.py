"""Standard-ONNX computations of the op set, written once as onnxscript trace functions.

Each trace function takes an onnxscript ``OpBuilder`` and ir values and emits ONNX ops. They are the
model-local function bodies of ``TopKDispatch``, ``CVMM`` and ``SigmaMoE`` (what ONNX Runtime, or
any runtime without our kernels, inlines and runs: `moexport.opset.functions.function_body`); the
exporter builds the dispatch and portable forms of a σ-MoE layer from the same pieces
(`moexport.exporter.forms`).

Bodies are specialised per configuration (attributes, dtype, number of experts) and told apart by the
ONNX function ``overload`` field (`moexport.opset.functions.config_key`), so none of them branches on
a string attribute at run time, which TensorRT's parser could not follow.

The bodies group the rows of each expert with ``NonZero`` + ``Gather`` (unrolled over the experts)
and scatter-add the results back: only k/E of the dense FLOPs, data-dependent intermediate shapes,
fast in ONNX Runtime on the CPU (bench/results/onnx_cpu.md). Runtimes without ``NonZero`` (TensorRT
needs a plugin for it) run the op-set plugins instead.

Routing is exact whatever a runtime's TopK does with ties: TopK supplies the k best *values*, and the
expert of slot j is the m-th index (in increasing order) whose logit equals value j, where m counts
the earlier slots with the same value. That is the lower-index rule of `moexport.models.routing`;
NaN logits become -inf first, as that rule has it.
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir

FLOAT, INT32, INT64 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64


def const(op, value, dtype) -> ir.Value:
    """A Constant node holding `value` as a numpy array of `dtype`."""
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def as_float(op, x: ir.Value, dtype: ir.DataType) -> ir.Value:
    """x (of element type `dtype`) in float32: operands keep their model-dtype values, maths runs in fp32."""
    return x if dtype == FLOAT else op.Cast(x, to=FLOAT)


def round_to(op, x: ir.Value, dtype: ir.DataType) -> ir.Value:
    """A float32 value rounded to the model dtype (a no-op for float32)."""
    return x if dtype == FLOAT else op.Cast(x, to=dtype)


def activate(op, h: ir.Value, activation: str, opset: int) -> ir.Value:
    """relu, exact (erf) gelu or silu, as in `moexport.models.activations`."""
    if activation == "relu":
        return op.Relu(h)
    if activation == "silu":
        return op.Mul(h, op.Sigmoid(h))
    if opset >= 20:
        return op.Gelu(h)
    half = op.Mul(h, op.CastLike(const(op, 0.5, np.float32), h))
    erf = op.Erf(op.Div(h, op.CastLike(const(op, np.sqrt(2.0), np.float32), h)))
    return op.Mul(half, op.Add(erf, op.CastLike(const(op, 1.0, np.float32), h)))


def route(op, logits: ir.Value, *, k: int, selection: str) -> tuple[ir.Value, ir.Value]:
    """Routing of float32 logits [..., E]: (gate [..., k] float32, expert [..., k] int32), best first."""
    # NaN as -inf (the routing rule): a NaN value equals no logit, and its slot took expert 0 again
    logits = op.Where(op.IsNaN(logits), const(op, -np.inf, np.float32), logits)
    values, _ = op.TopK(logits, const(op, [k], np.int64), axis=-1, _outputs=2)
    last = const(op, -1, np.int64)
    hit = op.Equal(op.Unsqueeze(logits, [-2]), op.Unsqueeze(values, [-1]))               # [..., k, E]
    occurrence = op.CumSum(op.Cast(hit, to=FLOAT), last)                                  # 1, 2, ... per equal logit
    same = op.Cast(op.Equal(op.Unsqueeze(values, [-1]), op.Unsqueeze(values, [-2])), to=FLOAT)   # [..., k, k]
    earlier = op.ReduceSum(op.Mul(same, const(op, np.tril(np.ones((k, k)), -1), np.float32)), [-1], keepdims=1)
    pick = op.And(hit, op.Equal(occurrence, op.Add(earlier, const(op, 1.0, np.float32))))
    expert = op.Cast(op.ArgMax(op.Cast(pick, to=FLOAT), axis=-1, keepdims=0), to=INT32)
    if selection == "sigmoid":
        gate = op.Sigmoid(values)
    elif selection == "softmax_after_topk":
        gate = op.Softmax(values, axis=-1)
    else:
        gate = op.GatherElements(op.Softmax(logits, axis=-1), expert, axis=-1)
    return gate, expert


def sort_slots(op, expert: ir.Value, logits: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Counting sort of the slots of expert [N, k] by expert: (sorted_expert, sorted_slot), both [N*k] int32."""
    flat = op.Reshape(expert, const(op, [-1], np.int64))
    n_experts = op.Squeeze(op.Shape(logits, start=-1), [0])
    experts = op.Range(const(op, 0, np.int32), op.Cast(n_experts, to=INT32), const(op, 1, np.int32))
    onehot = op.Cast(op.Equal(op.Unsqueeze(flat, [-1]), experts), to=FLOAT)             # [S, E]
    first = const(op, 0, np.int64)
    within = op.ReduceSum(op.Mul(onehot, op.CumSum(onehot, first, exclusive=1)), [-1], keepdims=0)
    offsets = op.CumSum(op.ReduceSum(onehot, [0], keepdims=0), first, exclusive=1)         # [E]
    position = op.Cast(op.Add(op.Gather(offsets, flat), within), to=INT64)               # [S]
    slots = op.Range(const(op, 0, np.int32), op.Cast(op.Squeeze(op.Shape(flat), [0]), to=INT32),
                     const(op, 1, np.int32))
    sorted_slot = op.ScatterElements(slots, position, slots, axis=0)
    return op.Gather(flat, sorted_slot), sorted_slot


def expert_rows(op, expert: ir.Value, e: int) -> tuple[ir.Value, ir.Value]:
    """Positions of expert `e` in expert [N, k]: (token rows [c] int64, their slots' (n, j) pairs [c, 2])."""
    pairs = op.Transpose(op.NonZero(op.Equal(expert, const(op, e, np.int32))), perm=[1, 0])
    return op.Gather(pairs, const(op, 0, np.int64), axis=1), pairs


def unflatten(op, x, out, expert, values, *, k: int, dtype: ir.DataType, with_expert: bool):
    """The layer's outputs from token rows: y [..., dv] (out [N, dv] float32 rounded to the model dtype,
    x's leading dims) and, if `with_expert`, expert [..., k] as int64."""
    lead = op.Shape(x, end=-1)
    y = op.Reshape(round_to(op, out, dtype), op.Concat(lead, op.Shape(values, start=2), axis=0))
    if not with_expert:
        return y
    return y, op.Reshape(op.Cast(expert, to=INT64), op.Concat(lead, const(op, [k], np.int64), axis=0))


def topk_dispatch(op, logits: ir.Value, *, k: int, selection: str):
    """Body of TopKDispatch."""
    gate, expert = route(op, logits, k=k, selection=selection)
    return (gate, expert, *sort_slots(op, expert, logits))


def cvmm(op, x, sorted_expert, src_row, dst_row, weight, gate=None, *, reduce: int, k: int, n_experts: int,
         dtype: ir.DataType):
    """Body of CVMM: one gather-MatMul-scatter per expert, experts in increasing order."""
    rows = op.Shape(dst_row)
    if reduce:
        rows = op.Div(rows, const(op, [k], np.int64))
    out = op.ConstantOfShape(op.Concat(rows, op.Shape(weight, start=2), axis=0))
    for e in range(n_experts):
        slots = op.Squeeze(op.NonZero(op.Equal(sorted_expert, const(op, e, np.int32))), [0])
        product = op.MatMul(as_float(op, op.Gather(x, op.Gather(src_row, slots)), dtype),
                            as_float(op, op.Gather(weight, const(op, e, np.int64)), dtype))
        if gate is not None:
            product = op.Mul(product, op.Unsqueeze(op.Gather(gate, slots), [-1]))
        target = op.Gather(dst_row, slots)
        if reduce:
            target = op.Div(target, const(op, k, np.int32))
        out = op.ScatterND(out, op.Unsqueeze(op.Cast(target, to=INT64), [-1]), product,
                           reduction="add" if reduce else "none")
    return out


def sigma_moe(op, x, expert_sel, keys, values, bias=None, o_bias=None, *, k: int, selection: str,
              activation: str, n_experts: int, dtype: ir.DataType, opset: int, with_expert: bool):
    """Body of SigmaMoE: routing, then per expert gather its tokens, two MatMuls, scatter-add."""
    flat = op.Reshape(x, op.Concat(const(op, [-1], np.int64), op.Shape(x, start=-1), axis=0))
    # the router weight is float32 or T: a Cast to float32 serves both (a copy where it already is)
    logits = op.MatMul(as_float(op, flat, dtype), op.Transpose(op.Cast(expert_sel, to=FLOAT), perm=[1, 0]))
    gate, expert = route(op, logits, k=k, selection=selection)
    out = op.ConstantOfShape(op.Concat(op.Shape(flat, end=1), op.Shape(values, start=2), axis=0))
    for e in range(n_experts):
        index = const(op, e, np.int64)
        rows, pairs = expert_rows(op, expert, e)
        hidden = op.MatMul(as_float(op, op.Gather(flat, rows), dtype), as_float(op, op.Gather(keys, index), dtype))
        if bias is not None:
            hidden = op.Add(hidden, as_float(op, op.Gather(bias, index), dtype))
        hidden = as_float(op, round_to(op, activate(op, hidden, activation, opset), dtype), dtype)
        product = op.MatMul(hidden, as_float(op, op.Gather(values, index), dtype))
        product = op.Mul(product, op.Unsqueeze(op.GatherND(gate, pairs), [-1]))
        out = op.ScatterND(out, op.Unsqueeze(rows, [-1]), product, reduction="add")
    if o_bias is not None:
        out = op.Add(out, as_float(op, o_bias, dtype))
    return unflatten(op, x, out, expert, values, k=k, dtype=dtype, with_expert=with_expert)
