"""Comparison of runner outputs: numeric error per output, routing agreement per σ-MoE layer.

Numeric outputs go through polygraphy's SimpleCompareFunc, against the output's scale: an output
passes when max |a − b| <= atol + rtol · max |reference| (see `compare_numeric`). Routing outputs
(the expert indices) go through `compare_routing`: the share of tokens whose top-k SETS agree, with
every disagreement explained by the reference's top-k margin (a near-tie) or by an earlier layer's
difference, or counted as a failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from polygraphy.comparator import Comparator
from polygraphy.comparator.compare import SimpleCompareFunc

from moexport.core.dtypes import Tolerance
from moexport.validate.runners import EXPERTS_PREFIX, GAP_PREFIX, routing_name

MAX_EXAMPLES = 5  # disagreeing tokens listed per layer in the report


@dataclass
class OutputResult:
    """Numeric agreement of one output between the reference and one runner (worst over iterations).

    `max_rel` is max |a − b| / `scale`, where `scale` = max |reference| (see `compare_numeric`).
    """

    runner: str
    output: str
    max_abs: float
    max_rel: float
    mean_abs: float
    scale: float
    atol: float
    rtol: float
    passed: bool


@dataclass
class RoutingResult:
    """Routing agreement of one σ-MoE layer between the reference and one runner."""

    runner: str
    layer: str
    tokens: int
    agreeing: int
    near_ties: int
    tie_margin: float
    downstream: int = 0
    examples: list[dict] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        """Share of tokens with identical top-k expert sets (1.0 when there were no tokens)."""
        return self.agreeing / self.tokens if self.tokens else 1.0

    @property
    def unexplained(self) -> int:
        """Disagreeing tokens explained neither by a near-tie nor by an earlier layer's difference."""
        return self.tokens - self.agreeing - self.near_ties - self.downstream

    @property
    def passed(self) -> bool:
        """Every disagreement is explained."""
        return self.unexplained == 0


def _numeric_outputs(name: str) -> bool:
    return not name.startswith((EXPERTS_PREFIX, GAP_PREFIX))


def compare_numeric(run_results, *, tolerance: Tolerance, reference: str) -> list[OutputResult]:
    """Per-output numeric agreement of every runner with `reference` (worst iteration reported).

    An output passes when max |a − b| <= atol + rtol · max |b|: the error is measured against the
    output's scale, because float rounding errors scale with the magnitude of what was summed, not with
    the (possibly cancelled, near-zero) value of one element. polygraphy's "max" statistic with a
    per-output atol of exactly that bound checks it.
    """
    ref_iterations = dict(run_results)[reference]
    scale = {name: max(float(np.abs(it[name]).max(initial=0.0)) for it in ref_iterations)
             for name in ref_iterations[0] if _numeric_outputs(name)}
    bound = {name: tolerance.atol + tolerance.rtol * s for name, s in scale.items()}
    compare = SimpleCompareFunc(
        atol=bound, rtol=0.0, check_error_stat="max",
        find_output_func=lambda name, index, other: [name] if _numeric_outputs(name) and name in other else None)
    (accuracy,) = Comparator.compare_accuracy(run_results, compare_func=compare,
                                              comparisons=_pairs(run_results, reference))
    results: dict[tuple[str, str], OutputResult] = {}
    for (_, runner), iterations in accuracy.items():
        for per_output in iterations:
            for output, r in per_output.items():
                seen = results.get((runner, output))
                worst = OutputResult(runner, output, r.max_absdiff, r.max_absdiff / max(scale[output], 1e-30),
                                     r.mean_absdiff, scale[output], tolerance.atol, tolerance.rtol,
                                     r.max_absdiff <= bound[output])
                if seen is not None:
                    worst.max_abs, worst.max_rel = max(seen.max_abs, worst.max_abs), max(seen.max_rel, worst.max_rel)
                    worst.mean_abs = max(seen.mean_abs, worst.mean_abs)
                    worst.passed = seen.passed and worst.passed
                results[(runner, output)] = worst
    return list(results.values())


def compare_routing(run_results, *, tolerance: Tolerance, reference: str) -> list[RoutingResult]:
    """Per-layer routing agreement of every runner that exposes expert indices with `reference`.

    A token whose top-k set differs is explained either by a near-tie of the reference's logits, or by
    an earlier σ-MoE layer that already routed this token or an earlier token of its sequence
    differently (attention carries that difference forward). Anything else is unexplained.
    """
    ref_iterations = dict(run_results)[reference]
    results: dict[tuple[str, str], RoutingResult] = {}
    for runner, iterations in run_results:
        if runner == reference:
            continue
        for iteration, (ref, other) in enumerate(zip(ref_iterations, iterations)):
            diverged = None  # [sequences, positions]: an earlier layer routed differently at or before here
            for name in ref:  # the reference records layers in forward order
                if not name.startswith(EXPERTS_PREFIX) or name not in other:
                    continue
                layer = name[len(EXPERTS_PREFIX) + 1:]
                result = results.setdefault((runner, layer), RoutingResult(runner, layer, 0, 0, 0, tolerance.tie))
                gap = ref[routing_name(GAP_PREFIX, layer)]
                diverged = _accumulate(result, ref[name], other[name], gap, diverged, iteration)
    return list(results.values())


def _accumulate(result: RoutingResult, ref: np.ndarray, other: np.ndarray, gap: np.ndarray,
                diverged: np.ndarray | None, iteration: int) -> np.ndarray:
    lead = ref.shape[:-1]
    grid = (int(np.prod(lead[:-1])), lead[-1]) if len(lead) >= 2 else (int(np.prod(lead)), 1)
    k = ref.shape[-1]
    ref, other, gap = ref.reshape(-1, k), np.asarray(other).reshape(-1, k), gap.reshape(-1)
    same = (np.sort(ref, axis=-1) == np.sort(other.astype(ref.dtype), axis=-1)).all(axis=-1)
    near = ~same & (gap <= result.tie_margin)
    upstream = np.zeros_like(same) if diverged is None else diverged.reshape(-1)
    downstream = ~same & ~near & upstream
    result.tokens += len(same)
    result.agreeing += int(same.sum())
    result.near_ties += int(near.sum())
    result.downstream += int(downstream.sum())
    for token in np.flatnonzero(~same)[: MAX_EXAMPLES - len(result.examples)]:
        kind = "near-tie" if near[token] else ("downstream" if downstream[token] else "unexplained")
        result.examples.append({"iteration": iteration, "token": int(token), "reference": ref[token].tolist(),
                                "runner": other[token].tolist(), "margin": float(gap[token]), "kind": kind})
    now = (~same).reshape(grid) | upstream.reshape(grid)
    return np.maximum.accumulate(now, axis=1)


def _pairs(run_results, reference: str) -> list[tuple[int, int]]:
    names = [name for name, _ in run_results]
    ref = names.index(reference)
    return [(ref, i) for i in range(len(names)) if i != ref]
