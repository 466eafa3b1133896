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
