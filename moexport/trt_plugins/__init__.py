"""TensorRT for the moexport op set: the plugin library (`libmoexport_trt.so`) and engine building."""
from moexport.trt_plugins.engine import build_engine, engine_backend, plugin_layers, trtexec_command
from moexport.trt_plugins.graph import plugin_graph, uses_plugins
from moexport.trt_plugins.library import register_plugins, trt_library

__all__ = ["build_engine", "engine_backend", "plugin_graph", "plugin_layers", "register_plugins", "trt_library",
           "trtexec_command", "uses_plugins"]
