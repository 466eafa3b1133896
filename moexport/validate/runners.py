"""Polygraphy runners for every place a moexport model runs: PyTorch, ONNX Runtime, TensorRT.

Each runner subclasses polygraphy's BaseRunner (or is polygraphy's own) so that polygraphy's
Comparator drives them all with identical inputs.
"""
from __future__ import annotations

import copy
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
from moexport.models import SigmaMoE, route

EXPERTS_PREFIX = "experts"  # routing outputs: "experts" (single layer) or "experts.<module path>"
GAP_PREFIX = "router_gap"  # PyTorch-only companion output: relative top-k margin of each token


def routing_name(prefix: str, module_path: str) -> str:
    """Name of a routing output: `prefix` for a model that is one layer, else `prefix.<module path>`."""
    return f"{prefix}.{module_path}" if module_path else prefix


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
    compared and disagreements explained.

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

    def activate_impl(self):
        self._was_training = self.model.training
        self._model = self.model.eval()
        if any(p.dtype != self.dtype for p in self._model.parameters()):
            # Convert a copy: `.to()` converts in place and would round the caller's weights for good.
            self._model = copy.deepcopy(self._model).to(self.dtype)
        self._routing: dict[str, torch.Tensor] = {}
        self._hooks = [layer.register_forward_pre_hook(self._record_routing(path))
                       for path, layer in sigma_moe_layers(self._model).items()]

    def _record_routing(self, path: str):
        def hook(layer: SigmaMoE, args):
            logits = layer.router_logits(args[0])
            _, expert = route(logits, layer.k, layer.selection)
            self._routing[routing_name(EXPERTS_PREFIX, path)] = expert
            self._routing[routing_name(GAP_PREFIX, path)] = topk_margin(logits, layer.k)

        return hook

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        inputs = {name: torch.from_numpy(np.asarray(value)) for name, value in feed_dict.items()}
        self._routing.clear()
        with torch.no_grad():
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
        main = [n for n in self.output_names if not n.startswith((EXPERTS_PREFIX, "new_memory"))]
        if "input_ids" in inputs:
            memory_names = sorted((n for n in inputs if n.startswith("memory.")), key=lambda n: int(n.split(".")[1]))
            memory = [inputs[n].to(self.dtype) for n in memory_names] or None
            if any(n.startswith("new_memory.") for n in self.output_names):
                logits, new_memory = self._model(inputs["input_ids"], memory=memory, return_memory=True)
                outputs = {f"new_memory.{i}": m for i, m in enumerate(new_memory)}
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


def onnxrt_runner(model: str | Path | onnx.ModelProto, *, providers: list[str] | None = None,
                  name: str | None = None) -> OnnxrtRunner:
    """Polygraphy's OnnxrtRunner over our own session (moexport's op set registered).

    Args:
        model: ONNX file, or the graph itself.
        providers: ONNX Runtime execution providers. Defaults to ["CPUExecutionProvider"].
        name: Runner name. Defaults to "onnxrt-<provider>".
    """
    from moexport.plugins import ort_session

    providers = providers or ["CPUExecutionProvider"]
    label = providers[0].removesuffix("ExecutionProvider").lower()
    return OnnxrtRunner(lambda: ort_session(model, providers=providers), name=name or f"onnxrt-{label}")


def trt_runner(path: str | Path, *, name: str | None = None):
    """Polygraphy's TrtRunner over a serialized TensorRT engine (needs TensorRT >= 10 installed)."""
    try:
        import tensorrt  # noqa: F401  (polygraphy imports it lazily; fail here with a clear message)
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    except ImportError:
        raise MoexportError(str(path), "is a TensorRT engine, but TensorRT is not installed here",
                            "validate the ONNX file instead, or run on a machine with TensorRT >= 10 "
                            "(pip install 'moexport[trt]')") from None
    return TrtRunner(EngineFromBytes(Path(path).read_bytes()), name=name or "tensorrt")
