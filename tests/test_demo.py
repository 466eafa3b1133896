import io
import re
from pathlib import Path

from rich.console import Console

from moexport.demo import DemoRow, print_results, print_summary
from moexport.exporter import FuseReport

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


def _value(text: str):
    return None if text == "—" else float(text)


def test_the_readmes_sample_is_what_the_demo_prints():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- demo-output -->\n```\n")[1].split("```\n<!-- /demo-output -->")[0].splitlines()
    table = block[block.index(next(line for line in block if line.startswith("artifact "))) + 2:]
    rows = [re.split(r"\s{2,}", line.strip()) for line in table[:next(i for i, l in enumerate(table)
                                                                       if l.startswith("batch 1"))]]
    rows = [DemoRow(a, rt, _value(mb), _value(ms), _value(err), routing, status)
            for a, rt, mb, ms, err, routing, status in rows]
    fusion = [line.removeprefix("fusion: ") for line in block if line.startswith("fusion: ")]
    label = block[len(fusion)].removeprefix("moexport demo — ")
    # The first fusion line is FuseReport's own; the others (kernels compiled, or why not) pass through.
    report = FuseReport(16, {"routing": 0, "sigma_moe": 4, "sigma_moe_portable": 0}, notes=fusion[1:])
    console = Console(file=io.StringIO(), width=132)
    print_results(console, rows, label, report, Path("moexport-demo"))
    assert [line.rstrip() for line in console.file.getvalue().splitlines()] == block[:-1]
    assert re.fullmatch(r"PASSED \| Runtime: [\d.]+s \| Command: moexport demo", block[-1])
