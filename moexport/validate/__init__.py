"""Parity validation: every runtime against the PyTorch reference, with polygraphy."""
from moexport.validate.api import RUNNERS, validate
from moexport.validate.compare import OutputResult, RoutingResult
from moexport.validate.inputs import make_inputs, sample_text
from moexport.validate.report import ValidationReport
from moexport.validate.runners import TorchRunner, onnxrt_runner, trt_runner

__all__ = [
    "RUNNERS",
    "OutputResult",
    "RoutingResult",
    "TorchRunner",
    "ValidationReport",
    "make_inputs",
    "onnxrt_runner",
    "sample_text",
    "trt_runner",
    "validate",
]
