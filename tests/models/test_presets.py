import pytest
import torch

from moexport import MoexportError
from moexport.models import PRESETS, from_preset, preset_config

# Parameter counts of the paper's models (paper_code.md §4.3; the paper's code gives 262,461,284 for
# wt103_big). The test pins every preset to ±0.1% of them.
PAPER_PARAMETERS = {
    ("wt103_small", "sigma_moe"): 47.26e6, ("wt103_small", "dense"): 47.26e6,
    ("wt103_238m", "sigma_moe"): 237.0e6, ("wt103_238m", "dense"): 237.7e6,
    ("wt103_big", "sigma_moe"): 262_461_284, ("wt103_big", "dense"): 262.48e6,
    ("enwik8", "sigma_moe"): 41.24e6, ("enwik8", "dense"): 41.23e6,
}


def count(name: str, ffn: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return sum(p.numel() for p in from_preset(name, ffn).parameters())


@pytest.mark.parametrize("name, ffn", list(PAPER_PARAMETERS))
def test_parameter_counts_match_the_paper(name, ffn):
    expected = PAPER_PARAMETERS[(name, ffn)]
    assert abs(count(name, ffn) - expected) <= 1e-3 * expected, count(name, ffn)


def test_wt103_big_has_exactly_the_papers_parameter_count():
    assert count("wt103_big", "sigma_moe") == 262_461_284


@pytest.mark.parametrize("name", ["wt103_small", "wt103_big", "enwik8"])
@pytest.mark.parametrize("ffn", ["pkm", "topk"])
def test_baselines_are_parameter_matched(name, ffn):
    # The paper matches the FFN parameters of every baseline to within ~2% of the σ-MoE model's.
    assert abs(count(name, ffn) - count(name, "sigma_moe")) <= 0.02 * count(name, "sigma_moe")


def test_preset_shapes_are_the_papers():
    config = preset_config("wt103_small")
    assert (config["d_model"], config["n_layers"], config["n_heads"], config["head_dim"], config["vocab_size"]) \
        == (412, 16, 10, 41, 8000)
    assert {k: config["ffn"][k] for k in ("kind", "n_experts", "expert_size", "k")} \
        == {"kind": "sigma_moe", "n_experts": 16, "expert_size": 128, "k": 4}
    assert preset_config("wt103_big", "pkm")["ffn"]["n_keys"] == 89
    assert preset_config("enwik8", "topk")["ffn"]["k"] == 128
    assert preset_config("enwik8", "dense")["ffn"]["d_ff"] == 2053


def test_flops_ratio_is_the_papers():
    # paper_code.md §5.1: σ-MoE FF MACs per token / dense = 25.3% (small), 12.8% (big), 3.5% (238M).
    for name, ratio in [("wt103_small", 0.253), ("wt103_big", 0.128), ("wt103_238m", 0.035)]:
        with torch.device("meta"):
            flops = from_preset(name).layers[0].ffn.ffn_flops_per_token()
        assert abs(flops["active"] / flops["dense"] - ratio) < 0.002, name


def test_overrides_reach_the_lm_and_the_ffn():
    config = preset_config("wt103_small", "topk", n_layers=2, k=64, dropout=0.0)
    assert config["n_layers"] == 2 and config["ffn"]["k"] == 64 and config["ffn"]["dropout"] == 0.0
    assert config["ffn"]["weight_std_scale"] == 1.0  # sqrt(2 / n_layers) of the overridden depth


def test_tiny_preset_runs():
    model = from_preset("tiny").eval()
    assert model(torch.randint(0, 256, (2, 5))).shape == (2, 5, 256)


@pytest.mark.parametrize("name, ffn, match", [("wt103_huge", None, "wt103_small"), ("enwik8", "moe", "sigma_moe"),
                                              ("wt103_238m", "pkm", "not trained")])
def test_bad_choices_list_the_valid_ones(name, ffn, match):
    with pytest.raises(MoexportError, match=match):
        preset_config(name, ffn)


def test_unknown_override_names_the_module():
    with pytest.raises(MoexportError, match="sigma_moe"):
        from_preset("tiny", n_kees=3)


def test_every_preset_is_listed():
    assert set(PRESETS) == {"wt103_small", "wt103_238m", "wt103_big", "enwik8", "tiny"}
