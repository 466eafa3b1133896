"""CVMM: grouped matrix products over a dispatch plan (rows sorted by expert), and their gradients.

`cvmm_kernel` is a grouped GEMM, one program per [BLOCK_M, BLOCK_N] output tile: row tiles never
straddle two experts (a tile map written with the dispatch plan says which expert and rows each
tile has, so no work is repeated at expert boundaries; programs past the last tile exit at once),
input rows are gathered through `src`, and one of three epilogues runs on each tile:

- EPILOGUE 0, store: (+ bias[e]) -> activation -> (* gate) -> out[dst] in the output dtype; the
  float32 pre-activation can be kept for the backward pass.
- EPILOGUE 1, reduce: gate * tile added (atomics, in out's dtype: a float32 accumulator, or y
  itself) into out[dst // DST_DIV]: the k contributions of a token never meet as [N*k, d] rows in
  memory. With
  y_ptr, the last of a token's DST_DIV contributions to a column tile rounds it into y
  (`experts.finish_rows`, counters [N, column tiles] zeroed by the route kernel).
- EPILOGUE 2, backward through gate and activation: the tile is dL/dh (without the gate); it writes
  dL/dpre = gate * tile * act'(pre) and adds sum(tile * h) to dgate[dst].

The tile map orders row tiles round-robin over the experts: rows of one expert are sorted by
token, so tiles running at the same time cover the same tokens, and a token's k atomic adds meet
in L2 instead of in device memory.

`wgrad_kernel` computes per-expert weight gradients sum_rows a[row]^T (scale * b[row]) with the rows
of expert e as the reduction dimension (no atomics; one program per output tile and expert).

(The module is not called `cvmm`: `moexport.kernels.cvmm` is the public op, and importing a submodule
of that name would replace the package's attribute with the module.)
"""
from __future__ import annotations

import triton
import triton.language as tl

from moexport.kernels._jit import activate, activate_grad, add_into, mma
from moexport.kernels.experts import finish_rows


@triton.jit
def cvmm_kernel(
    # operands and dispatch plan
    x_ptr, w_ptr, offsets_ptr, tile_map_ptr, src_ptr, dst_ptr, gate_ptr, bias_ptr,
    # saved forward tensors (EPILOGUE 2)
    h_ptr, pre_ptr,
    # outputs
    out_ptr, pre_out_ptr, dgate_ptr,
    # EPILOGUE 1 rounded in the launch: contribution counters, output bias, output
    count_ptr, o_bias_ptr, y_ptr,
    E: tl.constexpr, K_IN: tl.constexpr, N_OUT: tl.constexpr,
    stride_we: tl.constexpr, stride_wk: tl.constexpr, stride_wn: tl.constexpr,
    SRC_DIV: tl.constexpr, DST_DIV: tl.constexpr, GATE_BY_DST: tl.constexpr,
    ACTIVATION: tl.constexpr, EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n_col: tl.constexpr = (N_OUT + BLOCK_N - 1) // BLOCK_N
    rt = tl.program_id(0) // n_col
    if rt >= tl.load(tile_map_ptr):
        return
    code = tl.load(tile_map_ptr + 1 + rt)
    e = code % E
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    p = start + (code // E) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = p < end
    n = (tl.program_id(0) % n_col) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N_OUT
    if src_ptr is None:
        src = p
    else:
        src = tl.load(src_ptr + p, mask=row_ok, other=0) // SRC_DIV
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = x_ptr + src.to(tl.int64)[:, None] * K_IN
    w_tile = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn
    for k0 in range(0, K_IN, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K_IN), other=0.0)
        b = tl.load(w_tile + kk[:, None] * stride_wk, mask=(kk[:, None] < K_IN) & n_ok[None, :], other=0.0)
        acc += mma(a, b)
    if dst_ptr is None:
        dst = p
    else:
        dst = tl.load(dst_ptr + p, mask=row_ok, other=0)
    if gate_ptr is not None:
        g = tl.load(gate_ptr + (dst if GATE_BY_DST else p), mask=row_ok, other=0.0)
    ok = row_ok[:, None] & n_ok[None, :]
    if EPILOGUE == 0:
        if bias_ptr is not None:
            acc += tl.load(bias_ptr + e * N_OUT + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if pre_out_ptr is not None:
            tl.store(pre_out_ptr + dst.to(tl.int64)[:, None] * N_OUT + n[None, :], acc, mask=ok)
        acc = activate(acc, ACTIVATION)
        if gate_ptr is not None:
            acc = acc * g[:, None]
        tl.store(out_ptr + dst.to(tl.int64)[:, None] * N_OUT + n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=ok)
    elif EPILOGUE == 1:
        if gate_ptr is not None:
            acc = acc * g[:, None]
        tok = dst // DST_DIV
        add_into(out_ptr + tok.to(tl.int64)[:, None] * N_OUT + n[None, :], acc, ok)
        if y_ptr is not None:
            col = tl.program_id(0) % n_col
            finish_rows(out_ptr, count_ptr + tok * n_col + col, o_bias_ptr, y_ptr, tok, row_ok, col * BLOCK_N,
                        DST_DIV, BLOCK_N, N_OUT, BLOCK_N)
    else:
        at = p.to(tl.int64)[:, None] * N_OUT + n[None, :]
        h = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(dgate_ptr + dst, tl.sum(acc * h, axis=1), mask=row_ok, sem="relaxed")
        pre = tl.load(pre_ptr + at, mask=ok, other=0.0)
        dpre = acc * g[:, None] * activate_grad(pre, ACTIVATION)
        tl.store(out_ptr + at, dpre.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def wgrad_kernel(
    a_ptr, b_ptr, offsets_ptr, a_idx_ptr, b_idx_ptr, scale_ptr,
    out_ptr,
    E: tl.constexpr, M_DIM: tl.constexpr, N_DIM: tl.constexpr,
    A_DIV: tl.constexpr, B_DIV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[e] = sum over rows p of expert e of a[row_a(p)]^T (scale[idx_b(p)] * b[row_b(p)])."""
    e = tl.program_id(1)
    n_col: tl.constexpr = (N_DIM + BLOCK_N - 1) // BLOCK_N
    m = (tl.program_id(0) // n_col) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tl.program_id(0) % n_col) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        ok = p < end
        if a_idx_ptr is None:
            ra = p
        else:
            ra = tl.load(a_idx_ptr + p, mask=ok, other=0) // A_DIV
        if b_idx_ptr is None:
            raw_b = p
        else:
            raw_b = tl.load(b_idx_ptr + p, mask=ok, other=0)
        at = tl.load(a_ptr + ra.to(tl.int64)[None, :] * M_DIM + m[:, None],
                     mask=ok[None, :] & (m[:, None] < M_DIM), other=0.0)
        b = tl.load(b_ptr + (raw_b // B_DIV).to(tl.int64)[:, None] * N_DIM + n[None, :],
                    mask=ok[:, None] & (n[None, :] < N_DIM), other=0.0)
        if scale_ptr is not None:
            s = tl.load(scale_ptr + raw_b, mask=ok, other=0.0)
            b = (b.to(tl.float32) * s[:, None]).to(b_ptr.dtype.element_ty)
        acc += mma(at, b)
    tl.store(out_ptr + e.to(tl.int64) * M_DIM * N_DIM + m[:, None] * N_DIM + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M_DIM) & (n[None, :] < N_DIM))


@triton.jit
def finalize_kernel(
    acc_ptr, bias_ptr, out_ptr,
    N,
    D: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = (acc + bias) rounded once to the output dtype; acc is the float32 [N, D] accumulator."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N * D
    v = tl.load(acc_ptr + i, mask=ok, other=0.0)
    if bias_ptr is not None:
        v += tl.load(bias_ptr + i % D, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=ok)
