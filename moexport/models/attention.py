"""The paper's relative-position multi-head attention (Transformer-XL style, `FixedRelativeMultiheadAttention`).

For query i and key j (memory of M tokens first, then the T current ones; relative position
r = j − i − M, ≤ 0 for visible keys):

    att[h, i, j] = scale · ((q_i,h + u_h)·k_j,h + (q_i,h + v_h)·kpos[r, h]),   masked where r > 0

`kpos = sinusoid(r) @ pos_to_pq.weight.T`: interleaved sin/cos over the full d_model, as the paper's code.
`scale` is a learned parameter applied after the sum (no extra 1/√dh); `s_bias` is stored but unused,
exactly as in the paper. Parameter names are the paper's, so its state dicts load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moexport.core.errors import MoexportError
from moexport.models.base import ConfigModule
from moexport.models.init import prenorm_init_


def sinusoid(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Interleaved sinusoidal encoding [len(positions), d_model] in float32: pe[2i] = sin, pe[2i+1] = cos.

    Computed with the same float32 operations as the paper's `sinusoidal_pos_embedding`.
    """
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device)
                         * (-math.log(10000.0) / d_model))
    angles = positions.to(torch.float32)[:, None] * div_term
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(positions.shape[0], d_model)


class RelativeAttention(ConfigModule):
    """Causal relative-position multi-head attention with per-head content and position biases.

    Args:
        d_model: Model width d (even: the position encoding interleaves sin and cos).
        n_heads: Number of heads H.
        head_dim: Width dh of one head; may differ from d / H (the paper's WT103 models use 10 × 41
            with d = 412). Defaults to d_model // n_heads.
        weight_std_scale: Init scale s of the projections (std s/√fan_in); the paper uses sqrt(2 / n_layers).
    """

    kind = "relative_attention"

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, weight_std_scale: float = 1.0):
        super().__init__()
        if head_dim is None:
            if d_model % n_heads:
                raise MoexportError(f"n_heads={n_heads}", f"does not divide d_model={d_model}",
                                    "give head_dim explicitly")
            head_dim = d_model // n_heads
        if d_model % 2:
            raise MoexportError(f"d_model={d_model}", "must be even for the sinusoidal relative positions")
        self._keep_config(d_model=d_model, n_heads=n_heads, head_dim=head_dim, weight_std_scale=weight_std_scale)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        inner = n_heads * head_dim
        # Registration order follows the paper's state dict.
        self.scale = nn.Parameter(torch.tensor([1.0 / math.sqrt(head_dim)]))
        self.s_bias = nn.Parameter(torch.tensor([0.0]))
        self.global_content_bias = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.global_pos_bias = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.pos_to_pq = nn.Linear(d_model, inner, bias=False)
        self.data_to_kv = nn.Linear(d_model, 2 * inner, bias=False)
        self.data_to_q = nn.Linear(d_model, inner, bias=False)
        self.multi_head_merge = nn.Linear(inner, d_model, bias=False)
        for linear in (self.pos_to_pq, self.data_to_kv, self.data_to_q, self.multi_head_merge):
            prenorm_init_(linear, weight_std_scale)

    def forward(self, query_input: torch.Tensor, key_input: torch.Tensor) -> torch.Tensor:
        """Attend from the T queries to the L = M + T keys.

        Args:
            query_input: Normalised current tokens [B, T, d].
            key_input: Normalised memory followed by the current tokens [B, L, d]; its last T rows are
                `query_input` (pass the same tensor without memory).

        Returns:
            [B, T, d].
        """
        batch, n_queries, _ = query_input.shape
        n_keys = key_input.shape[1]
        heads, dh = self.n_heads, self.head_dim
        q = self.data_to_q(query_input).view(batch, n_queries, heads, dh).transpose(1, 2)  # [B, H, T, dh]
        # data_to_kv rows are interleaved per head: [K of head 0; V of head 0; K of head 1; ...].
        k, v = self.data_to_kv(key_input).view(batch, n_keys, heads, 2, dh).unbind(3)       # [B, L, H, dh]
        content = (q + self.global_content_bias[:, None]) @ k.permute(0, 2, 3, 1)           # [B, H, T, L]
        position = (q + self.global_pos_bias[:, None]) @ self._key_positions(n_keys, key_input.dtype)
        position = position.gather(-1, self._relative_index(n_queries, n_keys).expand_as(content))
        scores = (content + position) * self.scale
        scores = scores.masked_fill(self._causal_mask(n_queries, n_keys, key_input.device), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v.transpose(1, 2)                              # [B, H, T, dh]
        return self.multi_head_merge(out.transpose(1, 2).reshape(batch, n_queries, heads * dh))

    def _key_positions(self, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
        """Projected encodings of relative positions −(L−1) … 0 as [H, dh, L]; column m is r = m − (L−1)."""
        device = self.pos_to_pq.weight.device
        positions = torch.arange(n_keys, device=device, dtype=torch.float32) - (n_keys - 1)
        kpos = self.pos_to_pq(sinusoid(positions, self.d_model).to(dtype))                  # [L, H·dh]
        return kpos.view(n_keys, self.n_heads, self.head_dim).permute(1, 2, 0)

    def _relative_index(self, n_queries: int, n_keys: int) -> torch.Tensor:
        """Column of the position table for query i, key j: j − i + T − 1 (clamped where masked anyway)."""
        device = self.pos_to_pq.weight.device
        i = torch.arange(n_queries, device=device)[:, None]
        j = torch.arange(n_keys, device=device)[None, :]
        return (j - i + (n_queries - 1)).clamp(max=n_keys - 1)

    @staticmethod
    def _causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """True where key j is in the future of query i (only the last T key columns can be)."""
        i = torch.arange(n_queries, device=device)[:, None]
        j = torch.arange(n_keys, device=device)[None, :]
        return j > i + (n_keys - n_queries)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}"
