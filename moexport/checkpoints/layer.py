"""Stand-alone σ-MoE layer state dicts (`moe_layer`, MoEUT and Hugging Face ports of the paper's layer).

Tensors `keys` [E, d, G], `values` [E, G, v_dim], `expert_sel` [E, d] (or `expert_sel.weight`, as an
nn.Linear in the HF port), optionally `bias` [E, G] and `o_bias` [v_dim]. Nothing in the file says how
many experts a token uses, so k must be given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from moexport.checkpoints.paper import drop_logging_buffers
from moexport.checkpoints.tensors import load_into
from moexport.core.errors import MoexportError
from moexport.models.sigma_moe import SigmaMoE

def is_sigma_moe_state(content: Any) -> bool:
    """Whether file content is a stand-alone σ-MoE layer state dict (keys, values and a router)."""
    return (isinstance(content, Mapping) and "keys" in content and "values" in content
            and ("expert_sel" in content or "expert_sel.weight" in content))


def load_sigma_moe_state(state: Mapping[str, Any], path: Path, *, k: int | None, selection: str | None,
                         activation: str | None) -> SigmaMoE:
    """The `SigmaMoE` holding a stand-alone layer state dict, in eval mode."""
    state = {("expert_sel" if name == "expert_sel.weight" else name): value
             for name, value in drop_logging_buffers(state).items()}
    if "sel_bias" in state:
        raise MoexportError(f"{path}, tensor 'sel_bias'",
                            "is a router bias, which moexport's σ-MoE does not have")
    if k is None:
        raise MoexportError(path, "is a σ-MoE layer state dict, which does not record k (experts per token)",
                            "pass k=… to load_checkpoint (--k on the command line: inspect, export, validate)")
    keys, values = state["keys"], state["values"]
    for name, tensor in (("keys", keys), ("values", values)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise MoexportError(f"{path}, tensor '{name}'", f"is {found}, expected a 3-d tensor")
    n_experts, d_model, expert_size = keys.shape
    config = {"kind": SigmaMoE.kind, "d_model": d_model, "n_experts": n_experts, "expert_size": expert_size,
              "k": k, "selection": selection or "sigmoid", "activation": activation or "relu",
              "bias": "bias" in state or "o_bias" in state, "v_dim": values.shape[-1]}
    return load_into(config, state, path)
