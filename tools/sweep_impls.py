"""The implementations of the op set that the differential sweep (`tools/sweep.py`) runs, by name.

Each one runs a case's op (`sweep_cases.Case`) on its inputs and returns the op's outputs as torch
tensors: SigmaMoE ``y`` [..., dv] and, where the implementation exposes it, ``expert`` [..., k];
TopKDispatch ``gate``, ``expert``, ``sorted_expert``, ``sorted_slot``; CVMM ``out``.

=================  ===========================================================  ===============
name               what runs                                                    where
=================  ===========================================================  ===============
reference          `SigmaMoE.reference_forward` / `models.routing.route` + a    CPU or GPU
                   stable sort / a per-expert loop (CVMM): what the others are
                   compared against
onnx_reference     the NumPy references of `moexport.opset.reference`, run by   CPU
                   `onnx.reference` on a single-node model
ort                the ONNX function bodies, inlined and run by ONNX Runtime    CPU
triton             `moexport.kernels` (`sigma_moe_forward`, `topk_dispatch`,     interpreter on
                   `cvmm`)                                                      the CPU, JIT on
                                                                                the GPU
aot                the node's kernel bundle (`moexport fuse`'s), its cubins     GPU
                   launched through the CUDA driver by `AOTRunner`
ort_cuda           the same bundle in the compiled op library on ONNX           GPU
                   Runtime's CUDA execution provider
trt                the same bundle in the TensorRT plugin library, called as    GPU
                   TensorRT calls it (`moexport.trt_plugins.harness`: the
                   parser's fields, a profile up to the group's largest T,
                   serialisation, the runtime plugin, enqueue)
=================  ===========================================================  ===============

A new implementation joins the sweep with a subclass of `Implementation` and one `register(...)`
call; the harness runs every registered one whose `available()` and `supports()` say yes (`Trt`
below is the pattern: the layer's bundle from `compiled_bundle`, outputs from `empty_outputs`); the
device script (tools/h200_tests.sh, MOEXPORT_SWEEP_REQUIRE) names those that must run on every GPU case.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from sweep_cases import Case, Layer

from moexport.core.dtypes import torch_dtype

_ELEM = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
         "bfloat16": onnx.TensorProto.BFLOAT16}
OUTPUTS = {"SigmaMoE": ("y", "expert"), "TopKDispatch": ("gate", "expert", "sorted_expert", "sorted_slot"),
           "CVMM": ("out",)}
# the op's inputs, in the order of its schema (the last one, `kernels`, aside)
INPUTS = {"SigmaMoE": ("x", "expert_sel", "keys", "values", "bias", "o_bias"), "TopKDispatch": ("logits",),
          "CVMM": ("x", "sorted_expert", "src_row", "dst_row", "W", "gate")}


class Implementation:
    """One implementation of the op set. Subclasses set `name` and override `run`, and where they
    need them `available` and `supports`."""

    name = ""
    ops = frozenset(OUTPUTS)

    def available(self, device: str) -> str | None:
        """None when it can run on `device` ('cpu' or 'cuda') here; else the reason it cannot."""
        return None

    def supports(self, case: Case) -> str | None:
        """None when it runs this case; else the reason it does not (a dtype its runtime lacks, ...)."""
        return None if case.layer.op in self.ops else f"does not implement {case.layer.op}"

    def run(self, case: Case, data: dict, device: str) -> dict[str, torch.Tensor]:
        """The op's outputs for `data` (the case's inputs, on `device`)."""
        raise NotImplementedError


REGISTRY: dict[str, Implementation] = {}


def register(implementation: Implementation) -> Implementation:
    """Add an implementation to the sweep (replacing one of the same name)."""
    REGISTRY[implementation.name] = implementation
    return implementation


def _needs(module: str) -> str | None:
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def op_inputs(case: Case, data: dict) -> dict[str, torch.Tensor]:
    """The case's op inputs that are present, by schema name."""
    return {name: data[name] for name in INPUTS[case.layer.op] if data.get(name) is not None}


# ---- PyTorch ---------------------------------------------------------------------------------------

class Reference(Implementation):
    """The PyTorch reference. SigmaMoE also returns its float32 router `logits` (for the near-tie margins)."""

    name = "reference"

    def run(self, case, data, device):
        from moexport.models.routing import route

        L = case.layer
        with torch.no_grad():
            if L.op == "SigmaMoE":
                layer = sigma_moe_layer(L, data)
                flat = data["x"].reshape(-1, L.d)
                _, expert = layer.route(flat)
                return {"y": layer.reference_forward(data["x"]), "expert": expert.reshape(*case.lead, L.k),
                        "logits": layer.router_logits(flat)}
            if L.op == "TopKDispatch":
                gate, expert = route(data["logits"], L.k, L.selection)
                order = torch.sort(expert.reshape(-1), stable=True)
                return {"gate": gate, "expert": expert, "sorted_expert": order.values,
                        "sorted_slot": order.indices}
            return {"out": _cvmm_loop(L, data)}


def sigma_moe_layer(L: Layer, data: dict):
    """A `SigmaMoE` holding the case's tensors (built on the meta device: no initialisation to pay for)."""
    from moexport.models import SigmaMoE

    with torch.device("meta"):
        layer = SigmaMoE(L.d, L.n_experts, L.expert_size, L.k, selection=L.selection, activation=L.activation,
                         bias=L.bias, v_dim=L.v_dim).eval()
    dtype = torch_dtype(L.dtype)
    state = {"keys": data["keys"], "values": data["values"], "expert_sel": data["expert_sel"].to(dtype)}
    if L.bias:
        state.update(bias=data["bias"], o_bias=data["o_bias"])
    layer.load_state_dict(state, assign=True)
    return layer


def _cvmm_loop(L: Layer, data: dict) -> torch.Tensor:
    """CVMM as its schema says it: per expert, its rows' products in float32, written to dst_row or
    summed into dst_row // k in increasing sorted position."""
    se, src, dst = (data[n].long() for n in ("sorted_expert", "src_row", "dst_row"))
    S = se.shape[0]
    out = torch.zeros(S // L.k if L.reduce else S, L.v_dim, device=se.device)
    for e in torch.unique(se).tolist():
        rows = torch.nonzero(se == e).reshape(-1)
        product = data["x"][src[rows]].float() @ data["W"][e].float()
        if data.get("gate") is not None:
            product = product * data["gate"][rows, None]
        if L.reduce:
            out.index_add_(0, torch.div(dst[rows], L.k, rounding_mode="floor"), product)
        else:
            out[dst[rows]] = product
    return out


class Triton(Implementation):
    """moexport's kernels as PyTorch calls them (the Triton interpreter where there is no GPU)."""

    name = "triton"

    def available(self, device):
        return _needs("triton")

    def run(self, case, data, device):
        from moexport.kernels import cvmm, sigma_moe_forward, topk_dispatch
        from moexport.kernels.configs import bucket, experts_key

        L = case.layer
        with torch.no_grad():
            if L.op == "SigmaMoE":
                configs = None
                if case.experts_config:
                    key = experts_key(L.d, L.n_experts, L.expert_size, L.v_dim, L.k, bucket(case.tokens))
                    configs = {key: dict(case.experts_config)}
                # the layer's router weight, in the model dtype as a PyTorch SigmaMoE holds it
                router = data["expert_sel"].to(data["x"].dtype)
                y = sigma_moe_forward(data["x"], router, data["keys"], data["values"], k=L.k,
                                      selection=L.selection, activation=L.activation, bias=data["bias"],
                                      o_bias=data["o_bias"], configs=configs)
                return {"y": y}
            if L.op == "TopKDispatch":
                return dict(zip(OUTPUTS["TopKDispatch"], topk_dispatch(data["logits"], L.k, L.selection)))
            return {"out": cvmm(data["x"], data["sorted_expert"], data["src_row"], data["dst_row"], data["W"],
                                data["gate"], reduce=bool(L.reduce), k=L.k)}


# ---- ONNX ------------------------------------------------------------------------------------------

def _input_dims(L: Layer, name: str, lead_rank: int) -> tuple[int, list]:
    """(element type, dims) of an op input in the single-node model: token dimensions symbolic."""
    f32, i32, T = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, _ELEM[L.dtype]
    E, d, G, dv = L.n_experts, L.d, L.expert_size, L.v_dim
    return {"x": (T, [f"N{i}" for i in range(lead_rank)] + [d]) if L.op == "SigmaMoE" else (T, ["R", d]),
            "expert_sel": (T if L.router_in_dtype else f32, [E, d]), "keys": (T, [E, d, G]),
            "values": (T, [E, G, dv]), "bias": (T, [E, G]),
            "o_bias": (T, [dv]), "logits": (f32, ["N", E]), "sorted_expert": (i32, ["S"]), "src_row": (i32, ["S"]),
            "dst_row": (i32, ["S"]), "W": (T, [E, d, dv]), "gate": (f32, ["S"])}[name]


def attributes(L: Layer) -> dict:
    """The op's attributes for a layer."""
    return {"SigmaMoE": {"k": L.k, "selection": L.selection, "activation": L.activation},
            "TopKDispatch": {"k": L.k, "selection": L.selection}, "CVMM": {"k": L.k, "reduce": L.reduce}}[L.op]


def op_model(L: Layer, lead_rank: int, opset: int) -> onnx.ModelProto:
    """A model of one node of the case's op, every input a graph input (weights with static shapes,
    as the function bodies and the kernels need them), every output a graph output."""
    from moexport.opset import DOMAIN, VERSION

    absent = (() if L.bias else ("bias", "o_bias")) + (() if L.gate else ("gate",))
    names = [n for n in INPUTS[L.op] if n not in absent]
    node_inputs = [n if n in names else "" for n in INPUTS[L.op]]
    while node_inputs[-1] == "":
        node_inputs.pop()
    outputs = OUTPUTS[L.op]
    graph = helper.make_graph(
        [helper.make_node(L.op, node_inputs, list(outputs), domain=DOMAIN, **attributes(L))], "sweep",
        [helper.make_tensor_value_info(n, *_input_dims(L, n, lead_rank)) for n in names],
        [helper.make_value_info(o, onnx.TypeProto()) for o in outputs])
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)]
    # IR 10, what the exporter writes: onnx's default (its newest) is more than ONNX Runtime 1.2x reads
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.cpu().numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _feeds(case: Case, data: dict) -> dict[str, np.ndarray]:
    return {n: _numpy(t) for n, t in op_inputs(case, data).items()}


@functools.lru_cache(maxsize=4)
def _body_model(L: Layer, lead_rank: int, opset: int) -> onnx.ModelProto:
    """The single-node model with its function body (built once for both CPU runtimes of a case: a body
    unrolled over 128 experts takes a second to trace)."""
    from moexport.opset import attach_functions

    return attach_functions(op_model(L, lead_rank, opset))


class OnnxReference(Implementation):
    """`moexport.opset.reference_evaluator`: onnx.reference with the op set's NumPy references."""

    name = "onnx_reference"

    def available(self, device):
        return None if device == "cpu" else "runs on the CPU (the CPU sweep has it)"

    def run(self, case, data, device):
        from moexport.opset import reference_evaluator

        model = _body_model(case.layer, len(case.lead), case.opset)
        results = reference_evaluator(model).run(None, _feeds(case, data))
        return {name: _torch(np.asarray(a)) for name, a in zip(OUTPUTS[case.layer.op], results)}


class Ort(Implementation):
    """ONNX Runtime on the CPU: the model-local function bodies (`moexport.opset.bodies`)."""

    name = "ort"

    def available(self, device):
        return _needs("onnxruntime") or (None if device == "cpu" else "runs on the CPU (the CPU sweep has it)")

    def supports(self, case):
        if case.layer.dtype == "bfloat16" and case.layer.op != "TopKDispatch":
            return "ONNX Runtime's CPU provider has no bfloat16 MatMul"
        return super().supports(case)

    def run(self, case, data, device):
        from moexport.plugins import ort_session

        model = _body_model(case.layer, len(case.lead), case.opset)
        results = ort_session(model, threads=1).run(None, _feeds(case, data))
        return {name: _torch(a) for name, a in zip(OUTPUTS[case.layer.op], results)}


# ---- compiled kernels (GPU) ------------------------------------------------------------------------

def max_tokens(L: Layer) -> int:
    """The token count a layer's kernels are compiled for: the largest of its group."""
    return max(L.group_tokens or (1,))


@functools.lru_cache(maxsize=2)  # a group's cases come one after the other
def compiled_model(L: Layer) -> onnx.ModelProto:
    """The layer's single-node model with its kernels compiled for sm_90 and attached, as `moexport fuse
    --arch 90 --max-tokens N` attaches them (one per group: the lru cache holds the group's)."""
    from moexport.exporter.compiled import attach_kernels
    from moexport.opset import attach_functions

    model = op_model(L, 1, 20)
    report = attach_kernels(model, archs=(90,), max_tokens=max_tokens(L))
    if not report.bundles or report.skipped:
        raise RuntimeError(f"no kernels attached: {report}")
    return attach_functions(model)


def compiled_bundle(L: Layer) -> bytes:
    """The kernel bundle of the layer (what a fused file carries for a node of this configuration)."""
    from moexport.exporter.compiled import BUNDLE_PREFIX

    model = compiled_model(L)
    tensor = next(t for t in model.graph.initializer if t.name.startswith(BUNDLE_PREFIX))
    return onnx.numpy_helper.to_array(tensor).tobytes()


def bundle_manifest(bundle: bytes, tokens: int, folder: Path) -> Path:
    """The plan a bundle runs for `tokens` (its select symbol's value: tokens, or rows for CVMM), as an
    `AOTRunner` manifest (`aot.compile_plan`'s format) with its sm_90 cubins beside it; chosen as the
    native launcher chooses (`native/bundle.cpp`: the first plan whose max_tokens covers the count, else
    the last where it is unbounded)."""
    from moexport.kernels.bundle import read_bundle

    manifest = read_bundle(bundle)
    plans = manifest["plans"]
    index = next((i for i, p in enumerate(plans) if tokens <= p["max_tokens"]),
                 len(plans) - 1 if plans[-1]["unbounded"] else None)
    if index is None:
        raise RuntimeError(f"{tokens} is more than the bundle was built for ({plans[-1]['max_tokens']})")
    path = folder / f"{manifest['key']}_{index}.json"
    if path.exists():
        return path
    body = 16 + int.from_bytes(bundle[8:16], "little")  # the images follow the magic, the length, the manifest
    steps = []
    for step in plans[index]["steps"]:
        kernel = manifest["kernels"][step["kernel"]]
        image = next(i for i in kernel["images"] if i["target"] == "cubin" and i["sm"] == 90)
        cubin = f"{manifest['key']}_{step['kernel']}.cubin"
        start = body + image["offset"]
        (folder / cubin).write_bytes(zlib.decompress(bundle[start:start + image["size"]]))
        steps.append({**step, "kernel": kernel["name"], "entry": kernel["entry"], "cubin": cubin,
                      "shared": image["shared"], "hidden_pointers": image["hidden_pointers"],
                      "launch_pdl": step["launch_pdl"] and image["pdl"]})
    plan = plans[index]
    path.write_text(json.dumps({"plan": manifest["op"], "inputs": plan["inputs"], "outputs": plan["outputs"],
                                "workspace": plan["workspace"], "derived": plan["derived"], "steps": steps}))
    return path


class Aot(Implementation):
    """The layer's kernel bundle, each plan's cubins launched through the CUDA driver from Python
    (`moexport.kernels.launcher.AOTRunner`): no Triton at run time."""

    name = "aot"

    @functools.cached_property
    def folder(self) -> Path:
        """Where the plans' manifests and cubins are written (one folder per process)."""
        return Path(tempfile.mkdtemp(prefix="moexport_sweep_aot_"))

    def available(self, device):
        return "needs a CUDA GPU" if device != "cuda" else _needs("cuda.bindings")

    def run(self, case, data, device):
        from moexport.kernels.bundle import read_bundle

        L = case.layer
        bundle = compiled_bundle(L)
        manifest = read_bundle(bundle)
        inputs = op_inputs(case, data)
        if L.op == "SigmaMoE":
            inputs["x"] = inputs["x"].reshape(-1, L.d)
        count = case.tokens * L.k if L.op == "CVMM" else case.tokens
        runner = _runner(bundle_manifest(bundle, count, self.folder))
        bound = {plan_name: inputs[op_name] for op_name, plan_name in zip(INPUTS[L.op], manifest["op_inputs"])
                 if plan_name and op_name in inputs}
        out = runner.run({n: t.contiguous() for n, t in bound.items()})
        torch.cuda.synchronize()
        named = dict(zip(OUTPUTS[L.op], manifest["op_outputs"]))
        result = {name: out[plan_name] for name, plan_name in named.items() if plan_name}
        if L.op == "SigmaMoE":
            result = {n: t.reshape(*case.lead, t.shape[-1]) for n, t in result.items()}
        return result


@functools.lru_cache(maxsize=64)
def _runner(manifest: Path):
    from moexport.kernels.launcher import AOTRunner

    return AOTRunner(manifest)


@functools.lru_cache(maxsize=2)
def _cuda_session(L: Layer):
    from moexport.plugins import ort_session

    session = ort_session(compiled_model(L), providers=["CUDAExecutionProvider"])
    if not session.moexport_kernels:
        raise RuntimeError("the session did not register the compiled op library")
    return session


class OrtCuda(Implementation):
    """The compiled op library (`libmoexport_ort.so`) on ONNX Runtime's CUDA execution provider, running
    the layer's kernel bundle through the native launcher."""

    name = "ort_cuda"

    def available(self, device):
        if device != "cuda":
            return "needs a CUDA GPU"
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)"
        from moexport.core.errors import MoexportError
        from moexport.plugins import ort_library

        try:
            ort_library()
        except MoexportError as error:
            return error.problem
        return None

    def run(self, case, data, device):
        from moexport.plugins import compiled_calls, run_with_tensors

        L = case.layer
        inputs = {n: t.contiguous() for n, t in op_inputs(case, data).items()}
        if L.op == "SigmaMoE":
            inputs["x"] = inputs["x"].reshape(-1, L.d)
        outputs = empty_outputs(case, device)
        before = compiled_calls()
        run_with_tensors(_cuda_session(L), inputs, outputs)
        torch.cuda.synchronize()
        if compiled_calls() == before and case.tokens:
            raise RuntimeError("ONNX Runtime ran the function body, not the compiled kernels")
        if L.op == "SigmaMoE":
            outputs = {n: t.reshape(*case.lead, t.shape[-1]) for n, t in outputs.items()}
        return outputs


@functools.lru_cache(maxsize=1)
def _plugin_harness():
    from moexport.trt_plugins.harness import PluginHarness

    return PluginHarness()


class Trt(Implementation):
    """The TensorRT plugins (`libmoexport_trt.so`) running the layer's bundle, driven through TensorRT's
    calls by `moexport.trt_plugins.harness` (no TensorRT runs engines on these GPUs): createPlugin from
    the node's fields as `moexport build` gives them, a profile up to the group's largest token count,
    the runtime plugin from the serialised fields, enqueue on torch's stream."""

    name = "trt"

    def available(self, device):
        if device != "cuda":
            return "needs a CUDA GPU"
        from moexport.core.errors import MoexportError
        from moexport.trt_plugins.harness import harness_library
        from moexport.trt_plugins.library import trt_library

        try:
            trt_library(), harness_library()
        except MoexportError as error:
            return f"{error.culprit} {error.problem}"
        return None

    def run(self, case, data, device):
        from moexport.kernels.bundle import read_bundle
        from moexport.trt_plugins.harness import prepare

        L, T = case.layer, case.tokens
        bundle = compiled_bundle(L)
        node = {**attributes(L), "kernels": bundle, "kernels_key": read_bundle(bundle)["key"]}
        inputs = {n: t.contiguous() for n, t in op_inputs(case, data).items()}
        outputs = empty_outputs(case, device)
        if L.op == "SigmaMoE":  # [batch, seq, d], as the parser gives a layer's tokens
            inputs["x"] = inputs["x"].reshape(1, T, L.d)
            outputs = {n: t.reshape(1, T, t.shape[-1]) for n, t in outputs.items()}
        call = prepare(_plugin_harness(), L.op, "sweep", node, list(inputs.values()), list(outputs.values()),
                       largest=[_largest(L, n, t) for n, t in inputs.items()])
        call(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        return {n: t.reshape(*case.lead, t.shape[-1]) if L.op == "SigmaMoE" else t for n, t in outputs.items()}


def _largest(L: Layer, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    """An input's shape in the profile: the group's largest token count where the shape has tokens."""
    top, rows = max_tokens(L), max_tokens(L) * L.k
    if name == "x" and L.op == "SigmaMoE":
        return (1, top, L.d)
    if name == "x":  # CVMM: token rows (up projection) or slot rows (down)
        return (rows if L.reduce else top, L.d)
    if name == "logits":
        return (top, L.n_experts)
    if name in ("sorted_expert", "src_row", "dst_row", "gate") and L.op == "CVMM":
        return (rows,)
    return tuple(tensor.shape)


def empty_outputs(case: Case, device: str) -> dict[str, torch.Tensor]:
    """The op's outputs for a case, allocated on `device` (SigmaMoE's flat: [T, dv] and [T, k])."""
    L, T = case.layer, case.tokens
    i32 = {"dtype": torch.int32, "device": device}
    if L.op == "SigmaMoE":
        return {"y": torch.empty(T, L.v_dim, dtype=torch_dtype(L.dtype), device=device),
                "expert": torch.empty(T, L.k, dtype=torch.int64, device=device)}
    if L.op == "TopKDispatch":
        return {"gate": torch.empty(T, L.k, device=device), "expert": torch.empty(T, L.k, **i32),
                "sorted_expert": torch.empty(T * L.k, **i32), "sorted_slot": torch.empty(T * L.k, **i32)}
    return {"out": torch.empty(T if L.reduce else T * L.k, L.v_dim, device=device)}


for _implementation in (Reference(), OnnxReference(), Ort(), Triton(), Aot(), OrtCuda(), Trt()):
    register(_implementation)
