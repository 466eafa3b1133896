"""The compiled op library and the kernels a fused file carries, as far as a machine without a GPU shows
them: files, sharing, what ONNX Runtime's CPU provider runs, and the checks each node gets."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moexport.core.onnx_files import ELEMENT_TYPES
from moexport.exporter import export_onnx, fuse
from moexport.exporter.compiled import kernel_bundles
from moexport.kernels.bundle import read_bundle
from moexport.models import SigmaMoE, TransformerLM
from moexport.opset import attach_functions
from moexport.opset.functions import kernels_input
from moexport.plugins import carries_kernels, ort_library, ort_session

ARCHS = (90,)
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    """A two-layer σ-MoE LM: its dispatch export and the fused file with kernels."""
    folder = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16,
                          ffn={"kind": "sigma_moe", "d_model": 32, "n_experts": 4, "expert_size": 8, "k": 2}).eval()
    source = export_onnx(model, folder / "lm.onnx", routing_outputs=True)
    report = fuse(source, folder / "lm.fused.onnx", archs=ARCHS, max_tokens=MAX_TOKENS)
    return model, source, folder / "lm.fused.onnx", report


def test_layers_of_one_shape_share_one_bundle(lm_files):
    _, _, fused, report = lm_files
    model = onnx.load(fused)
    layers = [n for n in model.graph.node if n.op_type == "SigmaMoE"]
    assert len(layers) == 2 and len({kernels_input(n) for n in layers}) == 1
    (bundle,) = kernel_bundles(model)
    assert bundle["op"] == "SigmaMoE" and bundle["archs"] == [90] and len(bundle["nodes"]) == 2
    assert report.kernels.total_bytes == bundle["bytes"] and "shared by 2 node(s)" in str(report)
    config = read_bundle(onnx.numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == bundle["name"])).tobytes())["config"]
    assert config == {"d_model": 32, "n_experts": 4, "expert_size": 8, "v_dim": 32, "k": 2, "dtype": "float32",
                      "selection": "sigmoid", "activation": "relu", "bias": False, "expert_output": True,
                      "router_dtype": "float32"}


def test_fusing_again_replaces_the_kernels(lm_files, tmp_path):
    _, _, fused, _ = lm_files
    report = fuse(fused, tmp_path / "again.onnx", archs=ARCHS, max_tokens=16)
    model = onnx.load(tmp_path / "again.onnx")
    assert len(kernel_bundles(model)) == 1 and not report.changed
    assert not fuse(fused, tmp_path / "none.onnx", archs=()).kernels
    assert not carries_kernels(onnx.load(tmp_path / "none.onnx"))


def test_the_cpu_provider_runs_the_function_bodies_of_a_file_with_kernels(lm_files):
    model, source, fused, _ = lm_files
    ids = np.random.default_rng(0).integers(0, 64, (2, 10))
    session = ort_session(fused)
    assert not session.moexport_kernels
    logits = session.run(["logits"], {"input_ids": ids})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def library_session(path):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_library()))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_the_library_in_a_cpu_session_says_it_runs_on_cuda(lm_files):
    with pytest.raises(Exception, match=r"node '.*' \(SigmaMoE\): the moexport op library runs these nodes on "
                                        r"ONNX Runtime's CUDA execution provider only"):
        library_session(lm_files[2])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_library_takes_a_router_weight_in_the_model_dtype(tmp_path, dtype):
    """A half-precision fused layer has its router weight in that dtype (see the surgeon's tests): the
    library's ops take it (the type checks of session creation pass, and the CPU kernel then says where
    it runs), and the CPU provider without the library runs the function body (float16)."""
    torch.manual_seed(0)
    layer = SigmaMoE(32, 4, 8, 2).eval()
    source = export_onnx(layer, tmp_path / "layer.onnx", dtype=dtype)
    fuse(source, tmp_path / "fused.onnx", archs=ARCHS, max_tokens=MAX_TOKENS)
    model = onnx.load(tmp_path / "fused.onnx")
    node = next(n for n in model.graph.node if n.op_type == "SigmaMoE")
    assert next(t for t in model.graph.initializer if t.name == node.input[1]).data_type == ELEMENT_TYPES[dtype]
    with pytest.raises(Exception, match=r"\(SigmaMoE\): the moexport op library runs these nodes on "
                                        r"ONNX Runtime's CUDA execution provider only"):
        library_session(tmp_path / "fused.onnx")
    if dtype == "float16":
        x = np.random.default_rng(0).standard_normal((1, 5, 32)).astype(np.float16)
        (fused,) = ort_session(tmp_path / "fused.onnx").run(None, {"x": x})
        (dispatch,) = ort_session(source).run(None, {"x": x})
        np.testing.assert_allclose(fused.astype(np.float32), dispatch.astype(np.float32), rtol=1e-2, atol=1e-3)


def test_a_node_without_kernels_is_named(lm_files):
    with pytest.raises(Exception, match=r"\(TopKDispatch\): carries no compiled kernels .*moexport fuse"):
        library_session(lm_files[1])


def test_a_node_whose_attributes_differ_from_its_kernels_is_named(lm_files, tmp_path):
    model = onnx.load(lm_files[2])
    node = next(n for n in model.graph.node if n.op_type == "SigmaMoE")
    next(a for a in node.attribute if a.name == "k").i = 3
    onnx.save(model, tmp_path / "k3.onnx")
    with pytest.raises(Exception, match=rf"node '{node.name}' \(SigmaMoE\): has k=3 but its kernels were "
                                        r"compiled for k=2"):
        library_session(tmp_path / "k3.onnx")


def test_a_layer_with_one_of_its_biases_gets_zeros_for_the_other(tmp_path):
    torch.manual_seed(1)
    layer = SigmaMoE(16, 4, 8, 2, bias=True).eval()
    source = export_onnx(layer, tmp_path / "l.onnx")
    fused = tmp_path / "l.fused.onnx"
    fuse(source, fused, archs=())
    edited = onnx.load(fused)
    sigma = next(n for n in edited.graph.node if n.op_type == "SigmaMoE")
    o_bias = sigma.input[5]
    del sigma.input[5:]
    onnx.save(attach_functions(edited), tmp_path / "no_obias.onnx")  # the body of the node as it is now
    report = fuse(tmp_path / "no_obias.onnx", tmp_path / "out.onnx", archs=ARCHS, max_tokens=16)
    assert report.kernels.bundles and not report.kernels.skipped
    out = onnx.load(tmp_path / "out.onnx")
    sigma = next(n for n in out.graph.node if n.op_type == "SigmaMoE")
    zeros = next(t for t in out.graph.initializer if t.name == sigma.input[5])
    assert not onnx.numpy_helper.to_array(zeros).any() and sigma.input[5] != o_bias
    x = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
    np.testing.assert_array_equal(ort_session(tmp_path / "no_obias.onnx").run(None, {"x": x})[0],
                                  ort_session(tmp_path / "out.onnx").run(None, {"x": x})[0])


def test_inspect_reports_the_kernels_a_file_carries(lm_files, capsys):
    from moexport.cli import main

    assert main(["inspect", str(lm_files[2])]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "2 SigmaMoE" in shown and "sm_90" in shown and "compiled kernels" in shown
    assert main(["inspect", str(lm_files[1])]) == 0
    assert "function bodies (no compiled kernels" in " ".join(capsys.readouterr().out.split())
