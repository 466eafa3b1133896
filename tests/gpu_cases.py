"""What the GPU tests of both op hosts (the ONNX Runtime op library, the TensorRT plugins) share: the
layer shape and sweep, layers, the routing check, and each op's inputs with their reference."""
import numpy as np
import torch

from moexport.core import tolerance_for
from moexport.models import SigmaMoE, route
from moexport.opset import cvmm, topk_dispatch

TOKENS = (1, 16, 256, 4096, 32768)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
D, E, G, K = 256, 16, 64, 4
ARCHS = (90,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_layer(dtype, bias, seed=0):
    torch.manual_seed(seed)
    layer = SigmaMoE(D, E, G, K, bias=bias).eval()
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
            layer.o_bias.normal_()
    return layer.to("cuda", dtype)


def assert_routing_agrees(layer, x, experts):
    """Identical top-k sets for every token, except where the reference's k-th and (k+1)-th logits are
    within float32 rounding of each other (the kernels sum the router product in another order).
    Returns the tokens whose sets are identical."""
    with torch.no_grad():
        logits = layer.router_logits(x.reshape(-1, D))
    _, want = route(logits, K)
    top = torch.topk(logits, K + 1, dim=-1).values
    near = (top[:, K - 1] - top[:, K]) <= 1e-5 * top[:, K - 1].abs().clamp(min=1)
    same = (torch.sort(want, -1).values == torch.sort(experts.reshape(-1, K), -1).values).all(-1)
    assert bool((same | near).all()), f"{int((~same & ~near).sum())} tokens routed differently"
    return same


def assert_layer_output(layer, x, y, experts):
    """y matches the layer's PyTorch reference (per dtype tolerance) on every token routed alike."""
    same = assert_routing_agrees(layer, x, experts)
    with torch.no_grad():
        want = layer.reference_forward(x)
    tol = tolerance_for(x.dtype)
    rows = same.reshape(x.shape[:-1])
    torch.testing.assert_close(y[rows].float(), want[rows].float(), rtol=tol.rtol, atol=tol.atol)


def tied_logits(n_tokens):
    """Router logits from seven values: ties everywhere, at the top-k boundary too."""
    return torch.randint(-3, 4, (n_tokens, E), device="cuda").float()


def cvmm_case(dtype, reduce, n_tokens):
    """A CVMM call (the first of a layer's two for reduce=0, the second for reduce=1) on the GPU.

    Returns (feeds by op input name, as cuda tensors; the output's shape; the op set's reference).
    """
    rng = np.random.default_rng(n_tokens)
    d_in, d_out = (D, G) if not reduce else (G, D)
    weight = torch.from_numpy((rng.standard_normal((E, d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)).to(dtype)
    gate, _, sorted_expert, sorted_slot = topk_dispatch(rng.standard_normal((n_tokens, E)).astype(np.float32), K)
    x = rng.standard_normal((n_tokens * K if reduce else n_tokens, d_in)).astype(np.float32)
    src = (sorted_slot if reduce else sorted_slot // K).astype(np.int32)
    slot_gate = gate.reshape(-1)[sorted_slot] if reduce else None
    feeds = {"x": torch.from_numpy(x).to("cuda", dtype), "sorted_expert": torch.from_numpy(sorted_expert).cuda(),
             "src_row": torch.from_numpy(src).cuda(), "dst_row": torch.from_numpy(sorted_slot).cuda(),
             "W": weight.cuda()}
    if reduce:
        feeds["gate"] = torch.from_numpy(slot_gate).cuda()
    want = cvmm(feeds["x"].float().cpu().numpy(), sorted_expert, src, sorted_slot, weight.float().numpy(), slot_gate,
                reduce, K)
    return feeds, (n_tokens if reduce else n_tokens * K, d_out), want


def assert_cvmm_output(dtype, out, want):
    tol = tolerance_for(dtype)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=tol.rtol, atol=tol.atol * np.abs(want).max())


def assert_topk_dispatch_outputs(logits, k, selection, outputs):
    """gate, expert, sorted_expert, sorted_slot as the op set's reference gives them for `logits`."""
    want = topk_dispatch(logits.cpu().numpy(), k, selection)
    np.testing.assert_allclose(outputs[0].cpu().numpy(), want[0], rtol=1e-6, atol=1e-7)
    for got, expected in zip(outputs[1:], want[1:]):
        np.testing.assert_array_equal(got.cpu().numpy(), expected)
