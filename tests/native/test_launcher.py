"""The native launcher's planning half (moexport/native/*.cpp), checked on the CPU against the Python host:
the same plan choice, symbols, shape checks, workspace layout, grids and integer arguments."""
import json
import random
import struct
import subprocess

import pytest

from moexport import MoexportError
from moexport.kernels import bundle as bundles
from moexport.kernels.host import bind_symbols, buffer_dtype, pack_workspace
from moexport.kernels.plan import MoEShape, evaluate
from moexport.native import plan_call
from moexport.plugins import ort_library

SHAPE = MoEShape(48, 6, 16, 40, 2, "float16", "softmax", "gelu", True)


@pytest.fixture(scope="module")
def library():
    return ort_library()


@pytest.fixture(scope="module")
def layer_bundle():
    """Kernels of a small σ-MoE layer for sm_90, plans up to 256 tokens (gather, then dispatched)."""
    kernels = bundles.sigma_moe_kernels(SHAPE, expert_output=True, max_tokens=256)
    return kernels, bundles.build_bundle(kernels, archs=(90,))


def fake_bundle(plans, select="N", op_inputs=("x",), op_outputs=("y",)):
    """A bundle without images: enough for the planner, which never loads them."""
    manifest = {"format": 1, "op": "Test", "key": "fake", "config": {}, "select": select,
                "op_inputs": list(op_inputs), "op_outputs": list(op_outputs), "kernels": [
                    {"name": "k", "entry": "k", "images": []}], "plans": plans}
    text = json.dumps(manifest).encode()
    return bundles.MAGIC + struct.pack("<Q", len(text)) + text


def layer_inputs(n_tokens, *, dtype="float16", d=48, bias=True):
    return [{"dtype": dtype, "shape": [n_tokens, d]}, {"dtype": "float32", "shape": [6, 48]},
            {"dtype": "float16", "shape": [6, 48, 16]}, {"dtype": "float16", "shape": [6, 16, 40]},
            {"dtype": "float16", "shape": [6, 16]} if bias else None, {"dtype": "float16", "shape": [40]} if bias else None,
            None]


def test_the_library_is_built_links_to_no_gpu_library_and_exports_its_entry_points(library):
    linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    assert not any(name in linked for name in ("libcuda", "libcudart", "libnvinfer", "libonnxruntime"))
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                              check=True).stdout.split()
    assert {"RegisterCustomOps", "moexport_plan_call", "moexport_ort_compiled_calls"} <= set(exported)


def test_expressions_evaluate_as_python_does(library):
    """Random expressions of the plan language (floor division of negatives included) against `evaluate`."""
    rng = random.Random(0)

    def expr(depth):
        if depth == 0:
            return rng.choice(["N", "S", str(rng.randint(0, 9)), str(rng.randint(10, 4096))])
        a, b = expr(depth - 1), expr(depth - 1)
        return rng.choice([f"({a} + {b})", f"({a} - {b})", f"{a} * {b}", f"({a}) // max(1, {b})",
                           f"cdiv({a}, max(1, {b}))", f"min({a}, {b})", f"max({a}, {b})", f"-{a}"])

    grids = [expr(3) for _ in range(60)]
    plan = {"max_tokens": 1 << 20, "unbounded": True, "derived": [["S", "N * 3 - 7"]], "workspace": [],
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", "4"]}], "outputs": [],
            "steps": [{"kernel": 0, "grid": [g], "block": [32, 1, 1], "args": [], "launch_pdl": False}
                      for g in grids]}
    data = fake_bundle([plan])
    for n in (0, 1, 2, 5, 1000):
        answer = plan_call(library, data, [{"dtype": "float32", "shape": [n, 4]}])
        symbols = {"N": n, "S": n * 3 - 7}
        assert [s["grid"][0] for s in answer["steps"]] == [evaluate(g, symbols) for g in grids]


def python_plan(kernels, n_tokens, shapes):
    """What the Python host does for the same call: the plan, its symbols, workspace and steps."""
    plan = kernels.plan_for(n_tokens)
    symbols = bind_symbols([(b.name, b.shape) for b in plan.inputs], plan.derived, shapes, plan.name)
    sizes = [evaluate_numel(b.shape, symbols) * buffer_dtype(b.dtype).itemsize for b in plan.workspace]
    offsets, total = pack_workspace(sizes)
    steps = [([evaluate(g, symbols) for g in s.grid],
              [evaluate(a["value"], symbols) for a in bundles.argument_layout(plan, s) if a["kind"] == "i32"])
             for s in plan.steps]
    return kernels.plans.index(plan), symbols, list(zip([b.name for b in plan.workspace], offsets)), total, steps


def evaluate_numel(shape, symbols):
    n = 1
    for e in shape:
        n *= evaluate(e, symbols)
    return n


@pytest.mark.parametrize("n_tokens", [0, 1, 3, 16, 17, 64, 100, 256, 257, 5000])
def test_plans_calls_like_the_python_host(library, layer_bundle, n_tokens):
    kernels, data = layer_bundle
    answer = plan_call(library, data, layer_inputs(n_tokens))
    shapes = {"x": (n_tokens, 48), "expert_sel": (6, 48), "keys": (6, 48, 16), "values": (6, 16, 40),
              "bias": (6, 16), "o_bias": (40,)}
    index, symbols, workspace, total, steps = python_plan(kernels, n_tokens, shapes)
    assert answer["plan"] == index
    assert answer["symbols"] == symbols
    assert answer["outputs"] == [[n_tokens, 40], [n_tokens, 2]]
    assert [tuple(w) for w in answer["workspace"]] == workspace and answer["workspace_bytes"] == total
    assert [(s["grid"], s["ints"]) for s in answer["steps"]] == steps


@pytest.mark.parametrize("inputs, message", [
    (layer_inputs(5, dtype="float32"), "input 'x' is float32; the compiled kernels take float16"),
    (layer_inputs(5, d=47), r"input 'x' has shape \[5, 47\]; the compiled kernels expect \[5, 48\]"),
    (layer_inputs(5, bias=False), "input 'bias' is missing"),
    (layer_inputs(5)[:1] + [{"dtype": "float32", "shape": [6]}] + layer_inputs(5)[2:],
     "input 'expert_sel' of shape \\[6\\] must have 2 dimensions"),
])
def test_calls_that_do_not_fit_the_kernels_name_the_input(library, layer_bundle, inputs, message):
    with pytest.raises(MoexportError, match=message):
        plan_call(library, layer_bundle[1], inputs)


def test_the_router_weight_is_taken_in_the_dtype_its_kernels_were_compiled_for(library, layer_bundle):
    """SigmaMoE's router weight is float32 or the layer's dtype; a bundle is compiled for one of them."""
    half = bundles.build_bundle(bundles.sigma_moe_kernels(SHAPE, router_dtype="float16", expert_output=True,
                                                          max_tokens=16), archs=(90,))
    inputs = layer_inputs(5)
    half_inputs = inputs[:1] + [{"dtype": "float16", "shape": [6, 48]}] + inputs[2:]
    assert plan_call(library, half, half_inputs)["outputs"] == [[5, 40], [5, 2]]
    with pytest.raises(MoexportError, match="input 'expert_sel' is float32; the compiled kernels take float16"):
        plan_call(library, half, inputs)
    with pytest.raises(MoexportError, match="input 'expert_sel' is float16; the compiled kernels take float32"):
        plan_call(library, layer_bundle[1], half_inputs)


def test_a_router_weight_of_a_third_dtype_is_refused_when_compiling():
    with pytest.raises(MoexportError, match="router_dtype='bfloat16'.*float32 or the layer's dtype"):
        bundles.sigma_moe_kernels(SHAPE, router_dtype="bfloat16")


def test_a_gather_plan_does_not_serve_more_tokens_than_it_was_built_for(library):
    kernels = bundles.sigma_moe_kernels(SHAPE, max_tokens=16)
    assert kernels.plans[-1].notes["mode"] == "gather"
    data = bundles.build_bundle(kernels, archs=(90,))
    plan_call(library, data, layer_inputs(16))
    with pytest.raises(MoexportError, match="17 tokens is more than the compiled kernels were built for"):
        plan_call(library, data, layer_inputs(17))


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b"NOTABUNDLE" + b[10:], "not a moexport kernel bundle"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:8] + struct.pack("<Q", 5) + b"{oops" + b[21:], "kernel bundle manifest"),
])
def test_a_damaged_bundle_is_an_error_not_a_crash(library, layer_bundle, corrupt, message):
    with pytest.raises(MoexportError, match=message):
        plan_call(library, corrupt(layer_bundle[1]), layer_inputs(4))
