"""The NumPy references and their onnx.reference operators, against the PyTorch model."""
import numpy as np
import pytest
import torch
from opset_cases import nan_routing_case, rule_gates, sigma_moe_case, single_node_model, tied_logits

from moexport.models import route
from moexport.opset import reference_evaluator, sigma_moe, topk_dispatch


@pytest.mark.parametrize("selection", ["sigmoid", "softmax", "softmax_after_topk"])
def test_topk_dispatch_reference_follows_the_routing_rule(rng, selection):
    logits = tied_logits(rng, 20, 7)
    gate, expert, sorted_expert, sorted_slot = topk_dispatch(logits, 3, selection)
    want_gate, want_expert = route(torch.from_numpy(logits), 3, selection)
    np.testing.assert_array_equal(expert, want_expert.numpy())
    np.testing.assert_allclose(gate, want_gate.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(sorted_expert, expert.reshape(-1)[sorted_slot])
    assert np.all(np.diff(sorted_expert) >= 0)
    for e in range(7):  # stable: ascending slots within one expert
        assert np.all(np.diff(sorted_slot[sorted_expert == e]) > 0)


@pytest.mark.parametrize("bias", [False, True])
def test_sigma_moe_reference_matches_the_pytorch_layer(rng, bias):
    inputs, want_y, want_expert = sigma_moe_case(rng, shape=(2, 6), e=6, k=3, activation="gelu", bias=bias)
    y, expert = sigma_moe(**inputs, k=3, activation="gelu", with_expert=True)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(expert, want_expert.numpy())


def test_reference_evaluator_runs_the_op_set(rng):
    inputs, want_y, want_expert = sigma_moe_case(rng, shape=(1,), e=5, k=5, selection="softmax", bias=True)
    model, feeds = single_node_model("SigmaMoE", inputs, {"k": 5, "selection": "softmax"})
    y, expert = reference_evaluator(model).run(None, feeds)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(expert, want_expert.numpy())


@pytest.mark.parametrize("opset", [18, 20])
def test_reference_evaluator_runs_gelu_layers_whatever_their_function_bodies(rng, opset):
    """The model's own GELU bodies (Gelu from opset 20 on, which onnx.reference cannot prepare inside a
    function) are not what it runs: found by tools/sweep.py, where opset 20 GELU layers raised."""
    inputs, want_y, want_expert = sigma_moe_case(rng, shape=(3,), e=4, k=2, activation="gelu")
    model, feeds = single_node_model("SigmaMoE", inputs, {"k": 2, "activation": "gelu"}, opset=opset)
    y, expert = reference_evaluator(model).run(None, feeds)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(expert, want_expert.numpy())
    assert any(f.domain == "moexport" for f in model.functions)  # the caller's model keeps its bodies


@pytest.mark.parametrize("selection", ["sigmoid", "softmax", "softmax_after_topk"])
def test_nan_logits_rank_and_gate_as_minus_infinity(selection):
    """NumPy's sort put NaN below -inf, and the gates kept NaN (found by tools/sweep.py)."""
    logits, k, experts, as_rule = nan_routing_case()
    gate, expert, sorted_expert, _ = topk_dispatch(logits, k, selection)
    np.testing.assert_array_equal(expert, experts)
    np.testing.assert_allclose(gate, rule_gates(as_rule, experts, selection), rtol=1e-6)
    assert sorted(sorted_expert) == sorted(experts.reshape(-1))


def test_equal_router_rows_route_to_the_lower_index(rng):
    """As the PyTorch layer (float64 router product, rounded once): a float32 GEMM gave equal rows logits
    an ulp apart in some columns (found by tools/sweep.py)."""
    d, g = 101, 3
    for e in range(2, 40):
        x = rng.standard_normal((37, d)).astype(np.float32)
        expert_sel = rng.standard_normal((e, d)).astype(np.float32)
        expert_sel[e - 1] = expert_sel[0]
        keys, values = (rng.standard_normal(shape).astype(np.float32) for shape in ((e, d, g), (e, g, d)))
        _, expert = sigma_moe(x, expert_sel, keys, values, k=1, with_expert=True)
        assert not (expert == e - 1).any(), e


def test_cvmm_reference_takes_memory_of_its_output_not_of_a_weight_per_row(rng):
    """131072 rows of 256 x 64 (a 32768-token layer, k = 4): gathering a weight matrix per row took 8.6 GB
    and got the GPU machine's test workers killed; expert by expert it takes a few times the output."""
    import tracemalloc

    from moexport.opset import cvmm

    S, E, d_in, d_out = 131072, 16, 256, 64
    x = rng.standard_normal((32768, d_in), dtype=np.float32)
    sorted_expert = np.sort(rng.integers(0, E, S)).astype(np.int32)
    src_row, dst_row = rng.integers(0, 32768, S).astype(np.int32), rng.permutation(S).astype(np.int32)
    weight = rng.standard_normal((E, d_in, d_out), dtype=np.float32)
    tracemalloc.start()
    out = cvmm(x, sorted_expert, src_row, dst_row, weight)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * out.nbytes
    rows = slice(0, 500)
    want = np.einsum("si,sio->so", x[src_row[rows]], weight[sorted_expert[rows]])
    np.testing.assert_allclose(out[dst_row[rows]], want, rtol=1e-4, atol=1e-4)
