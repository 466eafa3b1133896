"""`moexport inspect FILE.onnx`: the moexport nodes of an ONNX file, the compiled kernels it carries, and
where those nodes run (compiled kernels or function bodies)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from rich.table import Table

from moexport.core.onnx_files import load_model
from moexport.exporter.compiled import kernel_bundles
from moexport.opset import DOMAIN
from moexport.opset.functions import kernels_input
from moexport.plugins.runtime import LIBRARY


def describe_onnx(path: str | os.PathLike) -> dict:
    """What an ONNX file holds of the op set: node counts, kernel bundles (targets, bytes, users), and
    where its moexport nodes run.

    Raises:
        MoexportError: the file is not a readable ONNX model.
    """
    model = load_model(path)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    bundles = kernel_bundles(model)
    library = Path(__file__).with_name(LIBRARY)
    with_kernels = sum(bool(kernels_input(n)) for n in nodes)
    if not nodes:
        runs = "no moexport node: every runtime runs the standard ops"
    elif with_kernels == len(nodes):
        runs = ("compiled kernels on ONNX Runtime's CUDA provider with libmoexport_ort"
                + ("" if library.is_file() else " (not built in this installation)")
                + " and in TensorRT with the moexport plugins; the function bodies elsewhere")
    elif with_kernels:
        runs = (f"{with_kernels} of {len(nodes)} nodes carry compiled kernels; the others have none, so run the "
                "file without the op library (function bodies), or fuse it again")
    else:
        runs = "function bodies (no compiled kernels: `moexport fuse --arch SM` attaches them)"
    total = Path(path).stat().st_size + sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + ".data"))
    return {"file": str(path), "bytes": total, "nodes": dict(Counter(n.op_type for n in nodes)),
            "bundles": bundles, "kernel_bytes": sum(b["bytes"] for b in bundles), "runs_on": runs}


def describe_onnx_table(info: dict) -> Table:
    """`describe_onnx` as a table, one row per kernel bundle."""
    nodes = ", ".join(f"{count} {op}" for op, count in info["nodes"].items()) or "none"
    share = f"{100 * info['kernel_bytes'] / info['bytes']:.1f}%" if info["bytes"] else "-"
    table = Table(title=f"{info['file']}: moexport nodes {nodes}",
                  caption=f"compiled kernels {info['kernel_bytes'] / 1e6:.2f} MB ({share} of the file); "
                          f"runs on: {info['runs_on']}")
    for column in ("kernels", "op", "configuration", "targets", "MB", "nodes"):
        table.add_column(column, overflow="fold")
    for b in info["bundles"]:
        config = ", ".join(f"{k}={v}" for k, v in b["config"].items())
        table.add_row(b["name"].rsplit(".", 1)[-1], b["op"], config, ", ".join(f"sm_{sm}" for sm in b["archs"]),
                      f"{b['bytes'] / 1e6:.2f}", str(len(b["nodes"])))
    return table

