"""`moexport bench onnx-gpu`: the σ-MoE as a user deploys it on ONNX Runtime's CUDA provider, against
every alternative, in one run (GPU, onnxruntime-gpu).

Layers (WT103-big width and the large shape, float16 and bfloat16, T = 1 … 32768 tokens), each a
one-layer ONNX graph run with IOBinding on CUDA tensors:

- `moexport_ort`: the fused SigmaMoE node on the compiled kernels (`libmoexport_ort.so`), and
  `moexport_ort_graph` the same session under ONNX Runtime's CUDA graphs (`enable_cuda_graph`);
- `torch_kernels` / `torch_kernels_graph`: moexport's PyTorch path (`sigma_moe_forward`, the same
  kernels), eager and replayed from a CUDA graph;
- `bodies`: the fused node on its function body (what ONNX Runtime runs without the library);
- `dense_param` / `dense_compute`: the dense FFN with the σ-MoE's parameters (d_ff = E·G) and with its
  active compute (d_ff = k·G), exported and run the same way (eager, and `*_graph` under CUDA graphs);
- `ort_moe`: ONNX Runtime's own `com.microsoft.MoE` of the same sizes (softmax routing: a speed
  anchor only).

Then whole LMs (WT103-small and WT103-big, float16): σ-MoE against its parameter-matched dense twin,
batch × tokens 1×1, 1×256, 16×256.

Every call is timed from the host after an L2 flush (weights from device memory) to the end of the
device's work (a device-wide synchronize): what one call costs a caller, launch overhead included. The
paths of a cell are timed in `--reps` interleaved rounds (each path once a round), median per path, so
host jitter falls on all of them alike (the function bodies apart, in fewer rounds). The ORT output is
checked against the PyTorch path (tokens routed alike).

    python -m moexport.bench onnx-gpu [--out DIR] [--reps 60] [--no-lm]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import onnx
import torch
from onnx import helper

from moexport.bench.kernels import flush_l2
from moexport.bench.report import add_results_options, results_folder, results_name, write_results
from moexport.core.errors import MoexportError
from moexport.core.onnx_files import ELEMENT_TYPES
from moexport.core.progress import progress
from moexport.exporter import export_onnx, fuse
from moexport.models import DenseMLP, SigmaMoE, from_preset
from moexport.plugins import ort_session, run_with_tensors

LAYER_SHAPES = {"WT103-big": (1024, 32, 128, 4), "large": (2048, 64, 256, 8)}  # d, E, G, k
TOKENS = (1, 16, 256, 4096, 32768)
DTYPES = ("float16", "bfloat16")
LM_PRESETS = ("wt103_small", "wt103_big")
LM_SHAPES = ((1, 1), (1, 256), (16, 256))
ARCHS = (90,)
CUDA = "CUDAExecutionProvider"
FLIP = 0.05  # a token's row error (relative to max |y|) above which its routing differs

LAYER_COLUMNS = ["shape", "dtype", "T", "moexport_ort_ms", "moexport_ort_graph_ms", "torch_kernels_ms",
                 "torch_kernels_graph_ms", "bodies_ms", "dense_param_ms", "dense_param_graph_ms", "dense_compute_ms",
                 "dense_compute_graph_ms", "ort_moe_ms", "vs_torch", "vs_torch_graph", "vs_param", "vs_compute",
                 "vs_ort_moe", "max_err", "flips"]
LM_COLUMNS = ["model", "dtype", "batch", "tokens", "sigma_moe_ms", "dense_ms", "vs_dense"]


def _timed_ms(fn) -> float:
    """ms of one `fn()` from the host, after an L2 flush, to the end of the device's work."""
    flush_l2()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def interleaved_ms(calls: dict, reps: int) -> tuple[dict, dict]:
    """Median ms of each call, timed in `reps` rounds that run every call once (in a rotating order):
    host jitter and clock drift fall on every path alike, not on whichever was timed in a bad second.
    Returns (medians, errors): a call that fails while warming up is reported in errors, not timed."""
    times, errors = {}, {}
    for key, fn in calls.items():
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times[key] = []
        except Exception as error:  # noqa: BLE001 - a baseline the runtime cannot run is reported, not fatal
            errors[key] = str(error).strip().splitlines()[-1][:200]
    order = list(times)
    for r in range(reps):
        for key in order[r % len(order):] + order[:r % len(order)]:
            times[key].append(_timed_ms(calls[key]))
    return {key: statistics.median(t) for key, t in times.items()}, errors


def _ort_moe_graph(d: int, E: int, G: int, k: int, dtype: str, sel: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor) -> onnx.ModelProto:
    """ONNX Runtime's com.microsoft.MoE of the same sizes: router MatMul, then MoE (softmax over the
    logits inside, weights [E, out, in])."""
    elem = ELEMENT_TYPES[dtype]
    inits = [_half_tensor(sel.t(), "router", elem), _half_tensor(keys.transpose(1, 2), "fc1", elem),
             _half_tensor(values.transpose(1, 2), "fc2", elem)]
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"]),
             helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=k,
                              activation_type="relu", normalize_routing_weights=0)]
    graph = helper.make_graph(nodes, "ort_moe", [helper.make_tensor_value_info("x", elem, ["T", d])],
                              [helper.make_tensor_value_info("y", elem, ["T", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def _half_tensor(t: torch.Tensor, name: str, elem: int) -> onnx.TensorProto:
    """A float16 / bfloat16 initializer from a torch tensor, bit for bit."""
    raw = t.contiguous().cpu().view(torch.int16).numpy().tobytes()
    return helper.make_tensor(name, elem, list(t.shape), raw, raw=True)


def _layer_files(shape: tuple[int, int, int, int], dtype: str, folder: Path) -> dict:
    """The layer's modules and ONNX files: fused with and without kernels, dense twins, ORT's MoE."""
    d, E, G, k = shape
    torch.manual_seed(0)
    moe = SigmaMoE(d, E, G, k).eval().to(getattr(torch, dtype))
    param, compute = (DenseMLP(d, ff).eval().to(getattr(torch, dtype)) for ff in (E * G, k * G))
    files = {}
    source = export_onnx(moe, folder / "moe.onnx", dtype=dtype)
    fuse(source, folder / "moe.kernels.onnx", archs=ARCHS, max_tokens=max(TOKENS))
    fuse(source, folder / "moe.bodies.onnx", archs=())
    files.update(kernels=folder / "moe.kernels.onnx", bodies=folder / "moe.bodies.onnx")
    for name, module in (("dense_param", param), ("dense_compute", compute)):
        files[name] = export_onnx(module, folder / f"{name}.onnx", dtype=dtype)
    onnx.save(_ort_moe_graph(d, E, G, k, dtype, moe.expert_sel.data, moe.keys.data, moe.values.data),
              str(folder / "ort_moe.onnx"))
    files["ort_moe"] = folder / "ort_moe.onnx"
    sessions = {key: ort_session(path, providers=[CUDA]) for key, path in files.items()}
    return {"moe": moe.cuda(), "files": files, "sessions": sessions}


def measure_layer(name: str, dtype: str, built: dict, T: int, reps: int) -> dict:
    """One cell: every implementation of the layer at T tokens (the CUDA-graph sessions are made for the
    cell's shapes, the eager ones are the layer's, bound again)."""
    d, *_, k = LAYER_SHAPES[name]
    moe, files, sessions = built["moe"], built["files"], built["sessions"]
    x = torch.randn(1, T, d, device="cuda", dtype=getattr(torch, dtype))
    outputs = {key: torch.empty_like(x) for key in sessions}
    row = {"shape": name, "dtype": dtype, "T": T}
    from moexport.kernels import sigma_moe_forward

    def torch_kernels(graph=None):
        return lambda: sigma_moe_forward(x, moe.expert_sel, moe.keys, moe.values, k=k, cuda_graph=graph)

    def eager(key, inputs=None):
        return lambda: run_with_tensors(sessions[key], inputs or {"x": x}, {"y": outputs[key]})

    def graphed(key):
        session = ort_session(files[key], providers=[(CUDA, {"enable_cuda_graph": "1"})])
        out = torch.empty_like(x)
        return lambda: run_with_tensors(session, {"x": x}, {"y": out})

    x2 = x.reshape(T, d)
    outputs["ort_moe"] = torch.empty_like(x2)
    calls = {"moexport_ort": eager("kernels"), "moexport_ort_graph": graphed("kernels"),
             "torch_kernels": torch_kernels(), "torch_kernels_graph": torch_kernels(True), "bodies": eager("bodies"),
             "dense_param": eager("dense_param"), "dense_param_graph": graphed("dense_param"),
             "dense_compute": eager("dense_compute"), "dense_compute_graph": graphed("dense_compute"),
             "ort_moe": eager("ort_moe", {"x": x2})}
    # the function bodies take 30-170x as long as the rest: timed apart, with fewer rounds
    slow = {"bodies": calls.pop("bodies")}
    for group, rounds in ((calls, reps), (slow, max(3, reps // 10))):
        medians, errors = interleaved_ms(group, rounds)
        row.update({f"{key}_ms": medians.get(key) for key in group})
        if errors:
            row.setdefault("errors", {}).update(errors)
    calls["moexport_ort"]()
    want = calls["torch_kernels"]()
    torch.cuda.synchronize()
    # tokens whose expert set differs (a near-tie the float32 router weight breaks the other way than the
    # layer's own) show as a whole row off: counted apart, as `bench kernels` does
    scale = want.float().abs().max().clamp(min=1e-30)
    row_err = ((outputs["kernels"].float() - want.float()).abs().amax(-1) / scale).reshape(-1)
    row["flips"] = int((row_err > FLIP).sum())
    row["max_err"] = float(row_err[row_err <= FLIP].max()) if row["flips"] < row_err.numel() else None

    def ratio(a, b):
        return row[a] / row[b] if row.get(a) and row.get(b) else None

    row.update(vs_torch=ratio("moexport_ort_ms", "torch_kernels_ms"),
               vs_torch_graph=ratio("moexport_ort_graph_ms", "torch_kernels_graph_ms"),
               vs_param=ratio("moexport_ort_ms", "dense_param_ms"), vs_compute=ratio("moexport_ort_ms", "dense_compute_ms"),
               vs_ort_moe=ratio("moexport_ort_ms", "ort_moe_ms"))
    return row


def measure_lm(preset: str, folder: Path, reps: int) -> list[dict]:
    """σ-MoE LM against its dense twin on the CUDA provider, float16, at each batch × tokens."""
    calls = {}
    for ffn in ("sigma_moe", "dense"):
        torch.manual_seed(0)
        model = from_preset(preset, ffn=ffn).eval()
        source = export_onnx(model, folder / f"{preset}.{ffn}.onnx", dtype="float16")
        if ffn == "sigma_moe":
            fuse(source, folder / f"{preset}.fused.onnx", archs=ARCHS, max_tokens=max(b * t for b, t in LM_SHAPES))
            source = folder / f"{preset}.fused.onnx"
        calls[ffn] = (source, model.vocab_size)
    sessions = {ffn: ort_session(path, providers=[CUDA]) for ffn, (path, _) in calls.items()}
    rows = []
    for batch, tokens in LM_SHAPES:
        ids = torch.randint(0, calls["dense"][1], (batch, tokens), device="cuda")
        row = {"model": preset, "dtype": "float16", "batch": batch, "tokens": tokens}
        runs = {}
        for ffn, (_, vocab) in calls.items():
            logits = torch.empty(batch, tokens, vocab, device="cuda", dtype=torch.float16)
            runs[ffn] = partial(run_with_tensors, sessions[ffn], {"input_ids": ids}, {"logits": logits})
        medians, errors = interleaved_ms(runs, reps)
        if errors:
            raise MoexportError(f"bench onnx-gpu, {preset}", f"could not run: {errors}")
        row.update({f"{ffn}_ms": ms for ffn, ms in medians.items()})
        row["vs_dense"] = row["sigma_moe_ms"] / row["dense_ms"]
        rows.append(row)
    return rows


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(s, dt) for s in LAYER_SHAPES for dt in DTYPES]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 4), squeeze=False)
    series = [("moexport_ort_ms", "moexport on ORT CUDA"), ("moexport_ort_graph_ms", "moexport on ORT CUDA, CUDA graph"),
              ("torch_kernels_ms", "moexport PyTorch path"), ("bodies_ms", "ORT function body"),
              ("dense_param_ms", "dense, param-equal (ORT)"), ("dense_compute_ms", "dense, compute-equal (ORT)"),
              ("ort_moe_ms", "com.microsoft.MoE (ORT)")]
    for ax, (shape, dtype) in zip(axes[0], cells):
        sub = [r for r in rows if r.get("shape") == shape and r.get("dtype") == dtype]
        for key, label in series:
            pts = [(r["T"], r[key]) for r in sub if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log", title=f"{shape} {dtype}", xlabel="tokens T", ylabel="ms per call")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moexport bench onnx-gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_options(parser, "onnx-gpu", "onnx_gpu")
    parser.add_argument("--reps", type=int, default=60, help="Timed rounds per cell. Defaults to 60.")
    parser.add_argument("--tokens", nargs="*", type=int, default=None, help="Defaults to 1 16 256 4096 32768.")
    parser.add_argument("--no-lm", action="store_true", help="Layers only, no whole LMs.")
    args = parser.parse_args(argv)
    import onnxruntime

    if not torch.cuda.is_available() or CUDA not in onnxruntime.get_available_providers():
        raise MoexportError("moexport bench onnx-gpu", "needs a CUDA GPU and onnxruntime-gpu",
                            "run it on the H200 (see the README)")
    tokens = args.tokens or TOKENS
    import onnxruntime

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "kernels": f"compiled for sm_{', sm_'.join(map(str, ARCHS))} at fuse time"}
    name, out = results_name(args.name, "onnx_gpu"), results_folder(args.output, "onnx-gpu")
    rows, lm_rows = [], []

    def save():  # after every cell: a call cut short by its time limit keeps what it measured
        write_results(name, rows, columns=LAYER_COLUMNS, out_dir=out, environment=env, extra={"lm_rows": lm_rows},
                      title="σ-MoE on ONNX Runtime's CUDA provider: compiled kernels vs every alternative",
                      notes=NOTES + "\n\n## Whole LMs\n\n" + _lm_table(lm_rows), plot=_plot)

    with tempfile.TemporaryDirectory(prefix="moexport-onnx-gpu-") as tmp:
        cells = [(s, dt) for s in LAYER_SHAPES for dt in DTYPES]
        with progress("onnx-gpu: layers", len(cells) * len(tokens)) as advance:
            for shape, dtype in cells:
                folder = Path(tmp) / f"{shape}.{dtype}"
                folder.mkdir()
                built = _layer_files(LAYER_SHAPES[shape], dtype, folder)
                for T in tokens:
                    rows.append(measure_layer(shape, dtype, built, T, args.reps))
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
                    advance(description=f"{shape} {dtype} T={T}")
                save()
        if not args.no_lm:
            for preset in LM_PRESETS:
                lm_rows += measure_lm(preset, Path(tmp), args.reps)
                print(lm_rows[-3:], flush=True)
                save()
    print(f"results in {out}/{name}.{{md,json,png}}")
    return 0


def _lm_table(rows: list[dict]) -> str:
    from moexport.bench.report import markdown_table

    return markdown_table(rows, LM_COLUMNS) if rows else "(not measured in this run)"


NOTES = """\
Milliseconds per call from the host, after an L2 flush, to the end of the device's work (median of
interleaved rounds: every path once a round); launch overhead included, as a caller sees it. Ratios:
`vs_torch` = moexport_ort / torch_kernels (same kernels: target <= 1.15), `vs_torch_graph` the same
both under CUDA graphs, `vs_param` = moexport_ort / dense_param (target < 1 at T >= 256), `vs_compute`
= moexport_ort / dense_compute (target <= 2 at T <= 16), `vs_ort_moe` = moexport_ort / ort_moe (target
< 1; ORT's MoE routes by softmax: a speed anchor, not the same model). `max_err` = max |ORT - PyTorch
path| / max |PyTorch path| over the tokens routed alike, `flips` the tokens whose row differs by more
than 5% (routed differently). An empty cell is a baseline the runtime could not run (`errors` in the
JSON)."""
