"""moexport: σ-MoE / PKM / Top-K models to ONNX, ONNX Runtime and TensorRT, with proof of parity."""
from moexport.core import InternalError, MoexportError
from moexport import checkpoints, kernels, models
from moexport.checkpoints import load_checkpoint, save_checkpoint
from moexport.models import from_preset
from moexport.exporter import export_onnx, fuse

__version__ = "0.1.0"

__all__ = [
    "MoexportError", "InternalError", "checkpoints", "kernels", "models", "from_preset", "load_checkpoint",
    "save_checkpoint", "export_onnx", "fuse",
    "__version__",
]
