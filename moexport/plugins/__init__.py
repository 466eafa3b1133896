"""ONNX Runtime for the moexport op set: sessions, and the compiled op library for the CUDA execution provider."""
from moexport.plugins.runtime import carries_kernels, compiled_calls, ort_library, ort_session, run_with_tensors

__all__ = ["carries_kernels", "compiled_calls", "ort_library", "ort_session", "run_with_tensors"]
