"""What every moexport module shares: a config that rebuilds it (native checkpoints store it)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn

from moexport.core.errors import MoexportError

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
