"""Routing kernels: router logits, top-k with the moexport tie rule, gates, and the dispatch plan.

The rule is `moexport.models.routing`'s: rank by the float32 logit, equal logits go to the lower
expert index, the k slots of a token best first (slot n*k + j). The dispatch plan is a stable
counting sort of the slots by expert, in two launches and without a device-wide sort:

1. `route_kernel`, one program per chunk of BLOCK_N tokens: logits (optionally x @ expert_sel^T),
   top-k, gates, and the chunk's histogram of experts `counts[chunk, e]`. It also prepares the
   chunk's rows of what the expert kernels add into (the float32 accumulator, or y itself filled
   with the output bias) and zeroes their contribution counters, so they need no memset launch.
2. `dispatch_kernel`, one program per chunk: the chunk's base offset per expert (experts below it
   plus earlier chunks, from `counts`) plus each slot's rank among the chunk's slots of the same
   expert gives its sorted position; program 0 also writes the per-expert row offsets [E + 1], and
   all programs share the writing of the tile map of the grouped GEMMs (`write_tile_map`).

Both grids depend on the token count only, so the sequence can run inside a CUDA graph or a
TensorRT enqueue.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moexport.kernels._jit import let_dependents_start, mma

# A float32 router weight's remainder after its float16 part is at most 2^-11 of it: scaled by 2^12 it
# is a normal float16 for weights from 2^-14 to 2^14 (router rows are about d^-1/2)
FP16_REST_SCALE = tl.constexpr(4096.0)


@triton.jit
def route_kernel(
    # inputs: tokens and router weight (HAS_X), or precomputed float32 logits
    x_ptr, sel_ptr, logits_ptr,
    # outputs (experts_ptr: optional, the indices again as int64, as the SigmaMoE op outputs them)
    gate_ptr, expert_ptr, counts_ptr, experts_ptr,
    # prepared for the expert kernels: [N, FILL_COLS] rows they add into (filled with fill_row, or
    # zeros), int32 [N, COUNT_COLS] contribution counters (zeroed)
    fill_ptr, fill_row_ptr, count_ptr,
    N,
    E: tl.constexpr, D: tl.constexpr, K: tl.constexpr, SELECTION: tl.constexpr,
    HAS_X: tl.constexpr, STORE_LOGITS: tl.constexpr, STORE_COUNTS: tl.constexpr,
    FILL_COLS: tl.constexpr, COUNT_COLS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # the gather experts kernel (launched with launch_pdl) may start its programs now (they wait for ours)
    let_dependents_start(PDL)
    pid = tl.program_id(0)
    if fill_ptr is not None:
        _fill_rows(fill_ptr, fill_row_ptr, pid * BLOCK_N, N, FILL_COLS, BLOCK_N)
    if count_ptr is not None:
        _fill_rows(count_ptr, None, pid * BLOCK_N, N, COUNT_COLS, BLOCK_N)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    col_ok = cols < E
    if HAS_X:
        # Half-precision products are exact in float32, so the tensor cores give float32 logits.
        logits = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            xt = tl.load(x_ptr + rows[:, None] * D + dd[None, :],
                         mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
            st = tl.load(sel_ptr + cols[None, :] * D + dd[:, None],
                         mask=col_ok[None, :] & (dd[:, None] < D), other=0.0)
            logits += _router_products(xt, st)
        if STORE_LOGITS:
            tl.store(logits_ptr + rows[:, None] * E + cols[None, :], logits,
                     mask=row_ok[:, None] & col_ok[None, :])
    else:
        logits = tl.load(logits_ptr + rows[:, None] * E + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    top_i, gate, taken = select_top_k(logits, E, K, SELECTION, BLOCK_E, BLOCK_K)
    kk = tl.arange(0, BLOCK_K)
    out = rows[:, None] * K + kk[None, :]
    out_ok = row_ok[:, None] & (kk[None, :] < K)
    tl.store(gate_ptr + out, gate, mask=out_ok)
    tl.store(expert_ptr + out, top_i, mask=out_ok)
    if experts_ptr is not None:
        tl.store(experts_ptr + out, top_i.to(tl.int64), mask=out_ok)
    if STORE_COUNTS:
        counts = tl.sum((taken & row_ok[:, None] & col_ok[None, :]).to(tl.int32), axis=0)
        tl.store(counts_ptr + pid * E + cols, counts, mask=col_ok)


@triton.jit
def _router_products(xt, st):
    """xt @ st in float32 for half or float32 tokens and a router weight in their dtype or float32."""
    if xt.dtype == st.dtype or xt.dtype == tl.float32:
        return mma(xt.to(st.dtype), st)
    else:
        # Half tokens, a float32 weight (the ONNX op's): its part in the tokens' dtype gives exact
        # products at the tensor cores' half rate, where 3 tf32 passes of tokens converted to float32
        # took 3x the route kernel's time at few tokens (10.5 us against 3.8, H100, WT103-small). A
        # weight the dtype holds (every half-precision export) ends there; any other also gets its
        # remainder, in 2 more parts for bfloat16 (8 bits each: float32's 24 in all) or, scaled past
        # float16's subnormals, 1 for float16 (22 bits, what tf32x3 kept of it too).
        hi = st.to(xt.dtype)
        out = mma(xt, hi)
        rest = st - hi.to(tl.float32)
        if tl.max(tl.max(tl.abs(rest), axis=1), axis=0) > 0:
            if xt.dtype == tl.bfloat16:
                mid = rest.to(tl.bfloat16)
                out += mma(xt, mid) + mma(xt, (rest - mid.to(tl.float32)).to(tl.bfloat16))
            else:
                out += mma(xt, (rest * FP16_REST_SCALE).to(tl.float16)) * (1.0 / FP16_REST_SCALE)
        return out


@triton.jit
def select_top_k(logits, E: tl.constexpr, K: tl.constexpr, SELECTION: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """The k experts of each row of float32 logits [rows, BLOCK_E] (columns from E on are not
    experts), best first, with the moexport tie rule; returns their indices and gates [rows, BLOCK_K]
    and the [rows, BLOCK_E] mask of the chosen experts (true past E too)."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    logits = _nan_as_lowest(logits)
    taken = tl.broadcast_to(cols[None, :] >= E, logits.shape)
    kk = tl.arange(0, BLOCK_K)
    top_v = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.int32)
    top0 = tl.zeros((logits.shape[0],), dtype=tl.float32)
    for j in tl.static_range(K):
        # an expert not taken yet always ties with the best (-inf at worst): never an invalid index
        v = tl.where(taken, float("-inf"), logits)
        best = tl.max(v, axis=1)
        tied = (v == best[:, None]) & ~taken
        idx = tl.min(tl.where(tied, cols[None, :], BLOCK_E), axis=1)
        taken = taken | (cols[None, :] == idx[:, None])
        if j == 0:
            top0 = best
        top_v = tl.where(kk[None, :] == j, best[:, None], top_v)
        top_i = tl.where(kk[None, :] == j, idx[:, None], top_i)
    if SELECTION == 0:
        gate = 1.0 / (1.0 + tl.exp(-top_v))
    elif SELECTION == 1:
        every = tl.where(col_ok[None, :], tl.exp(logits - top0[:, None]), 0.0)
        gate = tl.exp(top_v - top0[:, None]) / tl.sum(every, axis=1)[:, None]
    else:
        top = tl.where(kk[None, :] < K, tl.exp(top_v - top0[:, None]), 0.0)
        gate = top / tl.sum(top, axis=1)[:, None]
    return top_i, gate, taken


@triton.jit
def _nan_as_lowest(logits):
    """NaN logits (an overflowing router) rank as -inf, so every selection takes valid experts."""
    return tl.where(logits != logits, float("-inf"), logits)  # noqa: PLR0124 - only NaN differs from itself


@triton.jit
def _fill_rows(ptr, row_ptr, first, N, COLS: tl.constexpr, ROWS: tl.constexpr):
    """Set rows [first, first + ROWS) (those below N) of a row-major [N, COLS] tensor to the vector
    row_ptr [COLS], or to zero without one: the rows are one contiguous range, written in flat blocks."""
    BLOCK: tl.constexpr = 2048
    begin = first.to(tl.int64) * COLS
    stop = tl.minimum(first + ROWS, N).to(tl.int64) * COLS
    for i0 in range(0, ROWS * COLS, BLOCK):
        i = begin + i0 + tl.arange(0, BLOCK)
        if row_ptr is None:
            value = tl.zeros((BLOCK,), ptr.dtype.element_ty)
        else:
            value = tl.load(row_ptr + i % COLS, mask=i < stop, other=0.0).to(ptr.dtype.element_ty)
        tl.store(ptr + i, value, mask=i < stop)


@triton.jit
def dispatch_kernel(
    expert_ptr, counts_ptr,
    sorted_expert_ptr, sorted_slot_ptr, offsets_ptr, tile_map_ptr,
    N,
    E: tl.constexpr, K: tl.constexpr, TILE_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, SUB: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    n_chunks = tl.cdiv(N, BLOCK_N)
    # 1. Per expert: all slots (for the offsets of the experts below) and this chunk's predecessors.
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, n_chunks, BLOCK_C):
        chunk = c0 + tl.arange(0, BLOCK_C)
        block = tl.load(counts_ptr + chunk[:, None] * E + cols[None, :],
                        mask=(chunk[:, None] < n_chunks) & col_ok[None, :], other=0)
        total += tl.sum(block, axis=0)
        before += tl.sum(tl.where(chunk[:, None] < pid, block, 0), axis=0)
    inclusive = tl.cumsum(total, axis=0)
    base = inclusive - total + before
    if pid == 0:
        tl.store(offsets_ptr + 1 + cols, inclusive, mask=col_ok)
        tl.store(offsets_ptr + cols, 0, mask=cols == 0)
    write_tile_map(total, tile_map_ptr, pid, n_chunks, E, TILE_M, BLOCK_E)
    # 2. Rank of each slot among the chunk's earlier slots of its expert (slot order = stable).
    n_slots = N * K
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for s0 in range(0, BLOCK_N * K, SUB):
        slots = pid * BLOCK_N * K + s0 + tl.arange(0, SUB)
        ok = slots < n_slots
        ex = tl.load(expert_ptr + slots, mask=ok, other=BLOCK_E)
        onehot = (ex[:, None] == cols[None, :]).to(tl.int32)
        rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
        pos = tl.sum(onehot * (base + running)[None, :], axis=1) + rank
        tl.store(sorted_expert_ptr + pos, ex, mask=ok)
        tl.store(sorted_slot_ptr + pos, slots, mask=ok)
        running += tl.sum(onehot, axis=0)


@triton.jit
def write_tile_map(count, map_ptr, part, n_parts,
                   E: tl.constexpr, TILE_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tiles of TILE_M rows, round-robin over experts: map[0] = number of tiles, map[1 + t] =
    local * E + e for the t-th tile (tile `local` of expert e). Called by n_parts programs, each
    writing the rounds r = part (mod n_parts); count [BLOCK_E] holds the rows of each expert."""
    cols = tl.arange(0, BLOCK_E)
    tiles = tl.where(cols < E, tl.cdiv(count, TILE_M), 0)
    if part == 0:
        tl.store(map_ptr, tl.sum(tiles, axis=0))
    for r in range(part, tl.max(tiles, axis=0), n_parts):
        member = tiles > r
        rank = tl.cumsum(member.to(tl.int32), axis=0) - 1
        before = tl.sum(tl.minimum(tiles, r), axis=0)
        tl.store(map_ptr + 1 + before + rank, r * E + cols, mask=member)


@triton.jit
def _lower_bound(sorted_ptr, S, target):
    """First position of the sorted int array whose value is >= target, for each target."""
    lo = target * 0
    hi = lo + S
    while tl.max(hi - lo, axis=0) > 0:
        open_ = lo < hi
        mid = (lo + hi) // 2
        right = open_ & (tl.load(sorted_ptr + mid, mask=open_, other=0) < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    return lo


@triton.jit
def offsets_kernel(
    sorted_expert_ptr, offsets_ptr, tile_map_ptr,
    S,
    E: tl.constexpr, TILE_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """The dispatch plan's offsets and tile map from the sorted expert ids alone (the CVMM op's
    inputs): offsets[e] = first sorted position whose expert is >= e."""
    e = tl.arange(0, BLOCK_E)
    first = _lower_bound(sorted_expert_ptr, S, e)
    if tl.program_id(0) == 0:
        tl.store(offsets_ptr + e, first, mask=e <= E)
    count = _lower_bound(sorted_expert_ptr, S, e + 1) - first
    write_tile_map(count, tile_map_ptr, tl.program_id(0), tl.num_programs(0), E, TILE_M, BLOCK_E)
