"""Launch plans: each operation as a FIXED sequence of kernel launches, the one source of truth for
every host (PyTorch through Triton's JIT, and the AOT cubin launcher that the ONNX Runtime and
TensorRT plugins, a later issue, will use).

A `Plan` names its input, output and workspace buffers with shapes, and lists `Step`s: a kernel,
its grid, its runtime arguments (a buffer name, an integer expression, or None for a null
pointer) and its compile-time constants. Shapes, grids and integer arguments are expressions over
the plan's runtime symbols (the token count `N`, read off the input shapes, and symbols derived
from it such as the slot count `S`), written in a tiny language every host can
evaluate: integers, + - * // ( ) and cdiv(a, b), min(a, b), max(a, b). Nothing depends on data,
so a host needs no synchronisation, and the sequence can run inside a CUDA graph or a TensorRT
enqueue with a workspace whose size is a function of N.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moexport.kernels.configs import (SPECULATE_MIN_USE, Configs, bucket, expected_share, experts_config,
                                      float32_finish, pow2, tile_config)

ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
SELECTION_CODES = {"sigmoid": 0, "softmax": 1, "softmax_after_topk": 2}

# Tokens the gather path's programs scan per step ([GATHER_SCAN, k] expert ids at once)
GATHER_SCAN = 1024
# Shared memory a kernel's tiles may take on every GPU the bundles target by default: sm_80's opt-in
# maximum (sm_90 offers 227 KB). Every shipped config stays within it in half precision; in float32
# (the same tiles, twice the bytes) a config gets fewer pipeline stages (`_stages`), else its kernel
# would not launch (Triton's OutOfResources, the launcher's "needs ... bytes of shared memory").
SHARED_BUDGET = 166912
# Float32 products take 3 tf32 passes (`_jit.mma`), which split the operand tiles; in the route and
# expert kernels (tokens gathered by index, not tiles streamed as in CVMM) they then sit in registers, and
# where they hold more than this many float32 elements, ptxas spills to local memory (sm_90 cubins,
# `cuobjdump --dump-resource-usage`: WT103-small's gather kernel at one token spilled 5.4 KB a thread and
# took 112 us, 7x its time at 16 tokens, H100; every benchmark shape spilled somewhere; 8 warps did not
# make room for twice the elements). Half-precision tiles feed the tensor cores from shared memory.
F32_OPERAND_ELEMENTS = 2048
# The expert kernel's hidden tile h [BLOCK_M, BLOCK_G] is the up product's accumulator and the down
# product's split operand, so in float32 it is bounded too: Triton 3.6 (the H100/H200 machines') spilled
# 240 bytes a thread at 64 x 128 (the large shape, 256 tokens) and 176 at 128 x 128 (every benchmark
# shape's dispatched kernel, 4096 tokens and more); Triton 3.9 none.
F32_HIDDEN_ELEMENTS = 4096


@dataclass(frozen=True)
class Buffer:
    """A tensor of a plan: dtype name ('float32', 'int32', 'float16', 'bfloat16') and shape."""

    name: str
    dtype: str
    shape: tuple[str, ...]
    zero: bool = False  # filled with zeros before the first step (a memset in the sequence)
    strided: bool = False  # strides are compile-time constants of the steps, not row-major


@dataclass(frozen=True)
class Step:
    """One kernel launch: grid expressions, runtime arguments by parameter name (a buffer name, an
    integer expression, or None for a null pointer), compile-time constants, warps and stages."""

    kernel: str  # "<module>.<function>" inside moexport.kernels
    grid: tuple[str, ...]
    args: dict[str, str | None]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    # programmatic dependent launch: the kernel may start before the previous one ends (it waits for
    # its results itself); hosts that cannot launch so launch it normally, which is equally correct
    launch_pdl: bool = False


@dataclass(frozen=True)
class Plan:
    """An operation as a fixed launch sequence: its buffers and its steps, in order."""

    name: str
    inputs: tuple[Buffer, ...]
    outputs: tuple[Buffer, ...]
    workspace: tuple[Buffer, ...]
    steps: tuple[Step, ...]
    # symbols computed from the ones read off input shapes, in order, e.g. (("S", "N * 4"),)
    derived: tuple[tuple[str, str], ...] = ()
    # the configs were chosen for token counts up to this
    max_tokens: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def buffer(self, name: str) -> Buffer:
        for b in (*self.inputs, *self.outputs, *self.workspace):
            if b.name == name:
                return b
        raise KeyError(name)


_EXPR_NAMES = {"__builtins__": {}, "cdiv": lambda a, b: -(-a // b), "min": min, "max": max}
_CODE: dict[str, Any] = {}


def evaluate(expr: str | int, symbols: dict[str, int]) -> int:
    """Value of a plan expression for the given symbols (e.g. {'N': 4096})."""
    if isinstance(expr, int):
        return expr
    if expr not in _CODE:
        _CODE[expr] = compile(expr, "<plan expression>", "eval")
    return int(eval(_CODE[expr], _EXPR_NAMES, symbols))  # noqa: S307 - plan text only


@dataclass(frozen=True)
class MoEShape:
    """What a plan needs to know of a σ-MoE layer."""

    d: int
    n_experts: int
    expert_size: int
    v_dim: int
    k: int
    dtype: str
    selection: str = "sigmoid"
    activation: str = "relu"
    bias: bool = False
    # the router weight's dtype, where it is not `dtype`: the ONNX op keeps it in float32
    router_dtype: str | None = None

    @classmethod
    def of(cls, layer, dtype: str) -> "MoEShape":
        return cls(layer.d_model, layer.n_experts, layer.expert_size, layer.v_dim, layer.k, dtype,
                   layer.selection, layer.activation, layer.bias is not None)


def _route_step(s: MoEShape, n: int, *, source: str, counts: bool, logits_out: bool = False,
                experts: str | None = None, fill: str | None = None, fill_row: str | None = None, count: str | None = None,
                count_cols: int = 1, cfg: dict | None = None, configs: Configs) -> Step:
    """Routing of N tokens; also sets the rows of `fill` [N, v_dim] that the expert kernels add into
    to the vector `fill_row` (or zeros) and zeroes their int32 counters `count` [N, count_cols].
    `cfg`: the route config, by default `tile_config`'s."""
    cfg = cfg or tile_config("route", s.d, s.n_experts, n, rows_per_expert=0, configs=configs)
    has_x = source == "x"
    item = _item(s.router_dtype or s.dtype)  # float32 tiles wherever the router weight or the layer is float32
    rows = pow2(s.n_experts) + cfg["BLOCK_N"]  # a step's tiles of router weight and tokens
    return Step(
        "routing.route_kernel", (f"cdiv(N, {cfg['BLOCK_N']})",),
        {"x_ptr": "x" if has_x else None, "sel_ptr": "expert_sel" if has_x else None,
         "logits_ptr": "logits" if (not has_x or logits_out) else None,
         "gate_ptr": "gate", "expert_ptr": "expert", "counts_ptr": "counts" if counts else None, "experts_ptr": experts,
         "fill_ptr": fill, "fill_row_ptr": fill_row, "count_ptr": count, "N": "N"},
        {"E": s.n_experts, "D": s.d, "K": s.k, "SELECTION": SELECTION_CODES[s.selection], "HAS_X": has_x,
         "STORE_LOGITS": logits_out, "STORE_COUNTS": counts, "FILL_COLS": s.v_dim, "COUNT_COLS": count_cols,
         "BLOCK_N": cfg["BLOCK_N"], "BLOCK_E": pow2(s.n_experts), "BLOCK_K": pow2(s.k, 1),
         "BLOCK_D": _reduction_tile(min(cfg["BLOCK_D"], pow2(s.d), _fit(48 * 1024, rows * item)), rows, item),
         "PDL": True},
        cfg["num_warps"], cfg["num_stages"])


def _dispatch_steps(s: MoEShape, n: int, route_block: int, tile_m: int) -> tuple[Step, ...]:
    # every program sums all chunks' histograms: tiles of up to 4096 counts, so that many chunks
    # (32768 tokens: 512) take a few dependent loads rather than one per 32 chunks
    block_c = max(16, min(4096 // pow2(s.n_experts), pow2(-(-n // route_block))))
    return (Step(
        "routing.dispatch_kernel", (f"cdiv(N, {route_block})",),
        {"expert_ptr": "expert", "counts_ptr": "counts", "sorted_expert_ptr": "sorted_expert",
         "sorted_slot_ptr": "sorted_slot", "offsets_ptr": "offsets", "tile_map_ptr": "tile_map", "N": "N"},
        {"E": s.n_experts, "K": s.k, "TILE_M": tile_m, "BLOCK_N": route_block, "BLOCK_E": pow2(s.n_experts),
         "BLOCK_C": block_c, "SUB": 64}, 4, 2),)


def _cvmm_step(*, x: str, w: str, out: str, e: int, k_in: int, n_out: int, w_strides: tuple[int, int, int],
               cfg: dict, tile_m: int, src: str | None = None, src_div: int = 1, dst: str | None = None,
               dst_div: int = 1, gate: str | None = None, gate_by_dst: bool = False, bias: str | None = None,
               pre_out: str | None = None, h: str | None = None, pre: str | None = None,
               dgate: str | None = None, activation: str = "none", epilogue: int = 0,
               count: str | None = None, o_bias: str | None = None, y: str | None = None, item: int) -> Step:
    block_n = _block_n(cfg, n_out)
    block_k = min(cfg["BLOCK_K"], pow2(k_in))  # no float32 bound: 128 x 128 x 64 tiles do not spill here
    n_col = -(-n_out // block_n)
    return Step(
        "grouped.cvmm_kernel", (f"(cdiv(S, {tile_m}) + {e}) * {n_col}",),
        {"x_ptr": x, "w_ptr": w, "offsets_ptr": "offsets", "tile_map_ptr": "tile_map", "src_ptr": src,
         "dst_ptr": dst, "gate_ptr": gate, "bias_ptr": bias, "h_ptr": h, "pre_ptr": pre, "out_ptr": out,
         "pre_out_ptr": pre_out, "dgate_ptr": dgate, "count_ptr": count, "o_bias_ptr": o_bias, "y_ptr": y},
        {"E": e, "K_IN": k_in, "N_OUT": n_out, "stride_we": w_strides[0], "stride_wk": w_strides[1],
         "stride_wn": w_strides[2], "SRC_DIV": src_div, "DST_DIV": dst_div, "GATE_BY_DST": gate_by_dst,
         "ACTIVATION": ACTIVATION_CODES[activation], "EPILOGUE": epilogue, "BLOCK_M": tile_m,
         "BLOCK_N": block_n, "BLOCK_K": block_k},
        cfg["num_warps"], _stages(cfg["num_stages"], (tile_m + block_n) * block_k * item))


def _stages(num_stages: int, stage_bytes: int, fixed_bytes: int = 0) -> int:
    """A config's pipeline stages, fewer where `stage_bytes` of tiles a stage (plus `fixed_bytes` held
    throughout) would exceed SHARED_BUDGET."""
    return max(1, min(num_stages, (SHARED_BUDGET - fixed_bytes) // stage_bytes))


def _item(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _reduction_tile(block: int, other: int, item: int) -> int:
    """A product's reduction tile `block`, where its operand tiles hold (block x `other`) elements in all:
    shorter in float32 where they would exceed F32_OPERAND_ELEMENTS (a power of two, at least 16)."""
    return block if item != 4 else min(block, _fit(F32_OPERAND_ELEMENTS, other))


def _fit(budget: int, per_unit: int) -> int:
    """Largest power of two n (at least 16) with n * per_unit <= budget: a tile length that keeps a
    pipeline stage's shared memory within budget bytes."""
    return max(16, 1 << max(0, (budget // per_unit).bit_length() - 1))


def _block_n(cfg: dict, n_out: int) -> int:
    return min(cfg["BLOCK_N"], pow2(n_out))


def _finalize_step(acc: str, bias: str | None, out: str, width: int) -> Step:
    return Step("grouped.finalize_kernel", (f"cdiv(N * {width}, 1024)",),
                {"acc_ptr": acc, "bias_ptr": bias, "out_ptr": out, "N": "N"}, {"D": width, "BLOCK": 1024}, 4, 1)


def _tile_m(s: MoEShape, n: int, configs: Configs) -> int:
    rows = n * s.k // s.n_experts
    return tile_config("up", s.d, s.expert_size, n, rows_per_expert=rows, configs=configs)["BLOCK_M"]


def _up_down_steps(s: MoEShape, n: int, tile_m: int, *, out: str, configs: Configs, keep_pre: bool = False,
                   count: str | None = None, o_bias: str | None = None, y: str | None = None) -> tuple[Step, Step]:
    """The split sequence's two CVMM launches: up projection (gathered token rows -> h in sorted
    order, with keep_pre also the float32 pre-activation), and down projection, gate-weighted and
    added in float32 into the token rows of `out`; with `y`, each row's last contributor (counted
    in `count`) rounds it into y."""
    E, d, G, dv = s.n_experts, s.d, s.expert_size, s.v_dim
    rows = n * s.k // E
    up = _cvmm_step(x="x", w="keys", out="h", e=E, k_in=d, n_out=G, w_strides=(d * G, G, 1),
                    cfg=tile_config("up", d, G, n, rows_per_expert=rows, configs=configs), tile_m=tile_m,
                    src="sorted_slot", src_div=s.k, bias="bias" if s.bias else None,
                    pre_out="pre" if keep_pre else None, activation=s.activation, item=_item(s.dtype))
    down = _cvmm_step(x="h", w="values", out=out, e=E, k_in=G, n_out=dv, w_strides=(G * dv, dv, 1),
                      cfg=tile_config("down", G, dv, n, rows_per_expert=rows, configs=configs), tile_m=tile_m,
                      dst="sorted_slot", dst_div=s.k, gate="gate", gate_by_dst=True, epilogue=1,
                      count=count, o_bias=o_bias, y=y, item=_item(s.dtype))
    return up, down


def _expert_steps(s: MoEShape, n: int, tile_m: int, *, keep_pre: bool,
                  configs: Configs) -> tuple[tuple[Step, ...], tuple[Buffer, ...]]:
    """Up projection (gathered token rows -> h in sorted order) and down projection into float32 y."""
    G, dv = s.expert_size, s.v_dim
    # float32 without output bias: the accumulator is y itself (zero-filled), no finalize pass
    direct = s.dtype == "float32" and not s.bias
    steps = _up_down_steps(s, n, tile_m, out="y" if direct else "acc", keep_pre=keep_pre, configs=configs)
    if not direct:
        steps += (_finalize_step("acc", "o_bias" if s.bias else None, "y", dv),)
    workspace = (Buffer("h", s.dtype, ("S", str(G))),)
    if keep_pre:
        workspace += (Buffer("pre", "float32", ("S", str(G))),)
    if not direct:
        workspace += (Buffer("acc", "float32", ("N", str(dv)), zero=True),)
    return steps, workspace


def _plan_buffers(s: MoEShape, n: int, tile_m: int, route_block: int) -> tuple[Buffer, ...]:
    E = s.n_experts
    return (Buffer("gate", "float32", ("N", str(s.k))), Buffer("expert", "int32", ("N", str(s.k))),
            Buffer("counts", "int32", (f"cdiv(N, {route_block})", str(E))),
            Buffer("sorted_expert", "int32", ("S",)), Buffer("sorted_slot", "int32", ("S",)),
            Buffer("offsets", "int32", (str(E + 1),)),
            Buffer("tile_map", "int32", (f"1 + cdiv(S, {tile_m}) + {E}",)))


def _layer_inputs(s: MoEShape, *, with_x: bool = True) -> tuple[Buffer, ...]:
    E, d, G, dv = s.n_experts, s.d, s.expert_size, s.v_dim
    out = (Buffer("x", s.dtype, ("N", str(d))),) if with_x else ()
    out += (Buffer("expert_sel", s.router_dtype or s.dtype, (str(E), str(d))),
            Buffer("keys", s.dtype, (str(E), str(d), str(G))),
            Buffer("values", s.dtype, (str(E), str(G), str(dv))))
    if s.bias:
        out += (Buffer("bias", s.dtype, (str(E), str(G))), Buffer("o_bias", s.dtype, (str(dv),)))
    return out


def sigma_moe_plan(s: MoEShape, n_tokens: int, *, configs: Configs = None, expert_output: bool = False) -> Plan:
    """Inference forward of a σ-MoE layer for token counts in n_tokens' bucket, with the configs
    of `configs` (a table of measured ones; defaults to the shipped table) or the defaults. With
    `expert_output`, the plan also outputs each token's experts, best first (`experts` [N, k] int64:
    what the ONNX op's optional second output holds), which the route kernel writes beside its own.

    The config of the bucket (`configs.experts_config`) picks one of three sequences:

    - gather: route -> experts (one program per expert and hidden chunk finds its tokens itself;
      nothing sorted, no dispatch launch);
    - fused: route -> dispatch -> experts (up, activation and down per row tile of the plan);
    - split: route -> dispatch -> up CVMM (h through memory) -> down CVMM;

    and one of three ways to sum a token's k contributions into y (`finish`):
    'inline', float32 adds into an accumulator that the route kernel zeroes, the last contributor
    of each token row rounding it in the last launch (`experts.finish_rows`); 'pass', a memset of
    the accumulator first and a finalize launch last (cheaper where counting and re-reading rows
    inside the expert kernels costs more than one more pass: large v_dim, many tokens); or
    'atomic', adds straight into y in the model dtype, which the route kernel fills with the output
    bias (no accumulator and no second pass; in half precision one rounding per add, so k times the
    hidden chunks roundings where the others round once). Float32 layers always take 'atomic',
    bfloat16 layers never (their config's 'atomic' becomes 'inline', or 'pass' for large outputs).
    """
    n = bucket(n_tokens)
    E, d, G, dv = s.n_experts, s.d, s.expert_size, s.v_dim
    cfg = experts_config(d, E, G, dv, s.k, n, configs=configs)
    mode = cfg["mode"]
    finish = "atomic" if s.dtype == "float32" else cfg.get("finish", "inline")
    if finish == "atomic" and s.dtype == "bfloat16":
        # bfloat16 atomics round each of a token's k * chunks adds to 8 bits: 7 of them already left the
        # bfloat16 tolerance (the sweep's seed 5 case 73), and the op set promises one final rounding.
        # float16's 11 bits keep the shipped configs' up to 16 adds within it (the GPU sweeps)
        finish = float32_finish(n, dv)
    o_bias = "o_bias" if s.bias else None
    count_cols = cfg.get("V_SPLIT", 1)  # experts programs of one row block with their own columns
    if mode == "split":
        down = tile_config("down", G, dv, n, rows_per_expert=n * s.k // E, configs=configs)
        count_cols = -(-dv // _block_n(down, dv))
    # what the expert kernels add into, and what the route kernel prepares of it
    if finish == "atomic":
        out = {"acc": "y", "count": None, "y": None}
        prepare = {"fill": "y", "fill_row": o_bias}
        workspace = ()
    elif finish == "inline":
        out = {"acc": "acc", "count": "count", "y": "y"}
        prepare = {"fill": "acc", "count": "count", "count_cols": count_cols}
        workspace = (Buffer("acc", "float32", ("N", str(dv))), Buffer("count", "int32", ("N", str(count_cols))))
    else:
        out = {"acc": "acc", "count": None, "y": None}
        prepare = {}
        workspace = (Buffer("acc", "float32", ("N", str(dv)), zero=True),)
    route = _route_step(s, n, source="x", counts=mode != "gather", cfg=cfg.get("route"), configs=configs,
                        experts="experts" if expert_output else None, **prepare)
    if mode == "gather":
        step = _experts_step(s, n, cfg, dispatched=False, **out)
        steps = (route, step)
        workspace += (Buffer("gate", "float32", ("N", str(s.k))), Buffer("expert", "int32", ("N", str(s.k))))
        if not step.constexprs["SPECULATE"]:  # speculating programs keep no token list
            lists = str(E * -(-G // step.constexprs["BLOCK_G"]) * step.constexprs["V_SPLIT"])
            workspace += (Buffer("list_tok", "int32", (lists, "N")), Buffer("list_gate", "float32", (lists, "N")))
    else:
        tile_m = cfg["BLOCK_M"] if mode == "fused" else _tile_m(s, n, configs)
        steps = (route,) + _dispatch_steps(s, n, route.constexprs["BLOCK_N"], tile_m)
        workspace += _plan_buffers(s, n, tile_m, route.constexprs["BLOCK_N"])
        if mode == "fused":
            steps += (_experts_step(s, n, cfg, dispatched=True, **out),)
        else:
            steps += _up_down_steps(s, n, tile_m, out=out["acc"], count=out["count"],
                                    o_bias=o_bias if out["y"] else None, y=out["y"], configs=configs)
            workspace += (Buffer("h", s.dtype, ("S", str(G))),)
    if finish == "pass":
        steps += (_finalize_step("acc", o_bias, "y", dv),)
    outputs = (Buffer("y", s.dtype, ("N", str(dv))),)
    if expert_output:
        outputs += (Buffer("experts", "int64", ("N", str(s.k))),)
    return Plan("sigma_moe", _layer_inputs(s), outputs, workspace, steps, derived=(("S", f"N * {s.k}"),),
                max_tokens=n, notes={"mode": mode, "finish": finish, "config": cfg})


def _experts_step(s: MoEShape, n: int, cfg: dict, *, dispatched: bool, acc: str, count: str | None,
                  y: str | None) -> Step:
    E, G = s.n_experts, s.expert_size
    block_m, block_g, v_split = cfg["BLOCK_M"], min(cfg["BLOCK_G"], pow2(G)), cfg.get("V_SPLIT", 1)
    item = _item(s.dtype)
    if item == 4:
        block_g = min(block_g, _fit(F32_HIDDEN_ELEMENTS, block_m))
    # up: x [block_m, block_d] @ keys [block_d, block_g]; down: h [block_m, block_g] @ values [block_g, block_n]
    # (the down product's operands are bounded through block_n, its reduction being the hidden chunk)
    block_d = _reduction_tile(min(cfg["BLOCK_D"], pow2(s.d)), block_m + block_g, item)
    block_n = _reduction_tile(min(cfg["BLOCK_N"], pow2(s.v_dim)), block_m + block_g, item)
    # a stage holds a tile of x and one of keys (up loop), or one of values (down loop); h stays (this
    # gives exactly the 256 KB the launcher reported on an H100 for float32 tiles 128 x 128 x 64, 3 stages)
    stages = _stages(cfg["num_stages"], max(block_m * block_d + block_d * block_g, block_g * block_n) * item,
                     block_m * block_g * item)
    n_chunks = -(-G // block_g)
    grid = ((f"(cdiv(S, {block_m}) + {E}) * {n_chunks}", str(v_split)) if dispatched
            else (str(E), str(n_chunks), str(v_split)))
    plan = {"offsets_ptr": "offsets", "tile_map_ptr": "tile_map", "sorted_slot_ptr": "sorted_slot"}
    lists = {"list_tok_ptr": "list_tok", "list_gate_ptr": "list_gate"}
    speculate = not dispatched and block_m >= n and cfg.get("speculate",
                                                           expected_share(E, s.k, n) >= SPECULATE_MIN_USE)
    return Step(
        "experts.experts_kernel", grid,
        {"x_ptr": "x", "keys_ptr": "keys", "bias_ptr": "bias" if s.bias else None, "values_ptr": "values",
         "o_bias_ptr": "o_bias" if s.bias and y else None, "gate_ptr": "gate",
         "expert_ptr": None if dispatched else "expert",
         **{name: buf if dispatched else None for name, buf in plan.items()},
         **{name: None if dispatched or speculate else buf for name, buf in lists.items()},
         "acc_ptr": acc, "count_ptr": count, "y_ptr": y, "N": "N"},
        {"E": E, "D": s.d, "G": G, "DV": s.v_dim, "K": s.k, "ACTIVATION": ACTIVATION_CODES[s.activation],
         "DISPATCHED": dispatched, "BLOCK_M": block_m, "BLOCK_G": block_g, "BLOCK_D": block_d,
         "BLOCK_N": block_n, "BLOCK_K": pow2(s.k, 1),
         # tokens the gather path scans per step (dispatched tiles scan nothing)
         "BLOCK_S": 16 if dispatched else min(GATHER_SCAN, pow2(n)), "V_SPLIT": v_split, "SPECULATE": speculate,
         "PDL": True},
        # gather programs start while the route kernel (the step before) runs, and wait for it
        cfg["num_warps"], stages, launch_pdl=not dispatched)


def topk_dispatch_plan(n_experts: int, k: int, selection: str, n_tokens: int, *, tile_m: int = 64,
                       configs: Configs = None) -> Plan:
    """The TopKDispatch op: float32 logits [N, E] -> gate, expert, sorted_expert, sorted_slot (route
    config of `configs`, defaulting to the shipped table)."""
    s = MoEShape(1, n_experts, 1, 1, k, "float32", selection)
    n = bucket(n_tokens)
    route = _route_step(s, n, source="logits", counts=True, configs=configs)
    outputs = (Buffer("gate", "float32", ("N", str(k))), Buffer("expert", "int32", ("N", str(k))),
               Buffer("sorted_expert", "int32", ("S",)), Buffer("sorted_slot", "int32", ("S",)))
    workspace = tuple(b for b in _plan_buffers(s, n, tile_m, route.constexprs["BLOCK_N"])
                      if b.name not in {o.name for o in outputs})
    return Plan("topk_dispatch", (Buffer("logits", "float32", ("N", str(n_experts))),), outputs, workspace,
                (route,) + _dispatch_steps(s, n, route.constexprs["BLOCK_N"], tile_m),
                derived=(("S", f"N * {k}"),), max_tokens=n)


def cvmm_plan(n_experts: int, d_in: int, d_out: int, dtype: str, *, reduce: bool, k: int, gate: bool,
              n_rows: int, w_strides: tuple[int, int, int] | None = None, configs: Configs = None,
              out_dtype: str | None = None) -> Plan:
    """The CVMM op over S sorted rows: out[dst] = (gate *) x[src] @ W[e], or summed into dst // k
    (tile config of `configs`, defaulting to the shipped table); out in `out_dtype` (the ONNX op's
    is float32), by default x's dtype."""
    out_dtype = out_dtype or dtype
    E = n_experts
    w_strides = w_strides or (d_in * d_out, d_out, 1)
    rows = max(1, n_rows // E)
    cfg = tile_config("down" if reduce else "up", d_in, d_out, max(1, n_rows // k), rows_per_expert=rows,
                      configs=configs)
    tile_m = cfg["BLOCK_M"]
    # the kernel writes offsets[0..E], one lane each: E + 1 lanes (pow2(E) drops offsets[E] when E is
    # a power of two of 16 and up; for every other E the two are equal)
    offsets = Step("routing.offsets_kernel", (f"min(32, cdiv(S, {tile_m}))",),
                   {"sorted_expert_ptr": "sorted_expert", "offsets_ptr": "offsets", "tile_map_ptr": "tile_map",
                    "S": "S"}, {"E": E, "TILE_M": tile_m, "BLOCK_E": pow2(E + 1)}, 4, 1)
    out_rows = "cdiv(S, %d)" % k if reduce else "S"
    direct = out_dtype == "float32" or not reduce
    main = _cvmm_step(x="x", w="w", out="out" if direct else "acc", e=E, k_in=d_in, n_out=d_out, w_strides=w_strides,
                      cfg=cfg, tile_m=tile_m, src="src_row", dst="dst_row", dst_div=k if reduce else 1,
                      gate="gate" if gate else None, epilogue=1 if reduce else 0, item=_item(dtype))
    steps = (offsets, main)
    workspace = (Buffer("offsets", "int32", (str(E + 1),)),
                 Buffer("tile_map", "int32", (f"1 + cdiv(S, {tile_m}) + {E}",)))
    if not direct:
        steps += (_finalize_step("acc", None, "out", d_out),)
        workspace += (Buffer("acc", "float32", (out_rows, str(d_out)), zero=True),)
    inputs = (Buffer("x", dtype, ("R", str(d_in))), Buffer("sorted_expert", "int32", ("S",)),
              Buffer("src_row", "int32", ("S",)), Buffer("dst_row", "int32", ("S",)),
              Buffer("w", dtype, (str(E), str(d_in), str(d_out)), strided=True))
    if gate:
        inputs += (Buffer("gate", "float32", ("S",)),)
    outputs = (Buffer("out", out_dtype, (out_rows, str(d_out)), zero=reduce and direct),)
    return Plan("cvmm", inputs, outputs, workspace, steps, derived=(("N", f"cdiv(S, {k})"),),
                max_tokens=bucket(n_rows))


def route_plan(s: MoEShape, n_tokens: int, *, configs: Configs = None) -> Plan:
    """Training routing: top-k of a float32 rank key [N, E] (logits, dropped experts at -inf); route
    config of `configs`, defaulting to the shipped table."""
    n = bucket(n_tokens)
    route = _route_step(s, n, source="logits", counts=True, configs=configs)
    return Plan("route", (Buffer("logits", "float32", ("N", str(s.n_experts))),),
                (Buffer("expert", "int32", ("N", str(s.k))),
                 Buffer("counts", "int32", (f"cdiv(N, {route.constexprs['BLOCK_N']})", str(s.n_experts)))),
                (Buffer("gate", "float32", ("N", str(s.k))),), (route,), max_tokens=n)


_SAVED = ("sorted_expert", "sorted_slot", "offsets", "tile_map", "h", "pre")


def train_forward_plan(s: MoEShape, n_tokens: int, *, configs: Configs = None) -> Plan:
    """Training forward of the experts given routing (expert, counts from `route_plan` with the same
    `configs`) and gates; also outputs what the backward needs (dispatch plan, h, float32
    pre-activation). Configs of `configs`, defaulting to the shipped table."""
    n = bucket(n_tokens)
    route_block = tile_config("route", s.d, s.n_experts, n, rows_per_expert=0, configs=configs)["BLOCK_N"]
    tile_m = _tile_m(s, n, configs)
    experts, workspace = _expert_steps(s, n, tile_m, keep_pre=True, configs=configs)
    plan_buffers = _plan_buffers(s, n, tile_m, route_block) + workspace
    saved = tuple(b for b in plan_buffers if b.name in _SAVED)
    inputs = (Buffer("x", s.dtype, ("N", str(s.d))), Buffer("gate", "float32", ("N", str(s.k))),
              Buffer("expert", "int32", ("N", str(s.k))),
              Buffer("counts", "int32", (f"cdiv(N, {route_block})", str(s.n_experts)))) + _layer_inputs(s, with_x=False)
    y = Buffer("y", s.dtype, ("N", str(s.v_dim)), zero=s.dtype == "float32" and not s.bias)
    return Plan("sigma_moe_train", inputs, (y,) + saved,
                tuple(b for b in plan_buffers if b.name not in _SAVED and b.name not in {"gate", "expert", "counts"}),
                _dispatch_steps(s, n, route_block, tile_m) + experts, derived=(("S", f"N * {s.k}"),), max_tokens=n)


def backward_plan(s: MoEShape, n_tokens: int, *, configs: Configs = None) -> Plan:
    """Gradients of the experts: dx, dgate [N, k], dkeys, dvalues, and dpre [S, G] in sorted order
    (the hidden bias gradient is its per-expert column sum). Configs of `configs` (those of the
    forward's `train_forward_plan`), defaulting to the shipped table."""
    n = bucket(n_tokens)
    E, d, G, dv, k = s.n_experts, s.d, s.expert_size, s.v_dim, s.k
    tile_m = _tile_m(s, n, configs)
    rows = n * k // E
    dh = _cvmm_step(x="dy", w="values", out="dpre", e=E, k_in=dv, n_out=G, w_strides=(G * dv, 1, dv),
                    cfg=tile_config("up", dv, G, n, rows_per_expert=rows, configs=configs), tile_m=tile_m,
                    src="sorted_slot", src_div=k, dst="sorted_slot", gate="gate", gate_by_dst=True, h="h",
                    pre="pre", dgate="dgate", activation=s.activation, epilogue=2, item=_item(s.dtype))
    dx_direct = s.dtype == "float32"
    dx = _cvmm_step(x="dpre", w="keys", out="dx" if dx_direct else "acc", e=E, k_in=G, n_out=d,
                    w_strides=(d * G, 1, G), tile_m=tile_m, dst="sorted_slot", dst_div=k, epilogue=1,
                    cfg=tile_config("down", G, d, n, rows_per_expert=rows, configs=configs), item=_item(s.dtype))
    wcfg = tile_config("wgrad", G, dv, n, rows_per_expert=rows, configs=configs)

    def wgrad(a: str, b: str, out: str, m_dim: int, n_dim: int, **index) -> Step:
        bm, bn = min(wcfg["BLOCK_M"], pow2(m_dim)), min(wcfg["BLOCK_N"], pow2(n_dim))
        return Step("grouped.wgrad_kernel", (str(-(-m_dim // bm) * -(-n_dim // bn)), str(E)),
                    {"a_ptr": a, "b_ptr": b, "offsets_ptr": "offsets", "a_idx_ptr": index.get("a_idx"),
                     "b_idx_ptr": index.get("b_idx"), "scale_ptr": index.get("scale"), "out_ptr": out},
                    {"E": E, "M_DIM": m_dim, "N_DIM": n_dim, "A_DIV": index.get("a_div", 1),
                     "B_DIV": index.get("b_div", 1), "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": wcfg["BLOCK_K"]},
                    wcfg["num_warps"], wcfg["num_stages"])

    steps = (dh, wgrad("h", "dy", "dvalues", G, dv, b_idx="sorted_slot", b_div=k, scale="gate"),
             wgrad("x", "dpre", "dkeys", d, G, a_idx="sorted_slot", a_div=k), dx)
    workspace = ()
    if not dx_direct:
        steps += (_finalize_step("acc", None, "dx", d),)
        workspace += (Buffer("acc", "float32", ("N", str(d)), zero=True),)
    inputs = (Buffer("dy", s.dtype, ("N", str(dv))), Buffer("x", s.dtype, ("N", str(d))),
              Buffer("gate", "float32", ("N", str(k))), Buffer("sorted_slot", "int32", ("S",)),
              Buffer("offsets", "int32", (str(E + 1),)), Buffer("tile_map", "int32", (f"1 + cdiv(S, {tile_m}) + {E}",)),
              Buffer("h", s.dtype, ("S", str(G))), Buffer("pre", "float32", ("S", str(G))),
              Buffer("keys", s.dtype, (str(E), str(d), str(G))), Buffer("values", s.dtype, (str(E), str(G), str(dv))))
    outputs = (Buffer("dx", s.dtype, ("N", str(d)), zero=dx_direct), Buffer("dgate", "float32", ("N", str(k)), zero=True),
               Buffer("dkeys", s.dtype, (str(E), str(d), str(G))), Buffer("dvalues", s.dtype, (str(E), str(G), str(dv))),
               Buffer("dpre", s.dtype, ("S", str(G))))
    return Plan("sigma_moe_backward", inputs, outputs, workspace, steps, derived=(("S", f"N * {k}"),), max_tokens=n)
