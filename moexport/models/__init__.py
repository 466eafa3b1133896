"""The PyTorch reference models: every runtime is compared against these."""
from moexport.models.activations import ACTIVATIONS
from moexport.models.base import KINDS, ConfigModule, build
from moexport.models.routing import SELECTIONS, entropy_regularizer, route, topk_lower_index
from moexport.models.sigma_moe import SigmaMoE, expert_mix

__all__ = [
    "ACTIVATIONS",
    "SELECTIONS",
    "KINDS",
    "ConfigModule",
    "SigmaMoE",
    "build",
    "entropy_regularizer",
    "expert_mix",
    "route",
    "topk_lower_index",
]
