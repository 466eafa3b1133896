"""The differential sweep (tools/sweep.py): every implementation of the op set against the PyTorch
reference on seeded random layer configurations.

CPU (CI): seeds 1 and 2, cases 0-99 of each: 200 cases, every one run by the PyTorch reference, the
Triton kernels in the interpreter, `onnx.reference` with the NumPy references and ONNX Runtime's CPU
provider running the function bodies (not for bfloat16 layers, which it cannot multiply): this
file took 66 s with `-n 2` on the 2-core machine (110 s of CPU time), 2m35 while other sessions'
tests shared the machine.

GPU (marked gpu, one device call: `bash tools/h200_tests.sh 560 sweep`): seed 1, 32 groups of 32 cases (1024), each
group one layer whose kernels compile once, run by the reference on the GPU, the Triton kernels
(JIT), and the layer's kernel bundle through the CUDA driver (AOT), through the ONNX Runtime op
library on the CUDA provider and through the TensorRT plugins (the harness). MOEXPORT_SWEEP_REQUIRE
names the implementations that must run on every case (the device script requires all four);
MOEXPORT_SWEEP_RESULTS a folder for the per-case records (`python tools/sweep.py --summarize`).
"""
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from sweep import check, compare_values, near_ties, run_case, run_group, summarize
from sweep_cases import PROFILES, SPECIALS, case_of, make_data

from moexport.core.dtypes import tolerance_for

CPU_SEEDS, CPU_CASES = (1, 2), 100
GPU_SEED, GPU_GROUPS = 1, 32


# the NaN and infinity cases make NumPy and the interpreter warn about the invalid values they are fed
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("seed, index", [(s, i) for s in CPU_SEEDS for i in range(CPU_CASES)],
                         ids=[f"seed{s}-case{i}" for s in CPU_SEEDS for i in range(CPU_CASES)])
def test_cpu_case_agrees_with_the_reference_everywhere(seed, index):
    result = run_case(case_of("cpu", seed, index), "cpu")
    assert result.passed, result.report()
    ran = {v.impl for v in result.verdicts if v.status == "passed"}
    skipped = {v.impl: v.problems[0] for v in result.verdicts if v.status == "skipped"}
    # every CPU implementation ran, except ONNX Runtime on bfloat16 matrix products (its CPU provider has none)
    assert {"reference", "triton", "onnx_reference"} <= ran, skipped
    assert "ort" in ran or "bfloat16" in skipped.get("ort", ""), skipped


@pytest.mark.parametrize("seed, index", [(5, 73), (4, 15)], ids=["seed5-case73", "seed4-case15"])
def test_bfloat16_sums_agree_with_the_reference(seed, index):
    """The divergences that bfloat16 atomics caused: the default configs' 7 adds (case 73) and a config of
    `configs=` with 20 (case 15) exceeded the bfloat16 tolerance. bfloat16 layers now sum in float32."""
    result = run_case(case_of("cpu", seed, index), "cpu", ["triton"])
    assert result.passed, result.report()


@pytest.mark.gpu
@pytest.mark.parametrize("group", range(GPU_GROUPS))
def test_gpu_group_agrees_with_the_reference_everywhere(group):
    results = run_group("gpu", GPU_SEED, group, "cuda")
    folder = os.environ.get("MOEXPORT_SWEEP_RESULTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(r.record()) for r in results]
        (Path(folder) / f"group{group:03d}.jsonl").write_text("\n".join(lines) + "\n")
    failed = [r for r in results if not r.passed]
    assert not failed, "\n".join(r.report() for r in failed)
    required = [n for n in os.environ.get("MOEXPORT_SWEEP_REQUIRE", "triton").split(",") if n]
    for result in results:
        status = {v.impl: v for v in result.verdicts}
        missing = [f"{n}: {status[n].problems[0] if n in status else 'not registered'}" for n in required
                   if n not in status or status[n].status != "passed"]
        assert not missing, f"{result.case}: required implementations did not run: {missing}"


def test_a_case_is_the_same_wherever_it_is_drawn():
    a, b = case_of("cpu", 5, 42), case_of("cpu", 5, 42)
    assert a == b and a != case_of("cpu", 5, 43) and a != case_of("cpu", 6, 42)
    first, second = make_data(a), make_data(b)
    assert all(torch.equal(first[n], second[n]) if first[n] is not None else second[n] is None for n in first)


def test_gpu_groups_share_a_layer_and_few_token_buckets():
    per = PROFILES["gpu"].per_group
    for group in range(4):
        cases = [case_of("gpu", GPU_SEED, group * per + i) for i in range(per)]
        assert len({c.layer for c in cases}) == 1
        buckets = {1 << max(0, c.tokens - 1).bit_length() for c in cases if c.tokens}
        assert buckets <= set(cases[0].layer.group_tokens) and len(buckets) <= 4


def _coverage(cases) -> None:
    """The sweep reaches every op, dtype, selection, activation and special, and the edges of the
    issue's ranges: T 0, 1, odd; d 1 and odd widths; E 1; k 1 and k = E; bias on and off."""
    layers = [c.layer for c in cases]
    everything = {(op, special) for op, specials in SPECIALS.items() for special in specials}
    assert {(c.layer.op, c.special) for c in cases} == everything
    for attribute, values in (("dtype", 3), ("selection", 3), ("activation", 3), ("bias", 2)):
        assert len({getattr(L, attribute) for L in layers if L.op == "SigmaMoE"}) == values, attribute
    tokens = Counter(c.tokens for c in cases)
    assert tokens[0] and tokens[1] and sum(n for t, n in tokens.items() if t % 2 and t > 1)
    assert any(L.d == 1 for L in layers) and any(L.d % 2 and L.d > 1 for L in layers)
    assert any(L.n_experts == 1 for L in layers) and any(L.k == L.n_experts > 1 for L in layers)
    assert any(L.k == 1 < L.n_experts for L in layers)
    assert {1, 0} == {c.layer.reduce for c in cases if c.layer.op == "CVMM"}
    # a half-precision layer's router weight both in float32 and in its dtype (the op set takes either)
    assert {(L.dtype, L.router_in_dtype) for L in layers if L.op == "SigmaMoE" and L.dtype != "float32"} == {
        (dtype, in_dtype) for dtype in ("float16", "bfloat16") for in_dtype in (False, True)}


def test_the_cpu_sweep_covers_the_issue_s_ranges():
    _coverage([case_of("cpu", s, i) for s in CPU_SEEDS for i in range(CPU_CASES)])


def test_the_gpu_sweep_covers_the_issue_s_ranges():
    cases = [case_of("gpu", GPU_SEED, i) for i in range(GPU_GROUPS * PROFILES["gpu"].per_group)]
    _coverage(cases)
    layers = {c.layer for c in cases}
    assert len(cases) >= 1000
    assert max(c.tokens for c in cases) > 16384 and max(L.n_experts for L in layers) == 128
    assert max(L.expert_size for L in layers) == 256 and max(L.d for L in layers) == 2048
    assert any(L.d not in (1, 2048) and L.d & (L.d - 1) for L in layers)  # a width that is no power of two


def test_near_ties_excuse_close_logits_and_never_exact_ties():
    logits = torch.tensor([[3.0, 2.0, 1.999, 0.0],   # k=2: 2.0 vs 1.999 -> near
                           [3.0, 2.0, 1.0, 0.0],     # far apart
                           [3.0, 2.0, 2.0, 0.0],     # an exact tie at the boundary, nothing else close: strict
                           [3.0, 2.0, 2.0, 1.9995],  # the tie's group has a neighbour within the margin
                           [float("nan")] * 4])      # NaN ranks as -inf: all equal, exact
    assert near_ties(logits, 2, torch.full((5,), 0.01)).tolist() == [True, False, False, True, False]
    assert not near_ties(logits, 2, torch.zeros(5)).any()
    assert not near_ties(logits, 4, torch.full((5,), 10.0)).any()  # k = E: nothing is left out


def test_compare_values_wants_nan_and_infinities_where_the_reference_has_them():
    tol = tolerance_for("float32")
    ref = torch.tensor([[1.0, float("nan"), float("inf")], [2.0, 3.0, 4.0]])
    assert compare_values("y", ref, ref.clone(), tol)[1] == []
    for (row, col), value, problem in (((0, 1), 1.0, "NaN"), ((0, 2), -float("inf"), "infinities"),
                                       ((1, 0), 2.01, "max |err|")):
        got = ref.clone()
        got[row, col] = value
        assert problem in compare_values("y", ref, got, tol)[1][0]
        assert compare_values("y", ref, got, tol, torch.tensor([row != 0, row != 1]))[1] == []  # row left out


def _wrong_tie_breaks(seed: int, count: int):
    """σ-MoE tied-rows cases of the CPU sweep, each with the reference's routing rewritten so that ties
    go to the higher index (and y left as the reference's): what a wrong tie rule looks like."""
    from sweep_impls import REGISTRY

    found = []
    for index in range(400):
        case = case_of("cpu", seed, index)
        if case.layer.op != "SigmaMoE" or case.special != "tied_rows":
            continue
        data = make_data(case)
        ref = REGISTRY["reference"].run(case, data, "cpu")
        flat = ref["expert"].clone().reshape(-1, case.layer.k)
        for a, b in data["tied"].tolist():
            took_a = (flat == a).any(-1) & ~(flat == b).any(-1)
            flat[took_a] = torch.where(flat[took_a] == a, b, flat[took_a])
        if not torch.equal(flat, ref["expert"].reshape(-1, case.layer.k)):
            found.append((case, data, ref, dict(ref, expert=flat.reshape(ref["expert"].shape))))
        if len(found) == count:
            return found
    raise AssertionError(f"fewer than {count} tied-rows cases split a tie in seed {seed}'s first 400")


def test_a_wrong_tie_break_fails_its_case():
    for case, data, ref, wrong in _wrong_tie_breaks(3, 3):
        verdict = check(case, data, ref, wrong, "wrong")
        assert verdict.status == "failed" and any("tied experts" in p for p in verdict.problems), case


def test_an_error_beyond_the_dtype_tolerance_fails_its_case():
    case = next(c for c in (case_of("cpu", 4, i) for i in range(100)) if c.layer.op == "SigmaMoE" and c.tokens > 2
                and c.special == "plain")
    data = make_data(case)
    from sweep_impls import REGISTRY

    ref = REGISTRY["reference"].run(case, data, "cpu")
    tol = tolerance_for(case.layer.dtype)
    y = ref["y"].float()
    one_element = (torch.arange(y.numel()) == 1).reshape(y.shape)
    off = dict(ref, y=y + 3 * (tol.atol + tol.rtol * y.abs().max()) * one_element)
    assert check(case, data, ref, dict(ref, y=y), "same").status == "passed"
    assert check(case, data, ref, off, "off").status == "failed"


@pytest.mark.slow
def test_a_bundle_plan_becomes_the_manifest_compile_plan_writes(tmp_path):
    """The AOT implementation (GPU) runs a plan of a layer's bundle through AOTRunner: its manifest, made
    from the bundle, must be the one `compile_plan` writes for that plan (launches, arguments, cubins)."""
    from sweep_impls import bundle_manifest

    from moexport.kernels.aot import compile_plan
    from moexport.kernels.bundle import build_bundle, sigma_moe_kernels
    from moexport.kernels.plan import MoEShape

    kernels = sigma_moe_kernels(MoEShape(24, 6, 20, 16, 2, "float16", "softmax", "gelu", True), expert_output=True,
                                max_tokens=64)
    bundle = build_bundle(kernels, archs=(90,))
    for tokens in (1, 40):
        plan = kernels.plan_for(tokens)
        ours = json.loads(bundle_manifest(bundle, tokens, tmp_path).read_text())
        theirs = json.loads(compile_plan(plan, tmp_path / f"ref{tokens}", sm=90).read_text())
        for key in ("inputs", "outputs", "workspace", "derived"):
            assert ours[key] == theirs[key], key
        assert len(ours["steps"]) == len(theirs["steps"])
        for a, b in zip(ours["steps"], theirs["steps"]):
            for key in ("kernel", "entry", "grid", "block", "shared", "hidden_pointers", "launch_pdl"):
                assert a[key] == b[key], (tokens, key)
            # compile_plan's arguments also carry the kernel's parameter names, which launchers do not read
            assert a["args"] == [{k: v for k, v in arg.items() if k != "name"} for arg in b["args"]]
            assert (tmp_path / a["cubin"]).read_bytes() == (tmp_path / f"ref{tokens}" / b["cubin"]).read_bytes()


def test_the_summary_counts_cases_per_implementation_and_names_each_failure():
    def record(case, passed, *problems):
        verdicts = [{"impl": "reference", "status": "passed", "problems": []},
                    {"impl": "aot", "status": "passed" if passed else "failed", "problems": list(problems)},
                    {"impl": "ort_cuda", "status": "skipped", "problems": ["needs a CUDA GPU"]}]
        return {"case": case, "replay": f"replay {case}", "passed": passed, "verdicts": verdicts}

    text = summarize([record("a", True), record("b", False, "y: ... (the kernels' plan adds 16 float16 atomics "
                                                            "into each output, rounding each)"),
                      record("c", False, "3 token(s) routed differently (set)")])
    assert text.splitlines()[0] == "3 cases, 1 passed, 2 failed"
    assert "aot             2 failed, 1 passed" in text and "ort_cuda        3 skipped" in text
    assert "FAILED b" in text and "FAILED c" in text and "replay c" in text and "FAILED a" not in text


def test_the_single_node_models_are_ones_onnx_runtime_1_2x_reads():
    """IR 10, as the exporter writes: the first GPU sweep's models had onnx's newest IR (14), which ONNX
    Runtime 1.27 (the GPU build) refused for every case."""
    from sweep_impls import op_model

    for index in (0, 1, 2):
        case = case_of("cpu", 1, index)
        assert op_model(case.layer, len(case.lead), case.opset).ir_version == 10
