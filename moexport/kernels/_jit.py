"""Triton helpers shared by every kernel family: matrix product, activations, the interpreter flag.

Importing this module imports triton; `moexport.kernels` imports it only when a kernel is used.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter multiplies bfloat16 tiles as their raw uint16 bits (triton 3.9), so under
# TRITON_INTERPRET=1 products are taken in float32. That is what the tensor cores compute too:
# half-precision products are exact in float32 and the sum is accumulated in float32.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def mma(a, b):
    """a @ b with float32 accumulation; float32 operands keep float32 accuracy (3 tf32 passes)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """Hidden activation of a float32 tile (codes: plan.ACTIVATION_CODES; GELU is the exact erf form);
    NaN stays NaN, as in the reference."""
    if ACTIVATION == 1:
        # max.NaN: PTX's plain max.f32 returns the operand that is not NaN, which made ReLU(NaN) = 0
        return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 2:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 3:
        return x / (1.0 + tl.exp(-x))
    else:
        return x


@triton.jit
def activate_grad(x, ACTIVATION: tl.constexpr):
    """Derivative of `activate` at the pre-activation x (float32)."""
    if ACTIVATION == 1:
        return (x > 0.0).to(tl.float32)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACTIVATION == 3:
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def add_into(ptrs, value, mask):
    """Atomically add a float32 tile into `ptrs`, rounded to their dtype first (float16 targets take one
    rounding per add; no plan adds into bfloat16, whose 8 bits round too coarsely for that)."""
    tl.atomic_add(ptrs, value.to(ptrs.dtype.element_ty), mask=mask, sem="relaxed")


# Programmatic dependent launch (sm_90+): a kernel launched with `launch_pdl` may start while the
# kernel before it still runs, up to `wait_for_producer`, which hides the second launch's latency.
# Both instructions are no-ops in a kernel launched without it, and the interpreter runs launches
# one after the other anyway. Kernels built for GPUs before sm_90, which lack the instructions, are
# compiled with PDL=False (the steps' constexpr; hosts set it), and must then be launched normally.
@triton.jit
def let_dependents_start(PDL: tl.constexpr):
    """Allow the next kernel (if launched with launch_pdl) to start its programs now."""
    if PDL and not INTERPRET:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the kernel before this one has finished and its writes are visible."""
    if PDL and not INTERPRET:
        tl.extra.cuda.gdc_wait()
