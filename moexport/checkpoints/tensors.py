"""Filling a module built from a config with the tensors of a file, checking every one of them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from moexport.core.errors import MoexportError, some_names
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
    """
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    if missing:
        raise MoexportError(f"{path}, tensor '{missing[0]}'", "is missing",
                            f"the model needs {len(expected)} tensors; missing: {some_names(missing)}")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise MoexportError(f"{path}, tensor '{unexpected[0]}'", "is not a tensor of the model",
                            f"unexpected: {some_names(unexpected)}; "
                            f"expected names such as {some_names(list(expected))}")
    for name, want in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or not got.is_floating_point():
            found = type(got).__name__ if not isinstance(got, torch.Tensor) else f"a {got.dtype} tensor"
            raise MoexportError(f"{path}, tensor '{name}'", f"is {found}, expected a floating-point tensor")
        if tuple(got.shape) != tuple(want.shape):
            raise MoexportError(f"{path}, tensor '{name}'",
                                f"has shape {tuple(got.shape)}, expected {tuple(want.shape)}",
                                "the configuration and the weights of the checkpoint disagree")
    model.load_state_dict({name: state[name] for name in expected}, assign=True)
    return model.eval()

