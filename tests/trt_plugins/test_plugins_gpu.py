"""The TensorRT plugins on the GPU (H200), called as TensorRT calls them (the harness: the parser's
fields, configurePlugin and getWorkspaceSize for a profile up to 32768 tokens, serialisation, the
runtime-phase plugin, onShapeChange, enqueue on torch's stream): SigmaMoE against the PyTorch layer
with identical routing, TopKDispatch and CVMM against the op set's reference, every dtype and T from
1 to 32768; empty calls; a CUDA graph of enqueue.

Needs a CUDA GPU; no TensorRT (none runs on the H200). The kernels are compiled here, by this
machine's Triton.
"""
import pytest
import torch
from gpu_cases import (ARCHS, DTYPES, TOKENS, D, E, G, K, assert_cvmm_output, assert_layer_output,
                       assert_topk_dispatch_outputs, cvmm_case, dtype_name, make_layer, tied_logits)

from moexport.kernels import bundle as bundles
from moexport.kernels.plan import MoEShape
from moexport.models.routing import SELECTIONS
from moexport.trt_plugins.harness import PluginHarness, prepare

pytestmark = pytest.mark.gpu

MAX_TOKENS = max(TOKENS)


@pytest.fixture(scope="module")
def harness():
    return PluginHarness()


def node_kernels(op, config):
    """The node's attributes as `moexport build` gives them to the parser, its kernels compiled."""
    if op == "SigmaMoE":
        shape = MoEShape(D, E, G, D, K, config["dtype"], "sigmoid", "relu", config["bias"])
        # the router weight in the layer's dtype, as `moexport fuse` stores it (the float32 one of other
        # files runs in the sweep, tests/tools/test_sweep.py, and tests/kernels/test_onnx_plans.py)
        spec = bundles.sigma_moe_kernels(shape, router_dtype=config["dtype"], expert_output=True,
                                         max_tokens=MAX_TOKENS)
        attributes = {"k": K, "selection": "sigmoid", "activation": "relu"}
    elif op == "TopKDispatch":
        spec = bundles.topk_dispatch_kernels(E, K, config["selection"], max_tokens=MAX_TOKENS)
        attributes = {"k": K, "selection": config["selection"]}
    else:
        d_in, d_out = (G, D) if config["reduce"] else (D, G)
        spec = bundles.cvmm_kernels(E, d_in, d_out, config["dtype"], reduce=bool(config["reduce"]), k=K,
                                    gate=bool(config["reduce"]), max_tokens=MAX_TOKENS * K)
        attributes = {"reduce": config["reduce"], "k": K}
    data = bundles.build_bundle(spec, archs=ARCHS)
    return {**attributes, "kernels": data, "kernels_key": bundles.read_bundle(data)["key"]}


@pytest.fixture(scope="module")
def kernels():
    """kernels(op, **config) -> the node's attributes with its kernels, compiled once per configuration
    (build_bundle compiles in processes of its own)."""
    built = {}

    def get(op, **config):
        key = (op, tuple(sorted(config.items())))
        if key not in built:
            built[key] = node_kernels(op, config)
        return built[key]

    return get


def run(call):
    call(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()


def layer_call(harness, kernels, layer, dtype, bias, x):
    weights = [layer.expert_sel, layer.keys, layer.values] + ([layer.bias, layer.o_bias] if bias else [])
    y = torch.empty(*x.shape[:-1], D, device="cuda", dtype=dtype)
    experts = torch.empty(*x.shape[:-1], K, device="cuda", dtype=torch.int64)
    largest = [(1, MAX_TOKENS, D)] + [tuple(w.shape) for w in weights]
    call = prepare(harness, "SigmaMoE", "layers.0.ffn", kernels("SigmaMoE", dtype=dtype_name(dtype), bias=bias),
                   [x] + [w.contiguous() for w in weights], [y, experts], largest=largest)
    return call, y, experts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_sigma_moe_matches_pytorch_with_identical_routing(harness, kernels, dtype, bias, n_tokens):
    layer = make_layer(dtype, bias)
    x = torch.randn(1, n_tokens, D, device="cuda").to(dtype)
    call, y, experts = layer_call(harness, kernels, layer, dtype, bias, x)
    run(call)
    assert_layer_output(layer, x, y, experts)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_topk_dispatch_matches_the_op_set_reference(harness, kernels, selection, n_tokens):
    logits = tied_logits(n_tokens)
    outputs = [torch.empty(n_tokens, K, device="cuda"), torch.empty(n_tokens, K, dtype=torch.int32, device="cuda"),
               torch.empty(n_tokens * K, dtype=torch.int32, device="cuda"),
               torch.empty(n_tokens * K, dtype=torch.int32, device="cuda")]
    run(prepare(harness, "TopKDispatch", "route", kernels("TopKDispatch", selection=selection), [logits], outputs,
                largest=[(MAX_TOKENS, E)]))
    assert_topk_dispatch_outputs(logits, K, selection, outputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduce", [0, 1])
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_cvmm_matches_the_op_set_reference(harness, kernels, dtype, reduce, n_tokens):
    feeds, shape, want = cvmm_case(dtype, reduce, n_tokens)
    out = torch.empty(*shape, device="cuda")
    inputs = list(feeds.values())
    rows = MAX_TOKENS * K
    largest = [((rows if reduce else MAX_TOKENS), inputs[0].shape[1])] + [(rows,)] * 3 + [tuple(feeds["W"].shape)] + \
        ([(rows,)] if reduce else [])
    run(prepare(harness, "CVMM", "cvmm", kernels("CVMM", dtype=dtype_name(dtype), reduce=reduce), inputs, [out],
                largest=largest))
    assert_cvmm_output(dtype, out, want)


def test_an_empty_call_launches_nothing_and_gives_empty_outputs(harness, kernels):
    layer = make_layer(torch.float16, False)
    call, y, experts = layer_call(harness, kernels, layer, torch.float16, False,
                                  torch.empty(1, 0, D, device="cuda", dtype=torch.float16))
    run(call)
    assert y.shape == (1, 0, D) and experts.shape == (1, 0, K)


def test_enqueue_is_captured_and_replayed_by_a_cuda_graph(harness, kernels):
    """TensorRT may capture enqueue in a CUDA graph (its CUDA-graph mode, or a user's capture around
    enqueueV3): the kernels are loaded by the first call, the capture records the launches."""
    layer = make_layer(torch.bfloat16, True)
    x = torch.randn(1, 64, D, device="cuda", dtype=torch.bfloat16)
    call, y, experts = layer_call(harness, kernels, layer, torch.bfloat16, True, x)
    run(call)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on a stream of its own, current inside
        call(torch.cuda.current_stream().cuda_stream)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_layer_output(layer, x, y, experts)
