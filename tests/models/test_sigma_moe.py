import math

import pytest
import torch
from opset_cases import nan_routing_case, rule_gates

from moexport import MoexportError
from moexport.models import SigmaMoE, route, topk_lower_index
from moexport.models.routing import entropy_regularizer


def dense_masked(layer: SigmaMoE, x: torch.Tensor) -> torch.Tensor:
    """Paper §1.7: y = (M ⊙ act(x·W1_full + b)) · W2_full, at dense cost, in float64."""
    E, d, G = layer.keys.shape
    x = x.reshape(-1, d).double()
    w1 = layer.keys.detach().double().permute(1, 0, 2).reshape(d, E * G)
    w2 = layer.values.detach().double().reshape(E * G, -1)
    logits = x @ layer.expert_sel.detach().double().T
    ranked = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, : layer.k]
    if layer.selection == "sigmoid":
        gate = torch.sigmoid(logits).gather(-1, ranked)
    elif layer.selection == "softmax":
        gate = torch.softmax(logits, -1).gather(-1, ranked)
    else:
        gate = torch.softmax(logits.gather(-1, ranked), -1)
    mask = torch.zeros_like(logits).scatter(-1, ranked, gate)
    pre = x @ w1
    if layer.bias is not None:
        pre = pre + layer.bias.detach().double().reshape(-1)
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}[layer.activation]
    y = (mask.repeat_interleave(G, dim=1) * act(pre)) @ w2
    if layer.o_bias is not None:
        y = y + layer.o_bias.detach().double()
    return y


@pytest.mark.parametrize("selection", ["sigmoid", "softmax", "softmax_after_topk"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_forward_equals_dense_masked(selection, activation, bias):
    layer = SigmaMoE(24, 6, 8, 2, selection=selection, activation=activation, bias=bias, v_dim=20).eval()
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
            layer.o_bias.normal_()
    x = torch.randn(3, 7, 24)
    y = layer(x)
    assert y.shape == (3, 7, 20) and y.dtype == torch.float32
    ref = dense_masked(layer, x).reshape(3, 7, 20)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6), (y.double() - ref).abs().max()


@pytest.mark.parametrize("k", [1, 5])
def test_k_extremes_and_single_token(k):
    layer = SigmaMoE(16, 5, 4, k).eval()
    x = torch.randn(1, 16)
    assert torch.allclose(layer(x).double(), dense_masked(layer, x), rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0]])
    assert topk_lower_index(logits, 3).tolist() == [[1, 2, 4]]
    gate, expert = route(logits, 2, "sigmoid")
    assert expert.tolist() == [[1, 2]]
    assert torch.allclose(gate, torch.sigmoid(torch.tensor([[2.0, 2.0]])))


@pytest.mark.parametrize("selection", ["sigmoid", "softmax", "softmax_after_topk"])
def test_nan_logits_rank_and_gate_as_minus_infinity(selection):
    """torch.sort put NaN first: an overflowing router chose its NaN experts (found by tools/sweep.py)."""
    logits, k, experts, as_rule = nan_routing_case()
    gate, expert = route(torch.from_numpy(logits), k, selection)
    assert expert.tolist() == experts.tolist()
    torch.testing.assert_close(gate.double(), torch.from_numpy(rule_gates(as_rule, experts, selection)),
                               rtol=1e-6, atol=1e-7, equal_nan=True)


def test_a_token_of_nan_takes_the_first_experts_and_gives_nan():
    layer = SigmaMoE(8, 5, 4, 2, bias=True).eval()
    x = torch.randn(3, 8)
    x[1, 4] = float("nan")
    with torch.no_grad():
        _, expert = layer.route(x)
        y = layer.reference_forward(x)
    assert expert[1].tolist() == [0, 1]
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("d", [33, 101])
def test_equal_router_rows_give_equal_logits_in_every_column(d):
    """A float32 GEMM sums some output columns in other code paths (MKL's remainder columns): two equal
    router rows gave logits an ulp apart, and their tie went to the higher index (found by tools/sweep.py).
    Inference (no autograd) takes the exact product."""
    for n_experts in range(2, 40):
        layer = SigmaMoE(d, n_experts, 4, 1)
        with torch.no_grad():
            layer.expert_sel[n_experts - 1] = layer.expert_sel[0]
            x = torch.randn(37, d)
            logits = layer.router_logits(x)
            assert logits.dtype == torch.float32 and torch.equal(logits[:, 0], logits[:, -1]), n_experts
            assert not (layer.route(x)[1] == n_experts - 1).any(), n_experts


def test_tied_rows_route_identically_in_a_layer():
    layer = SigmaMoE(8, 4, 4, 2).eval()
    with torch.no_grad():
        layer.expert_sel.copy_(torch.stack([torch.ones(8)] * 4))  # every expert scores the same
    _, expert = layer.route(torch.randn(10, 8))
    assert (expert == torch.tensor([0, 1])).all()


def test_saturated_sigmoid_scores_are_ranked_by_logit():
    # sigmoid(20) == sigmoid(30) == 1.0 in float32; the ranking must still prefer the larger logit.
    gate, expert = route(torch.tensor([[20.0, 30.0, -5.0]]), 1, "sigmoid")
    assert expert.item() == 1 and gate.item() == 1.0


def test_half_precision_keeps_float32_routing_and_rounds_once():
    layer = SigmaMoE(32, 8, 16, 2).eval()
    x = torch.randn(50, 32)
    half = layer.to(torch.bfloat16)
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = dense_masked(half, x.bfloat16().float())
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def test_init_statistics():
    s = 0.5
    layer = SigmaMoE(256, 64, 32, 4, weight_std_scale=s)
    assert math.isclose(layer.keys.std().item(), s / math.sqrt(256), rel_tol=0.02)
    assert math.isclose(layer.values.std().item(), s / math.sqrt(64 * 32), rel_tol=0.02)
    assert math.isclose(layer.expert_sel.std().item(), s / math.sqrt(256), rel_tol=0.03)
    norms = layer.expert_sel.norm(dim=1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-5)


def test_entropy_regularizer_is_minus_entropy_of_the_mean_routing():
    layer = SigmaMoE(8, 4, 4, 2).train()
    x = torch.randn(30, 8)
    layer(x)
    p = torch.softmax(x @ layer.expert_sel.detach().T, -1).mean(0)
    assert torch.allclose(layer.entropy_regularizer(), (p * p.log()).sum(), atol=1e-6)
    uniform = entropy_regularizer(torch.zeros(5, 4))
    assert torch.allclose(uniform, torch.tensor(-math.log(4.0)))


def test_entropy_regularizer_needs_a_training_forward():
    with pytest.raises(MoexportError, match="training mode"):
        SigmaMoE(8, 4, 4, 2).entropy_regularizer()


def test_expert_dropout_only_in_training():
    layer = SigmaMoE(16, 8, 4, 2, expert_dropout=0.9)
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))


def test_router_forward_keeps_logits_and_drops_experts_in_training_only():
    """Every forward path routes through `router_forward`, so its training-only parts live there."""
    layer = SigmaMoE(16, 8, 4, 2, expert_dropout=0.5)
    x = torch.randn(64, 16)
    logits, drop = layer.eval().router_forward(x)
    assert drop is None and layer._last_logits is None and torch.equal(logits, layer.router_logits(x))
    logits, drop = layer.train().router_forward(x)
    assert layer._last_logits is logits and drop.shape == (64, 8) and 0 < drop.float().mean() < 1
    layer.expert_dropout = 0.0
    assert layer.router_forward(x)[1] is None


def test_gradients_reach_every_parameter():
    layer = SigmaMoE(16, 4, 8, 2, bias=True).train()
    layer(torch.randn(20, 16)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=9), dict(selection="max"), dict(activation="tanh")])
def test_bad_arguments_name_the_option(bad):
    args = dict(d_model=8, n_experts=8, expert_size=4, k=2) | bad
    with pytest.raises(MoexportError, match=next(iter(bad))):
        SigmaMoE(**args)


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(MoexportError, match="d_model=8"):
        SigmaMoE(8, 4, 4, 2)(torch.randn(3, 9))


def test_config_rebuilds_the_same_module():
    from moexport.models import build

    layer = SigmaMoE(8, 4, 4, 2, selection="softmax", bias=True, v_dim=6)
    again = build(layer.config())
    assert again.config() == layer.config()
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in layer.named_parameters()}


def test_router_logits_stay_float32_under_autocast():
    layer = SigmaMoE(16, 4, 8, 2).train()
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x)
        layer(x)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, x @ layer.expert_sel.detach().T, rtol=1e-6, atol=1e-6)
    assert layer._last_logits.dtype == torch.float32
