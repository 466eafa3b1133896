"""TensorRT for the moexport op set: engine building."""
from moexport.trt_plugins.engine import build_engine, engine_backend

__all__ = ["build_engine", "engine_backend"]
