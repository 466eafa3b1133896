"""fuse: exact op-type lists after each pass, outputs unchanged in ONNX Runtime (its own graph
optimisations off, so they cannot mask ours), checker, and the cases it must leave alone."""
import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import moexport
from moexport.core.dtypes import tolerance_for
from moexport.core.errors import MoexportError
from moexport.models import SigmaMoE, from_preset
from moexport.opset import DOMAIN, reference_evaluator
from moexport.plugins import ort_session

MODES = ["dispatch", "portable"]


def layer(bias=True, activation="relu", selection="sigmoid"):
    module = SigmaMoE(16, 6, 8, 2, bias=bias, activation=activation, selection=selection).eval()
    if bias:
        with torch.no_grad():
            module.bias.normal_()
            module.o_bias.normal_()
    return module


def run(path, feeds):
    return ort_session(path, optimization="disable").run(None, feeds)


def assert_same_outputs(a, b, feeds, dtype="float32"):
    """Same routing; values equal to the dtype's tolerance (fused and portable round differently in half types)."""
    tol = tolerance_for(dtype)
    for x, y in zip(run(a, feeds), run(b, feeds)):
        if np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias, activation, selection, routing", [
    (True, "relu", "sigmoid", True), (False, "gelu", "softmax", False), (True, "silu", "softmax_after_topk", True)])
def test_a_layer_fuses_into_one_node(tmp_path, mode, bias, activation, selection, routing):
    source = moexport.export_onnx(layer(bias, activation, selection), tmp_path / "src.onnx", mode=mode,
                                  routing_outputs=routing)
    report = moexport.fuse(source, tmp_path / "fused.onnx", archs=())
    expected = {"routing": int(mode == "portable"), "sigma_moe": int(mode == "dispatch"),
                "sigma_moe_portable": int(mode == "portable")}
    assert report.fused == expected and not report.misses
    fused = onnx.load(tmp_path / "fused.onnx")
    assert [(n.domain, n.op_type) for n in fused.graph.node] == [(DOMAIN, "SigmaMoE")]
    node = fused.graph.node[0]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["activation"] == activation.encode() and attributes["selection"] == selection.encode()
    assert len([i for i in node.input if i]) == (6 if bias else 4)
    # The expert indices stay in the fused graph under their name (validate reads them); an output only if asked.
    assert list(node.output) == ["y", "experts"]
    assert [o.name for o in fused.graph.output] == (["y", "experts"] if routing else ["y"])
    onnx.checker.check_model(str(tmp_path / "fused.onnx"), full_check=True)
    assert_same_outputs(source, tmp_path / "fused.onnx", {"x": np.random.randn(3, 7, 16).astype(np.float32)})


@pytest.mark.parametrize("mode", MODES)
def test_float16_layer_fuses(tmp_path, mode):
    source = moexport.export_onnx(layer(), tmp_path / "src.onnx", mode=mode, dtype="float16")
    report = moexport.fuse(source, tmp_path / "fused.onnx", archs=())
    assert report.changed and not report.misses
    assert [n.op_type for n in onnx.load(tmp_path / "fused.onnx").graph.node] == ["SigmaMoE"]
    assert_same_outputs(source, tmp_path / "fused.onnx", {"x": np.random.randn(2, 5, 16).astype(np.float16)}, "float16")


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_layer_fuses(tmp_path, mode):
    """Checked with onnx.reference (ONNX Runtime's CPU provider has no bfloat16 MatMul) against the layer."""
    module = layer(bias=True).to(torch.bfloat16)
    source = moexport.export_onnx(module, tmp_path / "src.onnx", mode=mode, dtype="bfloat16")
    report = moexport.fuse(source, tmp_path / "fused.onnx", archs=())
    fused = onnx.load(tmp_path / "fused.onnx")
    assert report.changed and not report.misses and [n.op_type for n in fused.graph.node] == ["SigmaMoE"]
    assert {t.data_type for t in fused.graph.initializer if t.name.endswith(("keys", "values", "bias"))} == {
        onnx.TensorProto.BFLOAT16}
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    (y,) = reference_evaluator(fused).run(["y"], {"x": x.float().numpy().astype(ml_dtypes.bfloat16)})
    with torch.no_grad():
        want = module.reference_forward(x)
    tol = tolerance_for("bfloat16")
    np.testing.assert_allclose(y.astype(np.float32), want.float().numpy(), rtol=tol.rtol, atol=tol.atol)


def router_type(path) -> int:
    model = onnx.load(path)
    (node,) = [n for n in model.graph.node if n.op_type == "SigmaMoE"]
    return next(t.data_type for t in model.graph.initializer if t.name == node.input[1])


@pytest.mark.parametrize("dtype, element", [("float32", onnx.TensorProto.FLOAT), ("float16", onnx.TensorProto.FLOAT16),
                                            ("bfloat16", onnx.TensorProto.BFLOAT16)])
def test_the_router_weight_is_stored_in_the_model_dtype_which_holds_it_exactly(tmp_path, dtype, element):
    """A half-precision export widens the router weight to float32 for the router MatMul; the fused
    node takes it back in the model dtype (exact), which its kernels read at half the bytes."""
    source = moexport.export_onnx(layer(), tmp_path / "src.onnx", dtype=dtype)
    moexport.fuse(source, tmp_path / "fused.onnx", archs=())
    assert router_type(tmp_path / "fused.onnx") == element


def test_a_float32_router_weight_the_model_dtype_cannot_hold_stays_float32(tmp_path):
    source = moexport.export_onnx(layer(), tmp_path / "src.onnx", dtype="float16")
    model = onnx.load(source)
    router = next(t for t in model.graph.initializer
                  if numpy_helper.to_array(t).dtype == np.float32 and list(t.dims) == [16, 6])  # router_w [d, E]
    weight = numpy_helper.to_array(router) * np.float32(1 + 2 ** -13)  # between two float16 values
    router.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), router.name))
    onnx.save(model, tmp_path / "edited.onnx")
    moexport.fuse(tmp_path / "edited.onnx", tmp_path / "fused.onnx", archs=())
    assert router_type(tmp_path / "fused.onnx") == onnx.TensorProto.FLOAT
    assert_same_outputs(tmp_path / "edited.onnx", tmp_path / "fused.onnx",
                        {"x": np.random.randn(2, 5, 16).astype(np.float16)}, "float16")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_every_layer_of_an_lm_fuses(tmp_path, mode):
    model = from_preset("tiny").eval()
    source = moexport.export_onnx(model, tmp_path / "src.onnx", mode=mode, memory=True, routing_outputs=True)
    report = moexport.fuse(source, tmp_path / "fused.onnx", archs=())
    assert report.fused["sigma_moe" if mode == "dispatch" else "sigma_moe_portable"] == 2 and not report.misses
    nodes = [(n.domain, n.op_type) for n in onnx.load(tmp_path / "fused.onnx").graph.node]
    assert [t for d, t in nodes if d == DOMAIN] == ["SigmaMoE", "SigmaMoE"]
    feeds = {"input_ids": np.random.randint(0, 256, (2, 9)),
             **{f"memory.{i}": np.random.randn(2, 4, 64).astype(np.float32) for i in range(2)}}
    assert_same_outputs(source, tmp_path / "fused.onnx", feeds)


@pytest.mark.parametrize("mode", MODES)
def test_a_static_shape_export_fuses(tmp_path, mode):
    source = moexport.export_onnx(layer(), tmp_path / "src.onnx", mode=mode, dynamic=False)
    assert [d.dim_value for d in onnx.load(source).graph.input[0].type.tensor_type.shape.dim] == [2, 8, 16]
    report = moexport.fuse(source, tmp_path / "fused.onnx", archs=())
    assert report.changed and not report.misses
    assert_same_outputs(source, tmp_path / "fused.onnx", {"x": np.random.randn(2, 8, 16).astype(np.float32)})


def test_fusing_twice_changes_nothing_more(tmp_path):
    source = moexport.export_onnx(layer(), tmp_path / "src.onnx")
    moexport.fuse(source, tmp_path / "once.onnx", archs=())
    report = moexport.fuse(tmp_path / "once.onnx", tmp_path / "twice.onnx", archs=())
    assert not report.changed and "left as they are" in str(report)


def test_an_unrelated_graph_is_left_unchanged(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [weight])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    report = moexport.fuse(tmp_path / "plain.onnx", tmp_path / "out.onnx", archs=())
    assert not report.changed
    assert onnx.load(tmp_path / "out.onnx").graph == onnx.load(tmp_path / "plain.onnx").graph


def fuse_edited(tmp_path, edit):
    """Export a dispatch-form layer, apply `edit` to its ModelProto, save it and fuse it."""
    model = onnx.load(moexport.export_onnx(layer(), tmp_path / "src.onnx", mode="dispatch"))
    edit(model)
    onnx.save(model, tmp_path / "edited.onnx")
    return moexport.fuse(tmp_path / "edited.onnx", tmp_path / "out.onnx", archs=())


def test_a_layer_whose_intermediate_is_used_elsewhere_is_not_fused(tmp_path):
    def expose_hidden_units(model):
        cvmm = next(n for n in model.graph.node if n.op_type == "CVMM")
        model.graph.output.append(helper.make_tensor_value_info(cvmm.output[0], TensorProto.FLOAT, ["slots", 8]))

    report = fuse_edited(tmp_path, expose_hidden_units)
    assert not report.changed
    assert any("also used outside the layer" in miss for miss in report.misses)


def test_a_layer_whose_weights_are_graph_inputs_is_not_fused(tmp_path):
    def feed_values_as_input(model):
        values = next(t for t in model.graph.initializer if t.name == "values")
        model.graph.initializer.remove(values)
        model.graph.input.append(helper.make_tensor_value_info(values.name, values.data_type, values.dims))

    report = fuse_edited(tmp_path, feed_values_as_input)
    assert not report.changed
    assert any("weights are not all constants" in miss for miss in report.misses)


def test_a_changed_constant_is_the_nearest_miss(tmp_path):
    def change_k_of_the_row_division(model):
        div = next(n for n in model.graph.node if n.op_type == "Div")  # src_row = sorted_slot // k
        constant = next(n for n in model.graph.node if n.output[0] == div.input[1])
        constant.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(3, np.int32)))

    report = fuse_edited(tmp_path, change_k_of_the_row_division)
    assert not report.changed
    assert any("nearest miss" in miss and "differs from the template" in miss for miss in report.misses)


def test_unknown_op_set_version_is_rejected(tmp_path):
    source = moexport.export_onnx(layer(), tmp_path / "src.onnx")
    model = onnx.load(source)
    next(o for o in model.opset_import if o.domain == DOMAIN).version = 7
    onnx.save(model, tmp_path / "v7.onnx")
    with pytest.raises(MoexportError, match="moexport op-set version 7"):
        moexport.fuse(tmp_path / "v7.onnx", tmp_path / "out.onnx", archs=())
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_pass_is_named(tmp_path):
    with pytest.raises(MoexportError, match="are not fusion passes"):
        moexport.fuse(tmp_path / "a.onnx", tmp_path / "b.onnx", passes=("experts",), archs=())
