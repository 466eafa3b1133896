import io

from rich.console import Console

from moexport.demo import DemoRow, print_summary

ROWS = [DemoRow("checkpoint", "PyTorch eager", None, 20.2, None, "—", "reference"),
        DemoRow("dispatch ONNX", "ORT CPU", 9.0, 8.9, 1.1e-05, "100.00% (3 near-ties)", "PASSED"),
        DemoRow("fused ONNX", "ORT CPU", 8.7, 7.7, 1.3e-05, "99.74% (1 near-ties)", "FAILED"),
        DemoRow("portable engine", "TensorRT-RTX", 12.0, None, None, "—", "built, not run*")]


def test_the_summary_keeps_every_value_whole_in_a_pipe():
    for width in (60, 80, 132):
        console = Console(file=io.StringIO(), width=width)
        print_summary(console, ROWS, "moexport/data/sigma_moe_lm (trained)")
        text = console.file.getvalue()
        lines = text.splitlines()
        assert "…" not in text and lines[0] == "moexport demo — moexport/data/sigma_moe_lm (trained)"
        for value in ["PyTorch eager", "20.2", "9.0", "1.1e-05", "100.00% (3 near-ties)", "1.3e-05", "FAILED",
                      "built, not run*", "TensorRT-RTX", "12.0", "* TensorRT-RTX runs on RTX GPUs only"]:
            assert any(value in line for line in lines), (width, value)

