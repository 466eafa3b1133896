"""Polygraphy runners for every place a moexport model runs: PyTorch, ONNX Runtime, TensorRT.

Each runner subclasses polygraphy's BaseRunner (or is polygraphy's own) so that polygraphy's
Comparator drives them all with identical inputs.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata

from moexport.core.dtypes import torch_dtype
from moexport.core.errors import MoexportError
from moexport.exporter.forms import EXPERTS_PREFIX, layer_output_name, routing_name
from moexport.models import SigmaMoE, TransformerLM, route

GAP_PREFIX = "router_gap"  # PyTorch-only companion output: relative top-k margin of each token
MEMORY_PREFIX, NEW_MEMORY_PREFIX = "memory.", "new_memory."


def sigma_moe_layers(model: torch.nn.Module) -> dict[str, SigmaMoE]:
    """The σ-MoE layers of a model by module path ("" for a model that is itself one layer)."""
    return {path: module for path, module in model.named_modules() if isinstance(module, SigmaMoE)}


def topk_margin(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(k-th best − (k+1)-th best logit) / max(1, |k-th best|): how close a token's top-k set is to a tie."""
    if k == logits.shape[-1]:
        return torch.full(logits.shape[:-1], float("inf"))
    top = torch.topk(logits, k + 1, dim=-1).values
    return (top[..., k - 1] - top[..., k]) / top[..., k - 1].abs().clamp(min=1.0)


class TorchRunner(BaseRunner):
    """Runs a moexport PyTorch model (a whole LM or one layer) as the reference.

    Besides the model outputs it records, for every σ-MoE layer, the selected experts
    (``experts.<path>``) and the top-k margin of every token (``router_gap.<path>``), so routing can be
    compared and disagreements explained. `infer_following` runs the model on another runtime's
    routing instead of its own.

    Args:
        model: The PyTorch model.
        input_metadata: Input names, dtypes and shapes (those of the artifact under test).
        output_names: Outputs to produce, named as the artifact names them.
        dtype: Dtype to run the model in (a converted copy where the model's differs: the model
            itself keeps its dtype, weights and training mode). Defaults to "float32".
        name: Runner name. Defaults to "pytorch".
    """

    def __init__(self, model: torch.nn.Module, *, input_metadata: TensorMetadata, output_names: list[str],
                 dtype: str | None = None, name: str | None = None):
        super().__init__(name=name or "pytorch", prefix="pytorch-runner")
        self.model, self.input_metadata, self.output_names = model, input_metadata, list(output_names)
        self.dtype = torch_dtype(dtype or "float32")
        self._follow: dict[str, np.ndarray] = {}

    def activate_impl(self):
        self._was_training = self.model.training
        self._model = self.model.eval()
        if any(p.dtype != self.dtype for p in self._model.parameters()):
            # Convert a copy: `.to()` converts in place and would round the caller's weights for good.
            self._model = copy.deepcopy(self._model).to(self.dtype)
        self._routing: dict[str, torch.Tensor] = {}
        self._layers = sigma_moe_layers(self._model)
        self._hooks = [layer.register_forward_pre_hook(self._record_routing(path))
                       for path, layer in self._layers.items()]

    def _record_routing(self, path: str):
        def hook(layer: SigmaMoE, args):
            logits = layer.router_logits(args[0])
            _, expert = route(logits, layer.k, layer.selection)
            self._routing[routing_name(path)] = expert
            self._routing[layer_output_name(GAP_PREFIX, path)] = topk_margin(logits, layer.k)

        return hook

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_following(self, feed_dict: dict[str, np.ndarray], experts: dict[str, np.ndarray]) -> OrderedDict:
        """`infer`, with every σ-MoE layer named in `experts` (by its routing output name) sending each
        token to the experts given there (another runtime's choices) instead of its own top-k.

        The routing outputs stay the model's own top-k choices and margins on the inputs it then sees:
        where another runtime's routing departs from them, it departs from what the reference would do
        given the routing of the layers before.
        """
        self._follow = experts
        try:
            return self.infer(feed_dict)
        finally:
            self._follow = {}

    @contextlib.contextmanager
    def _following(self):
        swapped = []
        for path, layer in self._layers.items():
            experts = self._follow.get(routing_name(path))
            if experts is not None:
                layer.forward = functools.partial(layer.reference_forward, expert=torch.from_numpy(experts))
                swapped.append(layer)
        try:
            yield
        finally:
            for layer in swapped:
                del layer.forward

    def infer_impl(self, feed_dict):
        inputs = {name: torch.from_numpy(np.asarray(value)) for name, value in feed_dict.items()}
        self._routing.clear()
        with torch.no_grad(), self._following():
            start = time.perf_counter()
            outputs = self._forward(inputs)
            self.inference_time = time.perf_counter() - start
        outputs.update(self._routing)
        result = OrderedDict()
        for name in self.output_names + [n for n in self._routing if n.startswith(GAP_PREFIX)]:
            if name not in outputs:
                raise MoexportError(f"output {name!r}", "is not produced by the PyTorch model",
                                    "the artifact was exported from a different model or with other options")
            value = outputs[name]
            result[name] = value.float().numpy() if value.is_floating_point() else value.numpy()
        return result

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        main = [n for n in self.output_names if not n.startswith((EXPERTS_PREFIX, NEW_MEMORY_PREFIX))]
        if "input_ids" in inputs:
            memory_names = sorted((n for n in inputs if n.startswith(MEMORY_PREFIX)),
                                  key=lambda n: int(n.split(".")[1]))
            memory = [inputs[n].to(self.dtype) for n in memory_names] or None
            if any(n.startswith(NEW_MEMORY_PREFIX) for n in self.output_names):
                logits, new_memory = self._model(inputs["input_ids"], memory=memory, return_memory=True)
                outputs = {f"{NEW_MEMORY_PREFIX}{i}": m for i, m in enumerate(new_memory)}
            else:
                logits, outputs = self._model(inputs["input_ids"], memory=memory), {}
            outputs[main[0] if main else "logits"] = logits
            return outputs
        (value,) = inputs.values()
        return {main[0] if main else "y": self._model(value.to(self.dtype))}

    def deactivate_impl(self):
        for hook in self._hooks:
            hook.remove()
        self.model.train(self._was_training)


def check_io(model: torch.nn.Module, artifact: str, metadata: TensorMetadata, outputs: list[str]) -> None:
    """Check that `artifact` takes the inputs `model` takes and gives only outputs it produces.

    Raises:
        MoexportError: Naming the artifact and the inputs or outputs that do not fit, with what the model
            expects: an ONNX file or engine made from another model (or not by moexport at all).
    """
    kind = type(model).__name__
    routing = {routing_name(path) for path in sigma_moe_layers(model)}
    found = ", ".join(f"{name} ({dtype} {list(shape)})" for name, (dtype, shape) in metadata.items()) or "none"
    hint = "give an ONNX file (or engine) made by `moexport export` from this checkpoint"
    if isinstance(model, TransformerLM):
        memory = {f"{MEMORY_PREFIX}{i}" for i in range(model.n_layers)}
        ids = metadata["input_ids"] if "input_ids" in metadata else None
        fits = (ids is not None and ids.dtype.is_integral and len(ids.shape) == 2
                and set(metadata) - {"input_ids"} in (set(), memory))
        expected = f"input_ids [batch, seq] (int64), and {MEMORY_PREFIX}<i> per layer with memory"
        allowed = {"logits"} | {f"{NEW_MEMORY_PREFIX}{i}" for i in range(model.n_layers)} | routing
        main = "logits"
    else:
        (value, *rest) = list(metadata.values()) or [None]
        width = getattr(model, "d_model", None)
        fits = (value is not None and not rest and value.dtype.is_floating and len(value.shape) >= 2
                and value.shape[-1] in (width, None))
        expected = f"one input x [..., {width}] (floating point)"
        allowed, main = {"y"} | routing, "y"
    if not fits:
        raise MoexportError(artifact, f"takes the inputs {found}, which the checkpoint's {kind} does not",
                            f"a {kind} takes {expected}; {hint}")
    unknown = [name for name in outputs if name not in allowed]
    if unknown or main not in outputs:
        problem = (f"gives the output(s) {', '.join(map(repr, unknown))}, which the checkpoint's {kind} does not"
                   if unknown else f"gives no output {main!r}")
        raise MoexportError(artifact, problem, f"a {kind} gives {main} (and {EXPERTS_PREFIX}.<layer> per σ-MoE "
                            f"layer); {hint}")


def onnxrt_runner(model: str | Path | onnx.ModelProto, *, providers: list[str | tuple[str, dict]] | None = None,
                  name: str | None = None, source: str | None = None) -> OnnxrtRunner:
    """Polygraphy's OnnxrtRunner over our own session (moexport's op set registered).

    Args:
        model: ONNX file, or the graph itself.
        providers: ONNX Runtime execution providers, names or (name, options). Defaults to
            ["CPUExecutionProvider"].
        name: Runner name. Defaults to "onnxrt-<provider>".
        source: The file a given graph was read from, for error messages.
    """
    from moexport.plugins.runtime import ort_session, provider_name

    providers = providers or ["CPUExecutionProvider"]
    label = provider_name(providers[0]).removesuffix("ExecutionProvider").lower()
    return OnnxrtRunner(lambda: ort_session(model, providers=providers, source=source),
                        name=name or f"onnxrt-{label}")


def trt_runner(path: str | Path, *, name: str | None = None):
    """Polygraphy's TrtRunner over a serialized TensorRT engine (needs TensorRT >= 10 installed); the
    moexport plugins are registered first, where the library was built, for engines built with them."""
    try:
        import tensorrt  # polygraphy imports it lazily; fail here with a clear message
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    except ImportError:
        raise MoexportError(str(path), "is a TensorRT engine, but TensorRT is not installed here",
                            "validate the ONNX file instead, or run on a machine with TensorRT >= 10 "
                            "(pip install 'moexport[trt]')") from None
    from moexport.trt_plugins import register_plugins, trt_library

    try:
        trt_library()
    except MoexportError:
        pass  # an engine without moexport plugin layers needs none; one with them says so when it loads
    else:
        register_plugins(tensorrt)
    return TrtRunner(EngineFromBytes(Path(path).read_bytes()), name=name or "tensorrt")
