"""An independent, loop-by-loop implementation of the paper's relative attention (paper_code.md, appendix)."""
import math

import torch

from moexport.models import RelativeAttention


def sinusoid_by_hand(position: float, d_model: int) -> torch.Tensor:
    """pe[2i] = sin(p·w_i), pe[2i+1] = cos(p·w_i), w_i = exp(−2i·ln(10000)/d), in float64."""
    pe = torch.zeros(d_model, dtype=torch.float64)
    for i in range(d_model // 2):
        w = math.exp(-2 * i * math.log(10000.0) / d_model)
        pe[2 * i], pe[2 * i + 1] = math.sin(position * w), math.cos(position * w)
    return pe


def reference_attention(attn: RelativeAttention, keys_in: torch.Tensor, n_queries: int) -> torch.Tensor:
    """The appendix formula with an explicit gather of kpos[j − i − M + (L−1)], in float64.

    The position table spans every relative position −(L−1) … T−1, as the paper's code builds it.
    """
    w = {name: p.detach().double() for name, p in attn.named_parameters()}
    batch, n_keys, d = keys_in.shape
    memory = n_keys - n_queries
    heads, dh = attn.n_heads, attn.head_dim
    x = keys_in.double()
    q = (x[:, memory:] @ w["data_to_q.weight"].T).view(batch, n_queries, heads, dh)
    kv = (x @ w["data_to_kv.weight"].T).view(batch, n_keys, heads, 2, dh)
    k, v = kv[..., 0, :], kv[..., 1, :]
    positions = range(-(n_keys - 1), n_queries)
    table = torch.stack([sinusoid_by_hand(p, d) for p in positions])
    kpos = (table @ w["pos_to_pq.weight"].T).view(len(positions), heads, dh)
    scores = torch.empty(batch, heads, n_queries, n_keys, dtype=torch.float64)
    for i in range(n_queries):
        for j in range(n_keys):
            content = ((q[:, i] + w["global_content_bias"]) * k[:, j]).sum(-1)
            position = ((q[:, i] + w["global_pos_bias"]) * kpos[j - i - memory + n_keys - 1]).sum(-1)
            score = (content + position) * w["scale"]
            scores[:, :, i, j] = score if j <= i + memory else float("-inf")
    att = torch.softmax(scores, -1)
    out = torch.einsum("bhij,bjhc->bihc", att, v).reshape(batch, n_queries, heads * dh)
    return out @ w["multi_head_merge.weight"].T


def randomised(attn: RelativeAttention) -> RelativeAttention:
    with torch.no_grad():
        attn.global_content_bias.normal_()
        attn.global_pos_bias.normal_()
        attn.scale.fill_(0.37)
    return attn
