"""Fused expert kernel of the inference forward: up projection, activation and down projection of a
block of rows of one expert in one program, so the hidden activations never leave the SM.

`experts_kernel` runs one program per (row block, chunk of BLOCK_G hidden units, span of output
columns: V_SPLIT of them). It computes
h = act(x[tok] @ keys[e][:, chunk] + bias) for the block (rounded once to the model dtype, as the
reference), then gate * h @ values[e][chunk, :], added (atomics) into the token rows of the
accumulator. Two ways to find the rows:

- DISPATCHED = False (gather: decode and a few hundred tokens): one program per (expert, chunk,
  column span) scans the routing once for the tokens that chose its expert, writes them to its own list
  (`_token_list`) and takes them BLOCK_M at a time; an expert no token chose costs one scan.
  Nothing is sorted and there is no dispatch launch: each selected expert's weights are streamed
  once per row block. The plan launches it with programmatic dependent launch: its programs start
  while the route kernel runs and wait for its results (`_jit.wait_for_producer`), which hides the
  launch latency (~1-2 us on the H200). SPECULATE (all tokens in one block, most experts chosen):
  a program computes the up projection of every token before it reads the routing (no token list
  to build), then adds only the rows of the tokens that chose its expert.
- DISPATCHED = True: row tiles of the dispatch plan (tile map, offsets, sorted slots of
  `routing.dispatch_kernel`), round-robin over experts, so tiles running together cover the same
  tokens and a token's k adds meet in L2.

Three ways to sum a token's k contributions (`plan.sigma_moe_plan`'s `finish`):
- inline: float32 adds into an accumulator; after its adds a program counts one contribution per
  row (`count`, zeroed by the route kernel), and the program that brings a token's count to
  k * chunks reads the finished row back and writes y = acc + o_bias in the model dtype
  (`finish_rows`);
- pass: float32 adds into an accumulator that a finalize launch rounds (y_ptr None here);
- atomic: adds straight into y in its dtype (prefilled with o_bias by the route kernel; y_ptr
  None): no accumulator, no second pass, but one rounding per add in half precision (k * chunks
  adds per output). Float32 layers always add into y this way.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moexport.kernels._jit import activate, add_into, mma, wait_for_producer


@triton.jit
def finish_rows(acc_ptr, count_ptrs, o_bias_ptr, y_ptr, tok, row_ok, n_first,
                TARGET: tl.constexpr, SPAN: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Count one contribution to each row; the last contributor of a row writes its columns
    [n_first, n_first + SPAN) of y = acc + o_bias, rounded once.

    The barrier orders every thread's (relaxed) adds before the release of the counter add; the
    acquire of the last one orders its reads after all other contributors' adds. The reads skip
    L1 (.cg), which may hold stale sectors of a neighbouring row.
    """
    tl.debug_barrier()
    done = tl.atomic_add(count_ptrs, 1, mask=row_ok, sem="acq_rel")
    last = row_ok & (done == TARGET - 1)
    if tl.max(last.to(tl.int32), axis=0) > 0:
        rows = tok.to(tl.int64)[:, None] * DV
        for n0 in range(0, SPAN, BLOCK_N):
            n = n_first + n0 + tl.arange(0, BLOCK_N)
            ok = last[:, None] & (n[None, :] < DV) & (n[None, :] < n_first + SPAN)
            v = tl.load(acc_ptr + rows + n[None, :], mask=ok, other=0.0, cache_modifier=".cg")
            if o_bias_ptr is not None:
                v += tl.load(o_bias_ptr + n, mask=n < DV, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows + n[None, :], v.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gates_of(expert_ptr, gate_ptr, t, N, e, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """For tokens t: the gate of expert e (0 where the token did not choose it) and whether it did."""
    j = tl.arange(0, BLOCK_K)
    ok = (t[:, None] < N) & (j[None, :] < K)
    chose = ok & (tl.load(expert_ptr + t[:, None] * K + j[None, :], mask=ok, other=-1) == e)
    gate = tl.sum(tl.load(gate_ptr + t[:, None] * K + j[None, :], mask=chose, other=0.0), axis=1)
    return gate, tl.max(chose.to(tl.int32), axis=1) > 0


@triton.jit
def _token_list(expert_ptr, gate_ptr, list_tok_ptr, list_gate_ptr, N, e,
                K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write the tokens that chose expert e (in token order) and their gates to the program's own
    list, scanning the routing BLOCK_S tokens at a time; return the list's length. A token's place
    is the running count of earlier choosers: one pass, nothing sorted."""
    length = tl.full((), 0, tl.int32)
    for t0 in range(0, N, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)
        gate, chose = _gates_of(expert_ptr, gate_ptr, t, N, e, K, BLOCK_K)
        at = length + tl.cumsum(chose.to(tl.int32), axis=0) - 1
        tl.store(list_tok_ptr + at, t, mask=chose)
        tl.store(list_gate_ptr + at, gate, mask=chose)
        length += tl.sum(chose.to(tl.int32), axis=0)
    # the list's entries were written by other threads of this program: order them before the reads
    tl.debug_barrier()
    return length


@triton.jit
def _turned(i, turn, n: tl.constexpr):
    """Step i of n, started at step `turn` (wrapping around) when there is one."""
    if turn is None:
        return i
    else:
        return (i + turn) % n


@triton.jit
def _up_rows(x_ptr, keys_ptr, bias_ptr, tok, row_ok, e, chunk, turn,
             D: tl.constexpr, G: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """h = act(x[tok] @ keys[e][:, chunk] + bias) for one block of rows, rounded once to the model
    dtype as the reference; hidden units past G are zero. The tiles of D are taken from tile `turn`
    on (see `experts_kernel`)."""
    g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * D
    k_cols = keys_ptr + e.to(tl.int64) * D * G + g[None, :]
    pre = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    ND: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    for i in range(ND):
        d = _turned(i, turn, ND) * BLOCK_D + tl.arange(0, BLOCK_D)
        a = tl.load(x_rows + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(k_cols + d[:, None] * G, mask=(d[:, None] < D) & (g[None, :] < G), other=0.0)
        pre += mma(a, b)
    if bias_ptr is not None:
        pre += tl.load(bias_ptr + e * G + g, mask=g < G, other=0.0).to(tl.float32)[None, :]
    return tl.where(g[None, :] < G, activate(pre, ACTIVATION), 0.0).to(x_ptr.dtype.element_ty)


@triton.jit
def _down_rows(h, values_ptr, o_bias_ptr, acc_ptr, count_ptr, y_ptr, tok, gate, row_ok, e, chunk, col, turn,
               G: tl.constexpr, DV: tl.constexpr, K: tl.constexpr, NG: tl.constexpr, V_SPLIT: tl.constexpr,
               SPAN: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_DEAD: tl.constexpr):
    """gate * h @ values[e][chunk, :] for output columns [col * SPAN, (col + 1) * SPAN), added into
    the rows `tok` (where row_ok) of the accumulator; then, inline, the rows' last contributor
    finishes them. The column tiles are taken from tile `turn` on.

    SKIP_DEAD (few rows): a hidden unit whose activation is zero in every added row (ReLU: about half of
    them for one token, a quarter for two) contributes nothing, so its row of values is not read: the
    masked copy moves no bytes. (Where such a row holds inf or NaN the reference's 0 * inf gives NaN;
    this gives 0.) Row tiles of the dispatch plan (up to 128 rows) leave almost no unit dead, and the
    test cost the fused kernel ~8% at WT103-big, 32768 tokens (H200), so they don't test."""
    g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    if SKIP_DEAD:
        live = tl.max(((h != 0) & row_ok[:, None]).to(tl.int32), axis=0) > 0
    else:
        live = g < G
    v_rows = values_ptr + e.to(tl.int64) * G * DV + g[:, None] * DV
    out_rows = acc_ptr + tok.to(tl.int64)[:, None] * DV
    # the trip count stays a constant (pipelined like any tile loop); the span's start is added to it
    NB: tl.constexpr = SPAN // BLOCK_N
    for i in range(NB):
        n = col * SPAN + _turned(i, turn, NB) * BLOCK_N + tl.arange(0, BLOCK_N)
        v = tl.load(v_rows + n[None, :], mask=live[:, None] & (n[None, :] < DV), other=0.0)
        add_into(out_rows + n[None, :], mma(h, v) * gate[:, None], row_ok[:, None] & (n[None, :] < DV))
    if y_ptr is not None:
        finish_rows(acc_ptr, count_ptr + tok * V_SPLIT + col, o_bias_ptr, y_ptr, tok, row_ok, col * SPAN, K * NG,
                    SPAN, DV, BLOCK_N)


@triton.jit
def _column_span(axis: tl.constexpr, V_SPLIT: tl.constexpr):
    """This program's span of output columns; without a split the constant 0, so that the kernel is
    the one measured before spans existed. With the program id there instead (a runtime 0), the
    fused kernel at WT103-big, 32768 tokens took 0.276 ms against 0.235 on the same H200 (triton
    3.6); with the constant, 0.234."""
    if V_SPLIT == 1:
        return 0
    else:
        return tl.program_id(axis)


@triton.jit
def experts_kernel(
    # layer
    x_ptr, keys_ptr, bias_ptr, values_ptr, o_bias_ptr,
    # routing: gate and expert [N, K] with each gather program's token list (scratch
    # [E * NG * V_SPLIT, N]), or the dispatch plan
    gate_ptr, expert_ptr, list_tok_ptr, list_gate_ptr, offsets_ptr, tile_map_ptr, sorted_slot_ptr,
    # accumulator [N, DV] (prefilled), contribution counters [N, V_SPLIT] (zeroed), output (None: acc is y)
    acc_ptr, count_ptr, y_ptr,
    N,
    E: tl.constexpr, D: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
    ACTIVATION: tl.constexpr, DISPATCHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, V_SPLIT: tl.constexpr, SPECULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    NG: tl.constexpr = (G + BLOCK_G - 1) // BLOCK_G
    # V_SPLIT programs share a row block and hidden chunk, each with its own span of output columns:
    # more programs for few rows (each recomputes the chunk's h) without more adds per output
    SPAN: tl.constexpr = (DV + V_SPLIT * BLOCK_N - 1) // (V_SPLIT * BLOCK_N) * BLOCK_N
    if DISPATCHED:
        # the plans launch these normally (after the dispatch kernel); waiting keeps a PDL launch correct
        wait_for_producer(PDL)
        rt = tl.program_id(0) // NG
        chunk = tl.program_id(0) % NG
        if rt >= tl.load(tile_map_ptr):
            return
        code = tl.load(tile_map_ptr + 1 + rt)
        e = code % E
        p = tl.load(offsets_ptr + e) + (code // E) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = p < tl.load(offsets_ptr + e + 1)
        slot = tl.load(sorted_slot_ptr + p, mask=row_ok, other=0)
        # the gates are loaded before the up projection: after it, their latency cost the fused kernel
        # 21% at WT103-big, 32768 tokens (0.283 ms against 0.234, H200)
        tok = slot // K
        gate = tl.load(gate_ptr + slot, mask=row_ok, other=0.0)
        col = _column_span(1, V_SPLIT)
        h = _up_rows(x_ptr, keys_ptr, bias_ptr, tok, row_ok, e, chunk, None, D, G, ACTIVATION, BLOCK_M, BLOCK_G,
                     BLOCK_D)
        _down_rows(h, values_ptr, o_bias_ptr, acc_ptr, count_ptr, y_ptr, tok, gate, row_ok, e, chunk, col, None,
                   G, DV, K, NG, V_SPLIT, SPAN, BLOCK_G, BLOCK_N, False)
    else:
        e = tl.program_id(0)
        chunk = tl.program_id(1)
        col = _column_span(2, V_SPLIT)
        # every program here reads the same token rows of x and adds into the same rows of y: taken in the
        # same order, their tiles meet in the same L2 lines at the same time (an up loop of 16 tokens without
        # its key loads took 750 cycles a step against 210 without the x loads too, H200); each program
        # starts at its own tile instead (in the whole kernel, within the noise: kernels_notes.md, round 7)
        turn = e * NG + chunk
        if SPECULATE:
            # all N <= BLOCK_M tokens in one block, most experts chosen: the up projection of every
            # token needs no routing (launched with launch_pdl, it may run while the route kernel
            # does) and no token list; the routing then only picks the rows to add
            tok = tl.arange(0, BLOCK_M)
            h = _up_rows(x_ptr, keys_ptr, bias_ptr, tok, tok < N, e, chunk, turn, D, G, ACTIVATION, BLOCK_M,
                         BLOCK_G, BLOCK_D)
            wait_for_producer(PDL)
            gate, chose = _gates_of(expert_ptr, gate_ptr, tok, N, e, K, BLOCK_K)
            if tl.max(chose.to(tl.int32), axis=0) > 0:
                _down_rows(h, values_ptr, o_bias_ptr, acc_ptr, count_ptr, y_ptr, tok, gate, chose, e, chunk, col,
                           turn, G, DV, K, NG, V_SPLIT, SPAN, BLOCK_G, BLOCK_N, True)
        else:
            # launched with launch_pdl, the program started while the route kernel runs
            wait_for_producer(PDL)
            mine = ((e * NG + chunk) * V_SPLIT + col).to(tl.int64) * N
            n_rows = _token_list(expert_ptr, gate_ptr, list_tok_ptr + mine, list_gate_ptr + mine, N, e, K, BLOCK_S,
                                 BLOCK_K)
            # not pipelined (it never was: the tile loops inside are the innermost); said explicitly because
            # where both tile loops take one trip, triton 3.6 tried to and failed on the masked value loads
            for r0 in tl.range(0, n_rows, BLOCK_M, num_stages=1):
                i = r0 + tl.arange(0, BLOCK_M)
                row_ok = i < n_rows
                # .cg: past L1, which may hold the list's lines from before the other threads' stores
                tok = tl.load(list_tok_ptr + mine + i, mask=row_ok, other=0, cache_modifier=".cg")
                gate = tl.load(list_gate_ptr + mine + i, mask=row_ok, other=0.0, cache_modifier=".cg")
                h = _up_rows(x_ptr, keys_ptr, bias_ptr, tok, row_ok, e, chunk, turn, D, G, ACTIVATION, BLOCK_M,
                             BLOCK_G, BLOCK_D)
                _down_rows(h, values_ptr, o_bias_ptr, acc_ptr, count_ptr, y_ptr, tok, gate, row_ok, e, chunk, col,
                           turn, G, DV, K, NG, V_SPLIT, SPAN, BLOCK_G, BLOCK_N, True)
