"""`moexport bench trt-plugin`: the TensorRT SigmaMoE plugin against moexport's PyTorch kernel path (GPU).

For each dtype and T, one layer shape, forward, in one run:

- the plugin as TensorRT runs it: libmoexport_trt.so's SigmaMoE, created, configured for a profile up to
  the largest T, serialised, created again for the runtime and enqueued on the stream through
  TensorRT's interfaces (`moexport.trt_plugins.harness`; no TensorRT runs on this GPU), launching the
  layer's kernels from the bundle `moexport fuse` would attach, compiled here ahead of time;
- `moexport.kernels.sigma_moe_forward`, the same kernels and plans through Triton's launcher, eagerly;
- the plans of a file whose router weight is float32 (the op set takes float32 or the layer's dtype;
  `moexport fuse` stores the layer's where it holds the weight exactly, as for every half-precision
  export) through that same launcher (`torch_f32_router`): what a float32 router weight costs.

With `--profile`, the GPU time of every kernel of one call of each (torch.profiler), a second table
of the results: where a gap between them comes from.

Median GPU ms with L2 flushed before every call (the loop of `moexport.bench.kernels`; each call is
issued during the flush, so the time is the GPU's), the host time of a call apart, and the plugin's
output against the PyTorch path's (routing compared token by token). The issue's target: the plugin
within 1.1x of the PyTorch path.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moexport.bench.kernels import SHAPES, TOKENS, Layer, _host_us, agreement, median_ms
from moexport.bench.report import add_results_options, markdown_table, results_folder, results_name, write_results
from moexport.core.errors import MoexportError

DTYPES = ("float16", "bfloat16", "float32")
PROFILED = (1, 16, 256)
TARGET = 1.1
COLUMNS = ["shape", "dtype", "T", "plugin_ms", "torch_ms", "ratio", "torch_f32_router_ms", "plugin_host_us",
           "torch_host_us", "workspace_kb", "max_err", "flips"]


def layer_kernels(layer: Layer, dtype: str, max_tokens: int) -> dict:
    """The SigmaMoE node's attributes as `moexport build` hands them to TensorRT: the op's, its bundle."""
    from moexport.kernels import bundle as bundles
    from moexport.kernels.plan import MoEShape

    shape = MoEShape(layer.d, layer.E, layer.G, layer.d, layer.k, dtype)
    kernels = bundles.sigma_moe_kernels(shape, router_dtype=dtype, max_tokens=max_tokens)
    data = bundles.build_bundle(kernels, archs=(_sm(),))
    return {"k": layer.k, "selection": "sigmoid", "activation": "relu", "kernels": data,
            "kernels_key": bundles.read_bundle(data)["key"]}


def _sm() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def contract_plans(layer: Layer, dtype: str):
    """The plans of a float32 router weight on PyTorch's launcher: tokens -> y."""
    from moexport.kernels import bundle as bundles
    from moexport.kernels.host import run_plan
    from moexport.kernels.plan import MoEShape

    kernels = bundles.sigma_moe_kernels(MoEShape(layer.d, layer.E, layer.G, layer.d, layer.k, dtype))
    sel = layer.sel.float()

    def forward(x):
        tensors = {"x": x, "expert_sel": sel, "keys": layer.keys, "values": layer.values}
        return run_plan(kernels.plan_for(x.shape[0]), tensors)["y"]
    return forward


def measure(harness, layer: Layer, attributes: dict, name: str, dtype: str, T: int, max_tokens: int,
            profile: list | None = None) -> dict:
    """One row: the plugin's enqueue, the PyTorch path and a float32 router's plans on PyTorch's
    launcher, timed on the same x; with `profile`, each one's kernels appended to it."""
    from moexport.trt_plugins.harness import prepare

    x = torch.randn(T, layer.d, device="cuda", dtype=layer.keys.dtype)
    sel = layer.sel  # in the layer's dtype, as `moexport fuse` stores a half-precision export's
    y = torch.empty_like(x)
    call = prepare(harness, "SigmaMoE", "sigma_moe", attributes, [x, sel, layer.keys, layer.values], [y],
                   largest=[(max_tokens, layer.d), tuple(sel.shape), tuple(layer.keys.shape),
                            tuple(layer.values.shape)])
    stream = torch.cuda.current_stream().cuda_stream
    plugin = lambda: call(stream)
    contract = contract_plans(layer, dtype)
    with torch.no_grad():
        ref = layer.moe(x)  # through Triton's JIT once, then the launches timed below
        contract(x)
        plugin()
        row = {"shape": name, "dtype": dtype, "T": T, "workspace_kb": call.workspace_bytes / 1024,
               **agreement(layer, x, y, ref)}
        row["plugin_ms"], row["torch_ms"] = median_ms(plugin), median_ms(lambda: layer.moe(x))
        row["torch_f32_router_ms"] = median_ms(lambda: contract(x))
        row["plugin_host_us"], row["torch_host_us"] = _host_us(plugin), _host_us(lambda: layer.moe(x))
        if profile is not None:
            for label, fn in (("plugin", plugin), ("torch", lambda: layer.moe(x)),
                              ("torch_f32_router", lambda: contract(x))):
                profile += [{"dtype": dtype, "T": T, "path": label, **k} for k in kernel_times(fn)]
    row["ratio"] = row["plugin_ms"] / row["torch_ms"]
    return row


def kernel_times(fn, calls: int = 20) -> list[dict]:
    """Median GPU microseconds of each kernel (and memset) one call of fn launches, L2 flushed before
    each call, in launch order (torch.profiler, which sees launches through the driver too)."""
    from moexport.bench.kernels import flush_l2

    flush = {e["name"] for e in _gpu_events(flush_l2, 1)}
    mine = [e for e in _gpu_events(lambda: (flush_l2(), fn()), calls) if e["name"] not in flush]
    per_call = len(mine) // calls
    rows = []
    for i in range(per_call):
        times = sorted(mine[c * per_call + i]["us"] for c in range(calls))
        rows.append({"kernel": mine[i]["name"][:60], "us": times[len(times) // 2]})
    return rows


def _gpu_events(fn, calls: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [{"name": e.name, "us": e.device_time} for e in prof.events() if e.device_type.name == "CUDA"]


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        line = left.plot([r["T"] for r in sub], [r["plugin_ms"] for r in sub], marker="o", label=f"plugin, {dtype}")
        left.plot([r["T"] for r in sub], [r["torch_ms"] for r in sub], marker="x", linestyle="--",
                  color=line[0].get_color(), label=f"PyTorch path, {dtype}")
        right.plot([r["T"] for r in sub], [r["ratio"] for r in sub], marker="o", label=dtype)
    right.axhline(TARGET, color="red", linestyle=":", label=f"target {TARGET}x")
    left.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms (median)", title=rows[0]["shape"])
    right.set(xscale="log", xlabel="tokens T", ylabel="plugin / PyTorch path", title="GPU time ratio")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NOTES = f"""\
plugin: libmoexport_trt.so's SigmaMoE, enqueued through TensorRT's plugin interfaces by
`moexport.trt_plugins.harness` (no TensorRT runs on this GPU) after the calls TensorRT makes to
build and deserialise an engine (workspace sized for a profile up to the largest T); its kernels are
the layer's bundle (fused as `moexport fuse` does, for this GPU), launched by the native launcher.
PyTorch path: `moexport.kernels.sigma_moe_forward`, the same plans through Triton's launcher, eager.
The router weight is in the layer's dtype for both, as `moexport fuse` stores it where it is exact.
Median ms with L2 flushed before every call (read flush), GPU time; host time per call apart (the
plugin's includes the ctypes call of the harness). ratio = plugin / PyTorch path; target <= {TARGET}.
torch_f32_router: the plans of a float32 router weight (a file whose router the layer's dtype cannot
hold) on PyTorch's launcher.
max_err, flips: the plugin's y against the PyTorch path's (`moexport.bench.kernels.agreement`).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moexport bench trt-plugin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_options(parser, "trt-plugin", "trt_plugin")
    parser.add_argument("--shape", default="WT103-small", help=f"Layer shape, one of {', '.join(SHAPES)}.")
    parser.add_argument("--tokens", nargs="*", type=int, default=None, help="Defaults to 1 16 256 4096 32768.")
    parser.add_argument("--dtypes", nargs="*", default=None, help=f"Defaults to {' '.join(DTYPES)}.")
    parser.add_argument("--profile", nargs="*", type=int, default=None, metavar="T",
                        help="Also profile the kernels of each path at these token counts (default with no "
                             "value: 1 16 256): a second table of the results.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise MoexportError("moexport bench trt-plugin", "needs a CUDA GPU", "run it on the H200")
    if args.shape not in SHAPES:
        raise MoexportError(f"--shape {args.shape}", "is not a known shape", f"use one of {', '.join(SHAPES)}")
    dtypes, tokens = args.dtypes or list(DTYPES), args.tokens or list(TOKENS)
    import triton

    from moexport.core.progress import progress
    from moexport.trt_plugins.harness import PluginHarness

    gpu = torch.cuda.get_device_name()
    name, out = results_name(args.name, "trt_plugin"), results_folder(args.output, "trt-plugin")
    harness, rows, kernels, max_tokens = PluginHarness(), [], [], max(tokens)

    def save():  # after every dtype: a call cut short by its time limit keeps what it measured
        env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "L2 flush": "read",
               "within target": all(r["ratio"] <= TARGET for r in rows)}
        notes = NOTES if not kernels else NOTES + (
            "\n## The kernels of one call\n\nMedian GPU µs of each kernel a call launches (torch.profiler, L2 "
            "flushed before each call), in launch order; the gaps between kernels are not in them.\n\n"
            + markdown_table(kernels, ["dtype", "T", "path", "kernel", "us"]) + "\n")
        return write_results(name, rows, columns=COLUMNS, out_dir=out, environment=env, notes=notes, plot=_plot,
                             extra={"kernels": kernels},
                             title="σ-MoE forward: the TensorRT plugin vs the PyTorch kernel path")

    with progress("benchmarking the TensorRT plugin", len(dtypes) * len(tokens)) as advance:
        for dtype in dtypes:
            layer = Layer(*SHAPES[args.shape], dtype=getattr(torch, dtype))
            advance(0, description=f"compiling the {dtype} kernels")
            attributes = layer_kernels(layer, dtype, max_tokens)
            for T in tokens:
                traced = kernels if args.profile is not None and T in (args.profile or PROFILED) else None
                rows.append(measure(harness, layer, attributes, args.shape, dtype, T, max_tokens, traced))
                advance(description=f"{dtype} T={T}")
            paths = save()
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
