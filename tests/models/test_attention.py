import math

import pytest
import torch

from moexport import MoexportError
from moexport.models import RelativeAttention, build
from moexport.models.attention import sinusoid

from attention_reference import randomised, reference_attention, sinusoid_by_hand


def test_sinusoid_matches_the_formula():
    positions = torch.tensor([-7.0, -1.0, 0.0, 3.0])
    expected = torch.stack([sinusoid_by_hand(p.item(), 10) for p in positions])
    assert torch.allclose(sinusoid(positions, 10).double(), expected, atol=1e-6)


@pytest.mark.parametrize("heads, head_dim", [(2, 8), (3, 5)])  # 3 × 5 ≠ d/H, as the paper's 10 × 41
def test_attention_matches_the_appendix_formula(heads, head_dim):
    attn = randomised(RelativeAttention(16, heads, head_dim))
    x = torch.randn(2, 7, 16)
    assert torch.allclose(attn(x, x).double(), reference_attention(attn, x, 7), atol=1e-5)


def test_attention_with_memory_matches_the_appendix_formula():
    attn = randomised(RelativeAttention(16, 2, 8))
    keys = torch.randn(2, 9, 16)  # 5 memory tokens, then 4 queries
    assert torch.allclose(attn(keys[:, 5:], keys).double(), reference_attention(attn, keys, 4), atol=1e-5)


def test_attention_is_causal():
    attn = randomised(RelativeAttention(16, 2, 8))
    x = torch.randn(1, 6, 16)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 16)
    assert torch.allclose(attn(x, x)[:, :4], attn(changed, changed)[:, :4], atol=1e-6)


def test_parameters_have_the_paper_names_and_shapes():
    attn = RelativeAttention(412, 10, 41)
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    assert shapes == {
        "scale": (1,), "s_bias": (1,), "global_content_bias": (10, 41), "global_pos_bias": (10, 41),
        "pos_to_pq.weight": (410, 412), "data_to_kv.weight": (820, 412), "data_to_q.weight": (410, 412),
        "multi_head_merge.weight": (412, 410),
    }
    assert math.isclose(attn.scale.item(), 1 / math.sqrt(41), rel_tol=1e-6)


def test_init_std_is_the_prenorm_recipe():
    attn = RelativeAttention(256, 4, weight_std_scale=0.5)
    assert math.isclose(attn.data_to_q.weight.std().item(), 0.5 / math.sqrt(256), rel_tol=1e-4)
    assert math.isclose(attn.multi_head_merge.weight.std().item(), 0.5 / math.sqrt(256), rel_tol=1e-4)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(MoexportError, match="n_heads=3"):
        RelativeAttention(16, 3)
    with pytest.raises(MoexportError, match="d_model=15"):
        RelativeAttention(15, 3, 5)


def test_config_rebuilds_the_same_module():
    attn = RelativeAttention(16, 3, 5)
    assert build(attn.config()).config() == attn.config() == {
        "kind": "relative_attention", "d_model": 16, "n_heads": 3, "head_dim": 5, "weight_std_scale": 1.0}
