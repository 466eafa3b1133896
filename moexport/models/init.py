"""Weight initialisation shared by the attention and the dense FFN layers (the paper's pre-LN recipe)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def prenorm_scale(n_layers: int) -> float:
    """The paper's init scale s = sqrt(2 / n_layers) of every projection of a pre-LN model."""
    return math.sqrt(2.0 / n_layers)


@torch.no_grad()
def prenorm_init_(linear: nn.Linear, weight_std_scale: float) -> None:
    """The paper's `reset_prenorm_params` for one Linear: truncated normal rescaled to std s/√fan_in.

    With s = sqrt(2 / n_layers) this is the paper's std sqrt(2 / (n_layers · fan_in)); the bias is zeroed.
    """
    weight = linear.weight
    if not weight.is_meta:  # a meta tensor has no values to draw (models are built on meta to be loaded)
        truncated_normal_(weight)
        weight.mul_(weight_std_scale / math.sqrt(weight.shape[1]) / weight.std())
    if linear.bias is not None:
        linear.bias.zero_()


@torch.no_grad()
def truncated_normal_(tensor: torch.Tensor, bound: float = 2.0) -> torch.Tensor:
    """N(0, 1) restricted to [−bound, bound], by redrawing only the values outside.

    The distribution of `nn.init.trunc_normal_`; torch's version redraws the whole tensor on every
    rejection round, which makes building the paper's larger models take tens of seconds.
    """
    tensor.normal_()
    outside = tensor.abs() > bound
    while outside.any():
        tensor[outside] = torch.randn(int(outside.sum()), dtype=tensor.dtype, device=tensor.device)
        outside = tensor.abs() > bound
    return tensor
