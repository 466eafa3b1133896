"""torch -> ONNX with the moexport op set, and the graph-surgeon fusion passes.

Importing this room registers the op-set schemas with ``onnx.defs`` (`moexport.exporter.opset`): the
op-set contract (schemas, function bodies) lives here, left of `moexport.plugins`, because the exporter
and the surgeon need it; `moexport.plugins` holds the runtime side.
"""
from moexport.exporter.export import export_forwards, export_onnx
from moexport.exporter.functions import attach_functions, lower
from moexport.exporter.opset import DOMAIN, OPS, VERSION
from moexport.exporter.surgeon import PASSES, FuseReport, fuse

__all__ = ["DOMAIN", "OPS", "PASSES", "VERSION", "FuseReport", "attach_functions", "export_forwards", "export_onnx",
           "fuse", "lower"]
