import math

import torch

from moexport.models.init import prenorm_init_, truncated_normal_


def test_truncated_normal_is_the_standard_normal_cut_at_two():
    values = truncated_normal_(torch.empty(200_000))
    assert values.abs().max() <= 2.0
    # Variance of N(0, 1) truncated to [-2, 2]: 1 - 2·φ(2)·2 / (Φ(2) - Φ(-2)).
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    assert math.isclose(values.std().item(), math.sqrt(1 - 4 * phi / mass), rel_tol=0.01)
    assert abs(values.mean().item()) < 0.01


def test_prenorm_init_leaves_meta_tensors_alone():
    with torch.device("meta"):
        linear = torch.nn.Linear(8, 4)
        prenorm_init_(linear, 0.5)
    assert linear.weight.is_meta
