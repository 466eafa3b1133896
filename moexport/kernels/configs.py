"""Tile configurations: chosen by token-count bucket, never re-tuned for a new token count.

A config depends on the layer's shape and on the bucket of the token count (powers of two), so a
run over many sequence lengths compiles a handful of kernels once. Measured configs are data: a
`ConfigTable` keyed like that, the shipped one read from `configs.json` beside this module on first
use (`shipped()`). The plan builders take a table (`configs=`), the shipped one by default; keys it
lacks fall back to the heuristics below. The tuning harness (tools/tune_kernels.py, beside the
package) times candidates on the GPU and writes its picks in the format of configs.json, so shipping
a pick is merging it into that file; where each shipped config comes from is in
bench/results/kernels_notes.md.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from moexport.core.errors import MoexportError

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

# What the `configs=` arguments take: a table of measured configs (a `ConfigTable`, or any mapping of
# keys to configs); None stands for the shipped table
Configs = Mapping[tuple, Mapping[str, Any]] | None

# The route kernel's config, as an experts config's optional 'route' entry holds it
ROUTE_FIELDS = ("BLOCK_N", "BLOCK_D", "num_warps", "num_stages")


class ConfigTable(Mapping):
    """Measured configs, read-only: an `experts_key` -> an `experts_config`, a `tile_key` -> a
    `tile_config`. Hashable by content, so that plans built with a table can be cached by it.

    Its JSON form (configs.json, the tuning harness's picks) is a list of entries
    {"key": [...], "config": {...}}, one a line, one per key.

    Args:
        configs: Key (a tuple) -> config (a JSON-like dict). Defaults to an empty table.
    """

    def __init__(self, configs: Mapping[tuple, Mapping[str, Any]] | None = None):
        self._configs = {tuple(key): copy.deepcopy(dict(config)) for key, config in (configs or {}).items()}
        self._hash: int | None = None

    def __getitem__(self, key: tuple) -> dict[str, Any]:
        return copy.deepcopy(self._configs[key])  # a caller's changes must not reach the table

    def __contains__(self, key: object) -> bool:
        return key in self._configs

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def __hash__(self) -> int:
        if self._hash is None:  # equal tables (Mapping's ==, any order) must hash alike
            self._hash = hash(frozenset((key, json.dumps(config, sort_keys=True))
                                        for key, config in self._configs.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"ConfigTable({len(self)} configs)"

    def merged(self, other: Mapping[tuple, Mapping[str, Any]]) -> ConfigTable:
        """This table with `other`'s configs in place of its own of the same keys, new keys last."""
        return ConfigTable({**self._configs, **other})

    def to_json(self) -> str:
        """The JSON form: one entry a line, in the table's order."""
        entries = [json.dumps({"key": list(key), "config": config}) for key, config in self._configs.items()]
        return "[\n" + ",\n".join(entries) + "\n]\n"

    @classmethod
    def from_json(cls, text: str, source: str = "JSON text") -> ConfigTable:
        """The table of a JSON form (see the class); `source` names it in errors.

        Raises:
            MoexportError: text that is not such a list, or that holds a key twice.
        """
        expected = 'a JSON list of {"key": [...], "config": {...}} entries, as moexport/kernels/configs.json'
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise MoexportError(source, f"is not JSON ({error})", expected) from None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("key"), list) and isinstance(e.get("config"), dict)
                for e in entries):
            raise MoexportError(source, "is not a table of configs", expected)
        keys = [tuple(e["key"]) for e in entries]
        twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if twice is not None:
            raise MoexportError(source, f"holds the key {list(twice)} more than once",
                                "one entry per key, as in moexport/kernels/configs.json")
        return cls({key: e["config"] for key, e in zip(keys, entries)})

    @classmethod
    def load(cls, path: str | Path) -> ConfigTable:
        """The table of a JSON file (see the class).

        Raises:
            MoexportError: a file that cannot be read or is not a table of configs.
        """
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise MoexportError(f"configs file {str(path)!r}", f"cannot be read ({error.strerror})") from None
        return cls.from_json(text, f"configs file {str(path)!r}")


@functools.cache
def shipped() -> ConfigTable:
    """The configs measured on the H200 that moexport ships (configs.json), read once, on first use."""
    text = (importlib.resources.files("moexport.kernels") / "configs.json").read_text()
    return ConfigTable.from_json(text, "moexport/kernels/configs.json")


def experts_key(d: int, n_experts: int, expert_size: int, v_dim: int, k: int, n_tokens: int) -> tuple:
    """The key of a layer shape's experts config at n_tokens' bucket in a `ConfigTable`."""
    return ("experts", d, n_experts, expert_size, v_dim, k, bucket(n_tokens))


def tile_key(role: str, d_in: int, d_out: int, n_tokens: int) -> tuple:
    """The key of a kernel role's tile config at n_tokens' bucket in a `ConfigTable`."""
    return (role, d_in, d_out, bucket(n_tokens))


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


def tile_config(role: str, d_in: int, d_out: int, n_tokens: int, *, rows_per_expert: int,
                configs: Configs = None) -> dict[str, Any]:
    """The config of a kernel role for a layer shape and token count: the measured one of `configs`
    (a `ConfigTable`; defaults to the shipped one), else `default_config`'s."""
    configs = shipped() if configs is None else configs
    key = tile_key(role, d_in, d_out, n_tokens)
    if key in configs:
        return dict(configs[key])
    return default_config(role, d_out, bucket(n_tokens), rows_per_expert)


def _pow2_below(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def float32_finish(n_bucket: int, v_dim: int) -> str:
    """How a token's contributions are summed in float32: rounded by a finalize pass when the
    accumulator is at least PASS_ACC_BYTES, else by the last contributor of each row."""
    return "pass" if n_bucket * v_dim * 4 >= PASS_ACC_BYTES else "inline"


def experts_config(d: int, n_experts: int, expert_size: int, v_dim: int, k: int, n_bucket: int, *,
                   configs: Configs = None) -> dict[str, Any]:
    """How the inference forward runs the experts for a layer shape and token bucket.

    `mode`: 'gather' (no dispatch; one program per expert and hidden chunk of BLOCK_G units takes
    the tokens that chose its expert BLOCK_M at a time), 'fused' (row tiles of BLOCK_M dispatched
    rows, up and down in one program) or 'split' (two CVMM launches, configs of `tile_config`).
    `finish`: 'inline', 'pass' or 'atomic' (see `plan.sigma_moe_plan`); the defaults take float32
    sums up to GATHER_MAX_TOKENS and beyond it half-precision atomics, which the H200 sweep found
    fastest at every shape from 256 tokens, as long as a token's output takes at most
    MAX_ATOMIC_ADDS of them (the plans of bfloat16 layers sum in float32 instead: their atomics
    round too coarsely). The defaults gather up to GATHER_MAX_TOKENS tokens, and up to
    GATHER_MAX_ROWS_TOKENS where experts get few rows (GATHER_MAX_ROWS); else 'fused'. Optional:
    'V_SPLIT' (default 1) programs per row block and hidden chunk, each with its share of the output
    columns; 'route', the route kernel's config (BLOCK_N, BLOCK_D, num_warps, num_stages) in place of
    `tile_config`'s; 'speculate' (see SPECULATE_MIN_USE). The defaults give every SM a couple of
    programs; a measured config of `configs` (a `ConfigTable`; defaults to the shipped one) overrides
    them.
    """
    configs = shipped() if configs is None else configs
    key = experts_key(d, n_experts, expert_size, v_dim, k, n_bucket)
    if key in configs:
        return dict(configs[key])
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
    # half-precision atomics round each of a token's k * chunks adds: the H200 sweeps stayed within the
    # tuning harness's error bound (MAX_ERR, tools/tune_kernels.py) up to 16 of them; beyond, float32
    # sums (a finalize pass for large outputs)
    adds = k * -(-G // block_g)
    finish = float32_finish(n_bucket, v_dim)
    if adds <= MAX_ATOMIC_ADDS:
        finish = "atomic"
    return {"mode": "fused", "BLOCK_M": block_m, "BLOCK_G": block_g, "BLOCK_D": 64, "BLOCK_N": 64 if big else 128,
            "num_warps": 8 if big else 4, "num_stages": 3, "finish": finish}
