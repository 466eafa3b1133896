"""Reading checkpoint files without running code from them.

`torch.save` files are unpickled by `torch.load(weights_only=False, pickle_module=...)` with a restricted
unpickler: it rebuilds tensors, `OrderedDict`s and the paper's training-state class
`framework.data_structures.dotdict.DotDict` (read as a plain dict), and refuses every other global.
torch's own weights-only unpickler cannot be used: it refuses SETITEMS on a dict subclass even when the
class is allow-listed (paper_code.md, appendix). Storages are resolved by torch before our hook sees them.
"""
from __future__ import annotations

import collections
import pickle
import struct
import types
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch._utils
from safetensors import SafetensorError
from safetensors.torch import load_file

from moexport.core.errors import MoexportError

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    # The paper's training state: a dict subclass with attribute access, read as a plain dict.
    ("framework.data_structures.dotdict", "DotDict"): dict,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""

    def __init__(self, module: str, name: str):
        self.qualified_name = f"{module}.{name}"
        super().__init__(f"refused global {self.qualified_name}")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed to rebuild tensors and the paper's state."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def _restricted_load(file, **kwargs) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load wants a module-like object: it subclasses `.Unpickler` and calls `.load` (legacy format).
restricted_pickle = types.ModuleType("moexport_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def read_torch_file(path: Path) -> Any:
    """The object in a `torch.save` file (zip or legacy format), tensors on the CPU; never runs its code.

    Raises:
        MoexportError: The file is truncated or corrupt, or pickles a global outside the allow-list.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except RefusedGlobal as error:
        raise MoexportError(path, f"pickles the global '{error.qualified_name}', which moexport refuses to load",
                            "only tensors, OrderedDict and the paper's DotDict are allowed: loading never "
                            "runs code from a checkpoint") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError, struct.error) as error:
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        raise MoexportError(path, "is not a readable torch.save file (truncated or corrupt?)",
                            f"reading it failed with: {reason}") from None


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, on the CPU."""
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise MoexportError(path, "is not a readable safetensors file (truncated or corrupt?)",
                            f"reading it failed with: {error}") from None


def looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with the little-endian u64 length of its JSON header, then '{'."""
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def read_file(path: Path) -> Any:
    """The content of a checkpoint file: a torch.save object or a safetensors tensor dict."""
    if not path.exists():
        raise MoexportError(path, "does not exist")
    if path.stat().st_size == 0:
        raise MoexportError(path, "is empty", "expected a checkpoint file (torch.save or .safetensors)")
    # By name too: torch.load hands a *.safetensors file to safetensors itself, outside our error handling.
    if path.suffix == ".safetensors" or (not zipfile.is_zipfile(path) and looks_like_safetensors(path)):
        return read_safetensors_file(path)
    return read_torch_file(path)
