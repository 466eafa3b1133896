"""The moexport op set (domain ``moexport``, version 1): the contract between the exporter, ONNX Runtime
and TensorRT.

Its parts: the op schemas (`schemas`; registered with ``onnx.defs`` when this room is imported), the
model-local function bodies in standard ops (`bodies`, attached to a model's nodes by `functions`),
and the NumPy reference implementations with their `onnx.reference` evaluator (`reference`).
"""
from moexport.opset.functions import attach_functions, function_body, node_config
from moexport.opset.reference import REFERENCE_OPS, cvmm, reference_evaluator, sigma_moe, topk_dispatch
from moexport.opset.schemas import DOMAIN, OPS, PLUGIN_ATTRIBUTES, VERSION, check_opset_imports

__all__ = ["DOMAIN", "OPS", "PLUGIN_ATTRIBUTES", "REFERENCE_OPS", "VERSION", "attach_functions",
           "check_opset_imports", "cvmm", "function_body", "node_config", "reference_evaluator", "sigma_moe",
           "topk_dispatch"]
