import math

import pytest
import torch

from moexport import MoexportError
from moexport.models import DenseMLP, TopKMLP, build


def paper_topk(layer: TopKMLP, x: torch.Tensor) -> torch.Tensor:
    """The paper's TopkTransformer: zero where −rank > kthvalue(−rank, k), in float64."""
    w1, b1 = layer.linear1.weight.detach().double(), layer.linear1.bias.detach().double()
    w2, b2 = layer.linear2.weight.detach().double(), layer.linear2.bias.detach().double()
    middle = torch.relu(x.double() @ w1.T + b1)
    vals = -middle * w2.norm(dim=0) if layer.use_norm else -middle
    mask = vals > vals.kthvalue(layer.k, dim=-1, keepdim=True).values
    return middle.masked_fill(mask, 0) @ w2.T + b2


def test_dense_mlp_is_the_two_layer_formula():
    layer = DenseMLP(12, 30)
    x = torch.randn(5, 12)
    w1, b1 = layer.linear1.weight.detach(), layer.linear1.bias.detach()
    w2, b2 = layer.linear2.weight.detach(), layer.linear2.bias.detach()
    assert torch.allclose(layer(x), torch.relu(x @ w1.T + b1) @ w2.T + b2, atol=1e-6)


@pytest.mark.parametrize("use_norm", [False, True])
def test_topk_matches_the_papers_kthvalue_mask(use_norm):
    layer = TopKMLP(12, 40, k=7, use_norm=use_norm)
    with torch.no_grad():
        layer.linear1.bias.normal_()
    x = torch.randn(3, 9, 12)
    assert torch.allclose(layer(x).double(), paper_topk(layer, x), atol=1e-6)


def test_topk_keeps_ties_at_the_threshold():
    layer = TopKMLP(4, 5, k=2)
    with torch.no_grad():
        layer.linear1.weight.zero_()
        layer.linear1.bias.copy_(torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0]))
        layer.linear2.weight.copy_(torch.arange(5.0).expand(4, 5))  # every output is Σ_j j·h_j
        layer.linear2.bias.zero_()
    y = layer(torch.randn(1, 4))
    assert torch.allclose(y, torch.full((1, 4), 0 * 3.0 + 1 * 2.0 + 2 * 2.0))  # 3, 2 and 2 kept


def test_topk_with_k_equal_to_width_is_the_dense_mlp():
    layer = TopKMLP(8, 16, k=16)
    x = torch.randn(6, 8)
    assert torch.equal(layer(x), DenseMLP.forward(layer, x))


def test_parameters_have_the_paper_names():
    assert {n: tuple(p.shape) for n, p in TopKMLP(412, 2053, 128).named_parameters()} == {
        "linear1.weight": (2053, 412), "linear1.bias": (2053,),
        "linear2.weight": (412, 2053), "linear2.bias": (412,)}


def test_init_std_is_the_prenorm_recipe():
    layer = DenseMLP(256, 1024, weight_std_scale=0.5)
    assert math.isclose(layer.linear1.weight.std().item(), 0.5 / 16, rel_tol=1e-4)
    assert math.isclose(layer.linear2.weight.std().item(), 0.5 / 32, rel_tol=1e-4)
    assert layer.linear1.bias.abs().sum() == 0


def test_flops():
    assert DenseMLP(412, 2053).ffn_flops_per_token() == {"active": 4 * 412 * 2053, "dense": 4 * 412 * 2053}
    assert TopKMLP(412, 2053, 128).ffn_flops_per_token() == {"active": 2 * (412 * 2053 + 128 * 412),
                                                             "dense": 4 * 412 * 2053}


def test_bad_k_names_the_option():
    with pytest.raises(MoexportError, match="k=17"):
        TopKMLP(8, 16, 17)


@pytest.mark.parametrize("layer", [DenseMLP(8, 16, activation="gelu", dropout=0.1),
                                   TopKMLP(8, 16, 3, use_norm=True)])
def test_config_rebuilds_the_same_module(layer):
    again = build(layer.config())
    assert type(again) is type(layer) and again.config() == layer.config()
