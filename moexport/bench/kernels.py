"""`moexport bench kernels`: σ-MoE FFN forward on the Triton kernels against its baselines (GPU).

For each shape and token count T, in one run, bf16, forward only, median milliseconds with L2
flushed before every call, so weights come from device memory (`FLUSHES`):

- dense FFN with the σ-MoE's parameters (d_ff = E*G) and with its active compute (d_ff = k*G),
  eagerly and replayed from a CUDA graph;
- σ-MoE with torch._grouped_mm (routing and dispatch in PyTorch);
- σ-MoE on the moexport kernels: eagerly as a user calls it (direct launches of the compiled
  kernels), eagerly with the opt-in cached-graph replays (`cuda_graph=True`:
  `moexport.kernels.graphs`), each with its host time per call, and from the caller's own CUDA graph;
- the floor: max(bytes / 4.25 TB/s, FLOPs / 690 TFLOP/s), bytes = x, y, router, the keys of the
  experts the cell's tokens select and the rows of their values some token activates (the rest
  meet only ReLU zeros; the gather kernels don't read them); FLOPs = router + k experts.

The kernel output is compared with the grouped_mm baseline (same routing rule) in every cell. The
σ-MoE runs with the shipped configs, or with those of --configs in their place: e.g. the picks of
the tuning harness (tools/tune_kernels.py, beside the package), which times candidate configs with
this module's layers, timing loop and error measure.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moexport.bench.report import add_results_options, results_folder, results_name, write_results
from moexport.core.errors import MoexportError

SHAPES = {  # name: (d_model, n_experts, expert_size, k)
    "WT103-small": (412, 16, 128, 4),
    "WT103-big": (1024, 32, 128, 4),
    "WT103-238M": (412, 128, 128, 4),
    "large": (2048, 64, 256, 8),
}
TOKENS = (1, 16, 256, 4096, 32768)
BANDWIDTH, MATMUL = 4.25e12, 690e12  # measured on the H200: copy bytes/s, bf16 GEMM FLOP/s
GRAPH_MAX_TOKENS = 32768
DEVICE = "cuda"

COLUMNS = ["shape", "T", "path", "dense_param_ms", "dense_compute_ms", "grouped_mm_ms", "moe_ms", "moe_cached_ms",
           "floor_ms", "value_rows_live", "moe_host_us", "moe_cached_host_us", "dense_param_graph_ms",
           "dense_compute_graph_ms", "moe_graph_ms", "vs_param", "vs_param_graph", "vs_compute", "vs_compute_graph",
           "vs_grouped_mm", "max_err", "flips"]


def floor_ms(d: int, E: int, G: int, k: int, T: int, *, used: float | None = None,
             value_rows: float | None = None) -> float:
    """max(bytes / BANDWIDTH, FLOPs / MATMUL): bytes of x, y, the router, the keys of the `used` experts
    (default: the number expected to be selected at least once) and `value_rows` rows of values
    (default: all of the used experts')."""
    from moexport.kernels.configs import expected_share

    used = E * expected_share(E, k, T) if used is None else used
    value_rows = used * G if value_rows is None else value_rows
    nbytes = 2 * (2 * T * d + E * d + used * d * G + value_rows * d)
    flops = 2 * T * (d * E + k * G * 2 * d)
    return 1e3 * max(nbytes / BANDWIDTH, flops / MATMUL)


# How L2 is flushed before each timed call. 'read': a reduction over a buffer ten times the L2
# evicts everything (writing back what is dirty) and leaves only clean lines, so the call reads its
# weights from HBM and writes nothing back but its own lines. 'memset': triton.testing.do_bench's
# flush, a memset of that buffer, leaves the L2 full of dirty lines (~50 MB on the H200) that are
# written back while the timed call streams its weights: up to ~7 us more for a call reading more
# than the L2 holds (bench/results/kernels_notes.md, round 6).
FLUSHES = ("read", "memset")
# (~0.14 ms of GPU time at 4 TB/s: longer than the host takes to issue any call here, so that an eager
# time is the GPU's; the host time is measured apart)
FLUSH_BYTES = 512 << 20
_flush_state: dict = {"mode": "read"}


def flush_l2() -> None:
    """Evict L2 (as FLUSHES says), so that the next call reads its weights from device memory."""
    state = _flush_state
    if "buffer" not in state:
        state["buffer"] = torch.zeros(FLUSH_BYTES // 8, dtype=torch.int64, device=DEVICE)
        state["sink"] = torch.zeros((), dtype=torch.int64, device=DEVICE)
    if state["mode"] == "memset":
        state["buffer"].zero_()
    else:
        torch.sum(state["buffer"], dim=0, out=state["sink"])


def median_ms(fn, rep: int = 50, warmup: int = 10) -> float:
    """Median ms of fn over about `rep` ms of calls (after `warmup` ms), L2 flushed before each: the
    timing loop of triton.testing.do_bench with the flush of `_flush_state`. The host issues each
    call while the flush runs, so an eager time is the GPU time whenever the host keeps up."""
    fn()
    estimate = max(1e-3, sum(_flushed_calls(fn, 5)) / 5)
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    times = sorted(_flushed_calls(fn, max(1, int(rep / estimate))))
    return times[len(times) // 2]


def _flushed_calls(fn, n: int) -> list[float]:
    """GPU ms of n calls of fn, each after an L2 flush."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        flush_l2()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def graphed(fn):
    """The replay of a CUDA graph of fn's launches (fn is called once first, outside the capture)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Layer:
    """Weights of one shape, and the implementations timed against each other; the σ-MoE planned with
    `configs` (a `ConfigTable`; None: the shipped one)."""

    def __init__(self, d, E, G, k, device=None, dtype=torch.bfloat16, configs=None):
        from moexport.kernels import sigma_moe_forward

        self._sigma_moe = sigma_moe_forward  # looked up once, as a user's import: not in the host time
        self.configs = configs
        device = device or DEVICE
        g = torch.Generator(device="cpu").manual_seed(0)
        make = lambda *s, scale: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
        self.d, self.E, self.G, self.k = d, E, G, k
        self.sel, self.keys = make(E, d, scale=d ** -0.5), make(E, d, G, scale=d ** -0.5)
        self.values = make(E, G, d, scale=(E * G) ** -0.5)
        self.w1, self.w2 = self.keys.permute(0, 2, 1).reshape(E * G, d), self.values.reshape(E * G, d).t().contiguous()
        self.c1, self.c2 = self.w1[: k * G].contiguous(), self.w2[:, : k * G].contiguous()
        pad = -d % 8  # torch._grouped_mm wants 16-byte aligned rows
        self.keys_p = F.pad(self.keys, (0, 0, 0, pad))
        self.values_p = F.pad(self.values, (0, pad))

    def dense(self, x, w1, w2):
        return F.linear(F.relu(F.linear(x, w1)), w2)

    def moe(self, x, cuda_graph=None):
        return self._sigma_moe(x, self.sel, self.keys, self.values, k=self.k, cuda_graph=cuda_graph,
                               configs=self.configs)

    def route(self, x):
        logits = F.linear(x.float(), self.sel.float())
        return torch.sigmoid(logits).topk(self.k, dim=-1)  # same rule on distinct logits

    def rows_needed(self, x) -> tuple[int, int]:
        """(experts some token selects, rows of their values some token activates): of an expert's
        values only the rows of hidden units some of its tokens activate take part in y (ReLU zeros
        the rest), and the kernels read only those (`experts.experts_kernel`)."""
        _, expert = self.route(x)
        used = live = 0
        for e in expert.unique().tolist():
            tokens = (expert == e).any(dim=1)
            live += int((F.relu(x[tokens] @ self.keys[e]) != 0).any(dim=0).sum())
            used += 1
        return used, live

    def grouped_mm(self, x):
        gate, expert = self.route(x)
        flat = expert.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=self.E), 0).to(torch.int32)
        rows = F.pad(x, (0, -self.d % 8))[order // self.k]
        h = F.relu(torch._grouped_mm(rows, self.keys_p, offs=offs))
        out = torch._grouped_mm(h, self.values_p, offs=offs)[:, : self.d].float()
        out = out * gate.reshape(-1)[order, None]
        y = torch.zeros(x.shape[0], self.d, device=x.device, dtype=torch.float32)
        return y.index_add_(0, order // self.k, out).to(x.dtype)


def agreement(layer: Layer, x, y, ref) -> dict:
    """Error against the baseline over tokens routed alike (0 when there are none), and the tokens
    routed differently (a row off by > 5%): how many, and the largest gap between their k-th and
    (k+1)-th logits."""
    rel = (y.float() - ref.float()).norm(dim=1) / ref.float().norm(dim=1).clamp_min(1e-6)
    flipped = rel > 0.05
    alike = ~flipped
    max_err = 0.0
    if alike.any():  # T = 1 with its token a near-tie has none (max() of nothing raises)
        max_err = float((y[alike].float() - ref[alike].float()).abs().max() / ref.float().abs().max())
    out = {"max_err": max_err, "flips": int(flipped.sum())}
    if out["flips"]:
        top = F.linear(x[flipped].float(), layer.sel.float()).topk(layer.k + 1, dim=-1).values
        out["flip_margin"] = float((top[:, -2] - top[:, -1]).max())
    return out


def _host_us(fn, n: int = 100) -> float:
    """Host time per call (microseconds) of n calls issued back to back, without waiting for the GPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * host / n


def _mode(name: str, T: int, configs=None) -> str:
    """The sequence and how a token's k contributions are summed, e.g. 'fused, pass'."""
    from moexport.kernels.configs import bucket, experts_config

    d, E, G, k = SHAPES[name]
    cfg = experts_config(d, E, G, d, k, bucket(T), configs=configs)
    return f"{cfg['mode']}, {cfg.get('finish', 'inline')}"


def measure(name: str, T: int, *, graph: bool = True, configs=None) -> dict:
    """One row of the table: every implementation timed at one shape and token count, the σ-MoE
    planned with `configs` (a `ConfigTable`; None: the shipped one)."""
    d, E, G, k = SHAPES[name]
    layer = Layer(d, E, G, k, configs=configs)
    x = torch.randn(T, d, device=DEVICE, dtype=torch.bfloat16)
    used, live = layer.rows_needed(x)
    row = {"shape": name, "T": T, "path": _mode(name, T, configs), "experts_used": used,
           "value_rows_live": live / (used * G),
           "floor_ms": floor_ms(d, E, G, k, T, used=used, value_rows=live)}
    calls = {"dense_param": lambda: layer.dense(x, layer.w1, layer.w2),
             "dense_compute": lambda: layer.dense(x, layer.c1, layer.c2), "moe": lambda: layer.moe(x),
             "moe_cached": lambda: layer.moe(x, cuda_graph=True)}
    with torch.no_grad():
        first = layer.moe(x)  # through Triton's JIT
        ref = None
        try:
            ref = layer.grouped_mm(x)
            row["grouped_mm_ms"] = median_ms(lambda: layer.grouped_mm(x))
        except RuntimeError as error:  # torch._grouped_mm missing or unsupported here
            row["grouped_mm_error"] = str(error).splitlines()[0]
        for what, fn in calls.items():
            row[f"{what}_ms"] = median_ms(fn)
            row[f"{what}_host_us"] = _host_us(fn)
            if graph and T <= GRAPH_MAX_TOKENS and what != "moe_cached":  # the same launches as moe
                row[f"{what}_graph_ms"] = median_ms(graphed(fn))
        if ref is not None:
            # the outputs of the first call (JIT), of a direct launch (table) and of a cached-graph replay
            row.update({f"{key}_first": value for key, value in agreement(layer, x, first, ref).items()})
            row.update(agreement(layer, x, layer.moe(x), ref))
            row.update({f"{key}_cached": value for key, value in
                        agreement(layer, x, layer.moe(x, cuda_graph=True), ref).items()})
    row["vs_param"] = row["moe_ms"] / row["dense_param_ms"]
    row["vs_compute"] = row["moe_ms"] / row["dense_compute_ms"]
    if "moe_graph_ms" in row:
        row["vs_param_graph"] = row["moe_graph_ms"] / row["dense_param_graph_ms"]
        row["vs_compute_graph"] = row["moe_graph_ms"] / row["dense_compute_graph_ms"]
    if "grouped_mm_ms" in row:
        row["vs_grouped_mm"] = row["grouped_mm_ms"] / row["moe_ms"]
    return row


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    series = [("dense_param_ms", "dense, param-equal"), ("dense_compute_ms", "dense, compute-equal"),
              ("grouped_mm_ms", "torch._grouped_mm"), ("moe_ms", "moexport kernels"),
              ("moe_graph_ms", "moexport kernels, CUDA graph"), ("floor_ms", "floor")]
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r["shape"] == shape]
        for key, label in series:
            pts = [(r["T"], r[key]) for r in sub if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if key == "floor_ms" else "-")
        ax.set(xscale="log", yscale="log", title=shape, xlabel="tokens T", ylabel="ms (median)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configs_from(path: str | None):
    """The table of configs a run plans with: None (the shipped one) without a file; else the shipped
    table with the file's configs (configs.json's format, e.g. the picks of tools/tune_kernels.py) in
    place of its own of the same keys, as they would be once shipped."""
    if path is None:
        return None
    from moexport.kernels.configs import ConfigTable, shipped

    return shipped().merged(ConfigTable.load(path))


def add_cell_options(parser: argparse.ArgumentParser) -> None:
    """The options of a run over benchmark cells (this benchmark, tools/tune_kernels.py): which cells,
    how L2 is flushed, which configs."""
    parser.add_argument("--shapes", nargs="*", default=None, help=f"Defaults to all: {', '.join(SHAPES)}.")
    parser.add_argument("--tokens", nargs="*", type=int, default=None, help="Defaults to 1 16 256 4096 32768.")
    parser.add_argument("--flush", choices=FLUSHES, default="read",
                        help="How L2 is flushed before each timed call: 'read' (default: a read of a 512 MB "
                             "buffer, the L2 left clean) or 'memset' (triton.testing.do_bench's: the L2 left "
                             "dirty, written back during the timed call).")
    parser.add_argument("--configs", default=None,
                        help="A table of configs in the format of moexport/kernels/configs.json (e.g. the picks "
                             "of tools/tune_kernels.py): its configs replace the shipped ones of the same keys.")


def cells_of(args: argparse.Namespace, program: str) -> list[tuple[str, int]]:
    """The (shape, T) cells of a run's options (`add_cell_options`), once they are checked and a GPU is
    found; sets the L2 flush they ask for."""
    _flush_state["mode"] = args.flush
    if not torch.cuda.is_available():
        raise MoexportError(program, "needs a CUDA GPU", "run it on the H200")
    shapes = args.shapes or list(SHAPES)
    for s in shapes:
        if s not in SHAPES:
            raise MoexportError(f"--shapes {s}", "is not a known shape", f"use some of {', '.join(SHAPES)}")
    return [(s, t) for s in shapes for t in (args.tokens or TOKENS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moexport bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_options(parser, "kernels", "kernels")
    parser.add_argument("--no-graph", action="store_true", help="Do not time the CUDA-graph replays.")
    add_cell_options(parser)
    args = parser.parse_args(argv)
    cells = cells_of(args, "moexport bench kernels")
    gpu = torch.cuda.get_device_name()
    configs = configs_from(args.configs)
    if configs is not None:
        print(f"configs of {args.configs} in place of the shipped ones of the same keys")
    rows = []
    from moexport.core.progress import progress

    with progress("benchmarking kernels", len(cells)) as advance:
        for shape, T in cells:
            rows.append(measure(shape, T, graph=not args.no_graph, configs=configs))
            advance(description=f"{shape} T={T}")
    import triton

    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "dtype": "bfloat16",
           "L2 flush": args.flush,
           "configs": f"tuned in this call ({Path(args.configs).name})" if args.configs else "shipped"}
    name = results_name(args.name, "kernels")
    paths = write_results(name, rows, columns=COLUMNS, out_dir=results_folder(args.output, "kernels"),
                          title="σ-MoE FFN forward: moexport kernels vs baselines", notes=NOTES,
                          environment=env, plot=_plot)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


NOTES = """\
Median ms, bf16, forward, one run (do_bench's timing loop), L2 flushed before every call (weights
read from HBM), as `L2 flush` above says: 'read' (a 512 MB buffer read, ~0.14 ms of GPU time: the
L2 left holding clean lines) or 'memset' (do_bench's kind of flush, a memset of that buffer, which
leaves ~50 MB of dirty lines that are written back while the timed call runs). The host issues
each call during the flush, so an eager time is the GPU time whenever the host keeps up.
- `moe_ms`: the σ-MoE call as a user makes it (`sigma_moe_forward`, plain eager, the default):
  direct launches of the compiled kernels (Triton's JIT only on a shape's first call).
- `moe_cached_ms`: the same call with `cuda_graph=True` (opt-in): from its second call it REPLAYS A
  CACHED CUDA GRAPH of the layer's launches: x copied into the graph's static input, one graph
  launch, y copied out into a fresh tensor (both copies are in the time), at every T here.
- `*_host_us` (JSON: also dense): host time per call, measured apart (100 calls back to back).
- `*_graph_ms`: the call replayed from a CUDA graph the caller captured (σ-MoE and both dense FFNs).
`path`: gather (route, experts: each expert's programs find their tokens themselves, nothing sorted,
no dispatch launch), fused (route, dispatch, experts: up, activation and down per row tile) or split
(route, dispatch, up CVMM, down CVMM); then how a token's k contributions are summed: inline (float32
accumulator zeroed by the route kernel, the last contributor of a row rounds it in the last launch),
pass (float32 accumulator: memset first, finalize launch last) or atomic (added straight into y in
bf16, which the route kernel zeroes: one rounding per add). Configs: see `configs` above. Targets, and the
comparison each uses:
`vs_param` = moe_ms / dense_param_ms (< 1 for T >= 256; <= 0.3 for WT103-big at T = 32768);
`vs_compute` = moe_ms / dense_compute_ms and `vs_compute_graph` = moe_graph_ms /
dense_compute_graph_ms: <= 2 for T <= 16; `vs_grouped_mm` = grouped_mm_ms / moe_ms (>= 3); all
eager/eager except the one marked graph/graph. `floor_ms` = max(bytes / 4.25 TB/s, FLOPs / 690
TFLOP/s), bytes = x, y, router, the keys of the experts the tokens select and the rows of their values
some token activates: `value_rows_live`, their share of those experts' value rows (the rest meet only
ReLU zeros, and the gather kernels don't read them; here, random weights, a unit fires for about half
of the tokens; in the shipped trained model for 23-37% of them). `max_err` = max |moe -
grouped_mm| / max |grouped_mm| over tokens routed alike; `flips` = tokens whose expert set differs
(row error > 5%), with the largest k-th vs (k+1)-th logit gap among them in the JSON
(`flip_margin`): near-ties that float32 logits summed in another order may decide either way.
"""
