"""Checks of option values that cannot be right whatever the files (API: an error; CLI: bad usage)."""
from __future__ import annotations

import math
import numbers

from moexport.core.errors import MoexportError


def check_tolerance(name: str, value: float) -> float:
    """`value` itself if it can be a tolerance (a finite number >= 0); else a MoexportError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise MoexportError(f"{name}={value!r}", "is not a tolerance", "give a finite number >= 0, e.g. 1e-3")
    return value


def check_count(name: str, value: int) -> int:
    """`value` itself if it is a whole number >= 1; else a MoexportError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise MoexportError(f"{name}={value!r}", "must be a whole number >= 1")
    return value
