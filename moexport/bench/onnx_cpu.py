"""The `onnx-cpu` suite: ONNX Runtime CPU latency of the three graph forms against PyTorch eager.

For the WT103-small model (full width, random weights: latency does not depend on training) and its
σ-MoE layer alone, at batch 1: PyTorch eager (the reference forward, which is what runs on a CPU),
and ONNX Runtime CPU on the dispatch, portable and fused graphs. The parameter-equal dense model
(PyTorch eager and ONNX Runtime) is measured in the same run as the bar σ-MoE has to clear. Every
ONNX output is also checked against eager (max relative error, routing agreement), so a fast wrong
graph cannot look good.

    python -m moexport.bench onnx-cpu [--tokens 256] [--iterations 20] [--out DIR]

Results go to a fresh folder ./moexport-bench/onnx-cpu-<date>-<time> unless --out names one (the
committed results were written with --out bench/results); the paths written are printed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moexport.bench.report import add_results_options, results_folder, write_results
from moexport.core.progress import progress
from moexport.exporter import export_onnx, fuse
from moexport.models import SigmaMoE, from_preset
from moexport.plugins import ort_session

FORMS = ("dispatch", "portable", "fused")


def _time(candidates: dict[str, callable], iterations: int) -> dict[str, tuple[float, float]]:
    """(median, min) milliseconds per candidate, after 3 warm-up calls each.

    The candidates take turns, one call each per round, so a change in machine load (the CI machine is
    shared) hits all of them alike.
    """
    for fn in candidates.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in candidates}
    for _ in range(iterations):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _graphs(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """The dispatch, portable and fused ONNX files of `model`."""
    paths = {form: folder / f"{form}.onnx" for form in FORMS}
    for form in ("dispatch", "portable"):
        export_onnx(model, paths[form], mode=form, routing_outputs=True)
    fuse(paths["dispatch"], paths["fused"], archs=())  # the CPU runs the function bodies
    return paths


def _candidates(name: str, model: torch.nn.Module, feed: dict[str, np.ndarray], paths: dict[str, Path],
                threads: int) -> list[tuple[dict, callable]]:
    """(row, timed call) for PyTorch eager and each ONNX graph of one model and input, outputs checked."""
    inputs = [torch.from_numpy(v) for v in feed.values()]
    reference, routes = _reference(model, inputs)

    def eager():
        with torch.no_grad():
            model(*inputs)

    found = [({"model": name, "runtime": "pytorch eager", "form": "-"}, eager)]
    for form, path in paths.items():
        session = ort_session(path, threads=threads)
        output, *experts = session.run(None, feed)
        row = {"model": name, "runtime": "onnxruntime cpu", "form": form,
               "max_rel_error": float(np.abs(output - reference).max() / max(np.abs(reference).max(), 1e-30))}
        if experts:
            same = [np.all(np.sort(a, -1) == np.sort(b, -1), -1) for a, b in zip(experts, routes)]
            row["routing_agreement"] = float(np.mean(same))
        found.append((row, lambda s=session: s.run(None, feed)))
    return found


def _wait_for_quiet(max_load: float, patience_s: float) -> float:
    """Wait until the 1-minute load average is below `max_load` (at most `patience_s`); return it."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(15)
    return os.getloadavg()[0]


def _reference(model: torch.nn.Module, inputs: list[torch.Tensor]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Eager output and, per σ-MoE layer (module order), the experts it routes its input to."""
    seen, hooks = [], []
    for module in model.modules():
        if isinstance(module, SigmaMoE):
            hooks.append(module.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))))
    with torch.no_grad():
        output = model(*inputs).numpy()  # on a CPU the eager forward is the PyTorch reference
        routes = [m.route(x)[1].numpy() for m, x in seen]
    for hook in hooks:
        hook.remove()
    return output, routes


def _cpu_name() -> str:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.machine()


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        subset = [r for r in rows if r["model"] == name]
        labels = ["eager" if r["form"] == "-" else r["form"] for r in subset]
        ax.bar(labels, [r["median_ms"] for r in subset],
               color=["#888888" if r["form"] == "-" else "#3070b0" for r in subset])
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("median latency (ms)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moexport.bench onnx-cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="Tokens of the batch-1 sequence. Defaults to 256.")
    parser.add_argument("--iterations", type=int, default=20, help="Timed runs per row. Defaults to 20.")
    add_results_options(parser, "onnx-cpu")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="Start timing once the 1-minute load average is below this. Defaults to 1.0.")
    parser.add_argument("--patience", type=float, default=900, help="Seconds to wait for that. Defaults to 900.")
    args = parser.parse_args(argv)
    out = results_folder(args.output, "onnx-cpu")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    tokens = args.tokens
    lm = from_preset("wt103_small", dropout=0.0).eval()
    dense = from_preset("wt103_small", "dense", dropout=0.0).eval()
    layer = SigmaMoE(412, 16, 128, 4).eval()
    ids = {"input_ids": np.random.default_rng(0).integers(0, lm.vocab_size, (1, tokens))}
    x = np.random.default_rng(1).standard_normal((1, tokens, 412), np.float32)
    candidates = []
    with tempfile.TemporaryDirectory() as folder, progress("onnx-cpu benchmark", total=4) as advance:
        folder = Path(folder)
        (folder / "layer").mkdir()
        (folder / "lm").mkdir()
        layer_paths = _graphs(layer, folder / "layer")
        candidates += _candidates("σ-MoE layer, 1 token", layer, {"x": x[:, :1]}, layer_paths, threads)
        candidates += _candidates(f"σ-MoE layer, {tokens} tokens", layer, {"x": x}, layer_paths, threads)
        advance()
        candidates += _candidates(f"WT103-small σ-MoE LM, 1×{tokens}", lm, ids, _graphs(lm, folder / "lm"), threads)
        advance()
        dense_path = export_onnx(dense, folder / "dense.onnx")
        candidates += _candidates(f"WT103-small dense LM, 1×{tokens}", dense, ids, {"dense": dense_path}, threads)
        advance(description="waiting for a quiet machine, then timing")
        load_start = _wait_for_quiet(args.max_load, args.patience)
        timings = _time({i: fn for i, (_, fn) in enumerate(candidates)}, args.iterations)
        advance()
    rows = [{**row, "median_ms": timings[i][0], "min_ms": timings[i][1]} for i, (row, _) in enumerate(candidates)]
    eager = {r["model"]: r["median_ms"] for r in rows if r["form"] == "-"}
    for row in rows:
        row["vs_eager"] = eager[row["model"]] / row["median_ms"]
    import onnxruntime

    environment = {"cpu": _cpu_name(), "threads": threads, "torch": torch.__version__,
                   "onnxruntime": onnxruntime.__version__,
                   "load average (start, end)": f"{load_start:.1f}, {os.getloadavg()[0]:.1f}"}
    notes = ("Median and minimum of the timed runs (after 3 warm-up runs), batch 1, float32, the same threads for "
             "PyTorch and ONNX Runtime. vs_eager > 1 means faster than PyTorch eager on the same model and input. "
             "max_rel_error: max |onnx - eager| / max |eager| of the output; routing_agreement: fraction of tokens "
             "(over all σ-MoE layers) whose top-k expert set equals PyTorch's, reported apart from the numeric "
             "error. The machine is shared with other jobs: timing starts once the load average is low (values in "
             "the header), and all rows, LMs and layers, eager and ONNX Runtime, are timed in one alternating loop, "
             "one call each per round, so that any load hits them alike. Forms: dispatch = TopKDispatch + CVMM "
             "nodes run through their function bodies; portable = standard ops, dense-masked experts; fused = one "
             "SigmaMoE node per layer run through its function body (per-expert gather, two MatMuls, scatter-add): "
             "the compiled op library runs on ONNX Runtime's CUDA execution provider only.")
    paths = write_results("onnx_cpu", rows, columns=["model", "runtime", "form", "median_ms", "min_ms", "vs_eager",
                                                     "max_rel_error", "routing_agreement"],
                          out_dir=out, title="ONNX Runtime CPU latency of the three graph forms vs PyTorch eager",
                          notes=notes, environment=environment, plot=_plot)
    best = min((r for r in rows if r["model"].startswith("WT103-small σ-MoE") and r["form"] != "-"),
               key=lambda r: r["median_ms"])
    print(f"fastest form {best['form']}: {best['median_ms']:.1f} ms, {best['vs_eager']:.2f}x eager")
    for path in paths.values():
        print(f"wrote {path}")
    return 0 if best["vs_eager"] >= 1.0 else 3
