"""moexport's own checkpoint: a folder with `config.json` (the module's config) and `model.safetensors`.

Works for whole language models and single layers alike: any `ConfigModule` is rebuilt from its config
and filled with its tensors, bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moexport.checkpoints.files import read_safetensors_file
from moexport.checkpoints.tensors import build_from_config, fill
from moexport.core.errors import MoexportError
from moexport.core.files import write_atomically
from moexport.models.base import ConfigModule

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT, FORMAT_VERSION = "moexport", 1


def save_native(model: ConfigModule, path: Path) -> Path:
    """Write `model` to the folder `path` (created if needed); each file appears whole or not at all."""
    if not isinstance(model, ConfigModule):
        raise MoexportError(f"model of type {type(model).__name__}", "is not a moexport module",
                            "build it with moexport.models (from_preset, SigmaMoE, …) or load_checkpoint")
    if path.exists() and not path.is_dir():
        raise MoexportError(path, "exists and is not a folder", "a moexport checkpoint is a folder")
    state = model.state_dict()
    on_meta = [name for name, tensor in state.items() if tensor.is_meta]
    if on_meta:
        raise MoexportError(f"tensor '{on_meta[0]}'", "is on the meta device and has no values to save")
    tensors = _separate_storages(state)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config()}
    # The weights first: config.json is what marks the folder as a checkpoint.
    write_atomically(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(path / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return path


def load_native(path: Path) -> ConfigModule:
    """The module stored in the folder `path` by `save_native`, in eval mode."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise MoexportError(path, f"is a folder without {CONFIG_FILE}", "a moexport checkpoint folder holds "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by moexport.save_checkpoint)")
    config = _read_config(config_path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MoexportError(weights, "does not exist", f"{CONFIG_FILE} needs its weights beside it")
    return fill(build_from_config(config["model"], config_path), read_safetensors_file(weights), weights)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MoexportError(path, f"is not readable JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise MoexportError(path, "is not a moexport config",
                            f'expected {{"format": "{FORMAT}", "model": {{…}}}}')
    if config.get("format_version") != FORMAT_VERSION:
        raise MoexportError(path, f"has format_version {config.get('format_version')!r}",
                            f"this moexport reads version {FORMAT_VERSION}")
    return config


def _separate_storages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with a storage each: safetensors refuses tensors that share memory (tied weights)."""
    seen, tensors = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors
