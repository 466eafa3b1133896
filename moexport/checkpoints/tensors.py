"""Filling a module built from a config with the tensors of a file, checking every one of them."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from moexport.core.errors import MoexportError
from moexport.models.base import ConfigModule, build


def build_from_config(config: dict[str, Any], path: Path) -> ConfigModule:
    """`build(config)` on the meta device (no memory, no init): the tensors come from the file."""
    try:
        with torch.device("meta"):
            return build(config)
    except MoexportError as error:
        raise MoexportError(path, f"describes a model moexport cannot build ({error.culprit}: {error.problem})",
                            error.note) from None


def load_into(config: dict[str, Any], state: Mapping[str, Any], path: Path) -> ConfigModule:
    """The module of `config` holding the tensors of `state` (read from `path`), in eval mode."""
    return fill(build_from_config(config, path), state, path)


def fill(model: ConfigModule, state: Mapping[str, Any], path: Path) -> ConfigModule:
    """`model` (built on the meta device) holding the tensors of `state`, in eval mode.

    Raises:
        MoexportError: A tensor is missing, unexpected, not a floating-point tensor, or its shape
            disagrees with the config (the message names the file and the tensor).

    Warns:
        UserWarning: Tensors with NaN or Inf values, named.
    """
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    if missing:
        raise MoexportError(f"{path}, tensor '{missing[0]}'", "is missing",
                            f"the model needs {len(expected)} tensors; missing: {_some(missing)}")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise MoexportError(f"{path}, tensor '{unexpected[0]}'", "is not a tensor of the model",
                            f"unexpected: {_some(unexpected)}; expected names such as {_some(list(expected))}")
    for name, want in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or not got.is_floating_point():
            found = type(got).__name__ if not isinstance(got, torch.Tensor) else f"a {got.dtype} tensor"
            raise MoexportError(f"{path}, tensor '{name}'", f"is {found}, expected a floating-point tensor")
        if tuple(got.shape) != tuple(want.shape):
            raise MoexportError(f"{path}, tensor '{name}'",
                                f"has shape {tuple(got.shape)}, expected {tuple(want.shape)}",
                                "the configuration and the weights of the checkpoint disagree")
    nonfinite = [name for name in expected if _has_nonfinite(state[name])]
    if nonfinite:
        warnings.warn(f"{path}: NaN or Inf values in tensors {_some(nonfinite)}", UserWarning, stacklevel=3)
    model.load_state_dict({name: state[name] for name in expected}, assign=True)
    return model.eval()


def _has_nonfinite(tensor: torch.Tensor) -> bool:
    # A finite sum proves every value finite in one cheap pass; only a NaN/Inf sum needs the exact scan.
    return not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all()


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
