"""The kernel benchmark's host-side bookkeeping (the timings themselves need the GPU)."""
import pytest
import torch

from moexport.bench.kernels import Layer, agreement, configs_from
from moexport.kernels.configs import ConfigTable, shipped


def test_agreement_counts_flipped_tokens_and_measures_the_others():
    layer = Layer(16, 4, 8, 2, device="cpu", dtype=torch.float32)
    x, ref = torch.randn(5, 16), torch.randn(5, 16)
    y = ref.clone()
    y[1] += 0.001 * ref[1]  # routed alike, a small error
    y[3] = -ref[3]  # routed differently: the whole row is off
    out = agreement(layer, x, y, ref)
    assert out["flips"] == 1 and "flip_margin" in out
    assert out["max_err"] == pytest.approx(0.001 * ref[1].abs().max().item() / ref.abs().max().item(), rel=1e-4)


def test_agreement_of_a_cell_whose_every_token_flipped_is_all_flips():
    """T = 1 with its one token a near-tie: no token routed alike, so no error to take the max of."""
    layer = Layer(16, 4, 8, 2, device="cpu", dtype=torch.float32)
    x, ref = torch.randn(1, 16), torch.randn(1, 16)
    out = agreement(layer, x, -ref, ref)
    assert out["flips"] == 1 and out["max_err"] == 0.0


def test_rows_needed_counts_the_selected_experts_and_their_units_some_token_activates():
    """Unit 0 of every expert sees negative pre-activations only (ReLU zeros: its values are never
    needed); every other unit is positive for every token."""
    layer = Layer(16, 4, 8, 2, device="cpu", dtype=torch.float32)
    layer.keys = torch.rand(4, 16, 8) + 0.1
    layer.keys[:, :, 0] *= -1
    x = torch.rand(3, 16) + 0.1
    used = len(layer.route(x)[1].unique())
    assert layer.rows_needed(x) == (used, used * 7)


def test_a_configs_file_takes_the_place_of_the_shipped_configs_of_its_keys(tmp_path):
    """--configs FILE (e.g. a sweep's picks) runs the benchmark as it would run once they are shipped."""
    first, second = list(shipped())[:2]
    path = tmp_path / "picks.json"
    path.write_text(ConfigTable({first: {"mode": "split", "finish": "pass"}}).to_json())
    configs = configs_from(str(path))
    assert configs[first] == {"mode": "split", "finish": "pass"} and configs[second] == shipped()[second]
    assert list(configs) == list(shipped()) and configs_from(None) is None
