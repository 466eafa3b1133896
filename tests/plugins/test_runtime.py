"""ONNX Runtime runs each op through its function body; checked against independent references.

TopKDispatch against the PyTorch routing rule (`moexport.models.routing`), CVMM against the NumPy
reference, SigmaMoE against the PyTorch σ-MoE layer. Shapes include ties, k = E and one token.
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from opset_cases import nan_routing_case, rule_gates, sigma_moe_case, single_node_model, tied_logits

from moexport.core.errors import MoexportError
from moexport.models import route
from moexport.opset import DOMAIN, cvmm, topk_dispatch
from moexport.plugins import ort_session, run_with_tensors

SELECTIONS = ["sigmoid", "softmax", "softmax_after_topk"]


@pytest.mark.parametrize("n, e, k", [(1, 8, 2), (37, 8, 3), (16, 6, 6), (64, 16, 4)])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_topk_dispatch_body_follows_the_routing_rule_with_ties(rng, n, e, k, selection):
    logits = tied_logits(rng, n, e)
    model, feeds = single_node_model("TopKDispatch", {"logits": logits}, {"k": k, "selection": selection})
    gate, expert, sorted_expert, sorted_slot = ort_session(model).run(None, feeds)
    want_gate, want_expert = route(torch.from_numpy(logits), k, selection)
    np.testing.assert_array_equal(expert, want_expert.numpy())
    np.testing.assert_allclose(gate, want_gate.numpy(), rtol=1e-6, atol=1e-7)
    order = torch.sort(want_expert.reshape(-1), stable=True)
    np.testing.assert_array_equal(sorted_slot, order.indices.numpy())
    np.testing.assert_array_equal(sorted_expert, order.values.numpy())
    assert {a.dtype for a in (expert, sorted_expert, sorted_slot)} == {np.dtype(np.int32)}


@pytest.mark.parametrize("selection", SELECTIONS)
def test_topk_dispatch_body_ranks_and_gates_nan_logits_as_minus_infinity(selection):
    """A NaN logit equals no value TopK returns: its slot took expert 0 again, twice in one token
    (found by tools/sweep.py)."""
    logits, k, experts, as_rule = nan_routing_case()
    model, feeds = single_node_model("TopKDispatch", {"logits": logits}, {"k": k, "selection": selection})
    gate, expert, sorted_expert, _ = ort_session(model).run(None, feeds)
    np.testing.assert_array_equal(expert, experts)
    np.testing.assert_allclose(gate, rule_gates(as_rule, experts, selection), rtol=1e-6)
    assert sorted(sorted_expert) == sorted(experts.reshape(-1))


@pytest.mark.parametrize("reduce", [0, 1])
@pytest.mark.parametrize("with_gate", [False, True])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float16, 1e-5)])
def test_cvmm_body_matches_the_reference(rng, reduce, with_gate, dtype, tol):
    n, e, k, d_in, d_out = 13, 5, 2, 6, 7
    gate, _, sorted_expert, sorted_slot = topk_dispatch(tied_logits(rng, n, e), k)
    rows = n * k if reduce else n
    x = rng.standard_normal((rows, d_in)).astype(dtype)
    weight = rng.standard_normal((e, d_in, d_out)).astype(dtype)
    src_row = sorted_slot if reduce else sorted_slot // k
    slot_gate = gate.reshape(-1)[sorted_slot] if with_gate else None
    inputs = {"x": x, "sorted_expert": sorted_expert, "src_row": src_row, "dst_row": sorted_slot, "W": weight,
              "gate": slot_gate}
    model, feeds = single_node_model("CVMM", inputs, {"k": k, "reduce": reduce})
    (out,) = ort_session(model).run(None, feeds)
    want = cvmm(x, sorted_expert, src_row, sorted_slot, weight, slot_gate, reduce, k)
    assert out.dtype == np.float32 and out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("activation, bias", [("relu", False), ("gelu", True), ("silu", True)])
@pytest.mark.parametrize("shape, e, k", [((1,), 6, 2), ((3, 5), 6, 6), ((4, 9), 8, 3)])
def test_sigma_moe_body_matches_the_pytorch_layer(rng, selection, activation, bias, shape, e, k):
    inputs, want_y, want_expert = sigma_moe_case(rng, shape=shape, e=e, k=k, selection=selection,
                                                 activation=activation, bias=bias)
    attributes = {"k": k, "selection": selection, "activation": activation}
    model, feeds = single_node_model("SigmaMoE", inputs, attributes)
    y, expert = ort_session(model).run(None, feeds)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(expert, want_expert.numpy())


def test_sigma_moe_body_in_float16_is_within_tolerance(rng):
    inputs, want_y, want_expert = sigma_moe_case(rng, shape=(2, 7), e=8, k=2, bias=True, dtype=torch.float16)
    model, feeds = single_node_model("SigmaMoE", inputs, {"k": 2})
    y, expert = ort_session(model).run(None, feeds)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float32), want_y.float().numpy(), rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(expert, want_expert.numpy())


@pytest.mark.parametrize("n_tokens", [0, 3])
def test_run_with_tensors_binds_torch_tensors_empty_ones_too(rng, n_tokens):
    """ONNX Runtime refuses to bind a null pointer, which an empty torch tensor has: zero tokens raised
    'Pointer to data memory is not valid' (found by tools/sweep.py)."""
    inputs, _, _ = sigma_moe_case(rng, shape=(1,), e=4, k=2)
    model, _ = single_node_model("SigmaMoE", {**inputs, "x": np.zeros((n_tokens, 12), np.float32)}, {"k": 2})
    x = torch.randn(n_tokens, 12)
    y, expert = torch.full((n_tokens, 12), float("nan")), torch.full((n_tokens, 2), -1, dtype=torch.int64)
    run_with_tensors(ort_session(model), {"x": x}, {"y": y, "expert": expert})
    want_y, want_expert = ort_session(model).run(None, {"x": x.numpy()})
    np.testing.assert_array_equal(y.numpy(), want_y)
    np.testing.assert_array_equal(expert.numpy(), want_expert)


def test_optional_expert_output_can_be_left_out(rng):
    inputs, want_y, _ = sigma_moe_case(rng, shape=(5,), e=4, k=2)
    model, feeds = single_node_model("SigmaMoE", inputs, {"k": 2}, n_outputs=1)
    (y,) = ort_session(model).run(None, feeds)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-5)


def test_graph_without_function_bodies_gets_them(rng):
    logits = tied_logits(rng, 4, 6)
    model, feeds = single_node_model("TopKDispatch", {"logits": logits}, {"k": 2})
    del model.functions[:]
    _, expert, _, _ = ort_session(model).run(None, feeds)
    np.testing.assert_array_equal(expert, route(torch.from_numpy(logits), 2)[1].numpy())


def test_unknown_op_set_version_is_rejected(rng, tmp_path):
    model, _ = single_node_model("TopKDispatch", {"logits": tied_logits(rng, 4, 6)}, {"k": 2})
    next(o for o in model.opset_import if o.domain == DOMAIN).version = 2
    path = tmp_path / "v2.onnx"
    onnx.save(model, path)
    with pytest.raises(MoexportError, match=r"v2.onnx \| uses moexport op-set version 2"):
        ort_session(path)


def test_unknown_moexport_op_is_named(rng):
    model, _ = single_node_model("TopKDispatch", {"logits": tied_logits(rng, 4, 6)}, {"k": 2})
    model.graph.node.append(helper.make_node("Shuffle", ["gate"], ["shuffled"], domain=DOMAIN))
    del model.functions[:]
    with pytest.raises(MoexportError, match=r"node 'shuffled' \(Shuffle\) \| has op type moexport::Shuffle, which is not"):
        ort_session(model)


@pytest.mark.parametrize("attributes, message", [({"k": 2, "selection": "argmax"}, "selection='argmax'"),
                                                  ({"k": 9}, "k=9 is out of range"),
                                                  ({"k": 2, "temperature": 2}, "unknown attribute")])
def test_bad_attributes_are_named(rng, attributes, message):
    inputs, _, _ = sigma_moe_case(rng, shape=(3,), e=4, k=2)
    with pytest.raises(MoexportError, match=message):
        single_node_model("SigmaMoE", inputs, attributes)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MoexportError, match="does not exist"):
        ort_session(tmp_path / "nothing.onnx")


def test_a_rejected_graph_in_memory_is_named_by_the_file_it_came_from():
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    with pytest.raises(MoexportError, match=r"^weird\.onnx \| is rejected by ONNX Runtime"):
        ort_session(model, source="weird.onnx")
