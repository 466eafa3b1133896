"""ONNX Runtime for the moexport op set: sessions that run moexport graphs."""
from moexport.plugins.runtime import ort_session

__all__ = ["ort_session"]
