"""`moexport demo`: the whole pipeline on one small σ-MoE language model, with one summary table.

checkpoint -> dispatch ONNX + portable ONNX -> fused ONNX -> ONNX Runtime -> parity against PyTorch
-> TensorRT engine (TensorRT where installed; a TensorRT-RTX build of the portable graph where only
that is). Every step shows progress; the table at the end says, per artifact, its size, latency, max
error and routing agreement.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.text import Text

from moexport.checkpoints import load_checkpoint
from moexport.core.files import check_output_folder
from moexport.core.progress import progress
from moexport.core.tables import print_line, print_table
from moexport.exporter import export_onnx, fuse
from moexport.models import TransformerLM
from moexport.plugins import ort_session
from moexport.validate import validate
from moexport.validate.inputs import sample_text

DEMO_CHECKPOINT = "sigma_moe_lm"  # folder under moexport/data (trained by examples/train_lm.py)
DEMO_SEQ = 128
TIMED_RUNS = 10


@dataclass
class DemoRow:
    """One line of the demo's summary table: an artifact, where it ran and how it compared."""

    artifact: str
    runtime: str
    size_mb: float | None
    latency_ms: float | None
    max_abs_err: float | None
    routing: str
    status: str

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"


def default_checkpoint() -> tuple[torch.nn.Module, str]:
    """The shipped trained demo model, or (if this installation lacks it) a deterministic untrained one."""
    folder = importlib.resources.files("moexport") / "data" / DEMO_CHECKPOINT
    if folder.is_dir():
        return load_checkpoint(Path(str(folder))), f"moexport/data/{DEMO_CHECKPOINT} (trained)"
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                          ffn={"kind": "sigma_moe", "d_model": 128, "n_experts": 8, "expert_size": 64, "k": 2})
    return model.eval(), "deterministic untrained σ-MoE LM (seed 0; no trained demo checkpoint installed)"


def run_demo(checkpoint: str | os.PathLike | None = None, *, output_dir: str | os.PathLike | None = None,
             console: Console | None = None, log: Console | None = None) -> list[DemoRow]:
    """Run the whole pipeline and return one row per artifact (also printed as a table).

    Args:
        checkpoint: Any checkpoint `moexport.load_checkpoint` reads. Defaults to the shipped demo model.
        output_dir: Folder for the ONNX files, engine and parity reports (checked before any work).
            Defaults to ./moexport-demo.
        console: Where the results go (fusion report, table, where the files are). Defaults to stdout.
        log: Where progress goes (the model used; the progress bar is on stderr). Defaults to stderr.
    """
    console, log = console or Console(), log or Console(stderr=True)
    out = check_output_folder(output_dir or "moexport-demo")
    if checkpoint is None:
        model, label = default_checkpoint()
    else:
        model, label = load_checkpoint(checkpoint), str(checkpoint)
    print_line(log, f"model: {label}")
    ids = _demo_tokens(model)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[DemoRow] = []
    steps = ["export dispatch", "export portable", "fuse", "validate dispatch", "validate portable",
             "validate fused", "engine"]
    with progress("timing PyTorch", total=len(steps)) as advance:
        rows.append(DemoRow("checkpoint", "PyTorch eager", None, _torch_latency(model, ids), None, "—", "reference"))
        paths = {}
        for mode in ("dispatch", "portable"):
            advance(0, description=f"exporting the {mode} graph")
            paths[mode] = export_onnx(model, out / f"model.{mode}.onnx", mode=mode, routing_outputs=True,
                                      show_progress=False)
            advance()
        advance(0, description="fusing the dispatch graph")
        paths["fused"] = out / "model.fused.onnx"
        fuse_report = fuse(paths["dispatch"], paths["fused"])
        advance()
        for form, path in paths.items():
            advance(0, description=f"validating the {form} graph in ONNX Runtime")
            rows.append(_onnx_row(form, path, model, ids, out / f"report.{form}"))
            advance()
        advance(0, description="building an engine")
        rows.append(_engine_row(paths["portable"], model, out))
        advance()
    print_results(console, rows, label, fuse_report, out)
    return rows


def _demo_tokens(model: torch.nn.Module) -> np.ndarray:
    text = np.frombuffer(sample_text(), dtype=np.uint8)[:DEMO_SEQ].astype(np.int64)
    vocab = getattr(model, "vocab_size", 256)
    return (text % vocab)[None, :]


def _torch_latency(model: torch.nn.Module, ids: np.ndarray) -> float:
    x = torch.from_numpy(ids)
    with torch.no_grad():
        return _median_ms(lambda: model(x))


def _ort_latency(path: Path, ids: np.ndarray) -> float:
    session, feed = ort_session(path), {"input_ids": ids}
    return _median_ms(lambda: session.run(None, feed))


def _median_ms(run: Callable[[], object]) -> float:
    """Median wall time of TIMED_RUNS calls of `run`, in ms, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _onnx_row(form: str, path: Path, model, ids: np.ndarray, report_dir: Path) -> DemoRow:
    report = validate(path, model, shapes={"input_ids": ids.shape}, report_dir=report_dir)
    worst = max((o.max_abs for o in report.outputs if o.output == "logits"), default=None)
    tokens = sum(r.tokens for r in report.routing)
    agreeing = sum(r.agreeing for r in report.routing)
    near = sum(r.near_ties for r in report.routing)
    routing = f"{100 * agreeing / tokens:.2f}%" + (f" ({near} near-ties)" if near else "") if tokens else "n/a"
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6
    return DemoRow(f"{form} ONNX", "ORT CPU", size, _ort_latency(path, ids), worst, routing,
                   "PASSED" if report.passed else "FAILED")


def _engine_row(portable: Path, model: torch.nn.Module, out: Path) -> DemoRow:
    from moexport.trt_plugins import build_engine, engine_backend

    backend = engine_backend()
    if backend is None:
        return DemoRow("engine", "TensorRT", None, None, None, "—", "skipped: no TensorRT here")
    engine = build_engine(portable, out / f"model.portable.{backend}.plan", shapes={"input_ids": (1, DEMO_SEQ)})
    size = engine.stat().st_size / 1e6
    if backend == "tensorrt":
        report = validate(engine, model, runners=["trt"], report_dir=out / "report.engine")
        return DemoRow("portable engine", "TensorRT", size, report.latency_ms.get("tensorrt"),
                       max((o.max_abs for o in report.outputs), default=None), "—",
                       "PASSED" if report.passed else "FAILED")
    return DemoRow("portable engine", "TensorRT-RTX", size, None, None, "—", "built, not run*")


def print_results(console: Console, rows: list[DemoRow], label: str, fuse_report, out: Path) -> None:
    """Print what the demo found: the fusion report, the summary table and where the files are."""
    for line in str(fuse_report).splitlines():
        print_line(console, f"fusion: {line}")
    print_summary(console, rows, label)
    print_line(console, f"artifacts and parity reports (JSON + HTML) in {out}/")


def print_summary(console: Console, rows: list[DemoRow], label: str) -> None:
    """Print the demo's rows as one table titled with the model's `label` (every value whole at any width)."""
    caption = (f"batch 1 × {DEMO_SEQ} tokens of the text sample; max abs err of the logits against PyTorch;\n"
               "routing: identical top-k sets" + ("; * TensorRT-RTX runs on RTX GPUs only"
                                                  if any("*" in r.status for r in rows) else ""))
    cells = [[r.artifact, r.runtime, _fmt(r.size_mb, ".1f"), _fmt(r.latency_ms, ".1f"), _fmt(r.max_abs_err, ".1e"),
              r.routing, Text(r.status, style="red" if r.failed else ("green" if r.status == "PASSED" else ""))]
             for r in rows]
    columns = ("artifact", "runtime", "MB", "ms", "max err", "routing", "status")
    print_table(console, f"moexport demo — {label}", columns, cells, caption=caption)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)
