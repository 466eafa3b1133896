"""Dtype names used across moexport and the parity tolerances written down per dtype (DESIGN.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moexport.core.errors import MoexportError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerance: rtol and atol bound the error of a result a against its reference b.

    Elementwise (the kernel tests): |a - b| <= atol + rtol * |b|. For a whole output (`validate`),
    against the output's scale: max |a - b| <= atol + rtol * max |b|.

    `tie` is the routing margin under which two runtimes may legitimately pick different experts: a
    token whose k-th and (k+1)-th best router logits differ by less than tie * max(1, |logit|) is a
    near-tie, reported with its margin; a routing difference at a larger margin is a failure.
    """

    rtol: float
    atol: float
    tie: float


# fp32: both sides accumulate in fp32, so only summation order differs.  Half types: one rounding of
# the output alone is 2^-8 (bf16) or 2^-11 (fp16) relative, and intermediates are rounded too.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(rtol=1e-5, atol=1e-5, tie=1e-4),
    "float16": Tolerance(rtol=1e-2, atol=1e-2, tie=2e-2),
    "bfloat16": Tolerance(rtol=2e-2, atol=2e-2, tie=5e-2),
}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical name ('float32', 'float16', 'bfloat16') of a dtype given as a name, alias or torch dtype."""
    if isinstance(dtype, torch.dtype):
        name = next((name for name, value in DTYPES.items() if value == dtype), None)
    else:
        name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise MoexportError(f"dtype={dtype!r}", "is not supported", f"use one of {', '.join(DTYPES)}")
    return name


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a name, alias or torch dtype."""
    return DTYPES[dtype_name(dtype)]


def tolerance_for(dtype: str | torch.dtype) -> Tolerance:
    """The parity tolerance of a dtype."""
    return TOLERANCES[dtype_name(dtype)]
