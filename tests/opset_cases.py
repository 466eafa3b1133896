"""Single-node models and σ-MoE cases that the op-set and ONNX Runtime tests share."""
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from moexport.models import SigmaMoE
from moexport.opset import DOMAIN, VERSION, attach_functions
from moexport.opset.functions import SIGNATURES


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


def tied_logits(rng, n, e):
    """Logits from 5 values, so most rows have ties, some at the top-k boundary."""
    return rng.integers(-2, 3, size=(n, e)).astype(np.float32)


def sigma_moe_case(rng, *, shape, e, k, selection="sigmoid", activation="relu", bias=False, dtype=torch.float32):
    """A random σ-MoE layer's op inputs as numpy arrays, with the layer's own y and experts (the reference)."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    layer = SigmaMoE(12, e, 5, k, selection=selection, activation=activation, bias=bias).eval()
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
            layer.o_bias.normal_()
    layer = layer.to(dtype)
    x = torch.randn(*shape, 12).to(dtype)
    numpy = (lambda t: None if t is None else t.detach().float().numpy().astype(torch.empty(0, dtype=dtype).numpy().dtype))
    inputs = {"x": numpy(x), "expert_sel": layer.expert_sel.detach().float().numpy(), "keys": numpy(layer.keys),
              "values": numpy(layer.values), "bias": numpy(layer.bias), "o_bias": numpy(layer.o_bias)}
    with torch.no_grad():
        return inputs, layer(x), layer.route(x)[1]


def nan_routing_case():
    """Router logits with NaN (an overflowing router), k, the experts the routing rule gives them (NaN
    ranks as -inf, ties to the lower index) and the logits as the rule sees them (for the gates)."""
    nan, inf = float("nan"), float("inf")
    logits = np.array([[nan, 1.0, nan, 0.5, -inf], [nan] * 5, [-inf, nan, 2.0, -inf, 1.0]], np.float32)
    return logits, 3, np.array([[1, 3, 0], [0, 1, 2], [2, 4, 0]]), np.where(np.isnan(logits), -inf, logits)


def rule_gates(as_rule: np.ndarray, experts: np.ndarray, selection: str) -> np.ndarray:
    """The gates of `experts` under `selection`, from logits without NaN (float64 formulas; an all -inf
    softmax is NaN)."""
    as_rule = as_rule.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        chosen = np.take_along_axis(as_rule, experts, -1)
        if selection == "sigmoid":
            return 1.0 / (1.0 + np.exp(-chosen))
        scores = as_rule if selection == "softmax" else chosen
        exp = np.exp(scores - scores.max(-1, keepdims=True))
        soft = exp / exp.sum(-1, keepdims=True)
        return np.take_along_axis(soft, experts, -1) if selection == "softmax" else soft
