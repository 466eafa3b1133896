"""Differential sweep: every implementation of the moexport op set against the PyTorch reference, on
seeded random layer configurations (`sweep_cases`), every implementation the machine has
(`sweep_impls`).

    python tools/sweep.py --seed 1 --case 17                  # replay one case of the CPU sweep
    python tools/sweep.py --profile gpu --seed 1 --case 517   # one case of the GPU sweep (on a GPU)
    python tools/sweep.py --seed 7 --cases 0:500              # explore: 500 cases of another seed
    python tools/sweep.py --summarize results.jsonl           # counts of a sweep's recorded results

The tests run it (tests/tools/test_sweep.py): a fixed set of CPU cases in CI, and the GPU groups in
one device call.

What agreement means, per op:

- Routing (expert indices) is compared as top-k *sets*. A token whose set differs is excused only as a
  near-tie: its reference logits have two different values within `tie_margin` of each other at the
  k-th place (logits summed in another order, or from tf32x3 products on the GPU, may order them either
  way). Exact ties are never excused: equal logits (duplicated router rows, integer data, zero tokens)
  go to the lower expert index in every implementation, and where every logit is exact (integer data,
  NaN tokens) the best-first order must match too. TopKDispatch gets its logits as input, so its
  routing must match exactly, order, sort and gates included.
- Every routing output must obey the contract by itself: k distinct experts in range; a duplicated
  router row never chosen without its lower-index twin; dead experts never, a popular expert always
  chosen; a NaN router row only when fewer than k others exist; a token of NaN takes experts 0..k-1
  (NaN logits rank as -inf).
- Numbers are compared on the tokens routed alike, as `moexport validate` compares outputs:
  max |a - b| <= atol + rtol * max |reference|, the dtype's tolerance (`moexport.core.tolerance_for`)
  over the finite elements; NaN must sit where the reference has NaN, and an infinity where it has the
  same infinity. Tokens holding an inf are compared for isolation only: a product with an infinite
  operand is inf or NaN depending on how it is formed (tf32x3 splits a float32 operand into parts and
  inf - inf is NaN), so such a token's routing and output may legitimately differ, but no other token's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

# the checkout this file is in comes first (a replay tests the code the sweep tested), then this folder
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

import torch

if not torch.cuda.is_available():  # kernels run in the Triton interpreter; set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sweep_cases import PROFILES, Case, case_of, make_data
from sweep_impls import REGISTRY

from moexport.core.dtypes import tolerance_for

# Routing near-tie margin: this many float32 units (2^-24) of the token's largest sum |x|·|w| over one
# expert's router row. Summation in any order stays within d units of it; typical errors are within
# sqrt(d), tf32x3 products on the GPU add a few units each: 2^8 units keeps a margin of >10x at d=2048.
TIE_UNITS = 2.0 ** 8
_U = 2.0 ** -24


@dataclass
class Verdict:
    """One implementation's result on one case."""

    impl: str
    status: str  # passed | failed | error | skipped
    problems: list[str] = field(default_factory=list)
    excused: int = 0  # near-tie tokens not compared
    max_rel: float = 0.0  # worst max |a - b| / max |reference| of its numeric outputs
    seconds: float = 0.0


@dataclass
class CaseResult:
    case: Case
    verdicts: list[Verdict]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(v.status in ("passed", "skipped") for v in self.verdicts)

    def report(self) -> str:
        lines = [f"FAILED | {self.case}"]
        for v in self.verdicts:
            if v.status in ("failed", "error"):
                lines += [f"  {v.impl}: {v.status}"] + [f"    {p}" for p in v.problems[:6]]
        lines.append(f"  replay: {self.case.replay()}")
        return "\n".join(lines)

    def record(self) -> dict:
        return {"case": str(self.case), "replay": self.case.replay(), "op": self.case.layer.op,
                "special": self.case.special, "tokens": self.case.tokens, "dtype": self.case.layer.dtype,
                "passed": self.passed, "seconds": round(self.seconds, 3),
                "verdicts": [asdict(v) for v in self.verdicts]}


# ---- routing -------------------------------------------------------------------------------------

def _ranked(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the routing rule ranks them (NaN as -inf), sorted best first."""
    return torch.sort(torch.nan_to_num(logits, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf), -1,
                      descending=True).values


def near_ties(logits: torch.Tensor, k: int, margin: torch.Tensor) -> torch.Tensor:
    """[T] bool: tokens whose top-k set may change when each logit moves by up to `margin` [T] while
    equal logits stay equal. The k-th value v and the next: different, they are near when within the
    margin; equal (the boundary splits a tie, which the index decides), it is when the nearest other
    value is within it."""
    E = logits.shape[-1]
    if k >= E or logits.shape[0] == 0:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    v = _ranked(logits)
    at, below = v[:, k - 1], v[:, k]
    apart = (at != below) & (at - below <= margin)
    distance = torch.where(v == at[:, None], torch.inf, (v - at[:, None]).abs()).amin(-1)
    split_tie = (at == below) & (distance <= margin)
    return apart | split_tie


def tie_margin(case: Case, data: dict, flat_x: torch.Tensor) -> torch.Tensor:
    """[T] float32: the routing margin of each token (0 where every logit is exact)."""
    if case.special == "integer":
        return torch.zeros(flat_x.shape[0], device=flat_x.device)
    # a NaN router row or token has no near-ties to excuse (its logits rank as -inf, exactly)
    sums = torch.nan_to_num(flat_x.float().abs() @ data["expert_sel"].float().abs().T, nan=0.0)
    return sums.amax(-1) * (TIE_UNITS * _U)


def routing_problems(case: Case, data: dict, expert: torch.Tensor, nan_tokens: torch.Tensor) -> list[str]:
    """What a routing output [T, k] breaks of the contract by itself (see the module docstring)."""
    L, problems = case.layer, []
    E, k = L.n_experts, L.k
    if expert.numel() != case.tokens * k:
        return [f"expert: shape {tuple(expert.shape)}, wanted {case.tokens} tokens of {k}"]
    expert = expert.reshape(-1, k).long()
    if expert.shape[0] == 0:
        return problems
    poisoned = data["poisoned"].reshape(-1).to(expert.device)
    if ((expert < 0) | (expert >= E)).any():
        return [f"expert indices outside [0, {E}): {expert[((expert < 0) | (expert >= E)).any(-1)][:3].tolist()}"]
    chosen = torch.zeros(expert.shape[0], E, dtype=torch.bool, device=expert.device).scatter_(1, expert, True)
    duplicate = chosen.sum(-1) != k
    if duplicate.any():
        problems.append(f"{int(duplicate.sum())} token(s) given an expert twice, e.g. token "
                        f"{int(duplicate.nonzero()[0])}: {expert[duplicate][0].tolist()}")
    finite = ~poisoned & ~nan_tokens
    for a, b in data["tied"].tolist():
        wrong = finite & chosen[:, b] & ~chosen[:, a]
        if wrong.any():
            problems.append(f"tied experts {a} < {b}: {int(wrong.sum())} token(s) chose {b} without {a}")
    for e in data["dead"].tolist():
        if (chosen[finite, e]).any():
            problems.append(f"dead expert {e} chosen by {int(chosen[finite, e].sum())} token(s)")
    for e in data["popular"].tolist():
        if not chosen[finite, e].all():
            problems.append(f"popular expert {e} missed by {int((~chosen[finite, e]).sum())} token(s)")
    if nan_tokens.any():
        want = torch.arange(k, device=expert.device)
        wrong = nan_tokens & (expert != want).any(-1)
        if wrong.any():
            problems.append(f"{int(wrong.sum())} NaN token(s) not routed to experts 0..{k - 1} (NaN ranks as "
                            f"-inf), e.g. {expert[wrong][0].tolist()}")
    if case.special == "nan_router_row" and "expert_sel" in data:
        nan_rows = torch.isnan(data["expert_sel"]).any(-1).to(expert.device)
        want = max(0, k - int((~nan_rows).sum()))
        wrong = finite & (chosen[:, nan_rows].sum(-1) != want)
        if wrong.any():
            problems.append(f"{int(wrong.sum())} token(s) chose experts with NaN router rows while others "
                            "were left")
    return problems


def compare_routing(ref: torch.Tensor, got: torch.Tensor, near: torch.Tensor, strict: torch.Tensor,
                    skip: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """(same [T]: tokens routed alike, problems): sets compared, best-first order too where `strict`."""
    k = ref.shape[-1]
    if got.numel() != ref.numel():
        return torch.zeros(ref.reshape(-1, k).shape[0], dtype=torch.bool, device=ref.device), [
            f"expert: shape {tuple(got.shape)}, the reference's {tuple(ref.shape)}"]
    ref, got = ref.reshape(-1, k).long(), got.reshape(-1, k).long().to(ref.device)
    same = (torch.sort(ref, -1).values == torch.sort(got, -1).values).all(-1)
    order = (ref == got).all(-1)
    bad = ~skip & ((~same & ~near) | (same & strict & ~order))
    if not bad.any():
        return same, []
    t = int(bad.nonzero()[0])
    kind = "order" if same[t] else "set"
    return same, [(f"{int(bad.sum())} token(s) routed differently ({kind}), e.g. token {t}: reference "
                   f"{ref[t].tolist()}, got {got[t].tolist()}")]


# ---- numbers -------------------------------------------------------------------------------------

def compare_values(name: str, ref: torch.Tensor, got: torch.Tensor, tol, rows: torch.Tensor | None = None
                   ) -> tuple[float, list[str]]:
    """(max |a - b| / scale, problems) of one numeric output over the given rows (NaN-aware)."""
    if tuple(got.shape) != tuple(ref.shape):
        return 0.0, [f"{name}: shape {tuple(got.shape)}, the reference's is {tuple(ref.shape)}"]
    width = ref.shape[-1] if ref.dim() > 1 else 1
    ref, got = ref.reshape(-1, width).double(), got.to(ref.device).reshape(-1, width).double()
    if rows is not None:
        ref, got = ref[rows], got[rows]
    if ref.numel() == 0:
        return 0.0, []
    problems = []
    nan = torch.isnan(ref) != torch.isnan(got)
    if nan.any():
        r, c = (int(i) for i in nan.nonzero()[0])
        problems.append(f"{name}: NaN where the other has none at {int(nan.sum())} element(s), e.g. "
                        f"[{r}, {c}] reference {ref[r, c].item():.6g} got {got[r, c].item():.6g}")
    infinite = (torch.isinf(ref) | torch.isinf(got)) & ~torch.isnan(ref) & ~torch.isnan(got) & (ref != got)
    if infinite.any():
        r, c = (int(i) for i in infinite.nonzero()[0])
        problems.append(f"{name}: infinities differ at {int(infinite.sum())} element(s), e.g. [{r}, {c}] "
                        f"reference {ref[r, c].item():.6g} got {got[r, c].item():.6g}")
    finite = torch.isfinite(ref) & torch.isfinite(got)
    if not finite.any():
        return 0.0, problems
    scale = float(ref[finite].abs().max())
    err = torch.where(finite, (got - ref).abs(), 0.0)
    worst = float(err.max())
    if worst > tol.atol + tol.rtol * scale:
        r, c = (int(i) for i in (err == worst).nonzero()[0])
        problems.append(f"{name}: max |err| {worst:.3g} > {tol.atol:g} + {tol.rtol:g} * {scale:.3g} "
                        f"({int((err > tol.atol + tol.rtol * scale).sum())} element(s)), e.g. [{r}, {c}] "
                        f"reference {ref[r, c].item():.6g} got {got[r, c].item():.6g}")
    return worst / max(scale, 1e-30), problems


# ---- the harness ---------------------------------------------------------------------------------

def _nan_tokens(case: Case, data: dict) -> torch.Tensor:
    """[T] bool: tokens whose every logit is NaN (a NaN in the token, or a NaN logit row)."""
    source = data["logits"] if case.layer.op == "TopKDispatch" else data.get("x")
    if source is None or case.layer.op == "CVMM":
        return torch.zeros(case.tokens, dtype=torch.bool)
    flat = source.reshape(case.tokens, source.shape[-1])
    return torch.isnan(flat).all(-1) if case.layer.op == "TopKDispatch" else torch.isnan(flat).any(-1)


def check(case: Case, data: dict, ref: dict, got: dict, impl: str) -> Verdict:
    """One implementation's outputs `got` against the reference's `ref` and the contract."""
    L, tol = case.layer, tolerance_for(case.layer.dtype)
    verdict = Verdict(impl, "passed")
    problems = verdict.problems
    nan_tokens = _nan_tokens(case, data).to(ref[next(iter(ref))].device)
    if L.op == "SigmaMoE":
        flat_x = data["x"].reshape(-1, L.d)
        poisoned = data["poisoned"].to(flat_x.device)
        margin = tie_margin(case, data, flat_x)
        near = near_ties(ref["logits"], L.k, margin) & ~nan_tokens
        rows = ~poisoned & ~near
        if "expert" in got:
            problems += routing_problems(case, data, got["expert"], nan_tokens)
            same, wrong = compare_routing(ref["expert"], got["expert"], near, ~(margin > 0) | nan_tokens, poisoned)
            problems += wrong
            rows = ~poisoned & same
        verdict.excused = int((near & ~poisoned).sum())
        verdict.max_rel, wrong = compare_values("y", ref["y"], got["y"], tol, rows)
        problems += [f"{p}{_summation(case) if impl in KERNEL_HOSTS else ''}" for p in wrong]
        y_nan = torch.isnan(got["y"].reshape(-1, L.v_dim)).all(-1) if L.v_dim else nan_tokens
        if (nan_tokens & ~y_nan.to(nan_tokens.device)).any():
            problems.append(f"{int((nan_tokens & ~y_nan).sum())} NaN token(s) whose output row is not all NaN")
    elif L.op == "TopKDispatch":
        problems += routing_problems(case, data, got["expert"], nan_tokens)
        for name in ("expert", "sorted_expert", "sorted_slot"):
            a, b = got[name].long().cpu(), ref[name].long().cpu()
            if a.shape != b.shape:
                problems.append(f"{name}: shape {tuple(a.shape)}, the reference's {tuple(b.shape)}")
            elif not torch.equal(a, b):
                diff = (a != b).reshape(-1).nonzero()
                problems.append(f"{name} differs at {len(diff)} position(s), e.g. flat index {int(diff[0])}: "
                                f"reference {int(b.reshape(-1)[diff[0]])}, got {int(a.reshape(-1)[diff[0]])}")
        problems += _dispatch_problems(got)
        verdict.max_rel, wrong = compare_values("gate", ref["gate"], got["gate"], tolerance_for("float32"))
        problems += wrong
    else:
        verdict.max_rel, wrong = compare_values("out", ref["out"], got["out"], tol, _clean_rows(case, data))
        problems += wrong
    verdict.status = "failed" if problems else "passed"
    return verdict


# implementations that run moexport's kernels with their shipped or default configs
KERNEL_HOSTS = ("triton", "aot", "ort_cuda")


def _summation(case: Case) -> str:
    """How the kernels' plan for the case sums a token's contributions, where it rounds each add
    (float16 atomics; bfloat16 layers sum in float32 since those exceeded their tolerance): a failing
    comparison says so."""
    from moexport.kernels.configs import bucket, experts_key
    from moexport.kernels.plan import MoEShape, sigma_moe_plan

    L = case.layer
    if L.dtype == "float32":
        return ""
    configs = None
    if case.experts_config:
        key = experts_key(L.d, L.n_experts, L.expert_size, L.v_dim, L.k, bucket(case.tokens))
        configs = {key: dict(case.experts_config)}
    shape = MoEShape(L.d, L.n_experts, L.expert_size, L.v_dim, L.k, L.dtype, L.selection, L.activation, L.bias)
    notes = sigma_moe_plan(shape, max(case.tokens, 1), configs=configs).notes
    if notes["finish"] != "atomic":
        return ""
    config = notes["config"]
    adds = L.k * (1 if notes["mode"] == "split" else -(-L.expert_size // min(config["BLOCK_G"], L.expert_size)))
    return f" (the kernels' plan adds {adds} {L.dtype} atomics into each output, rounding each)"


def _dispatch_problems(got: dict) -> list[str]:
    """The schema's invariants of TopKDispatch's sort: ascending experts, the slots' own, stable."""
    expert, se, slot = (got[n].long().cpu().reshape(-1) for n in ("expert", "sorted_expert", "sorted_slot"))
    if se.numel() == 0:
        return []
    problems = []
    if (se[1:] < se[:-1]).any():
        problems.append("sorted_expert is not ascending")
    if not torch.equal(torch.sort(slot).values, torch.arange(len(slot))):
        problems.append("sorted_slot is not a permutation of the slots")
    elif not torch.equal(expert.reshape(-1)[slot], se):
        problems.append("sorted_expert is not the experts of sorted_slot's slots")
    elif ((se[1:] == se[:-1]) & (slot[1:] < slot[:-1])).any():
        problems.append("sorted_slot is not stable (slots of one expert out of order)")
    return problems


def _clean_rows(case: Case, data: dict) -> torch.Tensor:
    """CVMM output rows that no inf row of x reaches."""
    L, poisoned = case.layer, data["poisoned"]
    src, dst = data["src_row"].long(), data["dst_row"].long()
    rows = len(dst) // L.k if L.reduce else len(dst)
    hit = torch.zeros(rows, dtype=torch.bool, device=src.device)
    target = torch.div(dst, L.k, rounding_mode="floor") if L.reduce else dst
    hit[target[poisoned.to(src.device)[src]]] = True
    return ~hit


def run_case(case: Case, device: str, names: list[str] | None = None) -> CaseResult:
    """Run the reference and every available implementation (or those named) on one case."""
    start = time.perf_counter()
    data = make_data(case, device)
    verdicts = []
    try:
        ref = REGISTRY["reference"].run(case, data, device)
    except Exception:  # noqa: BLE001 - a failing reference is the case's result, reported with its trace
        return CaseResult(case, [Verdict("reference", "error", [traceback.format_exc(limit=-3)])],
                          time.perf_counter() - start)
    verdicts.append(check(case, data, ref, ref, "reference"))
    for name, impl in REGISTRY.items():
        if name == "reference" or (names and name not in names):
            continue
        why = impl.available(device) or impl.supports(case)
        if why:
            verdicts.append(Verdict(name, "skipped", [why]))
            continue
        began = time.perf_counter()
        try:
            got = impl.run(case, data, device)
            verdict = check(case, data, ref, got, name)
        except Exception:  # noqa: BLE001 - any failure of an implementation (or output it lacks) is a result
            verdict = Verdict(name, "error", [traceback.format_exc(limit=-3)])
        verdict.seconds = time.perf_counter() - began
        verdicts.append(verdict)
    return CaseResult(case, verdicts, time.perf_counter() - start)


def run_group(profile: str, seed: int, group: int, device: str,
              names: list[str] | None = None) -> list[CaseResult]:
    """Every case of one group (they share a layer: compiled kernels are built once for them)."""
    per = PROFILES[profile].per_group
    return [run_case(case_of(profile, seed, i), device, names) for i in range(group * per, (group + 1) * per)]


def summarize(records: list[dict]) -> str:
    """Counts of recorded results: cases, and per implementation passed / failed / error / skipped."""
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        for v in record["verdicts"]:
            counts.setdefault(v["impl"], {}).setdefault(v["status"], 0)
            counts[v["impl"]][v["status"]] += 1
    passed = sum(r["passed"] for r in records)
    lines = [f"{len(records)} cases, {passed} passed, {len(records) - passed} failed"]
    for impl, c in counts.items():
        lines.append(f"  {impl:15s} " + ", ".join(f"{n} {s}" for s, n in sorted(c.items())))
    for record in records:
        if not record["passed"]:
            lines.append(f"  FAILED {record['case']}\n    {record['replay']}")
    return "\n".join(lines)


def _indices(text: str) -> range:
    first, _, last = text.partition(":")
    return range(int(first), int(last)) if last else range(int(first), int(first) + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--case", type=int, help="the case to replay")
    parser.add_argument("--cases", help="a range of cases, FIRST:LAST (LAST excluded)")
    parser.add_argument("--impl", nargs="+", help="run only these implementations (besides the reference)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="defaults to cuda where there is a GPU")
    parser.add_argument("--summarize", metavar="JSONL", help="print the counts of recorded results")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize([json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line]))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    indices = _indices(args.cases) if args.cases else [args.case if args.case is not None else 0]
    failed = 0
    for index in indices:
        result = run_case(case_of(args.profile, args.seed, index), device, args.impl)
        failed += not result.passed
        if result.passed:
            ran = [f"{v.impl} {v.seconds:.2f}s" for v in result.verdicts if v.status == "passed"]
            print(f"PASSED | {result.case} | {', '.join(ran)} | {result.seconds:.2f}s")
        else:
            print(result.report())
        for v in result.verdicts:
            if v.status == "skipped" and len(indices) == 1:
                print(f"  {v.impl}: skipped ({v.problems[0]})")
    print(f"{'PASSED' if not failed else 'FAILED'} | {len(indices) - failed} of {len(indices)} cases")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
