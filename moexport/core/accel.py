"""Registry through which a room to the right offers a faster implementation to a room to the left.

`models` is the leftmost room and must not import `kernels`; yet on a GPU the model should run the
Triton kernels. So `kernels` registers its implementation here when it is imported, and the model asks
for one at call time. Without a registration (CPU, no Triton) the model runs its PyTorch reference.
The package names the modules that offer an implementation (`provide`); the first lookup of that name
imports them, so nothing is imported for it before a model runs.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

_REGISTRY: dict[str, list[tuple[Callable[[torch.Tensor], bool], Callable]]] = {}
_PROVIDERS: dict[str, list[str]] = {}
_DISABLED: set[str] = set()


def provide(name: str, module: str) -> None:
    """Declare that importing `module` registers an implementation of `name` (imported at the first lookup)."""
    _PROVIDERS.setdefault(name, []).append(module)


def register(name: str, fn: Callable, *, applies: Callable[[torch.Tensor], bool]) -> None:
    """Offer `fn` as the implementation of `name` for inputs where `applies(input)` is true."""
    _REGISTRY.setdefault(name, []).append((applies, fn))


def lookup(name: str, x: torch.Tensor) -> Callable | None:
    """The registered implementation of `name` that applies to `x`, or None (use the reference)."""
    if name in _DISABLED:
        return None
    for module in _PROVIDERS.pop(name, ()):
        importlib.import_module(module)
    for applies, fn in reversed(_REGISTRY.get(name, [])):
        if applies(x):
            return fn
    return None


class disabled:
    """Context manager that makes `lookup(name, ...)` return None, e.g. to time or test the reference."""

    def __init__(self, *names: str):
        self.names = set(names)
        self.previous: set[str] = set()

    def __enter__(self):
        self.previous = set(_DISABLED)
        _DISABLED.update(self.names)
        return self

    def __exit__(self, *exc):
        _DISABLED.clear()
        _DISABLED.update(self.previous)
        return False
