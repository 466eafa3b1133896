"""NumPy reference implementations of the op set, their `onnx.reference` operators and evaluator.

Written directly from the contract in `moexport.opset.schemas` (not from the ONNX function bodies),
so that comparing the two checks the bodies. Numerics follow `moexport.models.sigma_moe`: float32
logits and accumulation, the hidden activation rounded once to the model dtype, one final rounding.
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
from onnx.reference.op_run import OpRun

from moexport.core.onnx_files import load_model
from moexport.opset.schemas import DOMAIN, check_opset_imports

_erf = np.vectorize(math.erf, otypes=[np.float64])
ACTIVATIONS = {
    "relu": lambda h: np.maximum(h, np.float32(0)),
    "gelu": lambda h: (0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))).astype(np.float32),
    "silu": lambda h: (h / (1.0 + np.exp(-h.astype(np.float64)))).astype(np.float32),
}


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def route(logits: np.ndarray, k: int, selection: str) -> tuple[np.ndarray, np.ndarray]:
    """(gate [..., k] float32, expert [..., k] int64): rank by logit, lower index first among equals,
    NaN as -inf (in the ranking and the gates)."""
    logits = np.where(np.isnan(logits), np.float32(-np.inf), logits)
    expert = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    with np.errstate(over="ignore", invalid="ignore"):  # exp(inf) is inf, -inf - -inf is NaN: as in float32
        if selection == "sigmoid":
            gate = 1.0 / (1.0 + np.exp(-np.take_along_axis(logits, expert, -1).astype(np.float64)))
        elif selection == "softmax":
            gate = np.take_along_axis(_softmax(logits), expert, -1)
        else:
            gate = _softmax(np.take_along_axis(logits, expert, -1))
    return gate.astype(np.float32), expert


def topk_dispatch(logits: np.ndarray, k: int, selection: str = "sigmoid"):
    """TopKDispatch: (gate, expert, sorted_expert, sorted_slot)."""
    gate, expert = route(logits.astype(np.float32), k, selection)
    flat = expert.reshape(-1)
    sorted_slot = np.argsort(flat, kind="stable")
    return gate, expert.astype(np.int32), flat[sorted_slot].astype(np.int32), sorted_slot.astype(np.int32)


def cvmm(x, sorted_expert, src_row, dst_row, weight, gate=None, reduce: int = 0, k: int = 1) -> np.ndarray:
    """CVMM: per sorted row s, x[src_row[s]] @ W[sorted_expert[s]] (times gate[s]), written or summed."""
    # expert by expert: gathering a weight matrix per row took S x d_in x d_out floats (8.6 GB at
    # 131072 rows of 256 x 64, which killed test workers on the GPU machine)
    products = np.zeros((len(src_row), weight.shape[2]), np.float32)
    for e in np.unique(sorted_expert):
        rows = np.flatnonzero(sorted_expert == e)
        products[rows] = x[src_row[rows]].astype(np.float32) @ weight[e].astype(np.float32)
    if gate is not None:
        products = products * gate[:, None]
    rows = len(dst_row) // k if reduce else len(dst_row)
    out = np.zeros((rows, weight.shape[2]), np.float32)
    if reduce:
        np.add.at(out, dst_row // k, products)  # in increasing s, i.e. expert order
    else:
        out[dst_row] = products
    return out


def sigma_moe(x, expert_sel, keys, values, bias=None, o_bias=None, k: int = 1, selection: str = "sigmoid",
              activation: str = "relu", with_expert: bool = False):
    """SigmaMoE: y [..., dv] in x's dtype (and expert [..., k] int64)."""
    flat = x.reshape(-1, x.shape[-1])
    # the product in float64, rounded once: equal router rows give equal logits (see models.routing)
    logits = (flat.astype(np.float64) @ expert_sel.astype(np.float64).T).astype(np.float32)
    gate, expert = route(logits, k, selection)
    out = np.zeros((flat.shape[0], values.shape[2]), np.float32)
    for e in range(keys.shape[0]):
        rows, slots = np.nonzero(expert == e)
        hidden = flat[rows].astype(np.float32) @ keys[e].astype(np.float32)
        if bias is not None:
            hidden = hidden + bias[e].astype(np.float32)
        hidden = ACTIVATIONS[activation](hidden).astype(x.dtype).astype(np.float32)
        np.add.at(out, rows, (hidden @ values[e].astype(np.float32)) * gate[rows, slots][:, None])
    if o_bias is not None:
        out = out + o_bias.astype(np.float32)
    y = out.astype(x.dtype).reshape(*x.shape[:-1], values.shape[2])
    return (y, expert.reshape(*x.shape[:-1], k)) if with_expert else y


class TopKDispatch(OpRun):
    op_domain = DOMAIN

    def _run(self, logits, kernels=None, k=None, selection=None, plugin_namespace=None, plugin_version=None):
        return topk_dispatch(logits, k, selection or "sigmoid")


class CVMM(OpRun):
    op_domain = DOMAIN

    def _run(self, x, sorted_expert, src_row, dst_row, W, gate=None, kernels=None, reduce=None, k=None,
             plugin_namespace=None, plugin_version=None):
        return (cvmm(x, sorted_expert, src_row, dst_row, W, gate, reduce or 0, k or 1),)


class SigmaMoE(OpRun):
    op_domain = DOMAIN

    def _run(self, x, expert_sel, keys, values, bias=None, o_bias=None, kernels=None, k=None, selection=None,
             activation=None, plugin_namespace=None, plugin_version=None):
        result = sigma_moe(x, expert_sel, keys, values, bias, o_bias, k, selection or "sigmoid",
                           activation or "relu", with_expert=len(self.onnx_node.output) > 1)
        return result if isinstance(result, tuple) else (result,)


REFERENCE_OPS = [TopKDispatch, CVMM, SigmaMoE]


def reference_evaluator(model: str | os.PathLike | onnx.ModelProto):
    """An `onnx.reference.ReferenceEvaluator` that runs the moexport ops with their NumPy references."""
    from onnx.reference import ReferenceEvaluator

    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    check_opset_imports(proto, "the model" if isinstance(model, onnx.ModelProto) else str(model))
    # The op set's function bodies are not run (REFERENCE_OPS replace them), but ReferenceEvaluator
    # prepares every model-local function, and it cannot prepare one with Gelu (opset 20 bodies): a copy
    # without them is evaluated.
    kept = [f for f in proto.functions if f.domain != DOMAIN]
    if len(kept) != len(proto.functions):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = copy
        del proto.functions[:]
        proto.functions.extend(kept)
    return ReferenceEvaluator(proto, new_ops=REFERENCE_OPS)
