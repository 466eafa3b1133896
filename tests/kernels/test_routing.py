import pytest
import torch

from moexport import MoexportError
from moexport.kernels import topk_dispatch
from moexport.models.routing import route


def stable_plan(expert: torch.Tensor):
    """Independent reference of the dispatch plan: a stable argsort of the slot-ordered experts."""
    flat = expert.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return flat[order], order


@pytest.mark.parametrize("selection", ["sigmoid", "softmax", "softmax_after_topk"])
@pytest.mark.parametrize("n_tokens, n_experts, k", [(1, 5, 2), (37, 6, 3), (130, 16, 4), (9, 4, 4)])
def test_topk_dispatch_follows_the_routing_rule(selection, n_tokens, n_experts, k, device):
    logits = torch.randn(n_tokens, n_experts)
    gate, expert, sorted_expert, sorted_slot = (t.cpu() for t in topk_dispatch(logits.to(device), k, selection))
    ref_gate, ref_expert = route(logits, k, selection)
    assert torch.equal(expert.long(), ref_expert), "expert"
    torch.testing.assert_close(gate, ref_gate, rtol=1e-6, atol=1e-7, msg="gate")
    ref_sorted_expert, ref_slot = stable_plan(ref_expert)
    assert torch.equal(sorted_expert.long(), ref_sorted_expert), "sorted_expert"
    assert torch.equal(sorted_slot.long(), ref_slot), "sorted_slot"


def test_ties_go_to_the_lower_expert_index(device):
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0], [3.0, -1.0, 3.0, 3.0, 0.0]])
    _, expert, _, _ = topk_dispatch(logits.to(device), 3)
    assert expert.tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 3]]


def test_nan_logits_rank_as_minus_infinity_and_never_give_an_invalid_expert(device):
    """An overflowing router (NaN logits) must still give k distinct valid experts per token: NaN
    ranks as -inf, ties to the lower index, in the interpreter (where max propagates NaN) as on the GPU."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, 1.0, nan, 0.5, -inf], [nan, nan, nan, nan, nan], [-inf, nan, 2.0, -inf, 1.0]])
    _, expert, sorted_expert, _ = topk_dispatch(logits.to(device), 3)
    assert expert.tolist() == [[1, 3, 0], [0, 1, 2], [2, 4, 0]]
    assert sorted(sorted_expert.tolist()) == sorted(expert.reshape(-1).tolist())


def test_saturated_sigmoid_scores_are_ranked_by_logit(device):
    gate, expert, _, _ = topk_dispatch(torch.tensor([[20.0, 30.0, -5.0]], device=device), 1)
    assert expert.item() == 1 and gate.item() == 1.0


def test_many_chunks_keep_the_sort_stable(device):
    # 300 tokens span several route chunks; few experts make long runs of equal keys.
    logits = torch.randn(300, 3)
    _, expert, sorted_expert, sorted_slot = (t.cpu() for t in topk_dispatch(logits.to(device), 2))
    ref_sorted_expert, ref_slot = stable_plan(expert.long())
    assert torch.equal(sorted_slot.long(), ref_slot) and torch.equal(sorted_expert.long(), ref_sorted_expert)


def test_bad_logits_get_one_clear_error():
    with pytest.raises(MoexportError, match="float32"):
        topk_dispatch(torch.randn(4, 5, dtype=torch.float64), 2)
    with pytest.raises(MoexportError, match="k=6"):
        topk_dispatch(torch.randn(4, 5), 6)
    with pytest.raises(MoexportError, match="selection"):
        topk_dispatch(torch.randn(4, 5), 2, "argmax")
