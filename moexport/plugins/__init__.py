"""The runtime side of the moexport op set: reference implementations and ONNX Runtime execution.

The op set's contract (names, schemas, function bodies) is needed by the exporter, which sits to the
left of this room, so it lives in `moexport.exporter.opset` / `moexport.exporter.bodies`; this room
only runs graphs. TensorRT engines and plugins are in `moexport.trt_plugins`.
"""
from moexport.plugins.reference import REFERENCE_OPS, cvmm, sigma_moe, topk_dispatch
from moexport.plugins.runtime import ort_session, reference_evaluator

__all__ = ["REFERENCE_OPS", "cvmm", "ort_session", "reference_evaluator", "sigma_moe", "topk_dispatch"]
