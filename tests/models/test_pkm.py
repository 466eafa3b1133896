import math

import pytest
import torch

from moexport import MoexportError
from moexport.models import PKM, build


def sub_scores(layer: PKM, x: torch.Tensor):
    half = layer.d_model // 2
    k1, k2 = (t.detach().double() for t in layer.keys)
    x = x.double()
    return [(x[:, :half] @ k1[t].T, x[:, half:] @ k2[t].T) for t in range(layer.heads)]


def appendix_dense(layer: PKM, x: torch.Tensor) -> torch.Tensor:
    """y = act(Σ_t (s1_t[..., :, None] + s2_t[..., None, :]).flatten(-2)) @ values.weight, in float64."""
    total = sum((s1[:, :, None] + s2[:, None, :]).flatten(1) for s1, s2 in sub_scores(layer, x))
    act = torch.relu(total) if layer.activation == "relu" else torch.softmax(total, -1)
    return act @ layer.values.weight.detach().double()


def brute_force_knn(layer: PKM, x: torch.Tensor) -> torch.Tensor:
    """Per head the exact top-knn of all n_keys² slot scores, act on the heads·knn scores, weighted sum."""
    picked_scores, picked_slots = [], []
    for s1, s2 in sub_scores(layer, x):
        all_slots = (s1[:, :, None] + s2[:, None, :]).flatten(1)
        top = all_slots.topk(layer.knn, dim=-1)
        picked_scores.append(top.values)
        picked_slots.append(top.indices)
    scores, slots = torch.cat(picked_scores, 1), torch.cat(picked_slots, 1)
    weights = torch.relu(scores) if layer.activation == "relu" else torch.softmax(scores, -1)
    return (weights[:, :, None] * layer.values.weight.detach().double()[slots]).sum(1)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_dense_path_matches_the_appendix_formula(activation):
    layer = PKM(12, 5, heads=3, knn=8, activation=activation)
    assert layer.uses_dense_path
    x = torch.randn(4, 6, 12)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.allclose(y.double(), appendix_dense(layer, x.reshape(-1, 12)).reshape(x.shape), atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_knn_path_equals_brute_force_top_knn(activation):
    layer = PKM(12, 6, heads=3, knn=4, activation=activation)
    assert not layer.uses_dense_path
    x = torch.randn(20, 12)
    assert torch.allclose(layer(x).double(), brute_force_knn(layer, x), atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_dense_path_equals_knn_path_when_every_slot_is_selected(activation):
    # One head and knn ≥ n_keys² (so also ≥ n_keys): the knn path selects every slot.
    layer = PKM(10, 4, heads=1, knn=16, activation=activation)
    x = torch.randn(30, 10)
    assert torch.allclose(layer.forward_dense(x), layer.forward_knn(x), atol=1e-6)


def test_paths_differ_with_several_heads_as_in_the_paper():
    layer = PKM(10, 4, heads=3, knn=16)
    x = torch.randn(30, 10)
    assert not torch.allclose(layer.forward_dense(x), layer.forward_knn(x), atol=1e-3)


def test_parameters_have_the_paper_names_and_shapes():
    layer = PKM(412, 62)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "values.weight": (3844, 412), "keys.0": (4, 62, 206), "keys.1": (4, 62, 206)}


def test_init_statistics():
    layer = PKM(256, 40, weight_std_scale=0.5)
    assert math.isclose(layer.keys[0].std().item(), 0.5 / 16, rel_tol=0.03)
    assert math.isclose(layer.values.weight.std().item(), 0.5 / 40, rel_tol=0.03)
    layer = PKM(256, 40, weight_std_scale=0.5, value_init="d_model")
    assert math.isclose(layer.values.weight.std().item(), 0.5 / 16, rel_tol=0.03)


def test_gradients_reach_every_parameter_on_both_paths():
    for knn in (0, 3):
        layer = PKM(8, 5, heads=2, knn=knn).train()
        layer(torch.randn(10, 8)).square().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (knn, name)


def test_flops_count_the_path_taken():
    dense, knn = PKM(412, 62).ffn_flops_per_token(), PKM(412, 200, knn=32).ffn_flops_per_token()
    assert dense["active"] == dense["dense"] == 2 * (4 * 62 * 412 + 62 ** 2 * 412)
    assert knn["active"] == 2 * (4 * 200 * 412 + 4 * 32 * 412)


@pytest.mark.parametrize("bad, match", [(dict(d_model=7), "d_model=7"), (dict(activation="gelu"), "activation"),
                                        (dict(value_init="xavier"), "value_init")])
def test_bad_arguments_name_the_option(bad, match):
    with pytest.raises(MoexportError, match=match):
        PKM(**(dict(d_model=8, n_keys=4) | bad))


def test_config_rebuilds_the_same_module():
    layer = PKM(8, 4, heads=2, knn=3, activation="softmax")
    again = build(layer.config())
    assert again.config() == layer.config()
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in layer.named_parameters()}
