"""Tile configurations: chosen by token-count bucket, never re-tuned for a new token count.

A config depends on the layer's shape and on the bucket of the token count (powers of two), so a
run over many sequence lengths compiles a handful of kernels once. `TUNED` takes measured
configurations keyed like that (`moexport bench kernels --tune` times candidates from CUDA-graph
replays and writes them as JSON); it ships empty: the one sweep run so far timed host overhead
(see bench/results/kernels_notes.md), so every shape uses the bucketed `default_config`.
"""
from __future__ import annotations

from typing import Any

# Largest token count of the decode path (one token block; every selected expert read once).
DECODE_MAX_TOKENS = 64

# (role, d_in, d_out, bucket) -> config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TUNED: dict[tuple[str, int, int, int], dict[str, int]] = {}


def bucket(n_tokens: int) -> int:
    """The power of two at or above n_tokens (at least 16): the key of the config tables."""
    return max(16, 1 << max(0, int(n_tokens) - 1).bit_length())


def pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def default_config(role: str, d_in: int, d_out: int, n_bucket: int, rows_per_expert: int) -> dict[str, int]:
    """A reasonable config when no tuned one exists (roles: 'up', 'down', 'wgrad', 'route', 'decode')."""
    if role == "route":
        return {"BLOCK_N": 16 if n_bucket <= 1024 else 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}
    if role == "decode":
        return {"BLOCK_T": pow2(n_bucket), "BLOCK_D": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
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
    return default_config(role, d_in, d_out, bucket(n_tokens), rows_per_expert)
