"""Tuning sweeps of the σ-MoE kernels' experts configs (GPU), beside the package, not in it.

For each shape and token count of the kernel benchmark (`moexport bench kernels`, whose layers,
timing loop, L2 flush and error measure this builds on), time candidate experts configs eagerly and
replayed from a CUDA graph, check each one's output against torch._grouped_mm, and pick the one to
ship (`pick`). Writes every timing (`<name>.json`, the sweep's record) and the picks in the format
of moexport/kernels/configs.json (`<name>_picks.json`), so that shipping them is merging them in:

    python tools/tune_kernels.py [--sequences] [--shapes large] [--tokens 16 256]   # on the GPU
    moexport bench kernels --configs bench/results/kernels_tuned_h200_picks.json  # the benchmark with them
    python tools/tune_kernels.py --ship bench/results/kernels_tuned_h200_picks.json  # into configs.json

`tools/h200.sh` runs the sweeps and the benchmark in one device call.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
from pathlib import Path

import torch

from moexport.bench.kernels import (DEVICE, SHAPES, Layer, add_cell_options, agreement, cells_of, configs_from,
                                    graphed, median_ms)
from moexport.core.errors import MoexportError
from moexport.kernels.configs import (GATHER_MAX_TOKENS, ROUTE_FIELDS, ConfigTable, bucket, experts_config,
                                      experts_key, shipped)

SHIPPED = Path(__file__).resolve().parents[1] / "moexport" / "kernels" / "configs.json"

# Configs are timed in float16: the tiles serve both half-precision dtypes alike, and only float16 plans
# take a config's 'atomic' summation (bfloat16 plans sum in float32: 7 bfloat16 adds already left the
# bfloat16 tolerance, see plan.sigma_moe_plan), so that is where summations differ in speed.
DTYPE = torch.float16
# Largest error (max |moe - grouped_mm| / max |grouped_mm|) a config may have to be picked: about three
# bfloat16 steps at the largest output. Float32 sums stay near 0.004-0.007; bfloat16 atomics rounded
# each of a token's k * hidden-chunk adds and reached 0.008-0.022 (earlier tuning rounds, in bfloat16).
MAX_ERR = 0.0125
# Configs within this factor of the fastest count as equally fast (timing noise): the most accurate wins.
NOISE = 1.02


def candidates(name: str, T: int, *, sequences: bool = False, configs: ConfigTable | None = None) -> list[dict]:
    """Experts configs worth timing for a shape and token count (see `configs.experts_config`):
    tile configs of the shipped summation (column spans, route tiles), or with `sequences` each
    sequence and summation (`finish`) with the shipped tiles:
    up to 64 tokens the gather sequence, up to 1024 also gather tiles against the fused sequence,
    beyond fused and split. "Shipped": of `configs` (None: the shipped table)."""
    d, E, G, k = SHAPES[name]
    default = experts_config(d, E, G, d, k, bucket(T), configs=configs)
    if sequences:
        finishes = ("inline", "atomic") if T <= 1024 else ("inline", "pass", "atomic")
        if T <= GATHER_MAX_TOKENS:
            bases = [default]
        elif T <= 1024:
            bases = [dict(default, mode="fused")] + [
                {"mode": "gather", "BLOCK_M": m, "BLOCK_G": g, "BLOCK_D": 128, "BLOCK_N": 128, "num_warps": w,
                 "num_stages": 3} for m, g, w in ((32, 32, 4), (32, 64, 4), (64, 32, 8), (64, 64, 8), (64, 128, 8))]
        else:
            bases = [dict(default, mode=m) for m in ("fused", "split")]
        variants = [dict(c, finish=f) for c in bases for f in finishes]
        return [default] + [c for c in variants if c != default]
    fields = ("BLOCK_M", "BLOCK_G", "BLOCK_D", "BLOCK_N", "num_warps", "num_stages")
    if T <= GATHER_MAX_TOKENS:
        grid = [(16, 128, 128, 4, 3), (32, 128, 128, 4, 3), (64, 128, 128, 4, 3), (32, 256, 256, 8, 3),
                (32, 64, 64, 4, 4), (16, 512, 512, 8, 2), (32, 512, 256, 8, 2), (64, 256, 256, 8, 3),
                (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 64, 128, 8, 6),
                # round 7: wider value tiles (more independent MMAs a step) and two programs an SM
                (128, 128, 256, 8, 3), (64, 128, 128, 8, 3), (64, 128, 256, 8, 3)]
        grid = [(default["BLOCK_M"], *c) for c in grid]
        mode = "gather"
    elif T <= 1024:
        grid = [(16, 32, 64, 128, 4, 3), (32, 32, 64, 128, 4, 3), (32, 64, 64, 128, 4, 3), (32, 128, 64, 64, 4, 3),
                (16, 32, 256, 256, 4, 3), (32, 64, 128, 128, 4, 4), (32, 128, 128, 128, 8, 3),
                (16, 64, 256, 128, 4, 3), (16, 64, 512, 256, 8, 2), (16, 64, 256, 256, 8, 3),
                (32, 128, 256, 256, 8, 2), (64, 128, 128, 128, 8, 3)]
        mode = "fused"
    else:
        grid = [(128, 128, 64, 64, 8, 3), (128, 128, 64, 128, 8, 3), (128, 128, 64, 64, 8, 4),
                (64, 128, 64, 128, 4, 3), (128, 64, 64, 128, 8, 3), (64, 256, 64, 64, 8, 3),
                (128, 128, 128, 64, 8, 2)]
        mode = "fused"
    finish = default.get("finish", "inline")
    out = [default] + [dict(zip(fields, c), mode=mode, finish=finish) for c in grid]
    if T > GATHER_MAX_TOKENS:
        out.append({"mode": "split", "finish": finish})
    if T <= GATHER_MAX_TOKENS:
        # gather programs with and without speculation (the plan's rule: configs.SPECULATE_MIN_USE)
        out += [dict(default, speculate=v) for v in (False, True)]
    if T <= 1024:
        # spans of output columns per row block: more programs for few rows, no more adds per output
        out += [dict(default, V_SPLIT=v) for v in (2, 4)]
        if default["mode"] == "gather" and T > GATHER_MAX_TOKENS:
            out += [dict(default, BLOCK_M=m, BLOCK_G=g, num_warps=w, V_SPLIT=v)
                    for m, g, w, v in ((32, 64, 4, 2), (64, 128, 8, 1), (64, 128, 8, 2), (64, 128, 8, 4),
                                       (32, 128, 4, 4))]
    # the route kernel's tiles, with the shipped experts config
    routes = ([(16, 128, 4, 4), (16, 256, 8, 3), (32, 256, 8, 3), (16, 512, 8, 2)] if T <= 1024 else
              [(64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 128, 4, 3), (64, 256, 8, 2)])
    out += [dict(default, route=dict(zip(ROUTE_FIELDS, r))) for r in routes]
    unique = []
    for c in out:
        if c not in unique and c.get("BLOCK_G", 0) <= max(G, 16):
            unique.append(c)
    return unique


def tuned_key(name: str, T: int) -> tuple:
    """The key of a benchmark cell's experts config in a `ConfigTable`."""
    d, E, G, k = SHAPES[name]
    return experts_key(d, E, G, d, k, T)


def trying(name: str, T: int, config: dict | None, configs: ConfigTable | None = None) -> ConfigTable | None:
    """The table that makes `config` the experts config of (shape, T) on top of `configs` (None: the
    shipped table); `configs` itself for no config."""
    if config is None:
        return configs
    return (shipped() if configs is None else configs).merged({tuned_key(name, T): config})


def _warm_one(task: tuple) -> str:
    """Compile (into Triton's disk cache) the kernels of one (shape, T, config, table), in a worker process."""
    name, T, config, configs = task
    try:
        layer = Layer(*SHAPES[name], dtype=DTYPE, configs=trying(name, T, config, configs))
        with torch.no_grad():
            layer.moe(torch.randn(T, layer.d, device=DEVICE, dtype=DTYPE))
        torch.cuda.synchronize()
        return ""
    except Exception as error:  # noqa: BLE001 - reported, and the main process meets it again
        return f"{task[:3]}: {str(error).splitlines()[0][:160]}"


def warm(tasks: list[tuple], jobs: int) -> None:
    """Compile the kernels of many (shape, T, config, table) in `jobs` processes at once: the Triton
    compiler is single-threaded, the timing process then loads them from the disk cache."""
    if jobs <= 1 or not tasks:
        return
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for problem in pool.map(_warm_one, tasks):
            if problem:
                print(f"warm-up failed: {problem}")


def _kernel_us(fn, n: int = 5) -> dict:
    """Mean GPU time (microseconds) of each kernel of fn over n back-to-back calls (L2 not flushed),
    from the profiler; empty where the profiler cannot trace the GPU."""
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        return {e.key[:60]: getattr(e, "device_time_total", 0) / n for e in prof.key_averages()
                if getattr(e, "device_time_total", 0) > 0}
    except Exception as error:  # noqa: BLE001 - a diagnostic only
        return {"error": str(error).splitlines()[0][:160]}


def pick(timings: list[dict], T: int) -> dict | None:
    """The timing of the config to ship: among those with max_err <= MAX_ERR, the most accurate of
    the ones within NOISE of the fastest. Up to 1024 tokens by GPU time (graph replays; eager calls
    can be host-bound, which configs do not change), beyond by eager time."""
    speed = (lambda t: t["graph_ms"]) if T <= 1024 else (lambda t: t["ms"])
    ok = [t for t in timings if t["max_err"] <= MAX_ERR]
    if not ok:
        return None
    fastest = min(speed(t) for t in ok)
    return min((t for t in ok if speed(t) <= NOISE * fastest), key=lambda t: (t["max_err"], speed(t)))


def tune(name: str, T: int, *, sequences: bool = False, configs: ConfigTable | None = None) -> dict:
    """Time every candidate experts config of one shape and token count (eager and graph replay),
    checking each one's output against torch._grouped_mm; returns them all and the one `pick` ships.
    Candidates are tried on top of `configs` (None: the shipped table)."""
    d, E, G, k = SHAPES[name]
    layer = Layer(d, E, G, k, dtype=DTYPE)
    x = torch.randn(T, d, device=DEVICE, dtype=DTYPE)
    timings = []
    with torch.no_grad():
        ref = layer.grouped_mm(x)
        for config in candidates(name, T, sequences=sequences, configs=configs):
            layer.configs = trying(name, T, config, configs)
            try:
                agree = agreement(layer, x, layer.moe(x), ref)
                timings.append({"config": config, "ms": median_ms(lambda: layer.moe(x), rep=25),
                                "graph_ms": median_ms(graphed(lambda: layer.moe(x)), rep=25), **agree})
            except Exception as error:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"skip {name} T={T} {config}: {str(error).splitlines()[0][:120]}")
    best = pick(timings, T)
    cell = {"shape": name, "T": T, "key": list(tuned_key(name, T)), "best": best and best["config"],
            "dense_param_ms": median_ms(lambda: layer.dense(x, layer.w1, layer.w2)),
            "dense_compute_ms": median_ms(lambda: layer.dense(x, layer.c1, layer.c2)), "timings": timings}
    if best:  # last: the profiler can slow later host calls down
        layer.configs = trying(name, T, best["config"], configs)
        with torch.no_grad():
            cell["kernels_us"] = _kernel_us(lambda: layer.moe(x))
    return cell


def picks(cells: list[dict]) -> ConfigTable:
    """The configs a sweep picked (the cells of `tune`), as a table in configs.json's format."""
    return ConfigTable({tuple(cell["key"]): cell["best"] for cell in cells if cell["best"]})


def ship(path: str | Path, into: str | Path = SHIPPED) -> list[str]:
    """Merge the configs of a table file (a sweep's picks) into `into` (configs.json), its other
    entries and their order kept; returns a line per config of the file: replaced, added or unchanged."""
    new, old = ConfigTable.load(path), ConfigTable.load(into)
    Path(into).write_text(old.merged(new).to_json())
    lines = []
    for key, config in new.items():
        change = "added" if key not in old else "unchanged" if old[key] == config else "replaced"
        lines.append(f"{change}: {list(key)} {config}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/tune_kernels.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default=None, help="Results folder. Defaults to bench/results.")
    parser.add_argument("--name", default=None, help="File stem. Defaults to kernels_tuned_<gpu>, e.g. "
                        "kernels_tuned_h200 (picks: <name>_picks.json).")
    parser.add_argument("--sequences", action="store_true",
                        help="Time the sequences and roundings with the shipped tiles, not tiles.")
    add_cell_options(parser)
    parser.add_argument("--jobs", type=int, default=1, help="Processes compiling kernels ahead. Defaults to 1.")
    parser.add_argument("--compile-only", action="store_true",
                        help="Only compile (with --jobs processes) the kernels the sweep would time, then exit.")
    parser.add_argument("--shipped", action="store_true",
                        help="With --compile-only: compile the configs the benchmark runs (shipped, or those of "
                             "--configs), not the candidates.")
    parser.add_argument("--ship", default=None, metavar="PICKS",
                        help="Merge a picks file into moexport/kernels/configs.json and exit (no GPU needed).")
    args = parser.parse_args(argv)
    if args.ship:
        print("\n".join(ship(args.ship)))
        return 0
    cells = cells_of(args, "python tools/tune_kernels.py")
    configs = configs_from(args.configs)
    tasks = [(s, t, c, configs) for s, t in cells
             for c in ([None] if args.shipped else candidates(s, t, sequences=args.sequences, configs=configs))]
    if args.compile_only:
        warm(tasks, max(2, args.jobs))
        return 0
    warm(tasks, args.jobs)
    found = []
    for s, t in cells:
        found.append(tune(s, t, sequences=args.sequences, configs=configs))
        print(json.dumps({k: v for k, v in found[-1].items() if k != "timings"}), flush=True)
    name = args.name or "kernels_tuned_" + torch.cuda.get_device_name().split()[-1].lower()
    out = Path(args.output or "bench/results") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=1))
    picked, table = out.with_name(f"{name}_picks.json"), picks(found)
    picked.write_text(table.to_json())
    for cell in found:
        best = next((t for t in cell["timings"] if t["config"] == cell["best"]), {})
        print(f"{cell['shape']:12s} T={cell['T']:<6d} "
              f"dense {cell['dense_param_ms']:.4f}/{cell['dense_compute_ms']:.4f}"
              f" best {best.get('ms', 0):.4f} graph {best.get('graph_ms', 0):.4f} {cell['best']}")
    print(f"{len(table)} picks in {picked}; ship them: python tools/tune_kernels.py --ship {picked}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoexportError as error:  # a user error: its message, no traceback (as the moexport CLI)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
