"""Graphs the TensorRT plugin tests share: fused σ-MoE layers written node by node (no torch export,
which costs seconds), with kernels compiled for sm_90 and plans up to 32 tokens (seconds to compile)."""
import onnx
import torch
from onnx import helper, numpy_helper

from moexport.core.onnx_files import ELEMENT_TYPES
from moexport.exporter.compiled import attach_kernels
from moexport.models import SigmaMoE
from moexport.opset import DOMAIN, VERSION, attach_functions

ARCHS = (90,)
MAX_TOKENS = 32
D, E, G, K = 32, 4, 8, 2  # width, experts, expert size, experts per token
LAYER_SHAPES = {"x": ((1, 1, D), (1, 8, D), (2, 16, D))}  # 32 tokens at most
LM_SHAPES = {"input_ids": ((1, 1), (1, 16), (1, 32))}


def sigma_moe_graph(path, *, layers: int = 1, d: int = D, seed: int = 0, dtype: str = "float32"):
    """`layers` fused σ-MoE nodes in a row (x -> y.0 -> y.1 ...; each also gives experts.<i>), of one
    configuration: one kernel bundle, attached as `moexport fuse` attaches it. Returns the path. In
    float16 the router weight is float16 too, as `moexport fuse` stores a half-precision export's."""
    torch.manual_seed(seed)
    nodes, weights, outputs, x = [], [], [], "x"
    for i in range(layers):
        layer = SigmaMoE(d, E, G, K).eval().to(getattr(torch, dtype))
        names = [f"expert_sel.{i}", f"keys.{i}", f"values.{i}"]
        weights += [numpy_helper.from_array(p.detach().numpy(), n)
                    for p, n in zip((layer.expert_sel, layer.keys, layer.values), names)]
        nodes.append(helper.make_node("SigmaMoE", [x, *names], [f"y.{i}", f"experts.{i}"], name=f"layers.{i}.ffn",
                                      domain=DOMAIN, k=K, selection="sigmoid", activation="relu"))
        outputs.append(helper.make_tensor_value_info(f"experts.{i}", onnx.TensorProto.INT64, ["batch", "seq", K]))
        x = f"y.{i}"
    element = ELEMENT_TYPES[dtype]
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", element, ["batch", "seq", d])],
                              [helper.make_tensor_value_info(x, element, ["batch", "seq", d]), *outputs], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, VERSION)])
    report = attach_kernels(model, archs=ARCHS, max_tokens=MAX_TOKENS)
    assert len(report.bundles) == 1 and not report.skipped, str(report)
    onnx.save(attach_functions(model), path)
    return path


def parser_nodes(path):
    """The moexport nodes of a graph as `moexport build` gives them to TensorRT's parser: (node, its
    attributes with the kernels as fields, the graph's initializers as arrays)."""
    from moexport.opset import PLUGIN_ATTRIBUTES
    from moexport.trt_plugins.graph import moexport_nodes, plugin_graph

    model = onnx.load(path)
    plugin_graph(model, path.parent)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(node, {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in PLUGIN_ATTRIBUTES},
             weights) for node in moexport_nodes(model)]


def layer_plugin(path, harness=None, **changes):
    """The build-phase plugin of a graph's first node, created as the parser creates it, with some of its
    attributes changed."""
    from moexport.trt_plugins.harness import PluginHarness, node_fields

    node, attributes, _ = parser_nodes(path)[0]
    return (harness or PluginHarness()).create(node.op_type, node.name, node_fields({**attributes, **changes}))
