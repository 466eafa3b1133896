"""The paper's model configurations (paper_code.md §3, §4.3), each with σ-MoE and its baselines.

Parameter counts with σ-MoE (the paper's code gives the same): wt103_small 47.26M, wt103_big 262.46M,
wt103_238m 237.0M, enwik8 41.24M. `dense` is the parameter-matched dense baseline (its d_ff from the
paper's `ff_multiplier`), `topk` the same MLP keeping the 128 largest activations (the paper's "nocomp"
runs, k ∈ {64…512}), `pkm` the parameter-matched PKM with the paper's init (relu, 4 heads, knn 128,
`custom_init=5`). The paper trained no PKM or Top-K model at the 238M scale, so there is none here.
`tiny` is not a paper configuration: a small model for tests and examples.
"""
from __future__ import annotations

import inspect
from typing import Any

from moexport.core.errors import MoexportError
from moexport.models.base import ConfigModule, build
from moexport.models.init import prenorm_scale
from moexport.models.transformer import TransformerLM

FFN_KINDS = ("sigma_moe", "dense", "pkm", "topk")

# name: (TransformerLM arguments, σ-MoE arguments, dense d_ff, PKM n_keys or None, Top-K k or None)
_PRESETS: dict[str, tuple[dict, dict, int, int | None, int | None]] = {
    "wt103_small": (dict(vocab_size=8000, d_model=412, n_layers=16, n_heads=10, head_dim=41, dropout=0.1),
                    dict(n_experts=16, expert_size=128, k=4, expert_dropout=0.0), 2053, 62, 128),
    "wt103_238m": (dict(vocab_size=8000, d_model=412, n_layers=16, n_heads=10, head_dim=41, dropout=0.1),
                   dict(n_experts=128, expert_size=128, k=4, expert_dropout=0.05), 16480, None, None),
    "wt103_big": (dict(vocab_size=8000, d_model=1024, n_layers=18, n_heads=16, dropout=0.2),
                  dict(n_experts=32, expert_size=128, k=4, expert_dropout=0.1), 4110, 89, 128),
    "enwik8": (dict(vocab_size=205, d_model=512, n_layers=12, n_heads=8, dropout=0.1),
               dict(n_experts=16, expert_size=128, k=4, expert_dropout=0.05), 2053, 62, 128),
    "tiny": (dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, dropout=0.0),
             dict(n_experts=8, expert_size=16, k=2, expert_dropout=0.0), 128, 14, 16),
}
PRESETS = tuple(_PRESETS)

_LM_ARGUMENTS = set(inspect.signature(TransformerLM).parameters) - {"ffn"}


def _has_ffn(name: str, ffn: str) -> bool:
    """Whether the paper trained this FFN kind at this preset's scale (PKM and Top-K are not everywhere)."""
    _, _, _, n_keys, topk = _PRESETS[name]
    return {"pkm": n_keys, "topk": topk}.get(ffn, 0) is not None


def preset_config(name: str, ffn: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The `TransformerLM` config of a paper preset, as plain values (edit it, then `build` it).

    Args:
        name: One of `PRESETS`.
        ffn: 'sigma_moe', 'dense', 'pkm' or 'topk'. Defaults to 'sigma_moe'.
        **overrides: TransformerLM arguments (vocab_size, n_layers, dropout, …) or arguments of the FFN
            module (k, n_experts, d_ff, n_keys, activation, …). `dropout` also sets the hidden
            dropout of the dense and Top-K FFNs, as the paper's single `dropout` argument does.

    Raises:
        MoexportError: Unknown preset or FFN kind, or a combination the paper did not train.
    """
    ffn = "sigma_moe" if ffn is None else ffn
    if name not in _PRESETS:
        raise MoexportError(f"preset {name!r}", "is not known", f"use one of {', '.join(PRESETS)}")
    if ffn not in FFN_KINDS:
        raise MoexportError(f"ffn={ffn!r}", "is not a feed-forward kind", f"use one of {', '.join(FFN_KINDS)}")
    lm, moe, d_ff, n_keys, topk = _PRESETS[name]
    if not _has_ffn(name, ffn):
        having = [other for other in _PRESETS if _has_ffn(other, ffn)]
        raise MoexportError(f"preset {name!r} with ffn={ffn!r}", "was not trained in the paper",
                            f"presets with {ffn}: {', '.join(having)}")
    lm = {**lm, **{key: value for key, value in overrides.items() if key in _LM_ARGUMENTS}}
    d, scale = lm["d_model"], prenorm_scale(lm["n_layers"])
    layer = {
        "sigma_moe": dict(kind="sigma_moe", d_model=d, **moe, weight_std_scale=scale),
        "dense": dict(kind="dense", d_model=d, d_ff=d_ff, dropout=lm["dropout"], weight_std_scale=scale),
        "topk": dict(kind="topk", d_model=d, d_ff=d_ff, k=topk, dropout=lm["dropout"], weight_std_scale=scale),
        "pkm": dict(kind="pkm", d_model=d, n_keys=n_keys, heads=4, knn=128, weight_std_scale=scale),
    }[ffn]
    layer.update({key: value for key, value in overrides.items() if key not in _LM_ARGUMENTS})
    return {"kind": TransformerLM.kind, **lm, "ffn": layer}


def from_preset(name: str, ffn: str | None = None, **overrides: Any) -> ConfigModule:
    """Build a freshly initialised `TransformerLM` of a paper preset (see `preset_config`).

    Example::

        model = moexport.models.from_preset("wt103_small")            # σ-MoE, 47.26M parameters
        baseline = moexport.models.from_preset("wt103_small", "dense")
    """
    return build(preset_config(name, ffn, **overrides))
