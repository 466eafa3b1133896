"""The compiled op library on ONNX Runtime's CUDA execution provider (H200): every op and dtype against
the PyTorch reference and the op set's NumPy reference, routing included; bad inputs; CUDA graphs.

Needs a CUDA GPU and onnxruntime-gpu (on the H200: `tools/h200_tests.sh` unpacks it, see the README).
"""
import numpy as np
import onnx
import pytest
import torch
from gpu_cases import (ARCHS, DTYPES, TOKENS, D, E, K, assert_cvmm_output, assert_layer_output,
                       assert_topk_dispatch_outputs, cvmm_case, make_layer, tied_logits)
from onnx import helper, numpy_helper

from moexport.exporter import export_onnx, fuse
from moexport.exporter.compiled import attach_kernels
from moexport.opset import DOMAIN, VERSION, attach_functions
from moexport.plugins import compiled_calls, ort_session, run_with_tensors

pytestmark = pytest.mark.gpu

CUDA = ["CUDAExecutionProvider"]
ELEMENTS = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
            torch.bfloat16: onnx.TensorProto.BFLOAT16}


@pytest.fixture(scope="module", autouse=True)
def _needs_ort_cuda():
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")


@pytest.fixture(scope="module")
def fused_layers(tmp_path_factory):
    """(layer, fused file with kernels) per (dtype, bias), built once."""
    folder, built = tmp_path_factory.mktemp("fused"), {}

    def get(dtype, bias, archs=ARCHS):
        key = (dtype, bias, archs)
        if key not in built:
            layer = make_layer(dtype, bias)
            name = f"{str(dtype)[6:]}_{bias}_{'_'.join(map(str, archs))}"
            source = export_onnx(layer, folder / f"{name}.onnx", dtype=str(dtype)[6:], routing_outputs=True)
            report = fuse(source, folder / f"{name}.fused.onnx", archs=archs, max_tokens=max(TOKENS))
            assert report.kernels.bundles and not report.kernels.skipped, str(report)
            built[key] = layer, folder / f"{name}.fused.onnx"
        return built[key]

    return get


def run_layer(path, layer, x):
    session = ort_session(path, providers=CUDA)
    assert session.moexport_kernels
    y = torch.empty(*x.shape[:-1], layer.v_dim, dtype=x.dtype, device="cuda")
    experts = torch.empty(*x.shape[:-1], layer.k, dtype=torch.int64, device="cuda")
    run_with_tensors(session, {"x": x}, {"y": y, "experts": experts})
    torch.cuda.synchronize()
    return y, experts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_sigma_moe_runs_the_compiled_kernels_like_pytorch(fused_layers, dtype, bias, n_tokens):
    layer, path = fused_layers(dtype, bias)
    x = torch.randn(1, n_tokens, D, device="cuda").to(dtype)
    before = compiled_calls()
    y, experts = run_layer(path, layer, x)
    assert compiled_calls() > before  # it ran on the library, not on the function body
    assert_layer_output(layer, x, y, experts)


def test_kernels_for_an_older_gpu_run_here_from_their_ptx(fused_layers):
    """sm_80 kernels (no PDL instructions) reach the H200 as PTX, which the driver compiles."""
    layer, path = fused_layers(torch.float16, True, archs=(80,))
    x = torch.randn(1, 300, D, device="cuda", dtype=torch.float16)
    y, experts = run_layer(path, layer, x)
    assert_layer_output(layer, x, y, experts)


def single_node(op_type, inputs, attributes, outputs, weights):
    """A model with one moexport node, its weights initializers, its kernels attached."""
    nodes_in = list(inputs)
    graph_inputs = [helper.make_tensor_value_info(n, elem, shape) for n, (elem, shape) in inputs.items()
                    if n not in weights]
    graph = helper.make_graph(
        [helper.make_node(op_type, nodes_in, [o for o, _ in outputs], domain=DOMAIN, **attributes)], "g",
        graph_inputs, [helper.make_tensor_value_info(o, elem, None) for o, elem in outputs],
        [numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, VERSION)],
                              ir_version=10)  # what the exporter writes, and ONNX Runtime 1.2x reads
    report = attach_kernels(model, archs=ARCHS, max_tokens=max(TOKENS))
    assert report.bundles and not report.skipped, str(report)
    return attach_functions(model)


@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("selection", ["sigmoid", "softmax", "softmax_after_topk"])
def test_topk_dispatch_matches_the_op_set_reference(n_tokens, selection):
    model = single_node("TopKDispatch", {"logits": (onnx.TensorProto.FLOAT, ["N", E])}, {"k": K, "selection": selection},
                        [("gate", onnx.TensorProto.FLOAT), ("expert", onnx.TensorProto.INT32),
                         ("sorted_expert", onnx.TensorProto.INT32), ("sorted_slot", onnx.TensorProto.INT32)], {})
    logits = tied_logits(n_tokens)
    session = ort_session(model, providers=CUDA)
    out = {"gate": torch.empty(n_tokens, K, device="cuda"),
           **{n: torch.empty(*s, dtype=torch.int32, device="cuda")
              for n, s in (("expert", (n_tokens, K)), ("sorted_expert", (n_tokens * K,)),
                           ("sorted_slot", (n_tokens * K,)))}}
    run_with_tensors(session, {"logits": logits}, out)
    torch.cuda.synchronize()
    assert_topk_dispatch_outputs(logits, K, selection, list(out.values()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduce", [0, 1])
@pytest.mark.parametrize("n_tokens", TOKENS)
def test_cvmm_matches_the_op_set_reference(dtype, reduce, n_tokens):
    feeds, shape, want = cvmm_case(dtype, reduce, n_tokens)
    inputs = {"x": (ELEMENTS[dtype], ["R", feeds["x"].shape[1]]), "sorted_expert": (onnx.TensorProto.INT32, ["S"]),
              "src_row": (onnx.TensorProto.INT32, ["S"]), "dst_row": (onnx.TensorProto.INT32, ["S"]),
              "W": (ELEMENTS[dtype], list(feeds["W"].shape))}
    if reduce:
        inputs["gate"] = (onnx.TensorProto.FLOAT, ["S"])
    model = single_node("CVMM", inputs, {"reduce": reduce, "k": K}, [("out", onnx.TensorProto.FLOAT)], {})
    out = torch.empty(*shape, device="cuda")
    run_with_tensors(ort_session(model, providers=CUDA), feeds, {"out": out})
    torch.cuda.synchronize()
    assert_cvmm_output(dtype, out, want)


def test_zero_tokens_give_empty_outputs(fused_layers):
    layer, path = fused_layers(torch.float16, False)
    session = ort_session(path, providers=CUDA)  # empty tensors have no device memory to bind: run from numpy
    y, experts = session.run(None, {"x": np.zeros((1, 0, D), np.float16)})
    assert y.shape == (1, 0, D) and experts.shape == (1, 0, K)


def test_bad_inputs_are_errors_that_name_the_node(fused_layers, tmp_path):
    layer, path = fused_layers(torch.float16, False)
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "SigmaMoE")
    # x of the wrong width: the graph's own shape check is the runtime's; leave x unshaped to reach ours
    x_info = model.graph.input[0]
    x_info.type.tensor_type.ClearField("shape")
    onnx.save(model, tmp_path / "unshaped.onnx")
    session = ort_session(tmp_path / "unshaped.onnx", providers=CUDA)
    with pytest.raises(Exception, match=rf"{node.name}.*'x' has shape \[5, 255\]"):
        session.run(None, {"x": np.zeros((5, 255), np.float16)})
    # a node whose attributes differ from those its kernels were compiled for
    for attribute in node.attribute:
        if attribute.name == "k":
            attribute.i = K + 1
    onnx.save(model, tmp_path / "k.onnx")
    with pytest.raises(Exception, match=r"k=5 but its kernels were compiled for k=4"):
        ort_session(tmp_path / "k.onnx", providers=CUDA)


def _label_kernels_for(path, sm: int) -> None:
    """Rewrite the file's kernel bundles as if fused for sm_`sm` alone: every image relabelled (the bytes
    stay those of this GPU's cubins, which the launcher then must not pick)."""
    from moexport.exporter.compiled import BUNDLE_PREFIX
    from moexport.kernels.bundle import pack_bundle, unpack_bundle

    model = onnx.load(path)
    for tensor in model.graph.initializer:
        if tensor.name.startswith(BUNDLE_PREFIX):
            manifest, blobs = unpack_bundle(numpy_helper.to_array(tensor).tobytes())
            for kernel in manifest["kernels"]:
                for image in kernel["images"]:
                    image["sm"] = sm
            manifest["archs"] = [sm]
            relabelled = pack_bundle(manifest, blobs)
            tensor.CopyFrom(numpy_helper.from_array(np.frombuffer(relabelled, np.uint8), tensor.name))
    onnx.save(model, path)


def test_a_file_without_kernels_for_this_gpu_says_how_to_fuse_again(tmp_path):
    layer = make_layer(torch.float16, False)
    source = export_onnx(layer, tmp_path / "l.onnx", dtype="float16")
    try:
        fuse(source, tmp_path / "l.fused.onnx", archs=(100,), max_tokens=16)
    except Exception:  # noqa: BLE001 - a Triton without Blackwell support (the GPU machines' 3.6)
        fuse(source, tmp_path / "l.fused.onnx", archs=(90,), max_tokens=16)
        _label_kernels_for(tmp_path / "l.fused.onnx", 100)
    session = ort_session(tmp_path / "l.fused.onnx", providers=CUDA)
    with pytest.raises(Exception, match=r"sm_90\) has no kernels in the file: it carries sm_100.*--arch 90"):
        session.run(None, {"x": np.zeros((1, 3, D), np.float16)})


def test_cuda_graphs_replay_the_compiled_kernels(fused_layers):
    """ONNX Runtime's CUDA graphs (enable_cuda_graph): captured on the first run, replayed after;
    inputs are updated in place, as the graphs require."""
    layer, path = fused_layers(torch.bfloat16, True)
    session = ort_session(path, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    x = torch.randn(1, 64, D, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, 64, D, device="cuda", dtype=torch.bfloat16)
    experts = torch.empty(1, 64, K, device="cuda", dtype=torch.int64)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        run_with_tensors(session, {"x": x}, {"y": y, "experts": experts})
        torch.cuda.synchronize()
        assert_layer_output(layer, x, y, experts)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_fused_lm_validates_on_the_compiled_kernels(dtype, tmp_path):
    """`moexport validate --onnxrt-cuda` of a whole fused LM: it passes, every token away from a near-tie
    is routed as the float32 reference routes it, and the σ-MoE nodes ran on the compiled kernels."""
    from moexport.models import TransformerLM
    from moexport.validate import validate

    torch.manual_seed(0)
    model = TransformerLM(vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                          ffn={"kind": "sigma_moe", "d_model": 128, "n_experts": 16, "expert_size": 32, "k": 4}).eval()
    source = export_onnx(model, tmp_path / "lm.onnx", dtype=dtype, routing_outputs=True)
    report = fuse(source, tmp_path / "lm.fused.onnx", archs=ARCHS)
    assert report.kernels.bundles and not report.kernels.skipped, str(report)
    result = validate(tmp_path / "lm.fused.onnx", model, runners=["onnxrt-cuda"])
    assert result.passed, result.to_dict()
    assert {r.layer for r in result.routing} == {"layers.0.ffn", "layers.1.ffn"}
    for layer in result.routing:
        assert layer.agreeing + layer.near_ties + layer.downstream == layer.tokens and not layer.unexplained
    assert any("onnxrt-cuda ran the moexport nodes on the compiled kernels" in note for note in result.notes)
    # float32 is judged without TF32 in the dense parts (which once failed it at 1e-3), bfloat16 through
    # float32 edges (ONNX Runtime's Python API has no bfloat16 arrays)
    assert any("use_tf32=0" in note for note in result.notes) == (dtype == "float32"), result.notes
    assert any("were cast from and to float32" in note for note in result.notes) == (dtype == "bfloat16")
