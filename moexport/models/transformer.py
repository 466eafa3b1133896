"""The paper's pre-LN Transformer-XL language model with any of the four feed-forward layers.

    x = embedding[tokens]                     (embedding scale 1.0, no absolute positions)
    per layer:  x = x + Attn(LN1(x))          (keys/values from LN1(cat(memory, x)))
                x = x + FFN(LN2(x))
    logits = output(out_norm(x))              (untied output layer, with bias)

Parameter names follow the paper's state dict (`embedding`, `layers.<i>.self_attn.*`, `norm1`, `norm2`,
`out_norm`, `output`), except that every layer's FFN sits under `ffn` whatever its kind (the paper
uses `pkm` for σ-MoE and PKM, and puts `linear1`/`linear2` of the dense layers in the layer itself).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moexport.core.errors import MoexportError
from moexport.models.attention import RelativeAttention
from moexport.models.base import ConfigModule, build
from moexport.models.init import prenorm_scale


class TransformerLayer(ConfigModule):
    """One pre-LN layer: relative attention and a feed-forward module, each on a residual branch.

    Args:
        d_model: Model width d.
        n_heads: Attention heads.
        ffn: The `config()` of the feed-forward module (kind 'sigma_moe', 'pkm', 'dense' or 'topk').
        head_dim: Width of one head. Defaults to d_model // n_heads.
        dropout: Dropout on both residual branches, training only. Defaults to 0.
        weight_std_scale: Init scale of the attention projections. Defaults to 1.
    """

    kind = "transformer_layer"

    def __init__(self, d_model: int, n_heads: int, ffn: dict[str, Any], head_dim: int | None = None,
                 dropout: float = 0.0, weight_std_scale: float = 1.0):
        super().__init__()
        self.self_attn = RelativeAttention(d_model, n_heads, head_dim, weight_std_scale=weight_std_scale)
        self.ffn = build(ffn)
        self._keep_config(d_model=d_model, n_heads=n_heads, ffn=self.ffn.config(),
                          head_dim=self.self_attn.head_dim, dropout=dropout, weight_std_scale=weight_std_scale)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] and this layer's memory [B, M, d] (its input of earlier segments) -> [B, T, d]."""
        if memory is None:
            query = keys = self.norm1(x)
        else:
            keys = self.norm1(torch.cat([memory, x], dim=1))
            query = keys[:, memory.shape[1]:]
        x = x + F.dropout(self.self_attn(query, keys), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.dropout, self.training)


class TransformerLM(ConfigModule):
    """The paper's pre-LN Transformer-XL language model.

    Args:
        vocab_size: Number of tokens V.
        d_model: Model width d.
        n_layers: Number of layers.
        n_heads: Attention heads.
        ffn: The `config()` of the feed-forward module of every layer, or a list with one per layer.
        head_dim: Width of one head. Defaults to d_model // n_heads.
        dropout: Dropout on the embedding, on the residual branches and before the output layer,
            training only (the paper's `dropout`). Defaults to 0.

    Example::

        model = TransformerLM(256, 64, 2, 4, ffn={"kind": "sigma_moe", "d_model": 64, "n_experts": 8,
                                                  "expert_size": 16, "k": 2})
        logits, memory = model(tokens[:, :32], return_memory=True)
        logits, memory = model(tokens[:, 32:], memory, return_memory=True)
    """

    kind = "transformer_lm"

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 ffn: dict[str, Any] | list[dict[str, Any]], head_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        ffns = list(ffn) if isinstance(ffn, (list, tuple)) else [ffn] * n_layers
        if len(ffns) != n_layers:
            raise MoexportError(f"ffn (a list of {len(ffns)} configs)", f"needs one config per layer ({n_layers})")
        self.vocab_size, self.d_model, self.n_layers, self.dropout = vocab_size, d_model, n_layers, dropout
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.xavier_uniform_(self.embedding.weight)
        # The paper's pre-LN init: attention projections with std sqrt(2 / (n_layers · fan_in)).
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, n_heads, layer_ffn, head_dim=head_dim, dropout=dropout,
                             weight_std_scale=prenorm_scale(n_layers))
            for layer_ffn in ffns)
        self.out_norm = nn.LayerNorm(d_model)
        self.output = nn.Linear(d_model, vocab_size)
        configs = [layer.ffn.config() for layer in self.layers]
        same = all(c == configs[0] for c in configs)
        self._keep_config(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                          ffn=configs[0] if same else configs, head_dim=self.layers[0].self_attn.head_dim,
                          dropout=dropout)

    def forward(self, input_ids: torch.Tensor, memory: list[torch.Tensor] | None = None, *,
                return_memory: bool = False, memory_length: int | None = None):
        """Next-token logits of a segment, optionally continuing earlier segments through `memory`.

        Args:
            input_ids: Tokens [B, T], int64 (any integer dtype).
            memory: Per layer, that layer's input over the previous M tokens: n_layers tensors [B, M, d]
                (M may be 0). Query i of this segment sees memory and tokens 0..i; relative positions
                continue across the boundary. Defaults to no memory.
            return_memory: Also return the memory for the next segment. Defaults to False.
            memory_length: Tokens kept in the returned memory. Defaults to M (a rolling window of the
                given memory's size), or T without memory. Leave it None when tracing.

        Returns:
            logits [B, T, V] (float32 for a float32 model), or (logits, new_memory) with `return_memory`;
            new_memory is detached (the paper trains with truncated back-propagation through time).

        Outside the FFN the forward has no data-dependent Python control flow: every shape is a function
        of B, T and M, so it traces with dynamic batch, sequence and memory axes. The σ-MoE reference
        layer loops over the experts it selected; the exporter traces its own formulation of that layer.
        """
        if memory is not None and len(memory) != self.n_layers:
            raise MoexportError(f"memory (a list of {len(memory)} tensors)",
                                f"needs one tensor per layer ({self.n_layers})")
        x = F.dropout(self.embedding(input_ids), self.dropout, self.training)
        new_memory = []
        for index, layer in enumerate(self.layers):
            layer_memory = None if memory is None else memory[index]
            if return_memory:
                new_memory.append(_keep_last(x, layer_memory, memory_length))
            x = layer(x, layer_memory)
        logits = self.output(F.dropout(self.out_norm(x), self.dropout, self.training))
        return (logits, new_memory) if return_memory else logits

    def init_memory(self, batch_size: int) -> list[torch.Tensor]:
        """An empty memory (M = 0) for every layer: the same outputs as no memory, with the memory's layout."""
        weight = self.embedding.weight
        return [weight.new_zeros(batch_size, 0, self.d_model) for _ in range(self.n_layers)]


def _keep_last(x: torch.Tensor, memory: torch.Tensor | None, length: int | None) -> torch.Tensor:
    """The last `length` tokens of cat(memory, x), detached; `length` None keeps the memory's size."""
    full = x if memory is None else torch.cat([memory, x], dim=1)
    if length is None:
        start = 0 if memory is None else x.shape[1]  # a rolling window: drop the T oldest tokens
    else:
        start = max(full.shape[1] - length, 0)
    return full[:, start:].detach()
