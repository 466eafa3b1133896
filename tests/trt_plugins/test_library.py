"""The plugin library as built here: from the vendored headers, linked to no TensorRT or CUDA, with the
entry points TensorRT looks for; and TensorRT-RTX, which aborts a process that adds a plugin layer
unless it can open itself as libtensorrt_rtx.so, building in a fresh process with the package's alias."""
import subprocess
import sys

import pytest
from trt_cases import layer_plugin

from moexport.models.activations import ACTIVATIONS
from moexport.models.routing import SELECTIONS
from moexport.trt_plugins import trt_library
from moexport.trt_plugins.harness import PluginHarness
from moexport.trt_plugins.library import RTX_ALIAS


def test_the_library_is_built_links_to_no_gpu_library_and_exports_its_entry_points():
    library = trt_library()
    linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    assert not any(name in linked for name in ("libcuda", "libcudart", "libnvinfer", "libtensorrt", "libonnxruntime"))
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                              check=True).stdout.split()
    assert {"getCreators", "setLoggerFinder", "moexport_plan_call"} <= set(exported)


def test_each_op_has_a_v3_creator_in_the_moexport_namespace_whose_fields_are_its_attributes():
    harness = PluginHarness()
    fields = {op: harness.field_names(op) for op in ("SigmaMoE", "TopKDispatch", "CVMM")}
    assert fields == {"SigmaMoE": ["k", "selection", "activation", "kernels", "kernels_key"],
                      "TopKDispatch": ["k", "selection", "kernels", "kernels_key"],
                      "CVMM": ["reduce", "k", "kernels", "kernels_key"]}


@pytest.mark.parametrize("attribute, allowed", [("selection", SELECTIONS), ("activation", ACTIVATIONS)])
def test_the_values_the_plugins_accept_are_the_op_sets(fused_layer, attribute, allowed):
    """native/ops.cpp keeps its own list of each attribute's values; its message lists them all."""
    with pytest.raises(Exception, match=rf"has {attribute}='x', which is not one of {', '.join(allowed)}$"):
        layer_plugin(fused_layer, **{attribute: "x"})


def run_fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def test_tensorrt_rtx_builds_plugin_graphs_in_a_fresh_process(tmp_path, fused_layer):
    """A fresh process has nothing that answers to libtensorrt_rtx.so: build_engine makes the alias do."""
    pytest.importorskip("tensorrt_rtx")
    done = run_fresh(f"from moexport.trt_plugins import build_engine; build_engine({str(fused_layer)!r}, "
                     f"{str(tmp_path / 'l.engine')!r}, shapes={{'x': ((1, 1, 32), (1, 4, 32), (1, 8, 32))}})")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "l.engine").stat().st_size > 0


def test_without_the_alias_tensorrt_rtx_aborts_the_process_that_adds_a_plugin_layer(fused_layer):
    """Why the alias exists: the same parse, with the library registered but the alias not loaded."""
    pytest.importorskip("tensorrt_rtx")
    code = f"""
import onnx, tensorrt_rtx as trt
from moexport.trt_plugins.graph import plugin_graph
from moexport.trt_plugins.library import trt_library, _rtx_name_resolves
assert not _rtx_name_resolves(), "the name resolves here without the alias (LD_LIBRARY_PATH?)"
model = onnx.load({str(fused_layer)!r})
plugin_graph(model, '.')
trt.get_plugin_registry().load_library(str(trt_library()))
logger = trt.Logger(trt.Logger.ERROR)
network = trt.Builder(logger).create_network(0)
trt.OnnxParser(network, logger).parse(model.SerializeToString())
print("parsed")
"""
    done = run_fresh(code)
    if "the name resolves here" in done.stderr:
        pytest.skip("libtensorrt_rtx.so resolves in this environment without the alias")
    assert done.returncode != 0 and "parsed" not in done.stdout
    assert "terminate called" in done.stderr
    assert (trt_library().parent / RTX_ALIAS).is_file()
