"""Engine building with TensorRT-RTX on the CPU machine: the portable graph of a small LM is parsable.

(Running an engine needs a GPU with TensorRT; nothing here executes one.)
"""
import pytest

import moexport
from moexport.core.errors import MoexportError
from moexport.models import SigmaMoE, from_preset
from moexport.trt_plugins import build_engine

pytest.importorskip("tensorrt_rtx", reason="needs `pip install tensorrt-rtx` (or TensorRT >= 10)")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_portable_lm_with_memory_builds_an_engine(tmp_path, dtype):
    model = from_preset("tiny").eval()
    path = moexport.export_onnx(model, tmp_path / "lm.onnx", mode="portable", dtype=dtype, memory=True,
                                routing_outputs=True)
    memory = ((1, 0, 64), (1, 8, 64), (4, 64, 64))
    engine = build_engine(path, tmp_path / "lm.engine", dtype=dtype,
                          shapes={"input_ids": ((1, 1), (1, 16), (4, 64)), "memory.0": memory, "memory.1": memory})
    # Deserialising needs a GPU; here the build succeeding (parse + AOT compile) is the check. The weights
    # are in the engine, so it is at least as large as the half-precision weights.
    weights = sum(p.numel() for p in model.parameters()) * 2
    assert engine.stat().st_size > weights


@pytest.fixture
def layer_file(tmp_path):
    return moexport.export_onnx(SigmaMoE(16, 4, 8, 2).eval(), tmp_path / "layer.onnx", mode="dispatch")


def test_dispatch_form_without_plugins_is_a_clear_parse_error(tmp_path, layer_file):
    shapes = {"x": ((1, 1, 16), (1, 8, 16), (2, 32, 16))}
    with pytest.raises(MoexportError, match=r"layer.onnx \| is not parsed by tensorrt"):
        build_engine(layer_file, tmp_path / "layer.engine", shapes=shapes)
    assert not (tmp_path / "layer.engine").exists()


def test_dynamic_input_needs_shapes(tmp_path, layer_file):
    with pytest.raises(MoexportError, match=r"input 'x' \| has dynamic dims"):
        build_engine(layer_file, tmp_path / "layer.engine")


def test_shapes_must_fit_the_input(tmp_path, layer_file):
    with pytest.raises(MoexportError, match=r"do not fit the input's dims"):
        build_engine(layer_file, tmp_path / "layer.engine", shapes={"x": ((1, 16), (1, 16), (1, 16))})


@pytest.mark.parametrize("value", [((1, 1, 16), (2, 8, 16)), 16])
def test_shapes_must_be_one_shape_or_three(tmp_path, layer_file, value):
    with pytest.raises(MoexportError, match=r"shapes\['x'\] = .* \| is neither one shape nor"):
        build_engine(layer_file, tmp_path / "layer.engine", shapes={"x": value})


def test_unreadable_onnx_is_a_clear_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(MoexportError, match=r"bad.onnx \| is not a readable ONNX model"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine")


def test_missing_output_folder_is_named_before_building(tmp_path, layer_file):
    # The dispatch form would fail to parse: the folder is checked first, before any TensorRT work.
    with pytest.raises(MoexportError, match=r"layer.engine \| is in a folder that does not exist"):
        build_engine(layer_file, tmp_path / "missing" / "layer.engine", shapes={"x": (1, 8, 16)})
