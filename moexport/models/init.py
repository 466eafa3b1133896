"""Weight initialisation shared by the attention and the dense FFN layers (the paper's pre-LN recipe)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def prenorm_init_(linear: nn.Linear, weight_std_scale: float) -> None:
    """The paper's `reset_prenorm_params` for one Linear: truncated normal rescaled to std s/√fan_in.

    With s = sqrt(2 / n_layers) this is the paper's std sqrt(2 / (n_layers · fan_in)); the bias is zeroed.
    """
    nn.init.trunc_normal_(linear.weight)
    linear.weight.mul_(weight_std_scale / math.sqrt(linear.weight.shape[1]) / linear.weight.std())
    if linear.bias is not None:
        linear.bias.zero_()
