"""Small-T (decode) kernels: every selected expert's weights are read once, nothing is sorted.

With at most BLOCK_T tokens (T * k small), the whole token block is one tile:

1. `decode_up_kernel`, one program per (expert, hidden chunk): skipped when no token selected the
   expert; otherwise h[e] = act(x @ keys[e] + bias[e]) for all BLOCK_T tokens, rounded once to the
   model dtype, into a workspace [E, BLOCK_T, G].
2. `decode_down_kernel`, one program per output chunk: y = sum over selected experts, in expert
   order, of gate[:, e] * (h[e] @ values[e]) in float32, + o_bias, rounded once.

Rows of tokens that did not select an expert are computed and then ignored (gate 0): at this size
the work is bound by reading the weights, and the reads are what the kernels minimise.
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
def decode_up_kernel(
    x_ptr, expert_ptr, w_ptr, bias_ptr,
    h_ptr,
    N,
    E: tl.constexpr, D: tl.constexpr, G: tl.constexpr, K: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    if tl.sum(_selected(expert_ptr, N, e, K, BLOCK_T, BLOCK_K).to(tl.int32)) == 0:
        return
    t = tl.arange(0, BLOCK_T)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    acc = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(x_ptr + t[:, None] * D + d[None, :], mask=(t[:, None] < N) & (d[None, :] < D), other=0.0)
        b = tl.load(w_ptr + e.to(tl.int64) * D * G + d[:, None] * G + g[None, :],
                    mask=(d[:, None] < D) & (g[None, :] < G), other=0.0)
        acc += mma(a, b)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + e * G + g, mask=g < G, other=0.0).to(tl.float32)[None, :]
    h = activate(acc, ACTIVATION).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + (e * BLOCK_T + t[:, None]).to(tl.int64) * G + g[None, :], h, mask=g[None, :] < G)


@triton.jit
def decode_down_kernel(
    h_ptr, gate_ptr, expert_ptr, w_ptr, obias_ptr,
    y_ptr,
    N,
    E: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_K)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = (t[:, None] < N) & (j[None, :] < K)
    gates = tl.load(gate_ptr + t[:, None] * K + j[None, :], mask=slot_ok, other=0.0)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for e in range(0, E):
        chose = _selected(expert_ptr, N, e, K, BLOCK_T, BLOCK_K)
        if tl.sum(chose.to(tl.int32)) > 0:
            r = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for g0 in range(0, G, BLOCK_G):
                g = g0 + tl.arange(0, BLOCK_G)
                a = tl.load(h_ptr + (e * BLOCK_T + t[:, None]).to(tl.int64) * G + g[None, :],
                            mask=g[None, :] < G, other=0.0)
                b = tl.load(w_ptr + e * (G * DV) + g[:, None] * DV + n[None, :],
                            mask=(g[:, None] < G) & (n[None, :] < DV), other=0.0)
                r += mma(a, b)
            gate = tl.sum(tl.where(chose, gates, 0.0), axis=1)
            acc += tl.where(tl.max(chose.to(tl.int32), axis=1)[:, None] > 0, gate[:, None] * r, 0.0)
    if obias_ptr is not None:
        acc += tl.load(obias_ptr + n, mask=n < DV, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + t[:, None] * DV + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(t[:, None] < N) & (n[None, :] < DV))
