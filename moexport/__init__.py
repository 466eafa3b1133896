"""moexport: σ-MoE / PKM / Top-K models to ONNX, ONNX Runtime and TensorRT, with proof of parity."""
from moexport.core import InternalError, MoexportError
from moexport import models

__version__ = "0.1.0"

__all__ = ["MoexportError", "InternalError", "models", "__version__"]
