"""The graph TensorRT's parser gets: kernels moved from inputs into attributes, as plugin_graph writes it."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from trt_cases import D

from moexport.core.errors import MoexportError
from moexport.trt_plugins.graph import plugin_graph


def test_the_kernels_become_attributes_of_their_nodes_and_leave_the_graph(fused_layer):
    model = onnx.load(fused_layer)
    node = model.graph.node[0]
    data = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[6])).tobytes()
    (bundle,) = plugin_graph(model, fused_layer.parent)
    assert (bundle.op, bundle.bytes, bundle.nodes, bundle.config["d_model"]) == ("SigmaMoE", len(data), ["layers.0.ffn"], D)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["kernels"] == data and attributes["kernels_key"] == bundle.key.encode()
    assert attributes["plugin_namespace"] == b"moexport" and attributes["plugin_version"] == b"1"
    assert list(node.input) == ["x", "expert_sel.0", "keys.0", "values.0"]  # no empty trailing inputs either
    assert not model.functions and len(model.graph.initializer) == 3


def test_an_input_missing_before_a_present_one_is_named(fused_layer):
    model = onnx.load(fused_layer)
    node = model.graph.node[0]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(D, np.float32), "o_bias"))
    node.input[4:6] = ["", "o_bias"]  # bias missing, o_bias given: TensorRT would pass the plugin a null tensor
    with pytest.raises(MoexportError, match=r"node 'layers.0.ffn' \(SigmaMoE\) \| has no input 'bias' but inputs after it"):
        plugin_graph(model, fused_layer.parent)
