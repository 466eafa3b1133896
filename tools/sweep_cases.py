"""The cases of the differential sweep (`tools/sweep.py`): seeded random layer configurations and their data.

A case is a pure function of (profile, seed, index): `case_of` draws it from a generator seeded with
exactly those, so any case replays alone on any machine. Cases come in groups that share one `Layer`
(op, shapes, dtype, attributes): on the GPU a group's kernels are compiled once (one bundle per layer,
`max_tokens` just above the group's largest token count); on the CPU every case is its own group.

What a case varies, besides the layer: the token count T (0, 1, odd counts, up to the profile's
largest), the leading dimensions of x, and a `special` that forces a situation random data rarely
reaches (`SPECIALS`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from moexport.core.dtypes import torch_dtype

OPS = ("SigmaMoE", "TopKDispatch", "CVMM")
DTYPES = ("float32", "float16", "bfloat16")
SELECTIONS = ("sigmoid", "softmax", "softmax_after_topk")
ACTIVATIONS = ("relu", "gelu", "silu")
# the paper's layer shapes (d, E, G, k), whose measured configs moexport ships (configs.json)
PAPER_SHAPES = ((412, 16, 128, 4), (1024, 32, 128, 4), (412, 128, 128, 4), (2048, 64, 256, 8))

# What each special forces (every op draws from the ones that mean something for it):
#   plain          random data
#   tied_rows      duplicated router rows (SigmaMoE) or integer logits (TopKDispatch): exact ties, which
#                  every implementation must break alike, for the lower expert index
#   integer        small-integer tokens and router rows: logits exact in any summation order, so routing
#                  must agree exactly, best-first order included
#   padding        some tokens all zero: every logit 0, an exact tie of all experts
#   nan_tokens     a NaN in some tokens (or logits): NaN logits rank as -inf (the routing rule), so such a
#                  token takes experts 0..k-1, and its output row is NaN
#   inf_tokens     an inf in some tokens: isolation only (no other token may change); how a product with
#                  an infinite operand comes out depends on how it is formed (see sweep.py)
#   one_expert     every token chooses one expert (a constant token feature it is tuned to)
#   dead_experts   experts that no token chooses
#   nan_router_row router rows of NaN: those experts rank last for every token
#   saturated      logits of magnitude ~1e3 (TopKDispatch): σ and softmax saturate, ranking must not
SPECIALS = {
    "SigmaMoE": {"plain": 34, "tied_rows": 10, "integer": 8, "padding": 5, "nan_tokens": 9, "inf_tokens": 6,
                 "one_expert": 10, "dead_experts": 10, "nan_router_row": 8},
    "TopKDispatch": {"plain": 30, "tied_rows": 15, "nan_tokens": 12, "inf_tokens": 12, "one_expert": 8,
                     "dead_experts": 8, "nan_router_row": 7, "saturated": 8},
    "CVMM": {"plain": 50, "nan_tokens": 15, "inf_tokens": 10, "one_expert": 13, "dead_experts": 12},
}


@dataclass(frozen=True)
class Profile:
    """Where cases run and how large they get."""

    name: str
    per_group: int  # cases that share one Layer
    max_tokens: int
    op_weights: tuple[int, int, int]  # SigmaMoE, TopKDispatch, CVMM
    work: float  # largest T * k * G * (d + dv) of a σ-MoE case (keeps the slow implementations in budget)


PROFILES = {
    # the Triton interpreter runs the kernels: small shapes, few hundred tokens at most
    "cpu": Profile("cpu", per_group=1, max_tokens=300, op_weights=(6, 2, 2), work=4e6),
    # compiled kernels: the paper's shapes and up to 32768 tokens, one bundle per group of 32 cases
    "gpu": Profile("gpu", per_group=32, max_tokens=32768, op_weights=(6, 2, 2), work=2e12),
}


@dataclass(frozen=True)
class Layer:
    """What a group of cases shares: the op, its shapes, dtype and attributes.

    SigmaMoE: x [T, d], expert_sel [E, d], keys [E, d, G], values [E, G, dv]. TopKDispatch: logits
    [T, E]. CVMM: x [R, d] rows, W [E, d, dv] (d_in d, d_out dv), over the T * k slots of a routing.
    """

    op: str
    d: int
    n_experts: int
    expert_size: int
    v_dim: int
    k: int
    dtype: str = "float32"
    selection: str = "sigmoid"
    activation: str = "relu"
    bias: bool = False
    reduce: int = 0  # CVMM
    gate: bool = False  # CVMM
    # SigmaMoE's router weight given to the ONNX op in the model dtype (as `moexport fuse` stores a
    # half-precision export's) rather than in float32: the op set takes either
    router_in_dtype: bool = False
    group_tokens: tuple[int, ...] = ()  # token buckets this group's cases draw from (GPU profile)


@dataclass(frozen=True)
class Case:
    """One case: a layer and what varies inside its group."""

    profile: str
    seed: int
    index: int
    layer: Layer
    tokens: int
    lead: tuple[int, ...]  # x's leading dimensions (their product is tokens)
    special: str
    data_seed: int
    # a forced experts config for the kernels (mode / finish), as `sigma_moe_forward(configs=...)` takes it
    experts_config: tuple[tuple[str, object], ...] = ()
    # the standard op set of the single-node ONNX models (below 20, GELU is written with Erf)
    opset: int = 20

    def replay(self) -> str:
        """The command that runs this case alone."""
        return f"python tools/sweep.py --profile {self.profile} --seed {self.seed} --case {self.index}"

    def __str__(self) -> str:
        L = self.layer
        shape = {"TopKDispatch": f"T={self.tokens} E={L.n_experts} k={L.k}",
                 "SigmaMoE": f"d={L.d} E={L.n_experts} G={L.expert_size} dv={L.v_dim} k={L.k} T={self.tokens}",
                 "CVMM": f"rows={'S' if L.reduce else 'T'} d_in={L.d} d_out={L.v_dim} E={L.n_experts} k={L.k} "
                         f"T={self.tokens} reduce={L.reduce} gate={L.gate}"}[L.op]
        attrs = "" if L.op != "SigmaMoE" else (f" {L.selection} {L.activation}{' bias' if L.bias else ''}"
                                               f"{' router=' + L.dtype if L.router_in_dtype else ''}")
        attrs = f" {L.selection}" if L.op == "TopKDispatch" else attrs
        config = f" config={dict(self.experts_config)}" if self.experts_config else ""
        return (f"{self.profile} seed={self.seed} case={self.index}: {L.op} {shape} {L.dtype}{attrs} "
                f"lead={self.lead} {self.special}{config} opset={self.opset}")


def _pick(rng: np.random.Generator, weighted: dict):
    names = list(weighted)
    p = np.array([weighted[n] for n in names], dtype=float)
    return names[rng.choice(len(names), p=p / p.sum())]


def _width(rng: np.random.Generator, profile: Profile) -> int:
    """d or v_dim: 1, odd and non-power-of-two widths, the paper's."""
    if profile.name == "cpu":
        return int(_pick(rng, {1: 1, 2: 1, 3: 1, int(rng.integers(4, 64)): 5, int(rng.integers(64, 161)): 2}))
    return int(_pick(rng, {1: 1, int(rng.integers(2, 64)) | 1: 2, 412: 2, 1024: 2, 2048: 1,
                           int(rng.integers(64, 2049)): 3}))


def layer_of(profile: str, seed: int, group: int) -> Layer:
    """The layer of a group (see the module docstring)."""
    prof = PROFILES[profile]
    rng = np.random.default_rng([seed, group, 0, len(profile)])
    op = OPS[rng.choice(3, p=np.array(prof.op_weights) / sum(prof.op_weights))]
    if profile == "gpu" and rng.random() < 0.25:
        d, E, G, k = PAPER_SHAPES[rng.integers(len(PAPER_SHAPES))]
        dv = d
    else:
        d = _width(rng, prof)
        big = 128 if profile == "gpu" else 48
        E = int(_pick(rng, {1: 1, 2: 1, int(rng.integers(3, 17)): 5, int(rng.integers(17, big + 1)): 3, 128: 1}))
        G = int(_pick(rng, {1: 1, int(rng.integers(2, 17)): 4, int(rng.integers(17, 49)): 3,
                            **({128: 1, 256: 1, int(rng.integers(49, 257)): 2} if profile == "gpu" else {})}))
        if profile == "cpu":  # the interpreter runs about E * G / 16 expert programs, ~20 ms each
            G = min(G, 16 * max(1, 96 // E))
        k = int(_pick(rng, {1: 2, E: 1, int(rng.integers(1, min(E, 8) + 1)): 5, int(rng.integers(1, E + 1)): 2}))
        dv = d if rng.random() < 0.6 else _width(rng, prof)
    layer = Layer(op, d, E, G, dv, k, dtype=DTYPES[rng.integers(3)], selection=SELECTIONS[rng.integers(3)],
                  activation=_pick(rng, {"relu": 2, "gelu": 1, "silu": 1}), bias=bool(rng.random() < 0.5))
    if op == "CVMM":  # the up projection (token rows, d -> G) or the down one (slot rows, G -> dv)
        reduce = int(rng.random() < 0.5)
        d_in, d_out = (G, dv) if reduce else (d, G)
        layer = dataclasses.replace(layer, d=d_in, v_dim=d_out, expert_size=0, reduce=reduce,
                                    gate=bool(rng.random() < (0.8 if reduce else 0.3)))
    if profile == "gpu":
        layer = dataclasses.replace(layer, group_tokens=_group_tokens(rng, layer, prof))
    if op == "SigmaMoE" and layer.dtype != "float32":
        # a stream of its own: the draws above, and so every earlier case, stay as they were
        in_dtype = np.random.default_rng([seed, group, 1, len(profile)]).random() < 0.5
        layer = dataclasses.replace(layer, router_in_dtype=bool(in_dtype))
    return layer


def _work(layer: Layer, tokens: int) -> float:
    if layer.op == "SigmaMoE":
        return tokens * layer.k * layer.expert_size * (layer.d + layer.v_dim)
    return tokens * layer.k * layer.d * layer.v_dim if layer.op == "CVMM" else tokens * layer.n_experts


def _max_tokens(layer: Layer, prof: Profile) -> int:
    per_token = max(_work(layer, 1), 1)
    top = min(prof.max_tokens, int(prof.work // per_token))
    if prof.name == "cpu" and layer.op == "SigmaMoE":  # the interpreter's expert programs each scan the tokens
        top = min(top, 4096 // layer.n_experts)
    return max(1, top)


def _group_tokens(rng: np.random.Generator, layer: Layer, prof: Profile) -> tuple[int, ...]:
    """Up to four token buckets for a GPU group: the kernels of a bucket compile once and serve all of
    the group's cases in it (few tokens, a few hundred, thousands, the most the layer's budget allows)."""
    top = _max_tokens(layer, prof)
    buckets = {1, 1 << int(rng.integers(1, 7))}
    for lo, hi in ((7, 10), (10, 16)):
        if top >= 1 << lo:
            buckets.add(1 << int(rng.integers(lo, min(hi, top.bit_length() - 1) + 1)))
    return tuple(sorted(b for b in buckets if b <= max(top, 1)))


def _tokens(rng: np.random.Generator, layer: Layer, prof: Profile) -> int:
    if rng.random() < 0.04:
        return 0
    if layer.group_tokens:  # inside one of the group's buckets (b/2, b]
        b = int(layer.group_tokens[rng.integers(len(layer.group_tokens))])
        low, t = b // 2 + 1, int(rng.integers(b // 2 + 1, b + 1))
    else:
        top = _max_tokens(layer, prof)
        low, t = 1, min(top, int(_pick(rng, {1: 3, int(rng.integers(1, 17)): 4, int(rng.integers(1, 65)): 4,
                                             int(rng.integers(1, top + 1)): 3})))
    return t - 1 if rng.random() < 0.5 and t % 2 == 0 and t - 1 >= low else t  # odd counts half the time


def _experts_config(rng: np.random.Generator, layer: Layer, tokens: int) -> tuple:
    """Sometimes (CPU profile, σ-MoE) a forced kernel sequence and summation, which the default configs
    of small shapes never choose (split, pass): `sigma_moe_forward(configs=...)` takes any."""
    if layer.op != "SigmaMoE" or layer.n_experts > 32 or rng.random() >= 0.3:  # (the interpreter's time)
        return ()
    mode = ("gather", "fused", "split")[rng.integers(3)]
    config = {"mode": mode, "BLOCK_M": int(16 << rng.integers(3)), "BLOCK_G": 16, "BLOCK_D": 32, "BLOCK_N": 32,
              "num_warps": 4, "num_stages": 2, "finish": ("inline", "pass", "atomic")[rng.integers(3)]}
    if mode == "gather" and rng.random() < 0.3:
        config["V_SPLIT"] = 2
    return tuple(sorted(config.items()))


def case_of(profile: str, seed: int, index: int) -> Case:
    """Case `index` of a profile's sweep with this seed (group index // per_group)."""
    prof = PROFILES[profile]
    layer = layer_of(profile, seed, index // prof.per_group)
    rng = np.random.default_rng([seed, index, 1, len(profile)])
    tokens = _tokens(rng, layer, prof)
    lead = (tokens,)
    if layer.op == "SigmaMoE" and prof.name == "cpu" and tokens > 1 and rng.random() < 0.3:
        first = [f for f in range(2, min(tokens, 8) + 1) if tokens % f == 0]
        lead = (first[0], tokens // first[0]) if first else (1, tokens)
    special = _pick(rng, SPECIALS[layer.op])
    config = _experts_config(rng, layer, tokens) if prof.name == "cpu" else ()
    return Case(profile, seed, index, layer, tokens, lead, special, int(rng.integers(1 << 31)), config,
                opset=18 if prof.name == "cpu" and rng.random() < 0.3 else 20)


# ---- data ----------------------------------------------------------------------------------------

def _scale_down(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    return t / math.sqrt(max(fan_in, 1))


def make_data(case: Case, device: str = "cpu") -> dict[str, torch.Tensor | None]:
    """The op's inputs on `device` (floats in the layer's dtype, router weight and logits in float32),
    plus for checks: `tied` [pairs, 2] (duplicated router rows a < b), `dead` [experts no token may
    choose], `popular` [the expert every token must choose], `poisoned` [T] bool (inf tokens, whose
    rows only isolation covers). Drawn on the device by its own generator (the same data on every
    machine of one kind: a GPU case replays on a GPU)."""
    g = torch.Generator(device=device).manual_seed(case.data_seed)
    rng = np.random.default_rng(case.data_seed)
    L, T = case.layer, case.tokens
    make = {"SigmaMoE": _sigma_moe_data, "TopKDispatch": _topk_data, "CVMM": _cvmm_data}[L.op]
    with torch.device(device):
        return make(case, L, T, g, rng)


def _poison(rng: np.random.Generator, x: torch.Tensor, value: float) -> torch.Tensor:
    """Put `value` (NaN, or inf of a random sign) at one random column of some rows of x [rows, d] (at
    least one when there are rows); return which rows [rows] bool."""
    rows, width = x.shape
    chosen = rng.random(rows) < 0.2
    if rows:
        chosen[rng.integers(rows)] = True
    sign = np.where(rng.random(rows) < 0.5, 1.0, -1.0) if value == math.inf else np.ones(rows)
    which = np.flatnonzero(chosen)
    columns = rng.integers(width, size=len(which))
    index = torch.from_numpy(which).to(x.device), torch.from_numpy(columns).to(x.device)
    x[index] = torch.from_numpy(sign[which] * value).to(x.device, x.dtype)
    return torch.from_numpy(chosen).to(x.device)


def _skew(rng: np.random.Generator, special: str, E: int, k: int) -> tuple[list[int], list[int]]:
    """(popular, dead) experts of a one_expert / dead_experts case."""
    if special == "one_expert":
        return [int(rng.integers(E))], []
    if special == "dead_experts" and E > k:
        return [], sorted(int(e) for e in rng.choice(E, size=int(rng.integers(1, E - k + 1)), replace=False))
    return [], []


def _sigma_moe_data(case, L: Layer, T: int, g, rng) -> dict:
    E, d, G, dv = L.n_experts, L.d, L.expert_size, L.v_dim
    x = torch.randn(T, d, generator=g)
    sel = _scale_down(torch.randn(E, d, generator=g), d)
    keys = _scale_down(torch.randn(E, d, G, generator=g), d)
    values = _scale_down(torch.randn(E, G, dv, generator=g), G)
    bias = torch.randn(E, G, generator=g) * 0.5 if L.bias else None
    o_bias = torch.randn(dv, generator=g) * 0.5 if L.bias else None
    extra = _route_special(case.special, x, sel, E, L.k, rng, g)
    dtype = torch_dtype(L.dtype)
    cast = lambda t: None if t is None else t.to(dtype)
    # the router weight holds model-dtype values (the PyTorch layer keeps it in the model dtype), given
    # to the ONNX op in float32, where they are exact, or in the model dtype (the op set takes either)
    router = sel.to(dtype) if L.router_in_dtype else sel.to(dtype).float()
    return {"x": cast(x).reshape(*case.lead, d), "expert_sel": router, "keys": cast(keys),
            "values": cast(values), "bias": cast(bias), "o_bias": cast(o_bias), **extra}


def _route_special(special: str, x: torch.Tensor, sel: torch.Tensor, E: int, k: int, rng, g) -> dict:
    """Apply a routing special to tokens x [T, d] and router rows sel [E, d] in place; return what the
    checks need to know of it."""
    T = x.shape[0]
    tied, poisoned = torch.zeros(0, 2, dtype=torch.long), torch.zeros(T, dtype=torch.bool)
    popular, dead = _skew(rng, special, E, k)
    if special == "tied_rows" and E >= 2:
        pairs = []
        for _ in range(int(rng.integers(1, E // 2 + 1))):
            a, b = sorted(int(e) for e in rng.choice(E, size=2, replace=False))
            sel[b] = sel[a]
            pairs.append((a, b))
        # a later pair may have copied over an earlier pair's row: keep the pairs that are still equal
        kept = [p for p in pairs if torch.equal(sel[p[0]], sel[p[1]])]
        tied = torch.tensor(kept, dtype=torch.long).reshape(-1, 2)
    elif special == "integer":
        x.copy_(torch.randint(-2, 3, x.shape, generator=g).float())
        sel.copy_(torch.randint(-2, 3, sel.shape, generator=g).float())
    elif special == "padding" and T:
        x[torch.from_numpy(rng.random(T) < 0.3).to(x.device)] = 0.0
    elif special in ("nan_tokens", "inf_tokens"):
        chosen = _poison(rng, x, math.nan if special == "nan_tokens" else math.inf)
        if special == "inf_tokens":
            poisoned = chosen
    elif popular or dead:
        # one token feature, constant for every token, that the popular expert's router row weighs
        # heavily and the dead experts' rows weigh heavily against: logits about +-40 apart from the rest
        x[:, 0] = 3.0
        for e in popular:
            sel[e, 0] = 15.0
        for e in dead:
            sel[e, 0] = -15.0
    elif special == "nan_router_row":
        rows = rng.choice(E, size=int(rng.integers(1, E + 1)), replace=False)
        sel[torch.from_numpy(rows).to(sel.device)] = math.nan
    return {"tied": tied, "popular": torch.tensor(popular, dtype=torch.long),
            "dead": torch.tensor(dead, dtype=torch.long), "poisoned": poisoned}


def _topk_data(case, L: Layer, T: int, g, rng) -> dict:
    E = L.n_experts
    logits = torch.randn(T, E, generator=g) * 2
    special = case.special
    if special == "tied_rows":
        logits = torch.randint(-2, 3, (T, E), generator=g).float()
    elif special == "saturated":
        logits = logits * 500
    elif special in ("nan_tokens", "inf_tokens") and T:
        # logits are the op's input: an infinite one is exact too, so no token is excused
        hit = torch.from_numpy(rng.random((T, E)) < 0.3).to(logits.device)
        hit[torch.from_numpy(rng.random(T) < 0.2).to(logits.device)] = True  # some rows all non-finite
        if special == "nan_tokens":
            logits[hit] = math.nan
        else:
            logits[hit] = torch.where(torch.rand(T, E, generator=g) < 0.5, -math.inf, math.inf)[hit]
    elif special == "nan_router_row":
        columns = rng.choice(E, size=int(rng.integers(1, E + 1)), replace=False)
        logits[:, torch.from_numpy(columns).to(logits.device)] = math.nan
    popular, dead = _skew(rng, special, E, L.k)
    for e in popular:
        logits[:, e] += 40.0
    for e in dead:
        logits[:, e] -= 40.0
    return {"logits": logits, "tied": torch.zeros(0, 2, dtype=torch.long), "popular": torch.tensor(popular),
            "dead": torch.tensor(dead), "poisoned": torch.zeros(T, dtype=torch.bool)}


def _cvmm_data(case, L: Layer, T: int, g, rng) -> dict:
    """A routing of T tokens (stable sort of its slots by expert, as TopKDispatch gives it), and rows
    of x: token rows read by slot // k for the up projection, or slot rows for the down projection."""
    from moexport.models.routing import route

    E, k, S = L.n_experts, L.k, T * L.k
    logits = torch.randn(T, E, generator=g)
    popular, dead = _skew(rng, case.special, E, k)
    for e in popular:
        logits[:, e] += 40.0
    for e in dead:
        logits[:, e] -= 40.0
    gate, expert = route(logits, k, "sigmoid")
    order = torch.sort(expert.reshape(-1), stable=True)
    sorted_expert, sorted_slot = order.values.int(), order.indices.int()
    rows = S if L.reduce else T
    x = torch.randn(rows, L.d, generator=g)
    poisoned = torch.zeros(rows, dtype=torch.bool)
    if case.special in ("nan_tokens", "inf_tokens") and rows:
        chosen = _poison(rng, x, math.nan if case.special == "nan_tokens" else math.inf)
        poisoned = chosen if case.special == "inf_tokens" else poisoned
    src = sorted_slot if L.reduce else torch.div(sorted_slot, k, rounding_mode="floor").int()
    dst = sorted_slot
    if rng.random() < 0.3:  # any permutation of the slots is a valid destination
        dst = torch.from_numpy(rng.permutation(S).astype(np.int32)).to(sorted_slot.device)
    weight = _scale_down(torch.randn(E, L.d, L.v_dim, generator=g), L.d)
    dtype = torch_dtype(L.dtype)
    return {"x": x.to(dtype), "sorted_expert": sorted_expert, "src_row": src, "dst_row": dst,
            "W": weight.to(dtype), "gate": gate.reshape(-1)[sorted_slot.long()].contiguous() if L.gate else None,
            "poisoned": poisoned, "tied": torch.zeros(0, 2, dtype=torch.long), "popular": torch.tensor(popular),
            "dead": torch.tensor(dead)}
