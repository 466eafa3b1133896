"""torch -> ONNX with the moexport op set (`export_onnx`), the lowering of σ-MoE layers to their
dispatch and portable forms (`lower`), and the graph-surgeon fusion passes (`fuse`)."""
from moexport.exporter.export import export_forwards, export_onnx
from moexport.exporter.forms import FORMS, lower
from moexport.exporter.surgeon import PASSES, FuseReport, fuse

__all__ = ["FORMS", "PASSES", "FuseReport", "export_forwards", "export_onnx", "fuse", "lower"]
