import pytest
import torch

from moexport import MoexportError
from moexport.core import tolerance_for
from moexport.kernels import cvmm, topk_dispatch


def loop_cvmm(x, sorted_expert, src_row, dst_row, w, gate, reduce, k):
    """Row-by-row float64 reference of the CVMM op."""
    S = sorted_expert.shape[0]
    out = torch.zeros(S // k if reduce else S, w.shape[-1], dtype=torch.float64)
    for s in range(S):
        row = x[src_row[s]].double() @ w[sorted_expert[s]].double()
        if gate is not None:
            row = row * gate[s].double()
        if reduce:
            out[dst_row[s] // k] += row
        else:
            out[dst_row[s]] = row
    return out


def plan(n_tokens, n_experts, k, device="cpu"):
    _, _, sorted_expert, sorted_slot = topk_dispatch(torch.randn(n_tokens, n_experts, device=device), k)
    return sorted_expert, sorted_slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", [False, True])
def test_cvmm_matches_a_row_loop(dtype, reduce, device):
    n_tokens, E, k, d_in, d_out = 29, 5, 2, 24, 40
    sorted_expert, sorted_slot = plan(n_tokens, E, k, device)
    x = torch.randn(n_tokens if not reduce else n_tokens * k, d_in).to(device, dtype)
    w = torch.randn(E, d_in, d_out).to(device, dtype)
    gate = torch.rand(n_tokens * k, device=device)
    # up projection: token rows in, slot rows out; down projection: slot rows in, token rows out
    src = sorted_slot // k if not reduce else sorted_slot
    out = cvmm(x, sorted_expert, src, sorted_slot, w, gate, reduce=reduce, k=k).cpu()
    ref = loop_cvmm(*(t.cpu() for t in (x, sorted_expert, src, sorted_slot, w, gate)), reduce, k)
    tol = tolerance_for(dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=tol.rtol, atol=tol.atol, msg=f"out {dtype} reduce={reduce}")


@pytest.mark.parametrize("n_experts", [16, 32])
def test_cvmm_reaches_the_last_expert_of_a_power_of_two_count(n_experts, device):
    """The op derives the per-expert row offsets from sorted_expert; the last expert's end (offsets[E])
    must be written also when E is a tile length (a power of two of 16 and up, as the paper's shapes)."""
    n_tokens, k = 21, 2
    logits = torch.randn(n_tokens, n_experts)
    logits[:, -1] += 100.0  # every token routes one slot to the last expert
    _, _, sorted_expert, sorted_slot = topk_dispatch(logits.to(device), k)
    x = torch.randn(n_tokens, 16, device=device)
    w = torch.randn(n_experts, 16, 24, device=device)
    out = cvmm(x, sorted_expert, sorted_slot // k, sorted_slot, w).cpu()
    ref = loop_cvmm(*(t.cpu() for t in (x, sorted_expert, sorted_slot // k, sorted_slot, w)), None, False, k)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"out, E={n_experts}: {m}")


def test_cvmm_reads_a_transposed_weight_without_copying(device):
    sorted_expert, sorted_slot = plan(17, 4, 1, device)
    x = torch.randn(17, 24, device=device)
    w_t = torch.randn(4, 20, 24, device=device).transpose(1, 2)  # [E, d_in, d_out] view, swapped strides
    out = cvmm(x, sorted_expert, sorted_slot, sorted_slot, w_t).cpu()
    ref = loop_cvmm(*(t.cpu() for t in (x, sorted_expert, sorted_slot, sorted_slot, w_t)), None, False, 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_cvmm_shape_errors_name_the_tensors(device):
    sorted_expert, sorted_slot = plan(8, 4, 2, device)
    x = torch.randn(8, 16, device=device)
    with pytest.raises(MoexportError, match="src_row"):
        cvmm(x, sorted_expert, sorted_slot[:-1], sorted_slot, torch.randn(4, 16, 8, device=device))
    with pytest.raises(MoexportError, match="do not fit"):
        cvmm(x, sorted_expert, sorted_slot, sorted_slot, torch.randn(4, 12, 8, device=device))


def test_the_public_cvmm_stays_the_op_after_its_kernels_are_loaded(device):
    """`moexport.kernels.cvmm` is the op, also once its Triton module is imported (a kernel module of the
    same name replaced the package attribute with itself after the first call: found by tools/sweep.py)."""
    import moexport.kernels as kernels
    from moexport.kernels import ops

    sorted_expert, sorted_slot = plan(6, 3, 1, device)
    x, w = torch.randn(6, 8, device=device), torch.randn(3, 8, 5, device=device)
    for _ in range(2):  # the first call imports the kernels
        assert kernels.cvmm is ops.cvmm
        assert kernels.cvmm(x, sorted_expert, sorted_slot, sorted_slot, w).shape == (6, 5)
