"""Benchmarks: kernels, layers, whole models. Each suite writes a markdown + JSON table and a plot.

Suites live in their own modules and expose ``main(argv) -> int``; ``python -m moexport.bench SUITE``
and ``moexport bench SUITE`` run them.
"""
from moexport.bench.report import write_results

SUITES = {
    "kernels": "moexport.bench.kernels",
    "onnx-cpu": "moexport.bench.onnx_cpu",
    "onnx-gpu": "moexport.bench.onnx_gpu",
    "trt-plugin": "moexport.bench.trt_plugin",
}

__all__ = ["SUITES", "write_results"]
