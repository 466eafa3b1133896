"""Comparison of runner outputs: numeric error per output, routing agreement per σ-MoE layer.

Numeric outputs go through polygraphy's SimpleCompareFunc, against the output's scale: an output
passes when max |a − b| <= atol + rtol · max |reference| (see `compare_numeric`). Routing outputs
(the expert indices) go through `compare_routing`: the share of tokens whose top-k SETS agree, with
every disagreement explained by the reference's top-k margin (a near-tie) or by an earlier layer's
difference, or counted as a failure.

Where a runtime routes a near-tie the other way, that token's output legitimately differs from the
reference by far more than rounding (another expert's output), and so may every later token that
attends to it. Such inputs are compared with the reference run on the runtime's own routing
(`follow_routing`): the numeric check then measures the rest of the computation, and the routing check
asks, layer by layer, whether each choice of the runtime is one the reference makes (or nearly ties
on) given the routing of the layers before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from polygraphy.comparator import Comparator, IterationResult, RunResults
from polygraphy.comparator.compare import SimpleCompareFunc

from moexport.core.dtypes import Tolerance
from moexport.core.errors import MoexportError
from moexport.exporter.forms import is_routing_name
from moexport.validate.runners import GAP_PREFIX, TorchRunner, layer_output_name

MAX_EXAMPLES = 5  # disagreeing tokens listed per layer in the report


@dataclass
class OutputResult:
    """Numeric agreement of one output between the reference and one runner (worst over iterations).

    `max_rel` is max |a − b| / `scale`, where `scale` = max |reference| (see `compare_numeric`).
    `rerouted` inputs had tokens the runner routed elsewhere (explained by near-ties); they were
    compared with the reference run on the runner's routing, and `max_abs_own_routing` is their max
    |a − b| against the reference's own routing (None when there were none).
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
    rerouted: int = 0
    max_abs_own_routing: float | None = None


@dataclass
class RoutingResult:
    """Routing agreement of one σ-MoE layer between the reference and one runner.

    Of the `tokens`, `agreeing` have the reference's top-k set. The others are `near_ties` (the
    reference's top-k margin is below `tie_margin`), `downstream` (the reference picks the runner's
    experts too once it follows the runner's routing of the layers before) or `unexplained` (on the
    inputs `unexplained_inputs`). An exact tie (margin 0) broken against the routing rule (the lower
    expert index wins) is unexplained.
    """

    runner: str
    layer: str
    tokens: int
    agreeing: int
    near_ties: int
    tie_margin: float
    downstream: int = 0
    unexplained: int = 0
    unexplained_inputs: list[int] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        """Share of tokens with identical top-k expert sets (1.0 when there were no tokens)."""
        return self.agreeing / self.tokens if self.tokens else 1.0

    @property
    def passed(self) -> bool:
        """Every disagreement is explained."""
        return self.unexplained == 0


def _numeric_outputs(name: str) -> bool:
    return not is_routing_name(name) and not name.startswith(GAP_PREFIX)


def same_sets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per token (all but the last axis): whether the expert sets [..., k] of `a` and `b` are equal."""
    return (np.sort(a, axis=-1) == np.sort(np.asarray(b).astype(a.dtype), axis=-1)).all(axis=-1)


def follow_routing(torch_runner: TorchRunner, feeds: list, run_results) -> dict[str, list]:
    """Per runner, the reference's results input by input: where the runner routed some token
    differently, the reference run on the runner's routing (`TorchRunner.infer_following`), else the
    reference's own results."""
    reference = run_results[torch_runner.name]
    followed = {}
    with torch_runner:
        for runner, iterations in run_results.items():
            if runner == torch_runner.name:
                continue
            followed[runner] = []
            for feed, ref, other in zip(feeds, reference, iterations):
                experts = {name: other[name] for name in ref if is_routing_name(name) and name in other}
                if all(same_sets(ref[name], value).all() for name, value in experts.items()):
                    followed[runner].append(ref)
                    continue
                outputs = torch_runner.infer_following(feed, experts)
                followed[runner].append(IterationResult(outputs, runner_name=torch_runner.name))
    return followed


def explained_only(followed: dict[str, list], run_results, reference: str,
                   routing: list[RoutingResult]) -> dict[str, list]:
    """`followed` with the reference's own results again on every input where a runner's routing has
    unexplained differences: a routing that is wrong is not one to compare the outputs on."""
    wrong = {(r.runner, i) for r in routing for i in r.unexplained_inputs}
    own = run_results[reference]
    return {runner: [own[i] if (runner, i) in wrong else it for i, it in enumerate(iterations)]
            for runner, iterations in followed.items()}


def compare_numeric(run_results, *, tolerance: Tolerance, reference: str,
                    followed: dict[str, list] | None = None) -> list[OutputResult]:
    """Per-output numeric agreement of every runner with `reference` (worst iteration reported).

    An output passes when max |a − b| <= atol + rtol · max |b|: the error is measured against the
    output's scale, because float rounding errors scale with the magnitude of what was summed, not with
    the (possibly cancelled, near-zero) value of one element. polygraphy's "max" statistic with a
    per-output atol of exactly that bound checks it. `followed` (from `follow_routing`) gives each
    runner's reference input by input; defaults to the reference's own results.
    """
    ref_iterations = run_results[reference]
    scale = {name: max(float(np.abs(it[name]).max(initial=0.0)) for it in ref_iterations)
             for name in ref_iterations[0] if _numeric_outputs(name)}
    bound = {name: tolerance.atol + tolerance.rtol * s for name, s in scale.items()}
    compare = SimpleCompareFunc(
        atol=bound, rtol=0.0, check_error_stat="max",
        find_output_func=lambda name, index, other: [name] if _numeric_outputs(name) and name in other else None)
    results: dict[tuple[str, str], OutputResult] = {}
    for runner, iterations in run_results.items():
        if runner == reference:
            continue
        refs = (followed or {}).get(runner, ref_iterations)
        _check_shapes(refs, iterations, runner, scale)
        pair = RunResults([(reference, refs), (runner, iterations)])
        (accuracy,) = Comparator.compare_accuracy(pair, compare_func=compare, comparisons=[(0, 1)])
        for index, per_output in enumerate(accuracy[(reference, runner)]):
            rerouted = refs[index] is not ref_iterations[index]
            for output, r in per_output.items():
                own = (float(np.abs(iterations[index][output] - ref_iterations[index][output]).max())
                       if rerouted else None)
                worst = OutputResult(runner, output, r.max_absdiff, r.max_absdiff / max(scale[output], 1e-30),
                                     r.mean_absdiff, scale[output], tolerance.atol, tolerance.rtol,
                                     r.max_absdiff <= bound[output], int(rerouted), own)
                seen = results.get((runner, output))
                if seen is not None:
                    worst.max_abs, worst.max_rel = max(seen.max_abs, worst.max_abs), max(seen.max_rel, worst.max_rel)
                    worst.mean_abs = max(seen.mean_abs, worst.mean_abs)
                    worst.passed = seen.passed and worst.passed
                    worst.rerouted += seen.rerouted
                    known = [v for v in (seen.max_abs_own_routing, own) if v is not None]
                    worst.max_abs_own_routing = max(known) if known else None
                results[(runner, output)] = worst
    return list(results.values())


def _check_shapes(refs, iterations, runner: str, outputs) -> None:
    """Outputs of different shapes cannot be compared: say so (polygraphy would only log it)."""
    for ref, other in zip(refs, iterations):
        for name in outputs:
            if name in other and ref[name].shape != other[name].shape:
                raise MoexportError(f"output {name!r} of {runner}", f"has shape {list(other[name].shape)}, the "
                                    f"PyTorch reference's is {list(ref[name].shape)}",
                                    "the artifact was exported from another model")


def compare_routing(run_results, *, tolerance: Tolerance, reference: str,
                    followed: dict[str, list] | None = None) -> list[RoutingResult]:
    """Per-layer routing agreement of every runner that exposes expert indices with `reference`.

    A token whose top-k set differs from the reference's is explained by a near-tie of the reference's
    logits, or by an earlier σ-MoE layer's difference when the reference, run on the runner's routing of
    the layers before (`followed`, from `follow_routing`), picks the runner's experts too. Anything else
    is unexplained.
    """
    ref_iterations = run_results[reference]
    results: dict[tuple[str, str], RoutingResult] = {}
    for runner, iterations in run_results.items():
        if runner == reference:
            continue
        refs = (followed or {}).get(runner, ref_iterations)
        for iteration, (ref, follow, other) in enumerate(zip(ref_iterations, refs, iterations)):
            for name in ref:  # the reference records layers in forward order
                if not is_routing_name(name) or name not in other:
                    continue
                layer = name.partition(".")[2]
                result = results.setdefault((runner, layer), RoutingResult(runner, layer, 0, 0, 0, tolerance.tie))
                gap = follow[layer_output_name(GAP_PREFIX, layer)]
                _accumulate(result, ref[name], follow[name], other[name], gap, iteration)
    return list(results.values())


def _accumulate(result: RoutingResult, ref: np.ndarray, follow: np.ndarray, other: np.ndarray, gap: np.ndarray,
                iteration: int) -> None:
    k = ref.shape[-1]
    ref, follow, other = (np.asarray(a).reshape(-1, k) for a in (ref, follow, other))
    gap = gap.reshape(-1)
    same, as_followed = same_sets(ref, other), same_sets(follow, other)
    # At an exact tie the rule decides (the lower index wins): another choice there is no rounding effect.
    near = ~as_followed & (gap <= result.tie_margin) & (gap > 0)
    unexplained = ~as_followed & ~near
    downstream = ~same & as_followed
    result.tokens += len(same)
    result.agreeing += int(same.sum())
    result.near_ties += int((near & ~same).sum())
    result.downstream += int(downstream.sum())
    result.unexplained += int(unexplained.sum())
    if unexplained.any() and iteration not in result.unexplained_inputs:
        result.unexplained_inputs.append(iteration)
    for token in np.flatnonzero(~same | unexplained)[: MAX_EXAMPLES - len(result.examples)]:
        kind = "near-tie" if near[token] else ("downstream" if downstream[token] else "unexplained")
        result.examples.append({"iteration": iteration, "token": int(token), "reference": ref[token].tolist(),
                                "runner": other[token].tolist(), "margin": float(gap[token]), "kind": kind})
