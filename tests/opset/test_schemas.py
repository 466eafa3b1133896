"""The op-set schemas: registered on import, accepted by the checker, shapes inferred."""
import onnx
import pytest
from onnx import TensorProto, helper

from moexport.opset import DOMAIN, OPS, VERSION


def graph_with(node, inputs, outputs):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, VERSION)])


def inferred(model):
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return {v.name: (v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.value_info, *model.graph.output]}


def test_all_ops_are_registered():
    assert all(onnx.defs.has(op, VERSION, DOMAIN) for op in OPS)


def test_topk_dispatch_shapes():
    node = helper.make_node("TopKDispatch", ["logits"], ["gate", "expert", "se", "ss"], domain=DOMAIN, k=3,
                            plugin_namespace="moexport", plugin_version="1")
    model = graph_with(node, [("logits", TensorProto.FLOAT, [10, 8])], [("gate", TensorProto.FLOAT, [10, 3])])
    onnx.checker.check_model(model, full_check=True)
    shapes = inferred(model)
    assert shapes["gate"] == (TensorProto.FLOAT, [10, 3])
    assert shapes["expert"] == (TensorProto.INT32, [10, 3])
    assert shapes["se"] == shapes["ss"] == (TensorProto.INT32, [30])


@pytest.mark.parametrize("reduce, rows", [(0, 12), (1, 6)])
def test_cvmm_shapes(reduce, rows):
    node = helper.make_node("CVMM", ["x", "se", "src", "dst", "W"], ["out"], domain=DOMAIN, reduce=reduce, k=2)
    ints = [(n, TensorProto.INT32, [12]) for n in ("se", "src", "dst")]
    model = graph_with(node, [("x", TensorProto.FLOAT16, [6, 4]), *ints, ("W", TensorProto.FLOAT16, [3, 4, 5])],
                       [("out", TensorProto.FLOAT, [rows, 5])])
    onnx.checker.check_model(model, full_check=True)
    assert inferred(model)["out"] == (TensorProto.FLOAT, [rows, 5])


def test_sigma_moe_shapes_keep_the_leading_dims():
    node = helper.make_node("SigmaMoE", ["x", "sel", "keys", "values", "", "o_bias"], ["y", "expert"], domain=DOMAIN,
                            k=2, activation="gelu")
    model = graph_with(node, [("x", TensorProto.FLOAT16, ["batch", "seq", 4]), ("sel", TensorProto.FLOAT, [3, 4]),
                              ("keys", TensorProto.FLOAT16, [3, 4, 5]), ("values", TensorProto.FLOAT16, [3, 5, 6]),
                              ("o_bias", TensorProto.FLOAT16, [6])],
                       [("y", TensorProto.FLOAT16, ["batch", "seq", 6])])
    onnx.checker.check_model(model, full_check=True)
    shapes = inferred(model)
    assert shapes["y"] == (TensorProto.FLOAT16, ["batch", "seq", 6])
    assert shapes["expert"] == (TensorProto.INT64, ["batch", "seq", 2])


def test_checker_rejects_an_undeclared_attribute():
    node = helper.make_node("TopKDispatch", ["logits"], ["g", "e", "se", "ss"], domain=DOMAIN, k=2, temperature=1.0)
    model = graph_with(node, [("logits", TensorProto.FLOAT, [4, 8])], [("g", TensorProto.FLOAT, [4, 2])])
    with pytest.raises(onnx.checker.ValidationError, match="temperature"):
        onnx.checker.check_model(model)


def test_checker_rejects_a_wrong_index_type():
    node = helper.make_node("CVMM", ["x", "se", "src", "dst", "W"], ["out"], domain=DOMAIN)
    ints = [(n, TensorProto.FLOAT, [4]) for n in ("se", "src", "dst")]
    model = graph_with(node, [("x", TensorProto.FLOAT, [4, 4]), *ints, ("W", TensorProto.FLOAT, [2, 4, 5])],
                       [("out", TensorProto.FLOAT, [4, 5])])
    with pytest.raises(onnx.shape_inference.InferenceError, match="sorted_expert.*unsupported type"):
        onnx.checker.check_model(model, full_check=True)
