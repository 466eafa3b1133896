"""The `moexport` command: a thin layer over the Python API.

Each subcommand is one function whose docstring is its help (the first line is its line in
`moexport -h`) and whose body calls the public API in a few lines. Option groups that several
subcommands share are defined once, below.

Exit status: 0 success; 1 bad input (file, tensor, option; the message says which); 2 bad usage;
3 a parity check FAILED.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.text import Text

from moexport import __version__
from moexport.core.errors import MoexportError
from moexport.core.files import check_output_file
from moexport.core.options import check_count, check_tolerance
from moexport.core.shapes import parse_shapes
from moexport.core.tables import print_line

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


def _console(stream) -> Console:
    """A console on sys.stdout or sys.stderr."""
    # A log file or pipe has no width of its own: give it room unless COLUMNS says otherwise (tables that
    # do not fit are stacked, see moexport.core.tables).
    wide = stream.isatty() or "COLUMNS" in os.environ
    return Console(stderr=stream is sys.stderr, width=None if wide else 132, highlight=False)


# Results (tables, "wrote" lines, the PASSED/FAILED line) go to stdout, so `moexport demo > log` keeps
# them; progress, warnings and errors go to stderr.
console, log = _console(sys.stdout), _console(sys.stderr)

# name -> (function, add_arguments)
SUBCOMMANDS: dict[str, tuple] = {}
ORDER = ("export", "fuse", "build", "validate", "bench", "demo", "inspect")  # as `moexport -h` lists them


def subcommand(add_arguments=None):
    """Register a function as a subcommand named after it (underscores become dashes)."""

    def register(fn):
        SUBCOMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = (fn, add_arguments or (lambda p: None))
        return fn

    return register


# ---- shared option groups ------------------------------------------------------------------------

def add_output_args(parser: argparse.ArgumentParser, *, required: bool = False, help: str = "Output path.") -> None:
    parser.add_argument("-o", "--output", required=required, default=None, help=help)


def add_precision_args(parser: argparse.ArgumentParser, *, what: str = "Run in") -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fp16", dest="dtype", action="store_const", const="float16", help=f"{what} float16.")
    group.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16", help=f"{what} bfloat16.")
    parser.set_defaults(dtype=None)


def _option(convert, check):
    """An argparse type: `convert` the text, then a moexport.core.options `check`; a value it refuses is
    bad usage (exit 2), as argparse reports it."""

    def parse(text: str):
        try:
            return check("value", convert(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        except MoexportError as error:
            note = f": {error.note}" if error.note else ""
            raise argparse.ArgumentTypeError(f"{text!r} {error.problem}{note}") from None

    return parse


def add_tolerance_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=_option(float, check_tolerance), default=None,
                        help="Absolute tolerance (>= 0). Defaults to the dtype's.")
    parser.add_argument("--rtol", type=_option(float, check_tolerance), default=None,
                        help="Relative tolerance (>= 0). Defaults to the dtype's.")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the generated inputs. Defaults to 1.")


def add_k_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=_option(int, check_count), default=None,
                        help="Experts per token of a σ-MoE layer state dict (the file does not record it).")


# ---- subcommands ---------------------------------------------------------------------------------
# (each room's subcommand lives here, a few lines calling that room's public API)

def _inspect_args(p):
    p.add_argument("checkpoint", help="Checkpoint folder or file, or an ONNX file.")
    add_k_arg(p)


@subcommand(_inspect_args)
def cmd_inspect(args):
    """Show a checkpoint's configuration, parameter count and per-layer FF FLOPs per token, or what an
    ONNX file holds of the moexport op set.

    FLOPs per token of every feed-forward layer: active (what the layer computes) against the
    parameter-equal dense FFN. Reads moexport folders, the paper's training checkpoints and σ-MoE
    layer state dicts; never runs code from the file. For an .onnx file: its moexport nodes, the
    compiled kernels it carries (targets, bytes, the nodes sharing each bundle) and where its nodes run.
    """
    if str(args.checkpoint).endswith(".onnx"):
        from moexport.plugins.inspect import describe_onnx, describe_onnx_table

        console.print(describe_onnx_table(describe_onnx(args.checkpoint)))
        return
    from moexport.checkpoints import describe, describe_table

    console.print(describe_table(describe(args.checkpoint, k=args.k)))


def _export_args(p):
    p.add_argument("checkpoint", help="Checkpoint folder or file (anything `moexport inspect` reads).")
    add_output_args(p, required=True, help="Output .onnx file (weights in <file>.data above 2 GB).")
    p.add_argument("--mode", choices=("dispatch", "portable"), default=None,
                   help="dispatch: TopKDispatch + CVMM nodes with function bodies; portable: standard ops only. "
                        "Defaults to dispatch.")
    add_precision_args(p)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 18). Defaults to 20.")
    p.add_argument("--static", dest="dynamic", action="store_false", default=None,
                   help="Fixed batch and sequence sizes instead of dynamic axes.")
    p.add_argument("--routing-outputs", action="store_true", default=None,
                   help="Add an output experts.<layer> (selected experts, int64) per σ-MoE layer.")
    p.add_argument("--memory", action="store_true", default=None,
                   help="Transformer-XL memory inputs memory.<i> and outputs new_memory.<i>.")
    add_k_arg(p)


@subcommand(_export_args)
def cmd_export(args):
    """Export a checkpoint (LM or σ-MoE layer) to ONNX with the moexport op set.

    An LM takes input_ids [batch, seq] and gives logits; a layer takes x [batch, seq, d] and gives y.
    """
    from moexport.checkpoints import load_checkpoint
    from moexport.exporter import export_onnx
    from moexport.models import check_finite

    check_output_file(args.output)  # before loading: a bad path is found in a second, not after the trace
    model = load_checkpoint(args.checkpoint, k=args.k)
    check_finite(model, args.checkpoint)
    path = export_onnx(model, args.output, mode=args.mode, dtype=args.dtype, opset=args.opset,
                       dynamic=args.dynamic, routing_outputs=args.routing_outputs, memory=args.memory)
    print_line(console, f"wrote {path}")


def _fuse_args(p):
    p.add_argument("model", help="ONNX file written by `moexport export`.")
    add_output_args(p, help="Output .onnx file. Defaults to <model>.fused.onnx.")
    p.add_argument("--arch", dest="archs", action="append", type=int, default=None, metavar="SM",
                   help="GPU compute capability to compile the kernels for, e.g. 90 (Hopper); repeat for more. "
                        "Defaults to 80 and 90: cubins for both, and PTX that newer GPUs compile.")
    p.add_argument("--no-kernels", dest="archs", action="store_const", const=[],
                   help="Attach no compiled kernels: runtimes run the function bodies.")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="Token counts the kernels' plans are chosen for (larger ones run the last). Defaults to 65536.")


@subcommand(_fuse_args)
def cmd_fuse(args):
    """Fuse each σ-MoE layer (dispatch or portable form) of an ONNX file into one SigmaMoE node.

    Folds constants, fuses the routing and each whole layer, and reports what was fused; a graph with
    no recognised layer keeps its nodes, with the nearest miss of each candidate. Then compiles the
    kernels of every moexport node for the chosen GPU architectures and stores them in the file (once
    per layer shape): ONNX Runtime's CUDA provider with the moexport op library and TensorRT with the
    moexport plugins run them; no Python or Triton is needed where the file is deployed.
    """
    from moexport.exporter import fuse

    output = args.output or str(Path(args.model).with_suffix(".fused.onnx"))
    archs = None if args.archs is None else tuple(args.archs)
    report = fuse(args.model, output, archs=archs, max_tokens=args.max_tokens, show_progress=None)
    for line in str(report).splitlines() + [f"wrote {output}"]:
        print_line(console, line)


def _build_args(p):
    p.add_argument("model", help="ONNX file: fused (or dispatch form with kernels), built with the moexport plugins; "
                                 "or the portable form, built as it is.")
    add_output_args(p, help="Output engine file. Defaults to <model>.engine.")
    add_precision_args(p)
    for bound in ("min", "opt", "max"):
        p.add_argument(f"--{bound}-shapes", default=None, metavar="SHAPES",
                       help=f"{bound.capitalize()} shapes of the dynamic inputs, e.g. 'input_ids:[1,256]'.")
    p.add_argument("--workspace-mb", type=int, default=None, help="Workspace memory limit. Defaults to TensorRT's.")
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="Timing cache: read if it exists, written after the build.")
    p.add_argument("--embed-plugin", action="store_true", default=None,
                   help="Put the plugin library into the engine, so that it runs where moexport is not installed.")
    p.add_argument("--save-onnx", default=None, metavar="FILE",
                   help="Also write the graph TensorRT parsed (kernels as plugin fields): what trtexec takes.")


@subcommand(_build_args)
def cmd_build(args):
    """Build a TensorRT engine (TensorRT >= 10, else TensorRT-RTX, which builds without a GPU).

    moexport nodes (a fused file) become the moexport TensorRT plugins, which run the kernels the
    file carries: the engine needs the plugin library (or --embed-plugin), no Python and no Triton.
    Prints the trtexec command that builds the same engine.
    """
    from moexport.trt_plugins import build_engine, engine_backend, trtexec_command, uses_plugins

    bounds = [parse_shapes(getattr(args, f"{b}_shapes")) for b in ("min", "opt", "max")]
    names = set().union(*bounds)
    missing = [n for n in names if not all(n in b for b in bounds)]
    if missing:
        raise MoexportError(f"input(s) {', '.join(sorted(missing))}", "need --min-shapes, --opt-shapes and --max-shapes")
    output = check_output_file(args.output or Path(args.model).with_suffix(".engine"))  # before the build
    save_onnx = None if args.save_onnx is None else check_output_file(args.save_onnx)
    shapes = {n: tuple(b[n] for b in bounds) for n in names}
    options = dict(dtype=args.dtype, workspace_mb=args.workspace_mb, timing_cache=args.timing_cache,
                   embed_plugin=args.embed_plugin)
    engine = build_engine(args.model, output, shapes=shapes, save_onnx=save_onnx, **options)
    print_line(console, f"wrote {engine}")
    if engine_backend() == "tensorrt_rtx":
        print_line(console, "built, not run: TensorRT-RTX engines run on RTX GPUs only")
    plugins = uses_plugins(args.model)
    graph = save_onnx or ("<the file of --save-onnx>" if plugins else args.model)
    print_line(console, "trtexec equivalent (TensorRT >= 10): " + trtexec_command(graph, engine, shapes=shapes,
                                                                                     plugins=plugins, **options))


def _bench_args(p):
    from moexport.bench import SUITES

    p.add_argument("suite", choices=list(SUITES), help=f"Benchmark suite: {', '.join(SUITES)}.")
    p.add_argument("suite_args", nargs=argparse.REMAINDER,
                   help="Options of the suite (see `moexport bench SUITE -h`).")


@subcommand(_bench_args)
def cmd_bench(args):
    """Run a benchmark suite; each writes a markdown + JSON table and a plot.

    kernels: σ-MoE forward on the Triton kernels against dense FFNs and torch._grouped_mm (GPU).
    onnx-cpu: ONNX Runtime CPU latency of the three graph forms against PyTorch eager (into a fresh
    folder under ./moexport-bench unless --out is given; prints the paths it wrote).
    onnx-gpu: the fused layer on ONNX Runtime's CUDA provider with the compiled kernels (GPU).
    trt-plugin: the TensorRT SigmaMoE plugin, enqueued as TensorRT does, against the PyTorch kernel path (GPU).
    """
    import importlib

    from moexport.bench import SUITES

    return importlib.import_module(SUITES[args.suite]).main(args.suite_args)


def _validate_args(p):
    p.add_argument("artifact", help="ONNX file or TensorRT engine (.plan / .engine) to check.")
    p.add_argument("--checkpoint", required=True, help="The checkpoint the artifact was exported from.")
    add_k_arg(p)
    p.add_argument("--onnxrt", dest="runners", action="append_const", const="onnxrt",
                   help="Run the artifact in ONNX Runtime on the CPU (the default for ONNX files).")
    p.add_argument("--onnxrt-cuda", dest="runners", action="append_const", const="onnxrt-cuda",
                   help="Run the artifact in ONNX Runtime with the CUDA execution provider.")
    p.add_argument("--trt", dest="runners", action="append_const", const="trt",
                   help="Run the artifact in TensorRT (the default for engines).")
    p.add_argument("--shapes", default=None, help="Input shapes, e.g. 'input_ids:[1,128]'. "
                   "Dynamic dimensions default to batch 2, sequence 64.")
    p.add_argument("--iterations", type=_option(int, check_count), default=None,
                   help="Random input sets (>= 1). Defaults to 2.")
    p.add_argument("--no-text", dest="use_text", action="store_false", default=None,
                   help="Do not feed the shipped text sample (fed to byte-level LMs by default).")
    p.add_argument("--save-report", default=None, metavar="DIR", help="Write report.json and report.html to DIR.")
    add_precision_args(p, what="Judge the artifact as")
    add_tolerance_args(p)


@subcommand(_validate_args)
def cmd_validate(args):
    """Check an ONNX file or TensorRT engine against the PyTorch model it was exported from.

    Runs the PyTorch reference (float32) and every selected runtime on identical inputs (seeded random
    data and, for byte-level LMs, the shipped text sample), checks every output against the tolerance
    of the artifact's dtype, max |err| <= atol + rtol * max |reference| (fp32 1e-5, fp16 1e-2, bf16
    2e-2), and, for every σ-MoE layer, compares the top-k expert sets token by token: a routing
    difference not explained by a near-tie fails. Where a near-tie went the other way, the outputs are
    compared with the reference run on the artifact's routing.
    Exit status 3 when a check FAILED.
    """
    from moexport.validate import validate

    report = validate(args.artifact, args.checkpoint, runners=args.runners, dtype=args.dtype, shapes=args.shapes,
                      seed=args.seed, iterations=args.iterations, atol=args.atol, rtol=args.rtol,
                      use_text=args.use_text, report_dir=args.save_report, k=args.k, verbose=args.verbose)
    report.print(console)
    return EXIT_OK if report else EXIT_FAILED


@subcommand(lambda p: (p.add_argument("checkpoint", nargs="?", default=None,
                                      help="Checkpoint to run the demo on. Defaults to the shipped σ-MoE LM."),
                       add_output_args(p, help="Folder for the artifacts and reports. Defaults to ./moexport-demo.")))
def cmd_demo(args):
    """Run the whole pipeline on a small σ-MoE LM: export, fuse, run, validate, build; one summary table.

    With no arguments it uses the trained σ-MoE language model shipped with moexport.
    """
    from moexport.demo import run_demo

    rows = run_demo(args.checkpoint, output_dir=args.output, console=console, log=log)
    return EXIT_FAILED if any(r.failed for r in rows) else EXIT_OK


# ---- entry point ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with bad usage reported like every other error: one `error:` line, exit status 2."""

    def error(self, message: str):
        print_line(log, Text.assemble(("error:", "red"), f" {self.prog}: {message} (see {self.prog} -h)"))
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moexport",
        description="Export σ-MoE / PKM / Top-K models to ONNX, ONNX Runtime and TensorRT, with proof of parity.",
    )
    parser.add_argument("--version", action="version", version=f"moexport {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show tracebacks of errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(SUBCOMMANDS, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        fn, add_arguments = SUBCOMMANDS[name]
        doc = inspect.cleandoc(fn.__doc__ or "")
        child = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        # -v after the subcommand too; SUPPRESS keeps a -v given before it.
        child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="Show tracebacks of errors.")
        add_arguments(child)
        child.set_defaults(_run=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            status = args._run(args) or EXIT_OK
        except MoexportError as error:
            if args.verbose:
                log.print_exception()
            print_line(log, Text.assemble(("error:", "red"), f" {error}"))
            return EXIT_ERROR
        except KeyboardInterrupt:
            print_line(log, Text("interrupted", style="red"))
            return EXIT_ERROR
    if args.command in {"validate", "demo"}:  # a parity verdict: PASSED, or FAILED with exit status 3
        verdict = "PASSED" if status == EXIT_OK else "FAILED"
        print_line(console, f"{verdict} | Runtime: {time.perf_counter() - started:.1f}s | Command: moexport "
                            + " ".join(sys.argv[1:] if argv is None else argv))
    return status


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, without the source line of the library that raised them."""
    print_line(log, Text.assemble(("warning:", "yellow"), f" {message}"))


if __name__ == "__main__":
    sys.exit(main())
