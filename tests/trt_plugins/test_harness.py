"""The plugins' TensorRT calls on the CPU machine, through the harness (TensorRT's argument structs, its
order of calls): everything up to enqueue runs here, and enqueue fails as TensorRT would see it."""
import pytest
import torch
from trt_cases import D, E, G, K, layer_plugin, parser_nodes, sigma_moe_graph

from moexport.core.errors import MoexportError
from moexport.native import plan_call
from moexport.trt_plugins import trt_library
from moexport.trt_plugins.harness import (BUILD, FIELD_CHAR, FIELD_INT32, FIELD_UNKNOWN, LINEAR, RUNTIME,
                                          PluginHarness, dynamic_desc, node_fields, prepare, tensor_desc)


@pytest.fixture(scope="module")
def harness():
    return PluginHarness()


def layer_tensors(weights, node, tokens=(2, 5)):
    inputs = [torch.randn(*tokens, D)] + [torch.from_numpy(weights[name]) for name in node.input[1:]]
    return inputs, [torch.empty(*tokens, D), torch.empty(*tokens, K, dtype=torch.int64)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU sees")
def test_tensorrts_calls_run_to_on_shape_change_and_enqueue_fails_without_a_driver(harness, fused_layer):
    (node, attributes, weights), = parser_nodes(fused_layer)
    inputs, outputs = layer_tensors(weights, node)
    largest = [(2, 16, D)] + [tuple(t.shape) for t in inputs[1:]]
    call = prepare(harness, "SigmaMoE", node.name, attributes, inputs, outputs, largest=largest)
    assert call.plugin.core() == ("SigmaMoE", "1", "moexport")
    with pytest.raises(MoexportError, match=r"node 'layers.0.ffn' \(SigmaMoE\) \| enqueue failed: node 'layers.0.ffn' "
                                             r"\(SigmaMoE\): the CUDA driver \(libcuda.so.1\) cannot be opened"):
        call()


def test_the_first_plugin_of_a_bundle_serialises_its_bytes_and_the_others_its_key(harness, two_layers):
    (first, a, _), (second, b, _) = parser_nodes(two_layers)
    plugins = [harness.create("SigmaMoE", n.name, node_fields(attrs)) for n, attrs in ((first, a), (second, b))]
    fields = [plugin.serialize() for plugin in plugins]
    key = a["kernels_key"]
    common = [("k", FIELD_INT32, K.to_bytes(4, "little")), ("selection", FIELD_CHAR, b"sigmoid"),
              ("activation", FIELD_CHAR, b"relu")]
    assert fields[0] == common + [("kernels", FIELD_UNKNOWN, a["kernels"]), ("kernels_key", FIELD_CHAR, key)]
    assert fields[1] == common + [("kernels_key", FIELD_CHAR, key)]


def test_a_plugin_finds_its_kernels_by_key_whenever_they_come_at_run_time(harness, tmp_path):
    """An engine's layers are deserialised in TensorRT's order: a plugin with only the key may come
    before the one with the bytes, and finds them when it first needs them. While building, the
    plugin with the bytes always comes first (node order), so a key without them is an error."""
    (first, a, weights), (second, b, _) = parser_nodes(sigma_moe_graph(tmp_path / "g.onnx", layers=2, d=40))
    inputs = [torch.randn(3, 40)] + [torch.from_numpy(weights[name]) for name in second.input[1:]]
    descs = [tensor_desc("float32", t.shape) for t in inputs]
    outs = [tensor_desc("float32", (3, 40)), tensor_desc("int64", (3, K))]
    with pytest.raises(MoexportError, match=r"names the kernels '\w+', which no node before it brought"):
        harness.create("SigmaMoE", second.name, node_fields(b), phase=BUILD)
    late = harness.create("SigmaMoE", second.name, node_fields(b), phase=RUNTIME)
    with pytest.raises(MoexportError, match=r"onShapeChange failed: .*its kernels \(bundle \w+\) are not loaded"):
        late.shape_change(descs, outs)
    bringer = harness.create("SigmaMoE", first.name, node_fields(a)).deserialize()
    late.shape_change(descs, outs)  # found now
    assert bringer.metadata.endswith(a["kernels_key"].decode()) and late.metadata.endswith("(shared)")


def test_the_workspace_covers_every_call_up_to_the_profiles_largest(harness, fused_layer):
    (node, attributes, weights), = parser_nodes(fused_layer)
    plugin = harness.create("SigmaMoE", node.name, node_fields(attributes))
    rest = [("float32", tuple(weights[name].shape)) for name in node.input[1:]]
    ins = [dynamic_desc("float32", (1, 1, D), (2, 16, D))] + [dynamic_desc(d, s, s) for d, s in rest]
    outs = [dynamic_desc("float32", (1, 1, D), (2, 16, D)), dynamic_desc("int64", (1, 1, K), (2, 16, K))]
    plugin.configure(ins, outs)
    size = plugin.workspace_size(ins, outs)
    needs = [plan_call(trt_library(), attributes["kernels"], [{"dtype": "float32", "shape": [n, D]}] +
                       [{"dtype": d, "shape": list(s)} for d, s in rest] + [None, None, None])["workspace_bytes"]
             for n in range(1, 33)]
    assert size >= max(needs) + 256 > 256  # + the alignment the plugin gives the launcher


def test_types_and_formats_are_the_kernels(harness, fused_layer):
    plugin = layer_plugin(fused_layer, harness)
    assert plugin.nb_outputs == 2
    assert plugin.output_types(["float32"] * 4) == ["float32", "int64"]
    with pytest.raises(MoexportError, match=r"input 'x' is float16; its kernels take float32"):
        plugin.output_types(["float16"] + ["float32"] * 3)
    descs = [dynamic_desc("float32", (1, 4, D), (1, 4, D)), dynamic_desc("float32", (E, D), (E, D)),
             dynamic_desc("float32", (E, D, G), (E, D, G)), dynamic_desc("float32", (E, G, D), (E, G, D)),
             dynamic_desc("float32", (1, 4, D), (1, 4, D)), dynamic_desc("int64", (1, 4, K), (1, 4, K))]
    assert all(plugin.supports(pos, descs, 4) for pos in range(6))
    half = dynamic_desc("float16", (1, 4, D), (1, 4, D))
    assert not plugin.supports(0, [half] + descs[1:], 4)
    vectorized = dynamic_desc("float32", (1, 4, D), (1, 4, D))
    vectorized.desc.format = LINEAR + 1
    assert not plugin.supports(0, [vectorized] + descs[1:], 4)
