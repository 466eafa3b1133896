"""`fuse`: graph-surgeon passes that turn exported σ-MoE layers into single ``SigmaMoE`` nodes.

Passes, in order (onnx-graphsurgeon):

1. fold: ``Constant`` nodes become initializers, dead nodes go (full constant folding runs at the end).
2. routing: standard-op routing (router logits -> TopK -> exact tie resolution -> gate), as the
   portable form emits it, becomes one ``TopKDispatch`` node.
3. sigma_moe: a whole dispatch chain (router MatMul -> ``TopKDispatch`` -> ``CVMM`` -> activation
   -> ``CVMM``, plus biases and reshapes) becomes one ``SigmaMoE`` node.
4. sigma_moe_portable: the portable (dense-masked) expert computation behind a ``TopKDispatch``
   becomes one ``SigmaMoE`` node. With pass 2 this fuses an existing portable ONNX file without its
   checkpoint.

Each pattern is a *template*: the subgraph that `moexport.exporter.forms` emits for a configuration
(selection, activation, biases, dtype, sizes), so a fused node computes exactly what it replaces.
Preconditions: the layer's weights are initializers and each intermediate value is used only inside
the layer (the expert indices may also be a graph output). Candidates are found from anchors
(``TopK`` and ``TopKDispatch`` nodes); a candidate that matches no template is left as it is and the
report names its nearest miss.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs
from onnx import helper

from moexport.core.errors import MoexportError, first_line
from moexport.core.files import check_output_file
from moexport.core.onnx_files import load_model, save_model
from moexport.core.progress import progress
from moexport.exporter.compiled import KernelsReport, attach_kernels, detach_kernels, triton_available
from moexport.exporter.forms import (
    EXPANSION_DOMAIN,
    FORM_INPUTS,
    dispatch_route,
    form_function,
    is_routing_name,
    sigma_moe_parameters,
    unique_name,
)
from moexport.models.activations import ACTIVATIONS
from moexport.models.routing import SELECTIONS
from moexport.opset import DOMAIN, PLUGIN_ATTRIBUTES, VERSION, attach_functions, check_opset_imports
from moexport.opset.bodies import route
from moexport.kernels.bundle import DEFAULT_ARCHS
from moexport.opset.functions import build_function, default_opset

log = logging.getLogger(__name__)
PASSES = ("routing", "sigma_moe", "sigma_moe_portable")
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
           np.dtype(ml_dtypes.bfloat16): "bfloat16"}


@dataclass
class FuseReport:
    """What `fuse` did: nodes folded, sites rewritten per pass, and why candidates were left alone."""

    folded: int = 0
    fused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))
    misses: list[str] = field(default_factory=list)
    kernels: KernelsReport | None = None  # the compiled kernels attached, if any were asked for
    notes: list[str] = field(default_factory=list)
    _pending: dict[int, tuple[gs.Node, "_Miss"]] = field(default_factory=dict, repr=False)

    def miss(self, node: gs.Node, miss: "_Miss") -> None:
        """Note why `node`'s layer was not fused; the deepest miss over the passes is reported if none fuses it."""
        if id(node) not in self._pending or miss.depth > self._pending[id(node)][1].depth:
            self._pending[id(node)] = (node, miss)

    def settle(self) -> None:
        """Move the pending misses of the layers still in the graph (not fused by any pass) to `misses`."""
        self.misses += [f"{node.op} {node.name!r}: {miss.reason}" for node, miss in self._pending.values() if node.outputs]
        self._pending.clear()

    @property
    def changed(self) -> bool:
        """True when some pass rewrote at least one site."""
        return any(self.fused.values())

    def __str__(self) -> str:
        counts = ", ".join(f"{name}: {count}" for name, count in self.fused.items())
        lines = [f"fused {counts}; folded {self.folded} nodes"]
        if not self.changed:
            lines.append("no σ-MoE layer recognised: its nodes were left as they are")
        lines += [f"not fused: {miss}" for miss in self.misses]
        if self.kernels is not None:
            lines.append(str(self.kernels))
        lines += self.notes
        return "\n".join(lines)


# ---- templates -----------------------------------------------------------------------------------

def _constants_to_tensors(graph: gs.Graph) -> gs.Graph:
    """Replace Constant nodes by gs.Constant tensors (what `fold_constants` does first), then clean up."""
    for node in [n for n in graph.nodes if n.op == "Constant" and "value" in n.attrs]:
        tensor = node.outputs[0]
        constant = gs.Constant(tensor.name, np.asarray(node.attrs["value"].values))
        for consumer in list(tensor.outputs):
            for index in [i for i, t in enumerate(consumer.inputs) if t is tensor]:
                consumer.inputs[index] = constant
        for index, output in enumerate(graph.outputs):
            if output is tensor:
                graph.outputs[index] = constant
        node.outputs.clear()
    return graph.cleanup()


def _template_graph(function: onnx.FunctionProto, opset: int) -> gs.Graph:
    """The function body as a standalone gs graph whose inputs are the function's formal inputs."""
    present = [name for name in function.input if name]
    node = helper.make_node(function.name, list(function.input), list(function.output), domain=function.domain,
                            overload=function.overload)
    graph = helper.make_graph([node], "template", [helper.make_value_info(n, onnx.TypeProto()) for n in present],
                              [helper.make_value_info(n, onnx.TypeProto()) for n in function.output])
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION), helper.make_opsetid(function.domain, 1)])
    inlined = onnx.inliner.inline_selected_functions(model, [(function.domain, function.name)])
    return _constants_to_tensors(gs.import_onnx(inlined))


@lru_cache(maxsize=256)
def _routing_template(k: int, selection: str, opset: int) -> gs.Graph:
    function = build_function(lambda op, logits: route(op, logits, k=k, selection=selection), ("logits",),
                              [True], domain=EXPANSION_DOMAIN, name="Route", overload=f"k{k}.{selection}",
                              opset=opset)
    return _template_graph(function, opset)


@lru_cache(maxsize=1024)
def _layer_template(form: str, config_items: tuple, present: tuple[bool, ...], opset: int, d_model: int,
                    expert_size: int) -> gs.Graph:
    config = dict(config_items)
    function = form_function(form, config, list(present), opset=opset, d_model=d_model, expert_size=expert_size,
                             routing=dispatch_route)
    return _template_graph(function, opset)


# ---- matching ------------------------------------------------------------------------------------

class _Miss(Exception):
    """A template did not match; carries how far it got and why."""

    def __init__(self, depth: int, reason: str):
        super().__init__(reason)
        self.depth, self.reason = depth, reason


def _same_attribute(a: Any, b: Any) -> bool:
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return isinstance(a, gs.Constant) and isinstance(b, gs.Constant) and _same_constant(a, b)
    if isinstance(a, (gs.Graph,)) or isinstance(b, (gs.Graph,)):
        return False  # our templates have no subgraphs
    return a == b


def _same_constant(a: gs.Constant, b: gs.Constant) -> bool:
    x, y = np.asarray(a.values), np.asarray(b.values)
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def _position(items: list, item) -> int:
    """Index of `item` in `items` by identity (gs tensors compare by value)."""
    return next(i for i, x in enumerate(items) if x is item)


def _domain(node: gs.Node) -> str:
    return "" if node.domain in ("", "ai.onnx", None) else node.domain


class _Match:
    """Backward structural match of a template graph at an anchor tensor of the target graph."""

    def __init__(self, template: gs.Graph):
        self.template = template
        self.placeholders = {t.name for t in template.inputs}
        self.nodes: dict[int, gs.Node] = {}      # id(template node) -> graph node
        self.bound: dict[str, gs.Tensor] = {}    # placeholder name -> graph tensor

    def _taken(self, gn: gs.Node) -> bool:
        return any(n is gn for n in self.nodes.values())

    def tensor(self, t: gs.Tensor, g: gs.Tensor) -> None:
        if t.name in self.placeholders:
            if self.bound.setdefault(t.name, g) is not g:
                raise _Miss(len(self.nodes), f"input {t.name!r} would bind to two different tensors")
            return
        if isinstance(t, gs.Constant):
            if not (isinstance(g, gs.Constant) and _same_constant(t, g)):
                raise _Miss(len(self.nodes), f"constant {g.name!r} differs from the template's")
            return
        if t.name == "" or g.name == "":
            if t.name != g.name:
                raise _Miss(len(self.nodes), f"optional input {g.name or t.name!r} present on one side only")
            return
        if not t.inputs or not g.inputs or isinstance(g, gs.Constant):
            raise _Miss(len(self.nodes), f"tensor {g.name!r} is not produced like the template's {t.name!r}")
        self.node(t.inputs[0], g.inputs[0], _position(t.inputs[0].outputs, t), _position(g.inputs[0].outputs, g))

    def node(self, tn: gs.Node, gn: gs.Node, t_index: int, g_index: int) -> None:
        if id(tn) in self.nodes:
            if self.nodes[id(tn)] is not gn or t_index != g_index:
                raise _Miss(len(self.nodes), f"node {gn.name!r} is reached where the template has a shared node")
            return
        if self._taken(gn):
            raise _Miss(len(self.nodes), f"node {gn.name!r} would match two template nodes")
        where = f"node {gn.name!r} ({gn.op})"
        if (tn.op, _domain(tn)) != (gn.op, _domain(gn)) or t_index != g_index:
            raise _Miss(len(self.nodes), f"{where}: the template has {tn.op} here")
        if len(tn.inputs) != len(gn.inputs) or len(tn.outputs) != len(gn.outputs):
            raise _Miss(len(self.nodes), f"{where}: different number of inputs or outputs")
        if tn.attrs.keys() != gn.attrs.keys() or not all(_same_attribute(tn.attrs[a], gn.attrs[a]) for a in tn.attrs):
            raise _Miss(len(self.nodes), f"{where}: attributes differ ({gn.attrs} vs {tn.attrs})")
        self.nodes[id(tn)] = gn
        for t, g in zip(tn.inputs, gn.inputs):
            self.tensor(t, g)

    def run(self, anchor: gs.Tensor, graph_outputs: set[int]) -> list[gs.Tensor]:
        """Match the template's first output at `anchor`, then its other outputs; return the matched outputs."""
        outputs = self.template.outputs
        self.tensor(outputs[0], anchor)
        matched = [anchor]
        for t in outputs[1:]:
            matched.append(self._find_output(t))
        self._check_private(matched, graph_outputs)
        return matched

    def _find_output(self, t: gs.Tensor) -> gs.Tensor:
        """The graph tensor matching a further template output: tried at the nodes near the matched ones."""
        producer, index = t.inputs[0], _position(t.inputs[0].outputs, t)
        if id(producer) in self.nodes:
            return self.nodes[id(producer)].outputs[index]
        matched = list(self.nodes.values())
        for candidate in {id(n): n for m in matched for n in _cone(m, len(self.template.nodes))}.values():
            if candidate.op != producer.op or self._taken(candidate):
                continue
            trial = dict(self.nodes), dict(self.bound)
            try:
                self.node(producer, candidate, index, index)
                return candidate.outputs[index]
            except _Miss:
                self.nodes, self.bound = trial
        raise _Miss(len(self.nodes), f"no tensor matches the template output {t.name!r}")

    def _check_private(self, outputs: list[gs.Tensor], graph_outputs: set[int]) -> None:
        inside = {id(n) for n in self.nodes.values()}
        keep = {id(t) for t in outputs}
        for node in self.nodes.values():
            for tensor in node.outputs:
                if id(tensor) in keep:
                    continue
                if id(tensor) in graph_outputs or any(id(c) not in inside for c in tensor.outputs):
                    # every template node matched: deeper than any partial match
                    raise _Miss(len(self.nodes) + 1, f"intermediate {tensor.name!r} is also used outside the layer")


def _try(templates, anchor: gs.Tensor, graph_outputs: set[int]):
    """The first template (with its key) that matches at `anchor`, or (None, nearest miss)."""
    best = _Miss(-1, "no template")
    for key, template in templates:
        match = _Match(template)
        try:
            return (key, match, match.run(anchor, graph_outputs)), None
        except _Miss as miss:
            best = max(best, miss, key=lambda m: m.depth)
    return None, best


# ---- passes --------------------------------------------------------------------------------------

def _graph_outputs(graph: gs.Graph) -> set[int]:
    return {id(t) for t in graph.outputs}


def _replace(graph: gs.Graph, match: _Match, op: str, inputs: list, outputs: list, attrs: dict, name: str) -> None:
    """Detach the matched nodes from their outputs and insert one moexport node in their place."""
    for node in match.nodes.values():
        node.outputs.clear()
    taken = {n.name for n in graph.nodes}
    graph.nodes.append(gs.Node(op=op, name=unique_name(name, taken), domain=DOMAIN, inputs=inputs, outputs=outputs,
                               attrs=attrs))


def _fuse_routing(graph: gs.Graph, opset: int) -> int:
    """Standard-op routing -> TopKDispatch. Anchors: the gate computations after each TopK."""
    count = 0
    for topk in [n for n in graph.nodes if n.op == "TopK" and _domain(n) == ""]:
        k_input = topk.inputs[1]
        if not isinstance(k_input, gs.Constant) or np.asarray(k_input.values).size != 1 or not topk.outputs[0].outputs:
            continue
        k = int(np.asarray(k_input.values).reshape(-1)[0])
        templates = [(s, _routing_template(k, s, opset)) for s in SELECTIONS]
        depth = max(len(t.nodes) for _, t in templates)
        gates = {id(t): t for n in _cone(topk, depth) for t in n.outputs
                 if n.op in ("Sigmoid", "Softmax", "GatherElements")}
        for gate in gates.values():
            found, _ = _try(templates, gate, _graph_outputs(graph))
            if found is not None:
                selection, match, (gate_out, expert) = found
                spare = [gs.Variable(f"{expert.name}.sorted_{n}", dtype=np.int32) for n in ("expert", "slot")]
                _replace(graph, match, "TopKDispatch", [match.bound["logits"]], [gate_out, expert, *spare],
                         {"k": k, "selection": selection, **PLUGIN_ATTRIBUTES}, name=f"{topk.name}.dispatch")
                count += 1
                break
    return count


def _cone(node: gs.Node, depth: int) -> list[gs.Node]:
    """Nodes reachable forward from `node` within `depth` steps (breadth first)."""
    seen, frontier = {id(node): node}, [node]
    for _ in range(depth):
        frontier = [c for n in frontier for t in n.outputs for c in t.outputs if id(c) not in seen]
        seen.update((id(c), c) for c in frontier)
    return list(seen.values())


def _fuse_layers(graph: gs.Graph, form: str, opset: int, report: FuseReport) -> int:
    """Whole σ-MoE layers around each TopKDispatch (dispatch chain or portable experts) -> SigmaMoE."""
    count = 0
    for dispatch in [n for n in graph.nodes if n.op == "TopKDispatch" and _domain(n) == DOMAIN]:
        found = _match_layer(graph, dispatch, form, opset)
        if isinstance(found, _Miss):
            report.miss(dispatch, found)
            continue
        match, config, outputs = found
        if not all(isinstance(match.bound[n], gs.Constant) for n in FORM_INPUTS[form][1:] if n in match.bound):
            report.miss(dispatch, _Miss(len(match.nodes), "the layer's weights are not all constants"))
            continue
        params = {n: np.asarray(match.bound[n].values) if n in match.bound else None for n in FORM_INPUTS[form][1:]}
        fused = sigma_moe_parameters(form, params, config["n_experts"])
        prefix = match.bound["keys" if form == "dispatch" else "w1"].name.rsplit(".", 1)[0]
        dropped = _dropped(match)
        taken = _tensor_names(graph) - {t.name for t in dropped}
        inputs = [match.bound["x"]] + [_parameter(fused[n], params.get(n), match.bound.get(n), f"{prefix}.{n}", taken)
                                       for n in ("expert_sel", "keys", "values", "bias", "o_bias")]
        while inputs[-1].name == "":
            inputs.pop()
        for tensor in dropped:  # they leave with the matched nodes; free their names for the new constants
            if not any(tensor is t for t in inputs):
                tensor.name += ".replaced"
        attrs = {"k": config["k"], "selection": config["selection"], "activation": config["activation"],
                 **PLUGIN_ATTRIBUTES}
        _replace(graph, match, "SigmaMoE", inputs, outputs, attrs, name=prefix)
        count += 1
    return count


def _tensor_names(graph: gs.Graph) -> set[str]:
    return {t.name for n in graph.nodes for t in [*n.inputs, *n.outputs]} | {t.name for t in graph.inputs}


def _dropped(match: _Match) -> list[gs.Constant]:
    """The layer's constants that only the matched nodes use (they go with them)."""
    inside = {id(n) for n in match.nodes.values()}
    return [t for t in match.bound.values() if isinstance(t, gs.Constant) and all(id(c) in inside for c in t.outputs)]


def _parameter(value, original, tensor, name: str, taken) -> gs.Tensor:
    """The fused node's parameter: empty, the layer's own constant when unchanged, or a new constant."""
    if value is None:
        return gs.Variable.empty()
    if value is original:
        return tensor
    return gs.Constant(unique_name(name, taken), value)


def _expert_weights(dispatch: gs.Node, router: gs.Node, form: str, n_experts: int):
    """(dtype name, expert size G) read off the expert weights next to a TopKDispatch, or None."""
    if form == "dispatch":
        weights = [c.inputs[4] for c in dispatch.outputs[2].outputs if c.op == "CVMM" and len(c.inputs) > 4]
    else:
        x = router.inputs[0].inputs[0].inputs[0] if router.inputs[0].inputs and router.inputs[0].inputs[0].op == "Cast" \
            else router.inputs[0]
        weights = [c.inputs[1] for c in x.outputs if c.op == "MatMul" and c is not router]
    for weight in weights:
        if isinstance(weight, gs.Constant) and np.asarray(weight.values).dtype in _DTYPES:
            shape = np.asarray(weight.values).shape
            return _DTYPES[np.asarray(weight.values).dtype], shape[-1] if form == "dispatch" else shape[1] // n_experts
    return None


def _match_layer(graph: gs.Graph, dispatch: gs.Node, form: str, opset: int):
    """(match, config, outputs) of the σ-MoE layer around a TopKDispatch node, or the nearest miss."""
    k, selection = int(dispatch.attrs["k"]), str(dispatch.attrs.get("selection", "sigmoid"))
    router = dispatch.inputs[0].inputs[0] if dispatch.inputs[0].inputs else None
    if router is None or router.op != "MatMul" or not isinstance(router.inputs[1], gs.Constant):
        return _Miss(0, "its logits do not come from a MatMul with a constant router weight")
    d_model, n_experts = np.asarray(router.inputs[1].values).shape
    weights = _expert_weights(dispatch, router, form, n_experts)
    if weights is None:
        return _Miss(0, f"no float32/float16/bfloat16 expert weights of the {form} form next to it")
    dtype, expert_size = weights
    best = _Miss(-1, "no candidate output")
    for activation, bias, o_bias, with_expert in itertools.product(ACTIVATIONS, (True, False), (True, False), (True, False)):
        config = {"op_type": "SigmaMoE", "k": k, "selection": selection, "activation": activation, "n_experts": n_experts,
                  "dtype": dtype, "optional": tuple(n for n, on in (("bias", bias), ("o_bias", o_bias)) if on),
                  "with_expert": with_expert}
        template = _layer_template(form, tuple(sorted(config.items())), (True, True, True, True, bias, o_bias),
                                   opset, d_model, expert_size)
        last = template.outputs[0].inputs[0].op
        for node in _cone(dispatch, len(template.nodes)):
            if node.op != last:
                continue
            found, miss = _try([(None, template)], node.outputs[0], _graph_outputs(graph))
            if found is not None:
                return found[1], config, found[2]
            best = max(best, miss, key=lambda m: m.depth)
    return _Miss(best.depth, f"nearest miss ({form} form) after {best.depth} matched nodes: {best.reason}")


# ---- driver --------------------------------------------------------------------------------------

def fuse(src: str | os.PathLike, dst: str | os.PathLike, *, passes: tuple[str, ...] | None = None,
         archs: tuple[int, ...] | None = None, max_tokens: int | None = None,
         show_progress: bool | None = None) -> FuseReport:
    """Fuse the σ-MoE layers of an ONNX file into single SigmaMoE nodes (see the module docstring) and
    attach the compiled kernels of every moexport node (`moexport.exporter.compiled`).

    Args:
        src: Input .onnx file (dispatch or portable form, as `export_onnx` writes them).
        dst: Output .onnx file, written atomically (may equal `src`).
        passes: Passes to run, in their fixed order. Defaults to all of `PASSES`.
        archs: GPU compute capabilities to compile the kernels for, e.g. (90,); () for none. Defaults
            to `moexport.kernels.bundle.DEFAULT_ARCHS` where Triton is installed, else none (said in
            the report).
        max_tokens: Token counts the kernels' plans are chosen for (dispatched plans serve more).
            Defaults to `moexport.kernels.bundle.DEFAULT_MAX_TOKENS`.
        show_progress: Show progress while compiling. Defaults to when stderr is a terminal.

    Returns:
        A FuseReport: nodes folded, sites fused per pass, the candidates left alone with their
        nearest miss, and the kernels compiled. A graph where nothing is recognised is written with
        its kernels attached and otherwise unchanged.

    Raises:
        MoexportError: Unreadable input, unknown pass, unknown moexport op-set version, kernels asked
            for without Triton, or an architecture they cannot be compiled for.
    """
    passes = PASSES if passes is None else tuple(passes)
    unknown = set(passes) - set(PASSES)
    if unknown:
        raise MoexportError(f"passes {sorted(unknown)}", "are not fusion passes", f"use some of {', '.join(PASSES)}")
    src, dst = Path(src), check_output_file(dst)
    model = load_model(src)
    check_opset_imports(model, str(src))
    try:  # the graph in memory, not the file again, where protobuf can hold it
        onnx.checker.check_model(model if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF else str(src))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise MoexportError(str(src), f"is not a valid ONNX model: {first_line(error)}") from None
    report = FuseReport()
    if archs is None and not triton_available():
        archs = ()
        report.notes.append("no compiled kernels: Triton is not installed here (pip install 'moexport[triton]'); "
                            "ONNX Runtime and TensorRT run this file on its function bodies")
    detach_kernels(model)  # they are compiled again for what the graph becomes
    graph, opset = gs.import_onnx(model), default_opset(model)
    # The exporter names every layer's expert indices experts.<layer>, graph outputs or not. They are
    # outputs while the passes run, so that cleanup keeps them and each fused node gives them too.
    shown, kept = len(graph.outputs), {id(t) for t in graph.outputs}
    graph.outputs += [t for name, t in graph.tensors().items() if is_routing_name(name) and id(t) not in kept]
    before = len(graph.nodes)
    _constants_to_tensors(graph)
    report.folded = before - len(graph.nodes)
    steps = {"routing": lambda: _fuse_routing(graph, opset),
             "sigma_moe": lambda: _fuse_layers(graph, "dispatch", opset, report),
             "sigma_moe_portable": lambda: _fuse_layers(graph, "portable", opset, report)}
    for name in PASSES:
        if name in passes:
            report.fused[name] = steps[name]()
            graph.cleanup()
    report.settle()
    if report.changed:
        graph.fold_constants().cleanup().toposort()
        del graph.outputs[shown:]
        fused = gs.export_onnx(graph)
        fused.ir_version = max(fused.ir_version, model.ir_version)
        fused.metadata_props.extend(model.metadata_props)  # graph surgeon drops them (the dtype record among them)
        model = fused
    if archs != ():
        targets = ", ".join(f"sm_{sm}" for sm in (archs or DEFAULT_ARCHS))
        with progress(f"compiling kernels for {targets}", enabled=show_progress) as advance:
            report.kernels = attach_kernels(model, archs=archs, max_tokens=max_tokens, advance=advance)
    save_model(attach_functions(model), dst)
    log.info("%s", report)
    return report
