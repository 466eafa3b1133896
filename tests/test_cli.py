"""The command line: help, version, options after the subcommand, and every bad input as one clear error."""
import argparse
import copy
import os
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

import moexport
from moexport import export_onnx, load_checkpoint, save_checkpoint
from moexport.cli import SUBCOMMANDS, build_parser, main
from moexport.models import SigmaMoE

SHIPPED = Path(moexport.__file__).parent / "data" / "sigma_moe_lm"


def test_subcommand_help_is_the_docstring_without_its_source_indentation():
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, (fn, _) in SUBCOMMANDS.items():
        description = subparsers.choices[name].description
        assert description.splitlines()[0] == fn.__doc__.strip().splitlines()[0], name
        assert not any(line.startswith(" ") for line in description.splitlines()), name


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"moexport {moexport.__version__}"


@pytest.mark.parametrize("argv", [["-v", "inspect", "nope.pt"], ["inspect", "nope.pt", "-v"]])
def test_verbose_before_or_after_the_subcommand_shows_the_traceback(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: nope.pt | does not exist"


# ---- bad input: one `error:` line naming the culprit, exit status 1 (2: bad usage), nothing left behind ----

def _graph_file(path: Path, input_name: str, elem_type: int) -> None:
    """A valid ONNX file that is not a moexport model: one Add node."""
    value = helper.make_tensor_value_info(input_name, elem_type, [2, 3])
    graph = helper.make_graph([helper.make_node("Add", [input_name, input_name], ["out"])], "add", [value],
                              [helper.make_tensor_value_info("out", elem_type, [2, 3])])
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files of the cases, made once: the shipped model's dispatch export (lm.onnx) and broken inputs."""
    root = tmp_path_factory.mktemp("inputs")
    model = load_checkpoint(SHIPPED)
    export_onnx(model, root / "lm.onnx")
    (root / "empty.onnx").write_bytes(b"")
    _graph_file(root / "add.onnx", "a", TensorProto.FLOAT)
    _graph_file(root / "add_ids.onnx", "input_ids", TensorProto.INT64)
    (root / "empty.safetensors").write_bytes(b"")
    (root / "short.safetensors").write_bytes((SHIPPED / "model.safetensors").read_bytes()[:100])
    (root / "afile").write_text("a file where a folder is expected")
    (root / "adir").mkdir()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layers[1].ffn.keys[2, 3, 4] = float("nan")
    save_checkpoint(broken, root / "nan_lm")
    layer = SigmaMoE(16, 4, 8, 2).eval()
    save_checkpoint(layer, root / "layer")
    export_onnx(layer, root / "layer.bf16.onnx", dtype="bfloat16")
    return root


BUILD_SHAPES = ["--min-shapes", "input_ids:[1,1]", "--opt-shapes", "input_ids:[1,8]",
                "--max-shapes", "input_ids:[1,16]"]
VALIDATE = ["validate", "{in}/lm.onnx", "--checkpoint", str(SHIPPED)]
NO_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(),
                             reason="needs Linux's /proc (read-only even for root)")
HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()

# (argv with {in} for the inputs folder, exit status, text the error line must hold: the culprit; or that and
# text of the note)
CASES = {
    "empty onnx": (["validate", "{in}/empty.onnx", "--checkpoint", str(SHIPPED)], 1, "empty.onnx | is empty"),
    "onnx that is no moexport model": (["validate", "{in}/add.onnx", "--checkpoint", str(SHIPPED)], 1,
                                       "add.onnx | takes the inputs a "),
    "same, with input_ids": (["validate", "{in}/add_ids.onnx", "--checkpoint", str(SHIPPED)], 1,
                             "add_ids.onnx | gives the output(s) 'out'"),
    "a zero dimension": (VALIDATE + ["--shapes", "input_ids:[0,128]"], 1, "shape 'input_ids:[0,128]'"),
    "shapes not name:[...] (brackets kept)": (VALIDATE + ["--shapes", "input_ids[1,128]"], 1,
                                              "'input_ids[1,128]' | is not of the form name:[d0,d1,...]"),
    "zero iterations": (VALIDATE + ["--iterations", "0"], 2, "argument --iterations: '0'"),
    "negative atol": (VALIDATE + ["--atol", "-1"], 2, "argument --atol: '-1' is not a tolerance"),
    "nan atol": (VALIDATE + ["--atol", "nan"], 2, "argument --atol: 'nan' is not a tolerance"),
    "negative rtol": (VALIDATE + ["--rtol", "-1"], 2, "argument --rtol: '-1' is not a tolerance"),
    "--trt on an ONNX file": (VALIDATE + ["--trt"], 1, "runner 'trt' (--trt) | runs TensorRT engines"),
    "--onnxrt-cuda without CUDA (brackets kept)": pytest.param(
        VALIDATE + ["--onnxrt-cuda"], 1, ("runner 'onnxrt-cuda' | needs", "(pip install 'moexport[gpu]')"),
        marks=pytest.mark.skipif(HAS_CUDA, reason="ONNX Runtime has CUDA here")),
    "bfloat16 on the ONNX Runtime CPU": (["validate", "{in}/layer.bf16.onnx", "--checkpoint", "{in}/layer"], 1,
                                         "layer.bf16.onnx | is a bfloat16 model"),
    "empty safetensors": (["export", "{in}/empty.safetensors", "-o", "out.onnx"], 1,
                          "empty.safetensors | is empty"),
    "100-byte safetensors": (["export", "{in}/short.safetensors", "-o", "out.onnx"], 1,
                             "short.safetensors | is not a readable safetensors file"),
    "NaN weights, export": (["export", "{in}/nan_lm", "-o", "out.onnx"], 1,
                            "tensor 'layers.1.ffn.keys' | holds NaN"),
    "NaN weights, validate": (["validate", "{in}/lm.onnx", "--checkpoint", "{in}/nan_lm"], 1,
                              "tensor 'layers.1.ffn.keys' | holds NaN"),
    "export under a file": (["export", str(SHIPPED), "-o", "{in}/afile/out.onnx"], 1, "afile/out.onnx | is under"),
    "export into /proc": pytest.param(["export", str(SHIPPED), "-o", "/proc/moexport.onnx"], 1,
                                      "/proc/moexport.onnx | cannot be written", marks=NO_PROC),
    "export -o a folder": (["export", str(SHIPPED), "-o", "{in}/adir"], 1, "adir | is a folder"),
    "fuse under a file": (["fuse", "{in}/lm.onnx", "-o", "{in}/afile/out.onnx"], 1, "afile/out.onnx | is under"),
    "fuse into a missing folder": (["fuse", "{in}/lm.onnx", "-o", "nodir/out.onnx"], 1,
                                   "nodir/out.onnx | is in a folder that does not exist"),
    "build into /proc": pytest.param(["build", "{in}/lm.onnx", "-o", "/proc/moexport.plan"] + BUILD_SHAPES, 1,
                                     "/proc/moexport.plan | cannot be written", marks=NO_PROC),
    "validate --save-report under a file": (VALIDATE + ["--save-report", "{in}/afile/report"], 1,
                                            "afile/report | cannot be created"),
    "demo under a file": (["demo", "-o", "{in}/afile/demo"], 1, "afile/demo | cannot be created"),
    "demo into /proc": pytest.param(["demo", "-o", "/proc/moexport-demo"], 1, "/proc/moexport-demo | cannot be "
                                    "written", marks=NO_PROC),
    "unknown bench suite": (["bench", "nope"], 2, "argument suite: invalid choice: 'nope'"),
}


def _tree(*folders: Path) -> set[str]:
    return {str(p) for folder in folders for p in folder.rglob("*")}


@pytest.mark.parametrize("argv, status, culprit", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_error_line_and_leaves_nothing_behind(argv, status, culprit, inputs, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative outputs land here
    before = _tree(inputs, tmp_path)
    argv = [a.replace("{in}", str(inputs)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse: bad usage
        code = exit.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == status, err
    culprit, *note = (culprit,) if isinstance(culprit, str) else culprit
    assert lines[0].startswith("error: ") and culprit in lines[0].replace(str(inputs) + "/", ""), err
    assert all(text in lines[1] for text in note), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  Note: ")), err
    assert out == ""  # no PASSED/FAILED verdict for an input error
    assert _tree(inputs, tmp_path) == before


def test_a_layer_state_dict_exports_and_validates_with_k(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save(SigmaMoE(16, 6, 8, 2).eval().state_dict(), "moe.pt")
    assert main(["export", "moe.pt", "--k", "2", "-o", "layer.onnx"]) == 0
    assert main(["validate", "layer.onnx", "--checkpoint", "moe.pt", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote layer.onnx\n") and out.splitlines()[-1].startswith("PASSED | Runtime")
    assert main(["validate", "layer.onnx", "--checkpoint", "moe.pt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: moe.pt | is a σ-MoE layer state dict") and "--k" in err


def test_results_go_to_stdout_and_errors_to_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(SigmaMoE(16, 4, 8, 2).eval(), "layer")
    assert main(["inspect", "layer"]) == 0
    out, err = capsys.readouterr()
    assert "sigma_moe" in out and err == ""
    assert main(["export", "layer", "-o", "layer.onnx"]) == 0 and main(["fuse", "layer.onnx", "--no-kernels"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "wrote layer.onnx" and out.splitlines()[-1] == "wrote layer.fused.onnx"
    assert "fused routing: 0, sigma_moe: 1" in out and err == ""
    assert os.path.isfile("layer.fused.onnx")
