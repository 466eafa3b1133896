"""Expert selection: the one routing rule every implementation of moexport follows.

Rule (kernels, ONNX function bodies, ONNX Runtime and TensorRT kernels all implement exactly this):

1. Router logits are computed in float32 (``x`` and ``expert_sel`` upcast, fp32 accumulation) whatever
   the model dtype. The router is tiny (d x E), and half-precision logits would turn many routing
   decisions into ties. Equal router rows give equal logits (the PyTorch and NumPy references take
   the product in float64 and round it once, since float32 GEMMs do not sum every column alike);
   logits that differ only by the order of the float32 sums are near-ties, on which implementations
   may legitimately disagree.
2. Experts are ranked by their raw logit. Sigmoid and softmax are strictly increasing, so this is the
   paper's top-k over scores, minus the artificial ties that rounding of saturated scores creates
   (sigmoid(17) and sigmoid(25) are both 1.0 in float32).
3. Equal logits: the lower expert index wins. The k selected experts are ordered best first, so slot j
   of token n holds its j-th best expert (slot index n*k + j in the dispatch ops).
   A NaN logit (a NaN in the token or the router row) counts as -inf, in the ranking and in the gates:
   NaN is not ordered, and sorts would put it first or last, or pick one expert twice. A token that
   is all NaN thus takes experts 0..k-1 (its output is NaN through the experts' products).
4. Gate of the selected experts by `selection`:
   ``sigmoid``: sigmoid(logit), no renormalisation (σ-MoE);
   ``softmax``: softmax over all experts, gathered at the selected ones (not renormalised);
   ``softmax_after_topk``: softmax over the k selected logits.
"""
from __future__ import annotations

import torch

from moexport.core.errors import MoexportError

SELECTIONS = ("sigmoid", "softmax", "softmax_after_topk")


def check_selection(selection: str) -> str:
    """`selection` itself, if it is one of `SELECTIONS`; otherwise a MoexportError listing them."""
    if selection not in SELECTIONS:
        raise MoexportError(f"selection={selection!r}", "is not a known selection mode",
                            f"use one of {', '.join(SELECTIONS)}")
    return selection


def nan_as_lowest(logits: torch.Tensor) -> torch.Tensor:
    """`logits` with NaN as -inf (rule 3 above); differentiable, with no gradient into the NaN entries."""
    return logits.masked_fill(torch.isnan(logits), float("-inf"))


def topk_lower_index(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, best first, lower index first among equals."""
    # A stable descending sort keeps equal keys in index order; torch.topk makes no such promise.
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]


def route(logits: torch.Tensor, k: int, selection: str = "sigmoid", *,
          drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select k experts per row of `logits` and compute their gates.

    Args:
        logits: Router logits [..., E], float32.
        k: Experts per token.
        selection: 'sigmoid', 'softmax' or 'softmax_after_topk'.
        drop_mask: Expert dropout (training only): True where an expert is dropped for a token. A
            dropped expert ranks below every kept one and, if still selected, gets gate 0.

    Returns:
        (gate [..., k] float32, expert [..., k] int64), best expert first.
    """
    check_selection(selection)
    logits = nan_as_lowest(logits)
    rank_key = logits if drop_mask is None else logits.masked_fill(drop_mask, float("-inf"))
    expert = topk_lower_index(rank_key, k)
    return gates_of(logits, expert, selection, drop_mask=drop_mask), expert


def gates_of(logits: torch.Tensor, expert: torch.Tensor, selection: str, *,
             drop_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gates [..., k] float32 of the selected `expert` [..., k] (int64) under rule 4 above.

    Separate from the selection so that an implementation which ranks elsewhere (a kernel) computes
    differentiable gates with the same rule.
    """
    logits = nan_as_lowest(logits)
    if selection == "softmax_after_topk":
        rank_key = logits if drop_mask is None else logits.masked_fill(drop_mask, float("-inf"))
        gate = torch.softmax(rank_key.gather(-1, expert), dim=-1)
        if drop_mask is not None:  # all k dropped: softmax of -inf is NaN; those slots get gate 0
            gate = torch.nan_to_num(gate, nan=0.0)
        return gate
    scores = torch.sigmoid(logits) if selection == "sigmoid" else torch.softmax(logits, dim=-1)
    if drop_mask is not None:
        scores = scores.masked_fill(drop_mask, 0.0)
    return scores.gather(-1, expert)


def entropy_regularizer(logits: torch.Tensor) -> torch.Tensor:
    """−H(p̄): minus the entropy of the batch-mean routing distribution softmax(logits) (paper §1.4).

    Minimising it spreads the tokens of a batch over the experts without making any single token's
    routing uniform.
    """
    log_p = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    log_mean = torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(log_p.shape[0])))
    return (log_mean.exp() * log_mean).sum()
