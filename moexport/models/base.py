"""What every moexport module shares: a config that rebuilds it (native checkpoints store it)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from moexport.core.errors import MoexportError, some_names

KINDS: dict[str, type["ConfigModule"]] = {}


class ConfigModule(nn.Module):
    """An nn.Module whose constructor arguments are plain values, kept by `config()`.

    Subclasses declare ``kind`` (their name in config files) and call ``self._keep_config(...)`` with
    their constructor arguments.
    """

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    def _keep_config(self, **arguments: Any) -> None:
        self._config = dict(arguments)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, with ``kind``: `build(module.config())` makes the same module."""
        return {"kind": self.kind, **self._config}


def build(config: dict[str, Any]) -> ConfigModule:
    """Construct the module described by a `config()` dict (weights freshly initialised)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in KINDS:
        raise MoexportError(f"config kind={kind!r}", "is not a moexport module",
                            f"known kinds: {', '.join(sorted(KINDS))}")
    try:
        return KINDS[kind](**config)
    except TypeError as error:
        raise MoexportError(f"config of {kind!r}", f"does not fit the constructor: {error}") from None


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the module's floating-point parameters and buffers that hold NaN or Inf values."""
    # A finite sum proves every value finite in one cheap pass; only a NaN/Inf sum needs the exact scan.
    return [name for name, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor.sum())
            and not torch.isfinite(tensor).all()]


def check_finite(module: nn.Module, source: str) -> None:
    """Raise a MoexportError naming the tensors of `module` (loaded from `source`) that hold NaN or Inf.

    Nothing computed from such weights can be exported or checked: every output they reach is NaN.
    """
    names = nonfinite_tensors(module)
    if names:
        raise MoexportError(f"{source}, tensor {some_names(names, 3)}", "holds NaN or Inf values",
                            "the outputs they reach would be NaN; fix the checkpoint (or the training run that "
                            "wrote it)")
