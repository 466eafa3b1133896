import io
import json

from rich.console import Console

from moexport.validate import OutputResult, RoutingResult, ValidationReport


def report() -> ValidationReport:
    outputs = [OutputResult(runner, "logits", 0.574, 0.0408, 0.00554, 14.1, 0.01, 0.01, False, 2, 0.851)
               for runner in ("onnxrt-cpu", "onnxrt-cuda")]
    example = {"iteration": 1, "token": 13, "reference": [3, 4], "runner": [3, 2], "margin": 0.000379,
               "kind": "near-tie"}
    routing = [RoutingResult(runner, f"layers.{i}.ffn", 384, 383, 1, 0.02, 0, 0, [], [example])
               for runner in ("onnxrt-cpu", "onnxrt-cuda") for i in range(4)]
    return ValidationReport("runs/[fp16]/lm.onnx", "moexport/data/sigma_moe_lm", "float16",
                            ["onnxrt-cpu", "onnxrt-cuda"], ["2 x random (seed 1)", "text sample"], outputs,
                            routing,
                            notes=["install 'moexport[trt]' to check engines"])


def printed(width: int) -> str:
    console = Console(file=io.StringIO(), width=width)  # what `result.print()` gets in a pipe: 80 columns
    report().print(console)
    return console.file.getvalue()


def test_print_keeps_every_value_whole_at_80_columns_and_wider():
    for width in (80, 132):
        text = printed(width)
        lines = text.splitlines()
        assert "…" not in text
        values = ["0.574", "0.0408", "0.00554", "0.01 / 0.01", "FAILED", "99.74%", "PASSED", "onnxrt-cuda", "384",
                  "runs/[fp16]/lm.onnx (float16)", "install 'moexport[trt]' to check engines", "max |err| 0.851"]
        values += [f"layers.{i}.ffn" for i in range(4)]
        for value in values:
            assert any(value in line for line in lines), (width, value)
        assert any("near-tie: onnxrt-cpu layer layers.0.ffn input 1 token 13" in line for line in lines)


def test_the_saved_report_holds_what_was_printed(tmp_path):
    paths = report().save(tmp_path / "r")
    saved = json.loads(paths["json"].read_text())
    assert saved["passed"] is False and saved["dtype"] == "float16"
    assert [o["max_abs_own_routing"] for o in saved["outputs"]] == [0.851, 0.851]
    assert all(r["unexplained"] == 0 and r["passed"] for r in saved["routing"])
    assert "runs/[fp16]/lm.onnx" in paths["html"].read_text()
