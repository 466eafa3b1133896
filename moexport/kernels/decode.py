"""Small-T (decode) kernel: every selected expert's weights are read once, nothing is sorted.

With at most BLOCK_T tokens (T * k small) the token block is one tile. `decode_kernel` runs one
program per (expert, chunk of BLOCK_G hidden units); a program whose expert no token selected
exits at once. The others compute h = act(x @ keys[e][:, chunk] + bias) for the token block,
rounded once to the model dtype, then h @ values[e][chunk, :] times the gate, added in float32
(atomics) into the [T, v_dim] accumulator that `cvmm.finalize_kernel` rounds once (+ o_bias).
So keys[e] and values[e] of each selected expert are streamed exactly once, by E * G / BLOCK_G
programs in parallel, and the layer is route -> decode -> finalize (plus a memset).

Rows of tokens that did not select the expert are masked out of the loads and the adds; at this
size the work is bound by reading the weights, not by the wasted products.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moexport.kernels._jit import activate, mma


@triton.jit
def _selected(expert_ptr, N, e, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_T, BLOCK_K] mask of the slots of the token block that chose expert e."""
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_K)
    ok = (t[:, None] < N) & (j[None, :] < K)
    return ok & (tl.load(expert_ptr + t[:, None] * K + j[None, :], mask=ok, other=-1) == e)


@triton.jit
def decode_kernel(
    x_ptr, gate_ptr, expert_ptr, keys_ptr, bias_ptr, values_ptr,
    acc_ptr,
    N,
    E: tl.constexpr, D: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    chose = _selected(expert_ptr, N, e, K, BLOCK_T, BLOCK_K)
    if tl.sum(chose.to(tl.int32)) == 0:
        return
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_K)
    gates = tl.load(gate_ptr + t[:, None] * K + j[None, :], mask=chose, other=0.0)
    gate = tl.sum(gates, axis=1)
    row_ok = tl.max(chose.to(tl.int32), axis=1) > 0
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    pre = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(x_ptr + t[:, None] * D + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(keys_ptr + e.to(tl.int64) * D * G + d[:, None] * G + g[None, :],
                    mask=(d[:, None] < D) & (g[None, :] < G), other=0.0)
        pre += mma(a, b)
    if bias_ptr is not None:
        pre += tl.load(bias_ptr + e * G + g, mask=g < G, other=0.0).to(tl.float32)[None, :]
    # rounded once to the model dtype, as the reference; hidden units past G are zero
    h = tl.where(g[None, :] < G, activate(pre, ACTIVATION), 0.0).to(x_ptr.dtype.element_ty)
    for n0 in range(0, DV, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        v = tl.load(values_ptr + e.to(tl.int64) * G * DV + g[:, None] * DV + n[None, :],
                    mask=(g[:, None] < G) & (n[None, :] < DV), other=0.0)
        part = gate[:, None] * mma(h, v)
        tl.atomic_add(acc_ptr + t[:, None] * DV + n[None, :], part, mask=row_ok[:, None] & (n[None, :] < DV),
                      sem="relaxed")
