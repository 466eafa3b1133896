"""The CUDA-graph replay path of eager inference calls: cache and skip rules here (CPU), replays on
the GPU against direct launches and the reference."""
import pytest
import torch

from moexport.kernels import graphs
from moexport.kernels.graphs import GraphCache, skip_reason


def test_cache_builds_on_the_second_sight_and_evicts_the_least_recently_used():
    built, evicted = [], []

    def build(name):
        return lambda: built.append(name) or name

    cache = GraphCache(2, evict=evicted.append)
    assert cache.get(("a",), build("a")) is None and not built  # first sight: run directly
    assert cache.get(("a",), build("a")) == "a" and built == ["a"]
    assert cache.get(("a",), build("a")) == "a" and built == ["a"]  # hit: nothing built again
    for key in ("b", "b", "a", "c", "c"):  # 'a' used after 'b': 'b' is the least recent when 'c' comes
        cache.get((key,), build(key))
    assert list(cache.entries) == [("a",), ("c",)] and evicted == ["b"]
    # an evicted key runs directly from then on: more keys in rotation than entries never thrash
    assert cache.get(("b",), build("b")) is None and cache.get(("b",), build("b")) is None
    assert built == ["a", "b", "c"]


def test_cache_forgets_keys_seen_once_beyond_its_table():
    cache = GraphCache(1)
    for i in range(10):
        cache.get((i,), lambda: i)
    assert len(cache.seen) == 4 and cache.get((0,), lambda: 0) is None  # key 0 was forgotten
    assert cache.get((9,), lambda: 9) == 9  # a recent one was not


def test_skip_reasons_name_the_cause():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    assert "bytes" in skip_reason(torch.empty(graphs.MAX_INPUT_BYTES // 4 + 1, 1), [w])
    assert skip_reason(torch.empty(graphs.MAX_INPUT_BYTES // 4 + 1, 1), [w], any_size=True) == "not a CUDA tensor"
    assert "no tokens" in skip_reason(torch.empty(0, 8), [w])
    assert "autograd" in skip_reason(x, [w.requires_grad_()])
    with torch.no_grad():
        assert skip_reason(x, [w, None]) == "not a CUDA tensor"
    assert "contiguous" in skip_reason(x, [torch.randn(8, 3).t()])


def test_replays_are_opt_in(monkeypatch):
    monkeypatch.delenv("MOEXPORT_CUDA_GRAPHS", raising=False)
    assert not graphs.wanted()
    monkeypatch.setenv("MOEXPORT_CUDA_GRAPHS", "1")
    assert graphs.wanted()


def test_cpu_calls_are_not_replayed():
    calls = []
    out = graphs.replay(torch.randn(4, 8), [torch.randn(3, 8)], "options", calls.append)
    assert out is None and not calls


# --- on the GPU -----------------------------------------------------------------------------------

def _layer(**options):
    """A WT103-big layer, and an empty graph cache (a freed layer's weights may come back at the same
    addresses, and so make the same keys)."""
    from moexport.models import SigmaMoE

    graphs.clear()
    torch.manual_seed(0)
    return SigmaMoE(1024, 32, 128, 4, **options).to("cuda", torch.bfloat16).eval()


def _infer(layer, x, cuda_graph=True):
    from moexport.kernels import sigma_moe_forward

    return sigma_moe_forward(x, layer.expert_sel, layer.keys, layer.values, k=layer.k, bias=layer.bias,
                             o_bias=layer.o_bias, cuda_graph=cuda_graph)


def _close(y, ref, what):
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("n_tokens", [1, 16, 300])
def test_replays_match_direct_launches_and_never_alias(n_tokens):
    layer = _layer(bias=True)
    with torch.no_grad():
        xs = [torch.randn(2, n_tokens, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        ys = [_infer(layer, x) for x in xs]  # call 1 direct, call 2 captures, calls 3-4 replay
        assert graphs.cached() == 1
        _infer(layer, xs[0], cuda_graph=None)  # the default: direct launches, nothing new cached
        assert graphs.cached() == 1
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert y.shape == (2, n_tokens, 1024)
            # each output kept its own values after the later calls (no shared static output)
            _close(y, _infer(layer, x, cuda_graph=False), f"call {i} vs direct")
        assert len({y.data_ptr() for y in ys}) == len(ys)


@pytest.mark.gpu
def test_replays_see_in_place_weight_updates_and_new_weights():
    layer = _layer()
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = [_infer(layer, x) for _ in range(3)][-1]
        count = graphs.cached()
        layer.values.mul_(-2.0)  # the graph reads the same address: no new capture needed
        after = _infer(layer, x)
        assert graphs.cached() == count
        _close(after, -2.0 * before.float(), "after values *= -2 (y is linear in values)")
        _close(after, _infer(layer, x, cuda_graph=False), "after an in-place update vs direct launches")
        layer.keys = torch.nn.Parameter(layer.keys.detach().clone() * 0.5)  # another tensor: another key
        direct = _infer(layer, x, cuda_graph=False)
        for call in ("first call", "capture", "replay"):
            _close(_infer(layer, x), direct, f"{call} with new keys")
        assert graphs.cached() == count + 1


@pytest.mark.gpu
def test_outer_capture_autograd_and_streams_bypass_or_separate_the_cache():
    layer = _layer()
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        direct = _infer(layer, x, cuda_graph=False)
        _infer(layer, x)
        count = graphs.cached()
        outer = torch.cuda.CUDAGraph()
        with torch.cuda.graph(outer):  # launches captured by the caller's graph, nothing cached
            y = _infer(layer, x)
        assert graphs.cached() == count
        outer.replay()
        _close(y, direct, "outer capture")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # its own static buffers
            ys = [_infer(layer, x) for _ in range(3)]
        torch.cuda.current_stream().wait_stream(side)
        assert graphs.cached() == count + 1
        _close(ys[-1], direct, "side stream")
    x.requires_grad_()
    assert skip_reason(x, [layer.keys]) is not None  # grad enabled and x requires grad
