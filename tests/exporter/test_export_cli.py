"""`moexport export`, `fuse` and `build`: the real command line (in process), exit codes and output files."""
import numpy as np
import onnx
import pytest
import torch

from moexport import cli
from moexport.checkpoints import save_checkpoint
from moexport.models import SigmaMoE
from moexport.plugins import ort_session


@pytest.fixture
def checkpoint(tmp_path):
    layer = SigmaMoE(16, 4, 8, 2).eval()
    return layer, save_checkpoint(layer, tmp_path / "layer")


def test_export_then_fuse(tmp_path, checkpoint):
    layer, folder = checkpoint
    out = tmp_path / "layer.onnx"
    assert cli.main(["export", str(folder), "-o", str(out), "--mode", "portable", "--routing-outputs"]) == 0
    assert cli.main(["fuse", str(out)]) == 0
    fused = tmp_path / "layer.fused.onnx"
    assert [n.op_type for n in onnx.load(fused).graph.node] == ["SigmaMoE"]
    x = torch.randn(2, 3, 16)
    y, experts = ort_session(fused).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, layer(x).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(experts, layer.route(x)[1].numpy())


def test_bad_input_exits_1_with_one_line(tmp_path, checkpoint, capsys):
    _, folder = checkpoint
    assert cli.main(["export", str(folder), "-o", str(tmp_path / "x.onnx"), "--opset", "12"]) == 1
    assert "opset=12 | is not supported" in capsys.readouterr().err
    assert cli.main(["fuse", str(tmp_path / "missing.onnx")]) == 1


def test_build_needs_all_three_shape_bounds(tmp_path, checkpoint, capsys):
    pytest.importorskip("tensorrt_rtx", reason="needs `pip install tensorrt-rtx` (or TensorRT >= 10)")
    _, folder = checkpoint
    out = tmp_path / "layer.onnx"
    assert cli.main(["export", str(folder), "-o", str(out), "--mode", "portable"]) == 0
    assert cli.main(["build", str(out), "--min-shapes", "x:[1,1,16]"]) == 1
    assert "need --min-shapes, --opt-shapes and --max-shapes" in capsys.readouterr().err
    shapes = ["--min-shapes", "x:[1,1,16]", "--opt-shapes", "x:[1,8,16]", "--max-shapes", "x:[2,64,16]"]
    assert cli.main(["build", str(out), *shapes]) == 0
    assert (tmp_path / "layer.engine").stat().st_size > 0
