"""The kernels as PyTorch operators: `torch.library` custom ops (CUDA-graph capturable, opaque to
torch.compile) for inference, and an autograd Function for training.

Three layers, as in scattermoe: the Triton kernels (routing, grouped, experts), the launch plans that
sequence them (plan.py, run by host.py), and these functions, which check inputs and pick plans.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from moexport.core.dtypes import dtype_name
from moexport.core.errors import MoexportError
from moexport.kernels import graphs
from moexport.kernels import plan as plans
from moexport.kernels.configs import ConfigTable, Configs, bucket
from moexport.kernels.host import run_plan
from moexport.models.routing import check_selection, gates_of

_PLANS: dict[tuple, plans.Plan] = {}


def _plan(builder, *args, **kwargs) -> plans.Plan:
    """Plans are built once per (builder, shape, token bucket, table of configs) and reused."""
    key = (builder.__name__, args, tuple(sorted(kwargs.items())))
    if key not in _PLANS:
        _PLANS[key] = builder(*args, **kwargs)
    return _PLANS[key]


def _shape(x, expert_sel, keys, values, bias, k, selection, activation) -> plans.MoEShape:
    check_selection(selection)
    E, d, G = keys.shape
    if x.shape[-1] != d or expert_sel.shape != (E, d) or values.shape[:2] != (E, G):
        raise MoexportError(f"σ-MoE tensors x {tuple(x.shape)}, expert_sel {tuple(expert_sel.shape)}, "
                            f"keys {tuple(keys.shape)}, values {tuple(values.shape)}", "do not fit together",
                            "expected x [N, d], expert_sel [E, d], keys [E, d, G], values [E, G, v_dim]")
    if not 1 <= k <= E:
        raise MoexportError(f"k={k}", f"must be between 1 and n_experts={E}")
    if activation not in plans.ACTIVATION_CODES:
        raise MoexportError(f"activation={activation!r}", "is not supported by the kernels",
                            f"use one of {', '.join(plans.ACTIVATION_CODES)}")
    return plans.MoEShape(d, E, G, values.shape[-1], k, dtype_name(x.dtype), selection, activation, bias is not None)


# (token bucket, dtype, keys shape, v_dim, k, selection, activation, bias, configs) -> plan: a repeated
# call skips building the shape key; `run_plan` still checks every input's shape against the plan
_LAYER_PLANS: dict[tuple, plans.Plan] = {}


def _layer_plan(x, expert_sel, keys, values, bias, k, selection, activation,
                configs: ConfigTable | None = None) -> plans.Plan:
    key = (bucket(x.shape[0]), x.dtype, tuple(keys.shape), values.shape[-1], k, selection, activation,
           bias is not None, configs)
    plan = _LAYER_PLANS.get(key)
    if plan is None:
        shape = _shape(x, expert_sel, keys, values, bias, k, selection, activation)
        plan = _LAYER_PLANS[key] = _plan(plans.sigma_moe_plan, shape, bucket(x.shape[0]), configs=configs)
    return plan


def _run_layer(plan: plans.Plan, x, expert_sel, keys, values, bias, o_bias) -> torch.Tensor:
    return run_plan(plan, {"x": x, "expert_sel": expert_sel, "keys": keys, "values": values, "bias": bias,
                           "o_bias": o_bias})["y"]


def _sigma_moe(x: torch.Tensor, expert_sel: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               bias: Optional[torch.Tensor], o_bias: Optional[torch.Tensor], k: int, selection: str,
               activation: str) -> torch.Tensor:
    plan = _layer_plan(x, expert_sel, keys, values, bias, k, selection, activation)
    return _run_layer(plan, x, expert_sel, keys, values, bias, o_bias)


_sigma_moe_op = torch.library.custom_op("moexport::sigma_moe", _sigma_moe, mutates_args=())


@_sigma_moe_op.register_fake
def _(x, expert_sel, keys, values, bias, o_bias, k, selection, activation):
    return x.new_empty(x.shape[0], values.shape[-1])


def _plain_eager(x: torch.Tensor) -> bool:
    """True when nothing traces the call: no compiler, no fake or functional tensor, no dispatch
    mode. Then the custom op's dispatcher would only add host time."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _current_dispatch_mode() is None)


def sigma_moe_forward(x: torch.Tensor, expert_sel: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *,
                      k: int, selection: str | None = None, activation: str | None = None,
                      bias: torch.Tensor | None = None, o_bias: torch.Tensor | None = None,
                      cuda_graph: bool | None = None, configs: Configs = None) -> torch.Tensor:
    """Inference forward of a σ-MoE layer on the kernels: x [..., d] -> y [..., v_dim].

    Few tokens run the gather sequence (2 launches), more the dispatched one (3 to 5 launches; see
    `plan.sigma_moe_plan`); none synchronises with the host, so the call can be captured in a
    CUDA graph. Under torch.compile, torch.export or a dispatch mode it is the custom op
    `moexport::sigma_moe`; a plain eager call skips the op's dispatcher and launches the same plan
    directly, or on request replays it from a cached CUDA graph (`graphs`; a fresh output tensor).

    Args:
        x: Tokens [..., d]; all tensors share its dtype and device.
        expert_sel, keys, values: The layer's parameters ([E, d], [E, d, G], [E, G, v_dim]).
        k: Experts per token.
        selection: 'sigmoid', 'softmax' or 'softmax_after_topk'. Defaults to 'sigmoid'.
        activation: 'relu', 'gelu' or 'silu'. Defaults to 'relu'.
        bias, o_bias: Hidden bias [E, G] and output bias [v_dim]. Defaults to none.
        cuda_graph: Replay plain eager CUDA calls from a cached CUDA graph (less host time, a
            little more GPU time): True at any size, False never. Defaults to never, or with
            MOEXPORT_CUDA_GRAPHS=1 for inputs up to `graphs.MAX_INPUT_BYTES`.
        configs: Measured configs to plan with in place of the shipped ones (benchmarks, tuning), for
            plain eager calls: a `configs.ConfigTable` (plans are cached per table) or a mapping of
            keys to configs. Defaults to the shipped table.

    Returns:
        y [..., v_dim] in x's dtype.

    Raises:
        MoexportError: tensors whose shapes or dtypes do not fit together, k outside
            [1, n_experts], an unknown selection or activation, `configs` for a traced call.
    """
    flat = x.reshape(-1, x.shape[-1])
    selection, activation = selection or "sigmoid", activation or "relu"
    weights = (expert_sel, keys, values, bias, o_bias)
    if configs is not None and not isinstance(configs, ConfigTable):
        configs = ConfigTable(configs)  # hashable: the plan caches' keys hold it
    if not _plain_eager(flat):
        if configs is not None:
            raise MoexportError("sigma_moe_forward(configs=...)", "applies to plain eager calls only",
                                "traced, compiled and exported calls run the custom op moexport::sigma_moe, "
                                "which plans with the shipped configs")
        y = _sigma_moe_op(flat, *weights, k, selection, activation)
    else:
        plan = _layer_plan(flat, expert_sel, keys, values, bias, k, selection, activation, configs)
        y = None
        if cuda_graph or (cuda_graph is None and graphs.wanted()):
            # the plan (hence the configs it was built with) is part of the key
            y = graphs.replay(flat, weights, id(plan), lambda xs: _run_layer(plan, xs, *weights),
                              any_size=bool(cuda_graph))
        if y is None:
            y = _run_layer(plan, flat, *weights)
    return y.reshape(*x.shape[:-1], values.shape[-1])


@torch.library.custom_op("moexport::topk_dispatch", mutates_args=())
def _topk_dispatch_op(logits: torch.Tensor, k: int, selection: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor, torch.Tensor]:
    out = run_plan(_plan(plans.topk_dispatch_plan, logits.shape[-1], k, selection, bucket(logits.shape[0])),
                   {"logits": logits})
    return out["gate"], out["expert"], out["sorted_expert"], out["sorted_slot"]


@_topk_dispatch_op.register_fake
def _(logits, k, selection):
    n = logits.shape[0]
    i32 = dict(dtype=torch.int32, device=logits.device)
    return (logits.new_empty(n, k), torch.empty(n, k, **i32), torch.empty(n * k, **i32), torch.empty(n * k, **i32))


def topk_dispatch(logits: torch.Tensor, k: int, selection: str | None = None):
    """The TopKDispatch op: float32 logits [N, E] -> (gate [N, k] float32, expert [N, k] int32,
    sorted_expert [N*k] int32 ascending, sorted_slot [N*k] int32: slot n*k + j, stable by expert).

    Ties go to the lower expert index; the k slots of a token are ordered best first.
    """
    selection = check_selection(selection or "sigmoid")
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise MoexportError(f"logits of shape {tuple(logits.shape)} and dtype {logits.dtype}",
                            "must be a 2-D float32 tensor [N, E]")
    if not 1 <= k <= logits.shape[1]:
        raise MoexportError(f"k={k}", f"must be between 1 and the number of experts {logits.shape[1]}")
    return _topk_dispatch_op(logits.contiguous(), k, selection)


@torch.library.custom_op("moexport::cvmm", mutates_args=())
def _cvmm_op(x: torch.Tensor, sorted_expert: torch.Tensor, src_row: torch.Tensor, dst_row: torch.Tensor,
             w: torch.Tensor, gate: Optional[torch.Tensor], reduce: bool, k: int) -> torch.Tensor:
    E, d_in, d_out = w.shape
    plan = _plan(plans.cvmm_plan, E, d_in, d_out, dtype_name(x.dtype), reduce=reduce, k=k, gate=gate is not None,
                 n_rows=bucket(sorted_expert.shape[0]), w_strides=tuple(w.stride()))
    return run_plan(plan, {"x": x, "sorted_expert": sorted_expert, "src_row": src_row, "dst_row": dst_row,
                           "w": w, "gate": gate})["out"]


@_cvmm_op.register_fake
def _(x, sorted_expert, src_row, dst_row, w, gate, reduce, k):
    rows = sorted_expert.shape[0]
    return x.new_empty(rows // k if reduce else rows, w.shape[-1])


def cvmm(x: torch.Tensor, sorted_expert: torch.Tensor, src_row: torch.Tensor, dst_row: torch.Tensor,
         w: torch.Tensor, gate: torch.Tensor | None = None, *, reduce: bool = False, k: int = 1) -> torch.Tensor:
    """The CVMM op over S rows sorted by expert.

    reduce=False: out[dst_row[s]] = (gate[s] *) x[src_row[s]] @ w[sorted_expert[s]], out [S, d_out].
    reduce=True: out[n] = sum over s with dst_row[s] // k == n of gate[s] * x[src_row[s]] @ w[...],
    out [S / k, d_out], summed in float32 and rounded once.
    """
    S = sorted_expert.shape[0]
    if w.dim() != 3 or x.dim() != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype:
        raise MoexportError(f"CVMM x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}",
                            "do not fit", "expected x [R, d_in] and w [E, d_in, d_out] of one dtype")
    if src_row.shape != (S,) or dst_row.shape != (S,) or (gate is not None and gate.shape != (S,)):
        raise MoexportError("CVMM src_row / dst_row / gate", f"must all have shape [{S}] like sorted_expert")
    if reduce and S % k:
        raise MoexportError(f"CVMM reduce with k={k}", f"needs a row count divisible by k, got {S}")
    gate = None if gate is None else gate.float().contiguous()
    return _cvmm_op(x.contiguous(), sorted_expert, src_row, dst_row, w, gate, reduce, k)


class _Experts(torch.autograd.Function):
    """Expert part of the layer (gates given): forward and backward on the kernels."""

    @staticmethod
    def forward(ctx, x, gate, expert, counts, keys, values, bias, o_bias, shape):
        n = x.shape[0]
        out = run_plan(_plan(plans.train_forward_plan, shape, bucket(n)),
                       {"x": x, "gate": gate.detach(), "expert": expert, "counts": counts, "expert_sel": None,
                        "keys": keys, "values": values, "bias": bias, "o_bias": o_bias})
        ctx.save_for_backward(x, gate, out["sorted_expert"], out["sorted_slot"], out["offsets"], out["tile_map"],
                              out["h"], out["pre"], keys, values)
        ctx.shape, ctx.has_bias = shape, bias is not None
        return out["y"]

    @staticmethod
    def backward(ctx, dy):
        x, gate, sorted_expert, sorted_slot, offsets, tile_map, h, pre, keys, values = ctx.saved_tensors
        shape = ctx.shape
        g = run_plan(_plan(plans.backward_plan, shape, bucket(x.shape[0])),
                     {"dy": dy.contiguous(), "x": x, "gate": gate.detach(), "sorted_slot": sorted_slot,
                      "offsets": offsets, "tile_map": tile_map, "h": h, "pre": pre, "keys": keys, "values": values})
        dbias = do_bias = None
        if ctx.has_bias:
            dbias = torch.zeros(shape.n_experts, shape.expert_size, device=x.device, dtype=torch.float32)
            dbias = dbias.index_add_(0, sorted_expert.long(), g["dpre"].float()).to(x.dtype)
            do_bias = dy.float().sum(0).to(x.dtype)
        return (g["dx"],       # x
                g["dgate"],    # gate (float32, through gates_of into the router logits)
                None, None,    # expert, counts: integer routing
                g["dkeys"], g["dvalues"],
                dbias, do_bias,
                None)          # shape


def sigma_moe_train(layer, x: torch.Tensor) -> torch.Tensor:
    """Differentiable forward of `layer` (a SigmaMoE) on the kernels, expert dropout included.

    Router logits and gates are computed by PyTorch (float32, differentiable: the router gets its
    gradient through the gates); the top-k of the (dropout-masked) logits and the experts run on
    the kernels.
    """
    flat = x.reshape(-1, layer.d_model)
    shape = plans.MoEShape.of(layer, dtype_name(x.dtype))
    logits, drop = layer.router_forward(flat)  # the reference's logits and dropped experts
    rank = logits.detach() if drop is None else logits.detach().masked_fill(drop, float("-inf"))
    routed = run_plan(_plan(plans.route_plan, shape, bucket(flat.shape[0])), {"logits": rank})
    gate = gates_of(logits, routed["expert"].long(), layer.selection, drop_mask=drop)
    y = _Experts.apply(flat, gate, routed["expert"], routed["counts"], layer.keys, layer.values, layer.bias,
                       layer.o_bias, shape)
    return y.reshape(*x.shape[:-1], layer.v_dim)


def sigma_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """The accelerated `SigmaMoE.forward` (registered with `moexport.core.accel`).

    Inference (no gradient needed) runs the fused custom op; otherwise `sigma_moe_train`. Parameters
    in another dtype than x fall back to the layer's reference.
    """
    params = [p for p in (layer.expert_sel, layer.keys, layer.values, layer.bias, layer.o_bias) if p is not None]
    if any(p.dtype != x.dtype or p.device != x.device for p in params):
        return layer.reference_forward(x)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    if layer.training or needs_grad:
        return sigma_moe_train(layer, x)
    return sigma_moe_forward(x, layer.expert_sel, layer.keys, layer.values, k=layer.k, selection=layer.selection,
                             activation=layer.activation, bias=layer.bias, o_bias=layer.o_bias)
