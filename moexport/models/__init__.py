"""The PyTorch reference models: every runtime is compared against these."""
from moexport.models.activations import ACTIVATIONS
from moexport.models.attention import RelativeAttention
from moexport.models.base import KINDS, ConfigModule, build, check_finite, nonfinite_tensors
from moexport.models.mlp import DenseMLP, TopKMLP
from moexport.models.pkm import PKM
from moexport.models.presets import FFN_KINDS, PRESETS, from_preset, preset_config
from moexport.models.routing import SELECTIONS, entropy_regularizer, route, topk_lower_index
from moexport.models.sigma_moe import SigmaMoE, expert_mix
from moexport.models.transformer import TransformerLayer, TransformerLM

__all__ = [
    "ACTIVATIONS",
    "FFN_KINDS",
    "KINDS",
    "PRESETS",
    "SELECTIONS",
    "ConfigModule",
    "DenseMLP",
    "PKM",
    "RelativeAttention",
    "SigmaMoE",
    "TopKMLP",
    "TransformerLM",
    "TransformerLayer",
    "build",
    "check_finite",
    "entropy_regularizer",
    "expert_mix",
    "from_preset",
    "nonfinite_tensors",
    "preset_config",
    "route",
    "topk_lower_index",
]
