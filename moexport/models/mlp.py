"""The dense feed-forward baselines of the paper: a two-layer MLP and the Top-K activation MLP.

Parameter names are the paper's (`linear1`, `linear2`, both with bias), so its `preln_relative` and
`preln_topk` checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moexport.core.errors import MoexportError
from moexport.models.activations import activation_fn
from moexport.models.base import ConfigModule
from moexport.models.init import prenorm_init_


class DenseMLP(ConfigModule):
    """y = linear2(dropout(act(linear1(x)))): the paper's dense FFN (`preln_relative`).

    Args:
        d_model: Input and output width d.
        d_ff: Hidden width.
        activation: 'relu', 'gelu' or 'silu'. Defaults to 'relu'.
        dropout: Dropout on the hidden activations, training only. Defaults to 0.
        weight_std_scale: Init scale s (std s/√fan_in); the paper uses sqrt(2 / n_layers). Defaults to 1.
    """

    kind = "dense"

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0,
                 weight_std_scale: float = 1.0):
        super().__init__()
        activation_fn(activation)
        self._keep_config(d_model=d_model, d_ff=d_ff, activation=activation, dropout=dropout,
                          weight_std_scale=weight_std_scale)
        self.d_model, self.d_ff, self.activation, self.dropout = d_model, d_ff, activation, dropout
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        prenorm_init_(self.linear1, weight_std_scale)
        prenorm_init_(self.linear2, weight_std_scale)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden activations act(linear1(x)), after dropout in training."""
        return F.dropout(activation_fn(self.activation)(self.linear1(x)), self.dropout, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.hidden(x))

    def ffn_flops_per_token(self) -> dict[str, int]:
        """Multiply-accumulates ×2 per token: active and the parameter-equal dense FFN (the same here)."""
        flops = 2 * 2 * self.d_model * self.d_ff
        return {"active": flops, "dense": flops}

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"


class TopKMLP(DenseMLP):
    """Dense MLP that keeps only the k largest hidden activations per token (`preln_topk`).

    An entry survives when its ranking value is ≥ the k-th largest one, so ties at the threshold are
    kept (more than k may survive) and with fewer than k positive entries everything is kept (the rest
    are zeros anyway). The ranking value is h_j, or h_j·‖linear2.weight[:, j]‖ with `use_norm`; the
    kept values are h_j either way.

    Args:
        d_model: Input and output width d.
        d_ff: Hidden width.
        k: Activations kept per token (the paper's `transformer.topk_value`).
        use_norm: Rank by h_j·‖W2 column j‖ (paper default) instead of h_j (the paper's "nocomp" runs).
            Defaults to False.
        activation: 'relu', 'gelu' or 'silu'. Defaults to 'relu'.
        dropout: Dropout on the hidden activations before ranking, training only. Defaults to 0.
        weight_std_scale: Init scale s (std s/√fan_in). Defaults to 1.
    """

    kind = "topk"

    def __init__(self, d_model: int, d_ff: int, k: int, use_norm: bool = False, activation: str = "relu",
                 dropout: float = 0.0, weight_std_scale: float = 1.0):
        if not 1 <= k <= d_ff:
            raise MoexportError(f"k={k}", f"must be between 1 and d_ff={d_ff}")
        super().__init__(d_model, d_ff, activation=activation, dropout=dropout, weight_std_scale=weight_std_scale)
        self._keep_config(d_model=d_model, d_ff=d_ff, k=k, use_norm=use_norm, activation=activation,
                          dropout=dropout, weight_std_scale=weight_std_scale)
        self.k, self.use_norm = k, use_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden(x)
        with torch.no_grad():
            rank = hidden * self.linear2.weight.norm(dim=0) if self.use_norm else hidden
            threshold = torch.topk(rank, self.k, dim=-1).values[..., -1:]
        return self.linear2(hidden.masked_fill(rank < threshold, 0.0))

    def ffn_flops_per_token(self) -> dict[str, int]:
        """The up-projection is dense; the down-projection reads only the k kept rows."""
        d, f = self.d_model, self.d_ff
        return {"active": 2 * (d * f + self.k * d), "dense": 2 * 2 * d * f}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}, use_norm={self.use_norm}"
