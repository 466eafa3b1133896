"""TensorRT for the moexport op set: engine building now; the op-set plugins are a later issue."""
from moexport.trt_plugins.engine import build_engine, engine_backend, load_plugins

__all__ = ["build_engine", "engine_backend", "load_plugins"]
