"""The paper's training checkpoints (`save/<name>/checkpoint/model-<iter>.pth` of RobertCsordas/moe).

A `torch.save` dict whose `model` entry is the state dict and whose `run_invariants["args"]` holds the
raw command-line arguments (paper_code.md, appendix). Shapes give most of the configuration; what they
cannot give (the σ-MoE k, PKM knn, Top-K k, activations) is read from the arguments. Options of the
research code that change the forward pass and that moexport does not implement are refused by name.
Evaluation-loop settings are not part of the model and are not read: how many segments of memory to
keep (`lm.trafo.test_context_blocks`, passed as `memory_length` to `TransformerLM.forward`) and
`lm.trafo.same_length_eval` (off by default; it masks part of the oldest memory segment).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from moexport.checkpoints.tensors import load_into
from moexport.core.errors import MoexportError
from moexport.models.base import ConfigModule
from moexport.models.init import prenorm_scale

VARIANTS = ("preln_moe", "preln_relative", "preln_kvmem", "preln_topk")
LOGGING_BUFFERS = ("kv_sel_counts_100", "iter")  # persistent counters of the research code: not weights

# Arguments that must keep these values: any other value changes the forward pass in a way moexport
# does not implement. Per variant, plus the ones shared by all.
_FIXED_ARGS: dict[str, dict[str, Any]] = {
    "all": {"transformer.output_mode": "normal", "embedding_size": None, "transformer.ln_affine": True,
            "lm.trafo.test_pos_clamp": None, "lm.trafo.last_layer_context": False},
    "preln_moe": {"kvmem.standard_parallel": False, "moe.sel_bias": False, "moe.key_mode": "moe",
                  "moe.half_key": False, "moe.norm_keys": False, "moe.topk_mode": "full", "moe.sel_norm": "none",
                  "moe.mlp_selection": False, "moe.norm_expert_scores": False, "kvmem.dropout": "none"},
    "preln_kvmem": {"kvmem.standard_parallel": False, "kvmem.linproj": False, "kvmem.factorize": False,
                    "kvmem.full_key": False, "kvmem.two_stage": False, "kvmem.head_exclusive": False,
                    "kvmem.key_redundancy_factor": 1, "kvmem.approx_topk": False, "kvmem.randomize_indices": False,
                    "kvmem.head_merge_topk": False, "pkm.slice_values": False, "kvmem.dropout": "none"},
    "preln_relative": {},
    "preln_topk": {},
}
# The paper names the FFN `pkm` (σ-MoE and PKM) or puts linear1/linear2 in the layer; moexport uses `ffn`.
_FFN_PREFIX = re.compile(r"^(layers\.\d+\.)(?:pkm\.|(?=linear[12]\.))")
_SELECTIONS = {("sigmoid", False): "sigmoid", ("sigmoid", True): "sigmoid",  # sigmoid is monotonic
               ("gate", False): "softmax", ("gate", True): "softmax_after_topk"}
_ACTIVATIONS = {"preln_moe": ("relu", "gelu"), "preln_relative": ("relu", "gelu"), "preln_topk": ("relu", "gelu"),
                "preln_kvmem": ("relu", "softmax")}


def is_paper_checkpoint(content: Any) -> bool:
    """Whether unpickled file content is a paper training checkpoint (it has 'model' and 'run_invariants')."""
    return isinstance(content, dict) and "model" in content and "run_invariants" in content


def drop_logging_buffers(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` without the research code's persistent counters (`LOGGING_BUFFERS`), which are not weights."""
    return {name: value for name, value in state.items() if name.rsplit(".", 1)[-1] not in LOGGING_BUFFERS}


def load_paper(content: dict[str, Any], path: Path) -> ConfigModule:
    """The `TransformerLM` of a paper training checkpoint (already unpickled), in eval mode."""
    args = PaperArgs(content, path)
    state = content["model"]
    if not isinstance(state, Mapping):
        raise MoexportError(f"{path}, entry 'model'", f"is a {type(state).__name__}, expected the state dict")
    state = drop_logging_buffers(state)
    config = paper_config(args, state, path)
    if args.get("tied_embedding", bool, False) and "output.weight" in state:
        state["output.weight"] = state["output.weight"].clone()  # untie: moexport's output layer is its own
    renamed = {_FFN_PREFIX.sub(r"\1ffn.", name): tensor for name, tensor in state.items()}
    return load_into(config, renamed, path)


class PaperArgs:
    """`run_invariants["args"]`, read with the raw-argparse conventions of the paper's code.

    Booleans are 0/1, options with a custom parser keep their string form ('8', 'none', '62,62').
    """

    def __init__(self, content: dict[str, Any], path: Path):
        args = content["run_invariants"].get("args") if isinstance(content["run_invariants"], dict) else None
        if not isinstance(args, dict):
            raise MoexportError(f"{path}, entry run_invariants['args']", "is missing",
                                "the paper's Saver stores the command-line arguments there")
        self.raw, self.path = args, path

    def get(self, key: str, kind: type | str, default: Any = ...) -> Any:
        """The argument `key` parsed as `kind` (int, float, bool, str or 'int_list').

        'none' reads as None, except for kind str.
        """
        if key not in self.raw:
            if default is ...:
                raise MoexportError(f"{self.path}, argument '{key}'", "is missing from run_invariants['args']")
            return default
        value = self.raw[key]
        if value is None or (kind is not str and isinstance(value, str) and value.lower() == "none"):
            return None
        try:
            return _PARSERS.get(kind, kind)(value)
        except (TypeError, ValueError):
            raise MoexportError(f"{self.path}, argument '{key}'", f"has value {value!r}",
                                f"expected {getattr(kind, '__name__', kind)}") from None

    def check_fixed(self, variant: str) -> None:
        """Refuse options whose effect on the forward pass moexport does not implement."""
        for key, wanted in {**_FIXED_ARGS["all"], **_FIXED_ARGS[variant]}.items():
            value = self.get(key, int if wanted is None else type(wanted), wanted)  # None: an int-or-none option
            if value != wanted:
                raise MoexportError(f"{self.path}, argument '{key}'",
                                    f"is {self.raw[key]!r}, which moexport does not support",
                                    f"only {wanted!r} is implemented for {variant}")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() not in {"0", "1", "true", "false"}:
            raise ValueError(value)
        return value.lower() in {"1", "true"}
    if value not in (0, 1):
        raise ValueError(value)
    return bool(value)


def _parse_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _parse_int_list(value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in re.split(r"[,_ ;]+", str(value).strip()) if v]


_PARSERS: dict[Any, Callable[[Any], Any]] = {bool: _parse_bool, int: _parse_int, "int_list": _parse_int_list}


def paper_config(args: PaperArgs, state: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The `TransformerLM` config of a paper checkpoint: shapes from `state`, the rest from `args`."""
    variant = args.get("transformer.variant", str)
    if variant not in VARIANTS:
        raise MoexportError(f"{path}, argument 'transformer.variant'",
                            f"is {variant!r}, which moexport cannot load",
                            f"supported variants: {', '.join(VARIANTS)}")
    args.check_fixed(variant)
    shape = _ShapeReader(state, path)
    vocab_size, d_model = shape("embedding.weight", 2)
    if args.get("state_size", int, d_model) != d_model:
        raise MoexportError(f"{path}, tensor 'embedding.weight'", f"has width {d_model}, but state_size is "
                            f"{args.get('state_size', int)}")
    n_layers = len({int(m.group(1)) for name in state if (m := re.match(r"layers\.(\d+)\.", name))})
    expected_layers = args.get("transformer.encoder_n_layers", int, n_layers)
    if n_layers != expected_layers:
        raise MoexportError(path, f"has tensors of {n_layers} layers, but transformer.encoder_n_layers is "
                            f"{expected_layers}")
    n_heads, head_dim = shape("layers.0.self_attn.global_content_bias", 2)
    activation = args.get("transformer.activation", str, "relu")
    if activation not in _ACTIVATIONS[variant]:
        raise MoexportError(f"{path}, argument 'transformer.activation'", f"is {activation!r}",
                            f"{variant} supports {', '.join(_ACTIVATIONS[variant])}")
    dropout = args.get("dropout", float, 0.0)
    ffn = _FFN_CONFIGS[variant](args, shape, d_model=d_model, scale=prenorm_scale(n_layers), activation=activation,
                                dropout=dropout)
    return {"kind": "transformer_lm", "vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers,
            "n_heads": n_heads, "ffn": ffn, "head_dim": head_dim, "dropout": dropout}


class _ShapeReader:
    """Shapes of named tensors, with a clear error for a missing or oddly shaped one."""

    def __init__(self, state: Mapping[str, Any], path: Path):
        self.state, self.path = state, path

    def __call__(self, name: str, ndim: int) -> tuple[int, ...]:
        tensor = self.state.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise MoexportError(f"{self.path}, tensor '{name}'",
                                "is missing" if tensor is None else "is not a tensor")
        if tensor.dim() != ndim:
            raise MoexportError(f"{self.path}, tensor '{name}'", f"has shape {tuple(tensor.shape)}, expected "
                                f"{ndim} dimensions")
        return tuple(tensor.shape)


def _sigma_moe(args, shape, *, d_model, scale, activation, dropout):
    n_experts, _, expert_size = shape("layers.0.pkm.keys", 3)
    mode = args.get("moe.selection_mode", str, "sigmoid")
    after_topk = args.get("moe.activation_after_topk", bool, False)
    if (mode, after_topk) not in _SELECTIONS:
        raise MoexportError(f"{args.path}, argument 'moe.selection_mode'",
                            f"is {mode!r}, which moexport cannot load",
                            "supported: sigmoid (σ-MoE) and gate (softmax, before or after top-k)")
    return {"kind": "sigma_moe", "d_model": d_model, "n_experts": n_experts, "expert_size": expert_size,
            "k": args.get("pkm.n_heads", int), "selection": _SELECTIONS[(mode, after_topk)],
            "activation": activation,
            "expert_dropout": args.get("moe.drop_expert", float, 0.0), "bias": "layers.0.pkm.bias" in shape.state,
            "v_dim": shape("layers.0.pkm.values", 3)[2],
            "weight_std_scale": scale * math.sqrt(args.get("moe.init_scale", float, 1.0))}


def _dense(args, shape, *, d_model, scale, activation, dropout):
    return {"kind": "dense", "d_model": d_model, "d_ff": shape("layers.0.linear1.weight", 2)[0],
            "activation": activation, "dropout": dropout, "weight_std_scale": scale}


def _topk(args, shape, *, d_model, scale, activation, dropout):
    return {**_dense(args, shape, d_model=d_model, scale=scale, activation=activation, dropout=dropout),
            "kind": "topk", "k": args.get("transformer.topk_value", int, 32),
            "use_norm": args.get("transformer.topk_use_norm", bool, True)}


def _pkm(args, shape, *, d_model, scale, activation, dropout):
    heads, n_keys, _ = shape("layers.0.pkm.keys.0", 3)
    key_sizes = args.get("pkm.n_keys", "int_list", [n_keys])
    if len(set(key_sizes)) > 1:
        raise MoexportError(f"{args.path}, argument 'pkm.n_keys'", f"is {args.raw['pkm.n_keys']!r}",
                            "moexport's PKM has two sub-key tables of the same size")
    return {"kind": "pkm", "d_model": d_model, "n_keys": n_keys, "heads": heads,
            "knn": args.get("pkm.knn", int, 32), "activation": activation,
            "weight_std_scale": scale,
            "value_init": "d_model" if args.get("pkm.custom_init", int, 0) in (0, 1) else "n_values"}


_FFN_CONFIGS = {"preln_moe": _sigma_moe, "preln_relative": _dense, "preln_topk": _topk, "preln_kvmem": _pkm}
