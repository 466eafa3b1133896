import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from moexport.exporter.functions import SIGNATURES, attach_functions
from moexport.exporter.opset import DOMAIN, VERSION


def single_node_model(op_type: str, inputs: dict, attributes: dict, *, n_outputs: int | None = None,
                      opset: int = 20, weights: tuple[str, ...] = ("W", "keys", "values", "expert_sel", "bias", "o_bias")):
    """A model with one moexport node: weights become initializers, other inputs graph inputs.

    Returns (model with function bodies attached, feeds).
    """
    names, outputs, _ = SIGNATURES[op_type]
    n_outputs = len(outputs) if n_outputs is None else n_outputs
    node_inputs, graph_inputs, initializers, feeds = [], [], [], {}
    for name in names:
        value = inputs.get(name)
        node_inputs.append("" if value is None else name)
        if value is None:
            continue
        if name in weights:
            initializers.append(numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
            feeds[name] = value
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node(op_type, node_inputs, list(outputs[:n_outputs]), domain=DOMAIN, **attributes)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outputs[:n_outputs]],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)])
    return attach_functions(model), feeds


@pytest.fixture
def rng():
    return np.random.default_rng(0)
