"""The kernel benchmark's host-side bookkeeping (the timings themselves need the GPU)."""
import pytest
import torch

from moexport.bench.kernels import _agreement, _Layer


def test_agreement_counts_flipped_tokens_and_measures_the_others():
    layer = _Layer(16, 4, 8, 2, device="cpu", dtype=torch.float32)
    x, ref = torch.randn(5, 16), torch.randn(5, 16)
    y = ref.clone()
    y[1] += 0.001 * ref[1]  # routed alike, a small error
    y[3] = -ref[3]  # routed differently: the whole row is off
    out = _agreement(layer, x, y, ref)
    assert out["flips"] == 1 and "flip_margin" in out
    assert out["max_err"] == pytest.approx(0.001 * ref[1].abs().max().item() / ref.abs().max().item(), rel=1e-4)


def test_agreement_of_a_cell_whose_every_token_flipped_is_all_flips():
    """T = 1 with its one token a near-tie: no token routed alike, so no error to take the max of."""
    layer = _Layer(16, 4, 8, 2, device="cpu", dtype=torch.float32)
    x, ref = torch.randn(1, 16), torch.randn(1, 16)
    out = _agreement(layer, x, -ref, ref)
    assert out["flips"] == 1 and out["max_err"] == 0.0


def test_pick_bounds_the_error_and_gives_timing_noise_to_the_more_accurate_config():
    from moexport.bench.kernels import MAX_ERR, NOISE, pick

    fast_but_rough = {"config": "a", "ms": 1.0, "graph_ms": 1.0, "max_err": MAX_ERR * 1.5}
    fastest_ok = {"config": "b", "ms": 2.0, "graph_ms": 2.0, "max_err": MAX_ERR * 0.9}
    near = 2.0 * NOISE * 0.999
    within_noise = {"config": "c", "ms": near, "graph_ms": near, "max_err": MAX_ERR * 0.4}
    slower = {"config": "d", "ms": 2.5, "graph_ms": 2.5, "max_err": MAX_ERR * 0.1}
    assert pick([fast_but_rough, fastest_ok, within_noise, slower], 256)["config"] == "c"
    assert pick([fast_but_rough, fastest_ok, slower], 256)["config"] == "b"
    assert pick([fast_but_rough], 256) is None
    # up to 1024 tokens the GPU time decides (eager may be host-bound), beyond the eager time
    host_bound = {"config": "e", "ms": 9.0, "graph_ms": 1.5, "max_err": 0.0}
    assert pick([fastest_ok, host_bound], 256)["config"] == "e"
    assert pick([fastest_ok, host_bound], 4096)["config"] == "b"


def test_rows_needed_counts_the_selected_experts_and_their_units_some_token_activates():
    """Unit 0 of every expert sees negative pre-activations only (ReLU zeros: its values are never
    needed); every other unit is positive for every token."""
    layer = _Layer(16, 4, 8, 2, device="cpu", dtype=torch.float32)
    layer.keys = torch.rand(4, 16, 8) + 0.1
    layer.keys[:, :, 0] *= -1
    x = torch.rand(3, 16) + 0.1
    used = len(layer.route(x)[1].unique())
    assert layer.rows_needed(x) == (used, used * 7)
