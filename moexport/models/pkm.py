"""The paper's improved product-key memory (PKM, `LowrankApproximate2Layer` in `preln_kvmem` models).

The input x itself is the query (no query projection). Its halves q1, q2 score against two sub-key
tables per head t, s1_t = q1·keys.0[t]ᵀ and s2_t = q2·keys.1[t]ᵀ; slot (a, b) of the n_keys² values
(row a·n_keys + b of `values.weight`) scores s1_t[a] + s2_t[b]. Two paths, chosen as in the paper:

- dense (knn == 0 or n_keys ≤ knn, every paper run): y = act(Σ_t s1_t ⊕ s2_t) @ values.weight, the
  heads summed before the activation, over all n_keys² slots;
- knn (n_keys > knn): per head the top-knn of s1_t and of s2_t, their knn² sums, the top-knn of those;
  y = Σ over the heads·knn selected slots of act(score)·values.weight[slot]. The activation acts on the
  heads·knn scores of a token (relu elementwise, softmax jointly); a slot chosen by two heads counts twice.

The two paths agree when there is one head and knn ≥ n_keys² (every slot is selected); with several
heads they differ by design (relu of the sum vs. sum of relus), exactly as in the paper's code.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moexport.core.errors import MoexportError
from moexport.models.base import ConfigModule
from moexport.models.routing import topk_lower_index

PKM_ACTIVATIONS = ("relu", "softmax")
VALUE_INITS = ("n_values", "d_model")


def _activate(name: str, scores: torch.Tensor) -> torch.Tensor:
    return F.relu(scores) if name == "relu" else torch.softmax(scores, dim=-1)


class PKM(ConfigModule):
    """Product-key memory layer.

    Args:
        d_model: Input and output width d (even: the query is split in halves).
        n_keys: Sub-keys per table; the memory has n_keys² values.
        heads: Sub-key table pairs (the paper's `pkm.n_heads`). Defaults to 4.
        knn: Slots per head on the knn path; 0 or ≥ n_keys selects the dense path. Defaults to 128.
        activation: 'relu' (the paper's param-matched PKM) or 'softmax'. Defaults to 'relu'.
        weight_std_scale: Init scale s; the paper uses sqrt(2 / n_layers). Defaults to 1.
        value_init: Std of the values: 'n_values' gives s/√(n_keys²) (the paper's `custom_init=5`, its
            "+ init" rows), 'd_model' gives s/√d (`custom_init=0`). Keys always use s/√d.
            Defaults to 'n_values'.
    """

    kind = "pkm"

    def __init__(self, d_model: int, n_keys: int, heads: int = 4, knn: int = 128, activation: str = "relu",
                 weight_std_scale: float = 1.0, value_init: str = "n_values"):
        super().__init__()
        if d_model % 2:
            raise MoexportError(f"d_model={d_model}", "must be even: the PKM query is split in two halves")
        if activation not in PKM_ACTIVATIONS:
            raise MoexportError(f"activation={activation!r}", "is not a PKM activation",
                                f"use one of {', '.join(PKM_ACTIVATIONS)}")
        if value_init not in VALUE_INITS:
            raise MoexportError(f"value_init={value_init!r}", "is not known",
                                f"use one of {', '.join(VALUE_INITS)}")
        if heads < 1 or n_keys < 1 or knn < 0:
            raise MoexportError(f"PKM(n_keys={n_keys}, heads={heads}, knn={knn})",
                                "needs n_keys ≥ 1, heads ≥ 1 and knn ≥ 0")
        self._keep_config(d_model=d_model, n_keys=n_keys, heads=heads, knn=knn, activation=activation,
                          weight_std_scale=weight_std_scale, value_init=value_init)
        self.d_model, self.n_keys, self.heads, self.knn = d_model, n_keys, heads, knn
        self.activation, self.weight_std_scale, self.value_init = activation, weight_std_scale, value_init
        # `values` is an embedding table so that its state-dict key is the paper's `values.weight`.
        self.values = nn.Embedding(n_keys * n_keys, d_model)
        self.keys = nn.ParameterList([nn.Parameter(torch.empty(heads, n_keys, d_model // 2)) for _ in range(2)])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper init: keys ~ N(0, s/√d); values ~ N(0, s/√(n_keys²)) or N(0, s/√d) (`value_init`)."""
        s = self.weight_std_scale
        for table in self.keys:
            table.normal_(0, s / math.sqrt(self.d_model))
        fan_in = self.n_keys ** 2 if self.value_init == "n_values" else self.d_model
        self.values.weight.normal_(0, s / math.sqrt(fan_in))

    @property
    def uses_dense_path(self) -> bool:
        """The paper's rule: knn == 0 or n_keys ≤ knn takes the dense path."""
        return self.knn == 0 or self.n_keys <= self.knn

    def sub_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head sub-key scores (s1, s2), each [N, heads, n_keys], of rows x [N, d]."""
        half = self.d_model // 2
        s1 = torch.einsum("nc,tkc->ntk", x[:, :half], self.keys[0])
        s2 = torch.einsum("nc,tkc->ntk", x[:, half:], self.keys[1])
        return s1, s2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise MoexportError(f"PKM input of shape {tuple(x.shape)}",
                                f"last dimension must be d_model={self.d_model}")
        flat = x.reshape(-1, self.d_model)
        y = self.forward_dense(flat) if self.uses_dense_path else self.forward_knn(flat)
        return y.reshape(x.shape)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The dense path on rows x [N, d]: all n_keys² slots, heads summed before the activation."""
        s1, s2 = self.sub_scores(x)
        # Σ_t (s1_t[a] + s2_t[b]) = (Σ_t s1_t)[a] + (Σ_t s2_t)[b]: sum the heads before the outer sum.
        scores = (s1.sum(1)[:, :, None] + s2.sum(1)[:, None, :]).flatten(1)
        return _activate(self.activation, scores) @ self.values.weight

    def forward_knn(self, x: torch.Tensor) -> torch.Tensor:
        """The knn path on rows x [N, d] (the paper's sparse path; used when n_keys > knn)."""
        scores, slots = self.select(x)
        weights = _activate(self.activation, scores.flatten(1))
        return F.embedding_bag(slots.flatten(1), self.values.weight, per_sample_weights=weights, mode="sum")

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head the knn best slots of rows x [N, d]: (score [N, heads, knn'], slot [N, heads, knn']).

        knn' = min(knn, n_keys²). Equal scores keep the earlier candidate (best sub-keys first).
        """
        s1, s2 = self.sub_scores(x)
        knn = min(self.knn, self.n_keys)
        with torch.no_grad():
            i1 = topk_lower_index(s1, knn)                                  # [N, heads, knn]
            i2 = topk_lower_index(s2, knn)
            candidate = (s1.gather(-1, i1)[..., :, None] + s2.gather(-1, i2)[..., None, :]).flatten(-2)
            slot = (i1[..., :, None] * self.n_keys + i2[..., None, :]).flatten(-2)
            slot = slot.gather(-1, topk_lower_index(candidate, min(self.knn, candidate.shape[-1])))
        # Recompute the selected scores with gradient, as the paper does.
        score = s1.gather(-1, slot // self.n_keys) + s2.gather(-1, slot % self.n_keys)
        return score, slot

    def ffn_flops_per_token(self) -> dict[str, int]:
        """Active: sub-key scoring plus the values read (n_keys² on the dense path, heads·knn on the knn path).

        Dense: the MLP with as many weights (2 × the weight count of keys and values).
        """
        scoring = self.heads * self.n_keys * self.d_model
        table = self.n_keys ** 2 * self.d_model
        read = table if self.uses_dense_path else self.heads * min(self.knn, self.n_keys ** 2) * self.d_model
        return {"active": 2 * (scoring + read), "dense": 2 * (scoring + table)}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_keys={self.n_keys}, heads={self.heads}, knn={self.knn}, "
                f"activation={self.activation!r}, path={'dense' if self.uses_dense_path else 'knn'}")
