"""Tile configurations: chosen by token-count bucket, never re-tuned for a new token count.

A config depends on the layer's shape and on the bucket of the token count (powers of two), so a
run over many sequence lengths compiles a handful of kernels once. `TUNED` holds measured
configurations keyed like that (`moexport bench kernels --tune` times candidates on the GPU and
prints them in this form); keys it lacks fall back to the heuristics below.
"""
from __future__ import annotations

from typing import Any

# Largest token count for which the defaults take the gather path (no dispatch launch; every selected
# expert's weights read once per row block); beyond it, up to GATHER_MAX_ROWS_TOKENS tokens, they
# still do where an expert gets at most GATHER_MAX_ROWS rows on average (its rows fit one block of
# twice that): every tuned pick of the H200 sweeps fits this rule.
GATHER_MAX_TOKENS = 64
GATHER_MAX_ROWS = 32
GATHER_MAX_ROWS_TOKENS = 1024

# The gather programs speculate (up projection of every token before the routing is known, see
# `experts.experts_kernel`) when all the bucket's tokens fit one row block and at least this share of
# the experts is expected to be chosen (the keys of the others are read for nothing); an experts
# config's 'speculate' overrides it.
SPECULATE_MIN_USE = 0.75

# Streaming multiprocessors to keep busy (H100 / H200: 132).
SMS = 132

# Default configs sum with half-precision atomics when a token's output takes at most this many adds
# (k * hidden chunks); otherwise in float32, rounded by a finalize pass when the float32 accumulator
# is at least PASS_ACC_BYTES, else by the last contributor of each row.
MAX_ATOMIC_ADDS = 16
PASS_ACC_BYTES = 32 << 20

# The route kernel's config, as an experts config's optional 'route' entry holds it
ROUTE_FIELDS = ("BLOCK_N", "BLOCK_D", "num_warps", "num_stages")


def _experts(mode: str, m: int, g: int, d: int, n: int, warps: int, stages: int,
             finish: str = "inline", route: tuple[int, int, int, int] | None = None,
             v_split: int = 1, speculate: bool | None = None) -> dict[str, Any]:
    config = {"mode": mode, "BLOCK_M": m, "BLOCK_G": g, "BLOCK_D": d, "BLOCK_N": n, "num_warps": warps,
              "num_stages": stages, "finish": finish}
    if v_split > 1:
        config["V_SPLIT"] = v_split
    if route:
        config["route"] = dict(zip(ROUTE_FIELDS, route))
    if speculate is not None:
        config["speculate"] = speculate
    return config


# (role, d_in, d_out, bucket) -> CVMM config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), and
# ("experts", d, n_experts, expert_size, v_dim, k, bucket) -> `experts_config`: measured on the H200,
# bf16 (triton 3.6), L2 flushed, picked by `bench.kernels.pick` (at most ~3 bfloat16 steps of error,
# the most accurate of those within 2% of the fastest). Round 4 (bench/results/kernels_notes.md):
# 16 and 256 tokens from the last tile sweep (column spans; kernels_tiles_h200.json), 4096 from the
# first sequence sweep (kernels_sequences_h200.json), 32768 from the first tile sweep; 1 token keeps
# round 2's tiles with float32 sums. Round 5: the large shape at 16 and 256 tokens (gather with
# 128-unit chunks, and at 256 one 64-row block per expert: none of its weights read twice). Rounds 1-5
# flushed L2 with a memset (do_bench's); round 6's sweeps at 16 tokens with the read flush found
# other tiles at most ~5% faster there (within run-to-run noise). Round 7 (gather programs skip the
# values of dead units and start at their own tiles): 16 tokens from a new tile sweep, read flush
# (kernels_tiles_h200_round7.json).
TUNED: dict[tuple, dict[str, Any]] = {
    ("experts", 412, 16, 128, 412, 4, 1): _experts("gather", 16, 16, 512, 512, 8, 2),  # small 1
    ("experts", 412, 16, 128, 412, 4, 16): _experts("gather", 16, 32, 128, 128, 4, 3, "atomic",  # small 16
        v_split=2),
    ("experts", 412, 16, 128, 412, 4, 256): _experts("fused", 16, 32, 64, 128, 4, 3, "atomic"),  # small 256
    ("experts", 412, 16, 128, 412, 4, 4096): _experts("fused", 128, 128, 64, 64, 8, 3),  # small 4096
    ("experts", 412, 16, 128, 412, 4, 32768): _experts("fused", 128, 128, 64, 128, 8, 3, "atomic"),  # small 32768
    ("experts", 1024, 32, 128, 1024, 4, 1): _experts("gather", 16, 32, 256, 256, 8, 3),  # big 1
    ("experts", 1024, 32, 128, 1024, 4, 16): _experts("gather", 16, 64, 256, 256, 8, 3, "atomic",  # big 16
        v_split=2),
    ("experts", 1024, 32, 128, 1024, 4, 256): _experts("gather", 64, 64, 128, 128, 8, 3,  # big 256
        "atomic", v_split=2),
    ("experts", 1024, 32, 128, 1024, 4, 4096): _experts("fused", 128, 128, 64, 64, 8, 4, "atomic"),  # big 4096
    ("experts", 1024, 32, 128, 1024, 4, 32768): _experts("fused", 128, 128, 64, 64, 8, 3, "atomic"),  # big 32768
    ("experts", 412, 128, 128, 412, 4, 1): _experts("gather", 16, 16, 512, 512, 8, 2),  # 238M 1
    ("experts", 412, 128, 128, 412, 4, 16): _experts("gather", 16, 64, 256, 256, 8, 3, "atomic",  # 238M 16
        speculate=False),
    ("experts", 412, 128, 128, 412, 4, 256): _experts("gather", 32, 64, 128, 128, 4, 3, "atomic"),  # 238M 256
    ("experts", 412, 128, 128, 412, 4, 4096): _experts("fused", 128, 128, 128, 64, 8, 2, "atomic"),  # 238M 4096
    ("experts", 412, 128, 128, 412, 4, 32768): _experts("fused", 128, 128, 64, 128, 8, 3,  # 238M 32768
        "atomic", route=(128, 64, 8, 3)),
    ("experts", 2048, 64, 256, 2048, 8, 1): _experts("gather", 16, 64, 256, 256, 8, 3),  # large 1
    ("experts", 2048, 64, 256, 2048, 8, 16): _experts("gather", 16, 128, 128, 128, 8, 4, "atomic"),  # large 16
    ("experts", 2048, 64, 256, 2048, 8, 256): _experts("gather", 64, 128, 128, 128, 8, 3, "atomic"),  # large 256
    ("experts", 2048, 64, 256, 2048, 8, 4096): _experts("split", 128, 128, 64, 64, 8, 4, "atomic"),  # large 4096
    ("experts", 2048, 64, 256, 2048, 8, 32768): _experts("split", 128, 128, 64, 64, 8, 4,  # large 32768
        "atomic", route=(128, 64, 8, 3)),
}


def bucket(n_tokens: int) -> int:
    """The power of two at or above n_tokens: the key of the config tables."""
    return pow2(n_tokens, floor=1)


def expected_share(n_experts: int, k: int, n_tokens: int) -> float:
    """Share of the experts that n_tokens tokens, each choosing k of n_experts independently and
    uniformly, are expected to choose at least once."""
    return 1 - (1 - k / n_experts) ** n_tokens


def pow2(n: int, floor: int = 16) -> int:
    """The power of two at or above n, and at least `floor` (a tile length)."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def default_config(role: str, d_out: int, n_bucket: int, rows_per_expert: int) -> dict[str, int]:
    """A reasonable config when no tuned one exists (roles: 'up', 'down', 'wgrad', 'route')."""
    if role == "route":
        if n_bucket <= 1024:
            # few programs: long tiles of the router weight, several in flight (latency, not bandwidth)
            return {"BLOCK_N": 16, "BLOCK_D": 256, "num_warps": 4, "num_stages": 3}
        return {"BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}
    if role == "wgrad":
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    block_m = min(128, pow2(rows_per_expert))
    if rows_per_expert <= 64:
        # few rows per expert: the weights are the traffic; narrow column tiles give more programs
        return {"BLOCK_M": block_m, "BLOCK_N": min(32, pow2(d_out)), "BLOCK_K": 128, "num_warps": 4,
                "num_stages": 4}
    block_n = min(128, pow2(d_out))
    big = block_m * block_n >= 128 * 128
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64,
            "num_warps": 8 if big else 4, "num_stages": 3 if big else 4}


def tile_config(role: str, d_in: int, d_out: int, n_tokens: int, *, rows_per_expert: int) -> dict[str, Any]:
    """The config of a kernel role for a layer shape and token count (tuned if measured)."""
    key = (role, d_in, d_out, bucket(n_tokens))
    if key in TUNED:
        return dict(TUNED[key])
    return default_config(role, d_out, bucket(n_tokens), rows_per_expert)


def _pow2_below(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def experts_config(d: int, n_experts: int, expert_size: int, v_dim: int, k: int, n_bucket: int) -> dict[str, Any]:
    """How the inference forward runs the experts for a layer shape and token bucket.

    `mode`: 'gather' (no dispatch; one program per expert and hidden chunk of BLOCK_G units takes
    the tokens that chose its expert BLOCK_M at a time), 'fused' (row tiles of BLOCK_M dispatched
    rows, up and down in one program) or 'split' (two CVMM launches, configs of `tile_config`).
    `finish`: 'inline', 'pass' or 'atomic' (see `plan.sigma_moe_plan`); the defaults take float32
    sums up to GATHER_MAX_TOKENS and beyond it bfloat16/float16 atomics, which the H200 sweep found
    fastest at every shape from 256 tokens, as long as a token's output takes at most
    MAX_ATOMIC_ADDS of them. The defaults gather up to GATHER_MAX_TOKENS tokens, and up to
    GATHER_MAX_ROWS_TOKENS where experts get few rows (GATHER_MAX_ROWS); else 'fused'. Optional:
    'V_SPLIT' (default 1) programs per row block and hidden chunk, each with its share of the output
    columns; 'route', the route kernel's config (BLOCK_N, BLOCK_D, num_warps, num_stages) in place of
    `tile_config`'s; 'speculate' (see SPECULATE_MIN_USE). The defaults give every SM a couple of
    programs; `TUNED` overrides them with measured ones.
    """
    key = ("experts", d, n_experts, expert_size, v_dim, k, n_bucket)
    if key in TUNED:
        return dict(TUNED[key])
    G = expert_size
    if n_bucket <= GATHER_MAX_TOKENS:
        used = n_experts * expected_share(n_experts, k, n_bucket)  # experts expected to be chosen
        block_g = min(64, pow2(G), max(16, _pow2_below(used * G / (2 * SMS))))
        return {"mode": "gather", "BLOCK_M": pow2(n_bucket), "BLOCK_G": block_g, "BLOCK_D": 128, "BLOCK_N": 128,
                "num_warps": 4, "num_stages": 3, "finish": "inline"}
    rows = n_bucket * k // n_experts
    if n_bucket <= GATHER_MAX_ROWS_TOKENS and rows <= GATHER_MAX_ROWS:
        # every expert is chosen: at most about one program per SM, one row block each
        block_g = min(128, pow2(G), pow2(n_experts * G / SMS))
        adds = k * -(-G // block_g)
        return {"mode": "gather", "BLOCK_M": min(64, pow2(2 * rows)), "BLOCK_G": block_g, "BLOCK_D": 128,
                "BLOCK_N": 128, "num_warps": 8, "num_stages": 3,
                "finish": "atomic" if adds <= MAX_ATOMIC_ADDS else "inline"}
    block_m = min(128, pow2(rows))
    tiles = n_experts * -(-rows // block_m)
    block_g = min(128, pow2(G))
    while block_g > 32 and tiles * -(-G // block_g) < 2 * SMS:
        block_g //= 2
    big = block_m * block_g >= 128 * 64
    # half-precision atomics round each of a token's k * chunks adds: the H200 sweeps stayed within
    # `bench.kernels.MAX_ERR` up to 16 of them; beyond, float32 sums (a finalize pass for large outputs)
    adds = k * -(-G // block_g)
    finish = "pass" if n_bucket * v_dim * 4 >= PASS_ACC_BYTES else "inline"
    if adds <= MAX_ATOMIC_ADDS:
        finish = "atomic"
    return {"mode": "fused", "BLOCK_M": block_m, "BLOCK_G": block_g, "BLOCK_D": 64, "BLOCK_N": 64 if big else 128,
            "num_warps": 8 if big else 4, "num_stages": 3, "finish": finish}
