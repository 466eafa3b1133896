"""σ-MoE: the sparse feed-forward layer of Csordás, Irie & Schmidhuber (2023), as in the paper's code.

    y = Σ_{e ∈ top-k} gate_e · act(x·keys[e] (+ bias[e])) · values[e]  (+ o_bias)

Parameter names and layouts are the paper's (`keys` [E, d, G] input-major, `values` [E, G, v_dim],
`expert_sel` [E, d]), so its checkpoints load without conversion. Routing follows
`moexport.models.routing` (float32 logits, lower index wins ties).

Numerics of the reference (the kernels follow the same recipe): matmul operands in the model dtype,
accumulation in float32, the hidden activation rounded once to the model dtype, gating, the sum over
the k experts and the output bias in float32, one final rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moexport.core import accel
from moexport.core.errors import MoexportError
from moexport.models.activations import activation_fn
from moexport.models.base import ConfigModule
from moexport.models.routing import check_selection, entropy_regularizer, gates_of, route


def renorm_keep_std(weight: torch.Tensor) -> torch.Tensor:
    """Rescale every row to the same L2 norm while keeping the matrix's overall std (σ-MoE init)."""
    std = weight.std()
    weight = weight / weight.norm(dim=1, keepdim=True)
    return weight * (std / weight.std())


def expert_mix(x: torch.Tensor, gate: torch.Tensor, expert: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, *, bias: torch.Tensor | None = None, o_bias: torch.Tensor | None = None,
               activation: str = "relu", hidden_dropout: float = 0.0) -> torch.Tensor:
    """Reference sparse expert computation: rows `x` [N, d], `gate`/`expert` [N, k] -> [N, v_dim].

    Loops over the experts that were selected at least once, so it does k/E of the dense work.
    """
    n_tokens, k = expert.shape
    act = activation_fn(activation)
    out = torch.zeros(n_tokens, values.shape[-1], dtype=torch.float32, device=x.device)
    flat_expert = expert.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=keys.shape[0]).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        rows = slots // k
        pre = x[rows].float() @ keys[e].float()
        if bias is not None:
            pre = pre + bias[e].float()
        hidden = act(pre).to(x.dtype)
        if hidden_dropout > 0:
            hidden = F.dropout(hidden, hidden_dropout, training=True)
        contribution = (hidden.float() @ values[e].float()) * gate.reshape(-1)[slots, None].float()
        out = out.index_add(0, rows, contribution)
    if o_bias is not None:
        out = out + o_bias.float()
    return out.to(x.dtype)


class SigmaMoE(ConfigModule):
    """σ-MoE feed-forward layer.

    Args:
        d_model: Input width d.
        n_experts: Number of experts E.
        expert_size: Hidden units per expert G.
        k: Experts selected per token.
        selection: 'sigmoid' (σ-MoE), 'softmax' or 'softmax_after_topk'. Defaults to 'sigmoid'.
        activation: Hidden activation: 'relu', 'gelu' or 'silu'. Defaults to 'relu'.
        expert_dropout: Probability δ of dropping an expert for a token before top-k (training only).
        dropout: Dropout on the hidden activations (training only). The paper's σ-MoE runs use 0.
        bias: Add the per-expert hidden bias `bias` [E, G] and the output bias `o_bias` [v_dim].
        v_dim: Output width. Defaults to d_model.
        weight_std_scale: Init scale s; the paper's pre-LN models use sqrt(2 / n_layers).
    """

    kind = "sigma_moe"

    def __init__(self, d_model: int, n_experts: int, expert_size: int, k: int, selection: str = "sigmoid",
                 activation: str = "relu", expert_dropout: float = 0.0, dropout: float = 0.0,
                 bias: bool = False, v_dim: int | None = None, weight_std_scale: float = 1.0):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise MoexportError(f"k={k}", f"must be between 1 and n_experts={n_experts}")
        check_selection(selection)
        activation_fn(activation)
        v_dim = d_model if v_dim is None else v_dim
        self._keep_config(d_model=d_model, n_experts=n_experts, expert_size=expert_size, k=k,
                          selection=selection, activation=activation, expert_dropout=expert_dropout,
                          dropout=dropout, bias=bias, v_dim=v_dim, weight_std_scale=weight_std_scale)
        self.d_model, self.n_experts, self.expert_size, self.k = d_model, n_experts, expert_size, k
        self.selection, self.activation, self.v_dim = selection, activation, v_dim
        self.expert_dropout, self.dropout, self.weight_std_scale = expert_dropout, dropout, weight_std_scale
        self.keys = nn.Parameter(torch.empty(n_experts, d_model, expert_size))
        self.values = nn.Parameter(torch.empty(n_experts, expert_size, v_dim))
        self.expert_sel = nn.Parameter(torch.empty(n_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(n_experts, expert_size)) if bias else None
        self.o_bias = nn.Parameter(torch.zeros(v_dim)) if bias else None
        self._last_logits: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """σ-MoE init: keys, expert_sel ~ N(0, s/√d) with equal-norm expert_sel rows; values ~ N(0, s/√(E·G))."""
        s = self.weight_std_scale
        self.keys.normal_(0, s / math.sqrt(self.d_model))
        self.values.normal_(0, s / math.sqrt(self.n_experts * self.expert_size))
        self.expert_sel.copy_(renorm_keep_std(torch.randn_like(self.expert_sel) * (s / math.sqrt(self.d_model))))
        if self.bias is not None:
            self.bias.zero_()
            self.o_bias.zero_()

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 router logits [..., E] (see `moexport.models.routing`), also under autocast.

        Without autograd (inference, the reference runs of `validate`) the product is taken in float64
        (where the device has it) and rounded once: a float32 GEMM sums some output columns in other code
        paths (MKL's remainder columns), so two equal router rows gave logits an ulp apart, and the tie
        that rule 3 gives to the lower index went either way. Training keeps the float32 product: a
        float64 copy of every token and its backward would cost memory and time for ties that do not
        matter there.
        """
        exact = not torch.is_grad_enabled() and x.device.type in ("cpu", "cuda")
        wide = torch.float64 if exact else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(wide), self.expert_sel.to(wide)).float()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference routing of `x` [..., d]: (gate [..., k] float32, expert [..., k] int64), best first."""
        return route(self.router_logits(x), self.k, self.selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise MoexportError(f"SigmaMoE input of shape {tuple(x.shape)}",
                                f"last dimension must be d_model={self.d_model}")
        fast = accel.lookup("sigma_moe", x)
        if fast is not None and not (self.training and self.dropout > 0):
            return fast(self, x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor, *, expert: torch.Tensor | None = None) -> torch.Tensor:
        """The PyTorch reference every other implementation is compared against.

        Args:
            x: Input [..., d].
            expert: Experts [..., k] to send each token to instead of its own top-k, e.g. those another
                runtime chose, so that the rest of the layer can be compared where a near-tie went the
                other way there. Gates follow the selection rule for these experts. Defaults to top-k.
        """
        flat = x.reshape(-1, self.d_model)
        logits, drop_mask = self.router_forward(flat)
        if expert is None:
            gate, expert = route(logits, self.k, self.selection, drop_mask=drop_mask)
        else:
            expert = expert.reshape(-1, self.k).to(device=x.device, dtype=torch.int64)
            gate = gates_of(logits, expert, self.selection)
        y = expert_mix(flat, gate, expert, self.keys, self.values, bias=self.bias, o_bias=self.o_bias,
                       activation=self.activation, hidden_dropout=self.dropout if self.training else 0.0)
        return y.reshape(*x.shape[:-1], self.v_dim)

    def router_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router's part of a forward of tokens `x` [N, d], one for every forward path so that they
        all drop the same experts: float32 logits [N, E] (in training kept for `entropy_regularizer`)
        and, in training with expert dropout, the mask [N, E] of the (token, expert) pairs dropped
        before the top-k (else None)."""
        logits = self.router_logits(x)
        drop_mask = None
        if self.training:
            self._last_logits = logits
            if self.expert_dropout > 0:
                drop_mask = torch.rand_like(logits) < self.expert_dropout
        return logits, drop_mask

    def entropy_regularizer(self) -> torch.Tensor:
        """−H of the batch-mean softmax of the raw routing logits of the last training forward."""
        if self._last_logits is None:
            raise MoexportError("SigmaMoE.entropy_regularizer()", "needs a forward pass in training mode first")
        return entropy_regularizer(self._last_logits)

    def ffn_flops_per_token(self) -> dict[str, int]:
        """Multiply-accumulates ×2 per token: active (router + k experts) and the parameter-equal dense FFN."""
        d, e, g, v = self.d_model, self.n_experts, self.expert_size, self.v_dim
        return {"active": 2 * (d * e + self.k * g * (d + v)), "dense": 2 * e * g * (d + v)}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, expert_size={self.expert_size}, "
                f"k={self.k}, selection={self.selection!r}, activation={self.activation!r}")
