"""The plan variants the ONNX op set needs (the compiled op libraries run exactly these), on the kernels:
a float32 router weight beside half-precision tokens, the int64 expert output, CVMM's float32 output."""
import numpy as np
import pytest
import torch

from moexport.core import tolerance_for
from moexport.kernels.host import run_plan
from moexport.kernels.plan import MoEShape, cvmm_plan, sigma_moe_plan
from moexport.models import SigmaMoE, route
from moexport.opset import cvmm, topk_dispatch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n_tokens", [5, 70], ids=["gather", "dispatched"])
def test_the_sigma_moe_op_plan_routes_in_float32_and_outputs_its_experts(device, dtype, n_tokens):
    torch.manual_seed(3)
    layer = SigmaMoE(24, 6, 8, 2, bias=True, v_dim=20).eval()
    with torch.no_grad():
        layer.bias.normal_()
        layer.o_bias.normal_()
    layer = layer.to(device, dtype)
    shape = MoEShape(24, 6, 8, 20, 2, str(dtype)[6:], bias=True, router_dtype="float32")
    x = torch.randn(n_tokens, 24, device=device).to(dtype)
    out = run_plan(sigma_moe_plan(shape, n_tokens, expert_output=True),
                   {"x": x, "expert_sel": layer.expert_sel.float(), "keys": layer.keys, "values": layer.values,
                    "bias": layer.bias, "o_bias": layer.o_bias})
    with torch.no_grad():
        want_y = layer.reference_forward(x)
        _, want_experts = route(layer.router_logits(x), 2)
    assert out["experts"].dtype == torch.int64
    torch.testing.assert_close(out["experts"], want_experts)
    tol = tolerance_for(dtype)
    torch.testing.assert_close(out["y"].double(), want_y.double(), rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_tokens", [5, 70], ids=["gather", "dispatched"])
def test_a_float32_router_weight_the_dtype_cannot_hold_routes_by_its_float32_value(device, dtype, n_tokens):
    """Expert 1's router row is expert 0's times 1 + 2^-13, which float16 and bfloat16 round back to
    expert 0's: with positive tokens expert 1's logit is the larger by ~2^-13 of it, so every token must
    choose it (the half-precision part of the weight alone would tie them, and ties go to expert 0)."""
    torch.manual_seed(5)
    d = 40
    row = ((torch.rand(d) + 0.5) * d ** -0.5).to(dtype).float()
    sel = torch.stack([row, row * (1 + 2 ** -13)] + [-row] * 2).to(device)
    assert torch.equal(sel[1].to(dtype), sel[0].to(dtype)) and not torch.equal(sel[1], sel[0])
    x = torch.rand(n_tokens, d, device=device).add(0.1).to(dtype)
    keys, values = (torch.randn(4, d, 8, device=device) / 6).to(dtype), (torch.randn(4, 8, d, device=device) / 3).to(dtype)
    shape = MoEShape(d, 4, 8, d, 1, str(dtype)[6:], router_dtype="float32")
    out = run_plan(sigma_moe_plan(shape, n_tokens, expert_output=True),
                   {"x": x, "expert_sel": sel, "keys": keys, "values": values})
    assert out["experts"].flatten().tolist() == [1] * n_tokens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduce", [False, True])
def test_the_cvmm_op_plan_writes_float32(device, dtype, reduce):
    rng = np.random.default_rng(1)
    n_tokens, E, k, d_in, d_out = 40, 5, 2, 16, 12
    _, _, sorted_expert, sorted_slot = topk_dispatch(rng.standard_normal((n_tokens, E)).astype(np.float32), k)
    x = torch.from_numpy(rng.standard_normal((n_tokens * k if reduce else n_tokens, d_in))).to(device, dtype)
    w = torch.from_numpy(rng.standard_normal((E, d_in, d_out)) / 4).to(device, dtype)
    gate = torch.from_numpy(rng.random(n_tokens * k).astype(np.float32)).to(device) if reduce else None
    src = sorted_slot if reduce else sorted_slot // k
    tensors = {"x": x, "sorted_expert": torch.from_numpy(sorted_expert).to(device),
               "src_row": torch.from_numpy(src.astype(np.int32)).to(device),
               "dst_row": torch.from_numpy(sorted_slot).to(device), "w": w, "gate": gate}
    plan = cvmm_plan(E, d_in, d_out, str(dtype)[6:], reduce=reduce, k=k, gate=reduce, n_rows=n_tokens * k,
                     out_dtype="float32")
    out = run_plan(plan, tensors)["out"]
    want = cvmm(x.float().cpu().numpy(), sorted_expert, src.astype(np.int32), sorted_slot, w.float().cpu().numpy(),
                None if gate is None else gate.cpu().numpy(), int(reduce), k)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-4, atol=1e-4)
