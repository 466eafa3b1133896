"""export_onnx: parity of both forms against the PyTorch model, names, dtypes, the model left alone, bad input."""
import re

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import moexport
from moexport.core import onnx_files
from moexport.core.dtypes import tolerance_for
from moexport.core.errors import MoexportError
from moexport.exporter import lower
from moexport.models import SigmaMoE, from_preset, preset_config
from moexport.opset import DOMAIN, reference_evaluator
from moexport.plugins import ort_session

MODES = ["dispatch", "portable"]


def layer(selection="sigmoid", activation="relu", bias=True, k=2, n_experts=6):
    module = SigmaMoE(16, n_experts, 8, k, selection=selection, activation=activation, bias=bias).eval()
    if bias:
        with torch.no_grad():
            module.bias.normal_()
            module.o_bias.normal_()
    return module


def assert_close(actual, expected, dtype="float32"):
    tol = tolerance_for(dtype)
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=tol.rtol,
                               atol=tol.atol)


def op_types(path):
    return [(n.domain, n.op_type) for n in onnx.load(path).graph.node]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("selection, activation", [("sigmoid", "relu"), ("softmax", "gelu"),
                                                   ("softmax_after_topk", "silu")])
def test_layer_matches_pytorch_with_identical_routing(tmp_path, mode, selection, activation):
    module = layer(selection, activation)
    path = moexport.export_onnx(module, tmp_path / "layer.onnx", mode=mode, routing_outputs=True)
    onnx.checker.check_model(str(path), full_check=True)
    session = ort_session(path)
    assert [o.name for o in session.get_outputs()] == ["y", "experts"]
    for shape in [(1, 1), (3, 11)]:  # dynamic batch and sequence, T = 1 included
        x = torch.randn(*shape, 16)
        y, experts = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            assert_close(y, module(x).numpy())
            np.testing.assert_array_equal(experts, module.route(x)[1].numpy())


def test_dispatch_form_has_the_dispatch_ops_and_portable_only_standard_ops(tmp_path):
    module = layer()
    dispatch = op_types(moexport.export_onnx(module, tmp_path / "d.onnx", mode="dispatch"))
    portable = op_types(moexport.export_onnx(module, tmp_path / "p.onnx", mode="portable"))
    assert [t for d, t in dispatch if d == DOMAIN] == ["TopKDispatch", "CVMM", "CVMM"]
    assert not [t for d, t in portable if d not in ("", "ai.onnx")]
    assert not onnx.load(tmp_path / "p.onnx").functions


@pytest.mark.parametrize("mode", MODES)
def test_float16_export_is_within_tolerance(tmp_path, mode):
    module = layer(k=3)
    path = moexport.export_onnx(module, tmp_path / "half.onnx", mode=mode, dtype="float16", routing_outputs=True)
    x = torch.randn(4, 9, 16)
    y, experts = ort_session(path).run(None, {"x": x.half().numpy()})
    half = module.half()
    with torch.no_grad():
        assert y.dtype == np.float16
        assert_close(y, half(x.half()).float().numpy(), "float16")
        np.testing.assert_array_equal(experts, half.route(x.half())[1].numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_dtype_is_recorded_and_the_expert_indices_are_named_without_being_outputs(tmp_path, dtype):
    module = layer()
    path = moexport.export_onnx(module, tmp_path / "x.onnx", dtype=dtype)
    model = onnx.load(path)
    assert {p.key: p.value for p in model.metadata_props}[onnx_files.DTYPE_KEY] == dtype
    assert onnx_files.model_dtype(model) == dtype
    assert [o.name for o in model.graph.output] == ["y"]
    # The tensor is there for validate to read: exposed as an output, it holds the layer's routing.
    model.graph.output.append(onnx.helper.make_tensor_value_info("experts", onnx.TensorProto.INT64, None))
    x = torch.randn(3, 5, 16)
    feed = x.half() if dtype == "float16" else x
    _, experts = ort_session(model).run(None, {"x": feed.numpy()})
    with torch.no_grad():
        np.testing.assert_array_equal(experts, module.to(feed.dtype).route(feed)[1].numpy())


def test_nonfinite_weights_are_refused_and_named(tmp_path):
    module = layer()
    with torch.no_grad():
        module.values[2, 3, 1] = float("nan")
    with pytest.raises(MoexportError, match=r"tensor 'values' \| holds NaN or Inf values"):
        moexport.export_onnx(module, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_export_is_within_tolerance_in_the_reference_runtime(tmp_path, mode):
    # ONNX Runtime's CPU provider has no bfloat16 MatMul; onnx.reference runs the graph instead.
    module = layer()
    path = moexport.export_onnx(module, tmp_path / "bf16.onnx", mode=mode, dtype="bfloat16")
    x = torch.randn(2, 5, 16).bfloat16()
    (y,) = reference_evaluator(path).run(None, {"x": x.float().numpy().astype(ml_dtypes.bfloat16)})
    with torch.no_grad():
        assert_close(y.astype(np.float32), module.bfloat16()(x).float().numpy(), "bfloat16")


def test_opset_18_uses_an_erf_gelu(tmp_path):
    module = layer(activation="gelu")
    path = moexport.export_onnx(module, tmp_path / "o18.onnx", mode="portable", opset=18)
    assert ("", "Gelu") not in op_types(path) and ("", "Erf") in op_types(path)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        assert_close(ort_session(path).run(None, {"x": x.numpy()})[0], module(x).numpy())


def routed_inputs(model, ids, memory):
    """Per σ-MoE layer: the experts the PyTorch model picks, from the input its FFN sees."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, SigmaMoE):
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0])))
    with torch.no_grad():
        out = model(ids, memory, return_memory=True)
    for hook in hooks:
        hook.remove()
    return out, {name: model.get_submodule(name).route(x)[1].numpy() for name, x in seen.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_lm_with_memory_matches_pytorch(tmp_path, mode):
    model = from_preset("tiny").eval()
    path = moexport.export_onnx(model, tmp_path / "lm.onnx", mode=mode, memory=True, routing_outputs=True)
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    assert names == ["logits", "new_memory.0", "new_memory.1", "experts.layers.0.ffn", "experts.layers.1.ffn"]
    ids, memory = torch.randint(0, 256, (3, 10)), [torch.randn(3, 5, 64) for _ in range(2)]
    (logits, new_memory), routes = routed_inputs(model, ids, memory)
    outputs = session.run(None, {"input_ids": ids.numpy(), **{f"memory.{i}": m.numpy() for i, m in enumerate(memory)}})
    assert_close(outputs[0], logits.numpy())
    for got, want in zip(outputs[1:3], new_memory):
        assert_close(got, want.numpy())
    for name, got in zip(names[3:], outputs[3:]):
        np.testing.assert_array_equal(got, routes[name.removeprefix("experts.")])


def test_the_model_is_left_as_it_was(tmp_path):
    module = layer()
    module.train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    moexport.export_onnx(module, tmp_path / "m.onnx", dtype="float16", routing_outputs=True)
    assert module.training and "forward" not in module.__dict__
    assert all(torch.equal(state[k], v) and v.dtype == torch.float32 for k, v in module.state_dict().items())
    module.eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.reference_forward(x))


def test_weights_go_to_external_data_above_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_files, "_TWO_GB", 1024)
    module = layer()
    path = moexport.export_onnx(module, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 1024
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        assert_close(ort_session(path).run(None, {"x": x.numpy()})[0], module(x).numpy())


class Foreign(nn.Module):
    def __init__(self):
        super().__init__()
        self.d_model = 16

    def forward(self, x):
        return x


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "fused"}, r"mode='fused' \| is not an export mode"),
    ({"dtype": "int8"}, r"dtype='int8' \| is not supported"),
    ({"opset": 17}, r"opset=17 \| is not supported"),
    ({"memory": True}, r"memory=True \| needs a TransformerLM"),
])
def test_bad_options_are_named(tmp_path, kwargs, message):
    with pytest.raises(MoexportError, match=message):
        moexport.export_onnx(layer(), tmp_path / "x.onnx", **kwargs)


def test_unsupported_module_is_named(tmp_path):
    model = nn.Sequential(layer(), Foreign())
    with pytest.raises(MoexportError, match=r"module '1' \(Foreign\) \| is not supported"):
        moexport.export_onnx(model, tmp_path / "x.onnx")


def test_unsupported_attribute_is_named(tmp_path):
    model = from_preset("tiny")
    model.layers[1].ffn.activation = "tanh"
    with pytest.raises(MoexportError, match=r"layers.1.ffn.activation='tanh' \(SigmaMoE\) \| is not supported"):
        moexport.export_onnx(model, tmp_path / "x.onnx")


def test_missing_output_folder_writes_nothing(tmp_path):
    with pytest.raises(MoexportError, match="folder that does not exist"):
        moexport.export_onnx(layer(), tmp_path / "no" / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_output_path_that_is_a_folder_is_refused_before_tracing(tmp_path, monkeypatch):
    monkeypatch.setattr("moexport.exporter.export._trace", lambda *a, **k: pytest.fail("traced"))
    with pytest.raises(MoexportError, match=re.escape(f"{tmp_path} | is a folder")):
        moexport.export_onnx(layer(), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(MoexportError, match=r"which is a file, not a folder"):
        moexport.export_onnx(layer(), tmp_path / "file" / "x.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


PRESET_CASES = [(name, ffn) for name in ("wt103_small", "wt103_238m", "wt103_big", "enwik8", "tiny")
                for ffn in ("sigma_moe",)] + [("wt103_small", ffn) for ffn in ("dense", "pkm", "topk")]


@pytest.mark.slow
@pytest.mark.parametrize("name, ffn", PRESET_CASES)
def test_every_preset_exports_at_reduced_width(tmp_path, name, ffn):
    # Reduced width and depth; the FFN kind, expert count, k and selection are the preset's own.
    config = preset_config(name, ffn, n_layers=1, d_model=48, n_heads=2, head_dim=24, vocab_size=97)
    model = moexport.models.build(config).eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want = model(ids).numpy()
    for mode in MODES if ffn == "sigma_moe" else MODES[:1]:
        path = moexport.export_onnx(model, tmp_path / f"{mode}.onnx", mode=mode)
        assert_close(ort_session(path).run(None, {"input_ids": ids.numpy()})[0], want)


def test_lower_names_an_unknown_form(tmp_path):
    source = moexport.export_onnx(layer(), tmp_path / "src.onnx", mode="dispatch")
    moexport.fuse(source, tmp_path / "fused.onnx", archs=())
    with pytest.raises(MoexportError, match=r"form='fused' \| is not a form to lower to"):
        lower(onnx.load(tmp_path / "fused.onnx"), "fused")
