"""`export_onnx`: a moexport model (single layer or whole LM) to ONNX in the dispatch or portable form.

How: during the export only, every σ-MoE layer's forward is swapped for one that emits a single
``moexport::SigmaMoE`` node (`torch.onnx.ops.symbolic_multi_out`, traced by the dynamo exporter), so
eager mode keeps running the real kernels and the model object is left as it was. The traced graph is
then *lowered*: each SigmaMoE node becomes its dispatch form (``TopKDispatch`` + ``CVMM``) or its
portable form (standard ops), both emitted by `moexport.exporter.forms`. Tracing one node and
lowering it ourselves, instead of tracing the dispatch ops from PyTorch code, makes every σ-MoE
subgraph exactly what the graph surgeon's templates expect, whatever the torch version does with the
surrounding ops.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from moexport.core.dtypes import dtype_name, torch_dtype
from moexport.core.errors import MoexportError, first_line
from moexport.core.files import check_output_file
from moexport.core.onnx_files import record_dtype, save_model
from moexport.core.progress import progress
from moexport.exporter.forms import FORMS, is_routing_name, lower, routing_name
from moexport.models.activations import ACTIVATIONS
from moexport.models.base import ConfigModule, check_finite
from moexport.models.routing import SELECTIONS
from moexport.models.sigma_moe import SigmaMoE
from moexport.models.transformer import TransformerLM
from moexport.opset import DOMAIN, PLUGIN_ATTRIBUTES, VERSION

log = logging.getLogger(__name__)
MIN_OPSET, DEFAULT_OPSET = 18, 20


def _check_modules(model: nn.Module) -> None:
    """Every module must be a moexport module or a torch.nn built-in: others are named in the error."""
    for path, module in model.named_modules():
        if not isinstance(module, ConfigModule) and not type(module).__module__.startswith("torch.nn"):
            raise MoexportError(f"module {path or '<root>'!r} ({type(module).__name__})", "is not supported by the exporter",
                                "export moexport models (moexport.models) or their layers")
        if isinstance(module, SigmaMoE):
            _check_sigma_moe(path, module)


def _check_sigma_moe(path: str, module: SigmaMoE) -> None:
    checks = {"selection": (module.selection, SELECTIONS), "activation": (module.activation, tuple(ACTIVATIONS))}
    for name, (value, allowed) in checks.items():
        if value not in allowed:
            raise MoexportError(f"{path or 'model'}.{name}={value!r} (SigmaMoE)", "is not supported by the exporter",
                                f"use one of {', '.join(allowed)}")


def _sigma_moe_forward(module: SigmaMoE, path: str, experts: list | None):
    """An export-time forward of `module`: one moexport::SigmaMoE node (plus the expert output if asked)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        attrs = {"k": module.k, "selection": module.selection, "activation": module.activation, **PLUGIN_ATTRIBUTES}
        inputs = [x, module.expert_sel, module.keys, module.values, module.bias, module.o_bias]
        y_shape, e_shape = (*x.shape[:-1], module.v_dim), (*x.shape[:-1], module.k)
        if experts is None:
            return torch.onnx.ops.symbolic(f"{DOMAIN}::SigmaMoE", inputs, attrs, dtype=x.dtype, shape=y_shape,
                                           version=VERSION)
        y, expert = torch.onnx.ops.symbolic_multi_out(f"{DOMAIN}::SigmaMoE", inputs, attrs, dtypes=[x.dtype, torch.int64],
                                                      shapes=[y_shape, e_shape], version=VERSION)
        experts.append((path, expert))
        return y

    return forward


@contextlib.contextmanager
def export_forwards(model: nn.Module, experts: list | None = None):
    """Swap in the export-time forward of every σ-MoE layer; restore the originals on exit.

    Args:
        model: The model (not modified beyond the duration of the block).
        experts: A list that collects (module path, expert tensor) per layer, or None for no expert outputs.
    """
    swapped = []  # (module, the forward it held itself, if any)
    try:
        for path, module in model.named_modules():
            if isinstance(module, SigmaMoE):
                swapped.append((module, module.__dict__.get("forward")))
                module.forward = _sigma_moe_forward(module, path, experts)
        yield model
    finally:
        for module, previous in swapped:
            del module.forward
            if previous is not None:
                module.forward = previous


class _Traced(nn.Module):
    """The module torch.onnx traces: flat tensors in, flat tensors out (logits, memories, experts)."""

    def __init__(self, model: nn.Module, memory: bool, experts: list | None):
        super().__init__()
        self.model, self.memory, self.experts = model, memory, experts

    def forward(self, first: torch.Tensor, *memory: torch.Tensor):
        if self.experts is not None:
            self.experts.clear()
        if isinstance(self.model, TransformerLM) and self.memory:
            out, new_memory = self.model(first, list(memory), return_memory=True)
            outputs = [out, *new_memory]
        else:
            outputs = [self.model(first)]
        return tuple(outputs + [e for _, e in self.experts or []])


def _example(model: nn.Module, memory: bool, dtype: torch.dtype) -> tuple[tuple, list[str], list[dict]]:
    """Example inputs, their names and dynamic axes, from the model's own sizes."""
    batch, seq, mem = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("memory")
    if isinstance(model, TransformerLM):
        ids = torch.randint(0, model.vocab_size, (2, 8))
        if not memory:
            return (ids,), ["input_ids"], [{0: batch, 1: seq}]
        states = tuple(torch.randn(2, 4, model.d_model, dtype=dtype) for _ in range(model.n_layers))
        names = ["input_ids"] + [f"memory.{i}" for i in range(model.n_layers)]
        return (ids, *states), names, [{0: batch, 1: seq}] + [{0: batch, 1: mem}] * model.n_layers
    if memory:
        raise MoexportError("memory=True", f"needs a TransformerLM, not a {type(model).__name__}")
    width = getattr(model, "d_model", None)
    if width is None:
        raise MoexportError(f"model ({type(model).__name__})", "has no d_model to make an example input from",
                            "export a moexport layer or TransformerLM")
    return (torch.randn(2, 8, width, dtype=dtype),), ["x"], [{0: batch, 1: seq}]


def _dynamic_shapes(axes: list[dict]) -> tuple:
    """Dynamic axes in the structure of `_Traced.forward(first, *memory)`."""
    return (axes[0], tuple(axes[1:])) if len(axes) > 1 else (axes[0],)


def _output_names(model: nn.Module, memory: bool, experts: list | None) -> list[str]:
    lm = isinstance(model, TransformerLM)
    names = ["logits" if lm else "y"]
    if lm and memory:
        names += [f"new_memory.{i}" for i in range(model.n_layers)]
    return names + [routing_name(path) for path, _ in experts or []]


def export_onnx(model: nn.Module, path: str | os.PathLike, *, mode: str | None = None, dtype: str | None = None,
                opset: int | None = None, dynamic: bool | None = None, routing_outputs: bool | None = None,
                memory: bool | None = None, show_progress: bool | None = None) -> Path:
    """Export a moexport model to ONNX.

    Args:
        model: A `TransformerLM` (input ``input_ids`` [batch, seq] int64 -> ``logits``) or a layer
            (input ``x`` [batch, seq, d] -> ``y``). It is not modified.
        path: Output .onnx file. Weights go to ``<path>.data`` when the model is over 2 GB.
        mode: 'dispatch' (``TopKDispatch`` + ``CVMM`` nodes with function bodies) or 'portable'
            (standard ops only, dense-masked experts). Defaults to 'dispatch'.
        dtype: 'float32', 'float16' or 'bfloat16'. Defaults to 'float32'.
        opset: ONNX opset, at least 18. Defaults to 20.
        dynamic: Dynamic batch, sequence (and memory) axes. Defaults to True.
        routing_outputs: Add per σ-MoE layer an output ``experts.<module path>`` (``experts`` for a
            single layer): the selected experts [..., k] int64, best first. Without it the tensor is
            still there under that name (not an output), for `validate` to read. Defaults to False.
        memory: Transformer-XL memory: inputs ``memory.<i>`` [batch, M, d] and outputs
            ``new_memory.<i>`` per layer. Defaults to False.
        show_progress: Show a progress bar. Defaults to when stderr is a terminal.

    Returns:
        The path written.

    Raises:
        MoexportError: An unsupported module, attribute, mode, dtype or opset, weights holding NaN or Inf,
            an output path that cannot be written, or a failed export.
    """
    mode = "dispatch" if mode is None else mode
    dtype = dtype_name("float32" if dtype is None else dtype)
    opset = DEFAULT_OPSET if opset is None else opset
    dynamic, memory = dynamic is not False, bool(memory)
    if mode not in FORMS:
        raise MoexportError(f"mode={mode!r}", "is not an export mode", f"use one of {', '.join(FORMS)}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise MoexportError(f"opset={opset}", "is not supported",
                            f"use an opset from {MIN_OPSET} to {onnx.defs.onnx_opset_version()}")
    if not isinstance(model, nn.Module):
        raise MoexportError(f"model ({type(model).__name__})", "is not a torch.nn.Module")
    _check_modules(model)
    check_finite(model, f"model ({type(model).__name__})")
    path = check_output_file(path)
    n_layers = sum(isinstance(m, SigmaMoE) for m in model.modules())
    with progress(f"tracing {type(model).__name__} with torch.onnx", total=n_layers + 2,
                  enabled=show_progress) as advance:
        proto = _trace(model, mode=mode, dtype=torch_dtype(dtype), opset=opset, dynamic=dynamic,
                       routing_outputs=bool(routing_outputs), memory=memory)
        advance(description="lowering σ-MoE layers")
        lower(proto, mode, advance=advance)
        advance(description="saving")
        save_model(record_dtype(proto, dtype), path)
    return path


def _trace(model: nn.Module, *, mode: str, dtype: torch.dtype, opset: int, dynamic: bool, routing_outputs: bool,
           memory: bool) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of the model with one SigmaMoE node per σ-MoE layer."""
    first = next(model.parameters())
    same = first.dtype == dtype and first.device.type == "cpu"
    work = model if same else copy.deepcopy(model).to(device="cpu", dtype=dtype)  # the user's model stays as it is
    # Every layer's expert indices are traced and named experts.<module path>, graph outputs or not, so
    # that `validate` can expose them and judge the outputs of a token that a near-tie routes elsewhere.
    experts = []
    args, input_names, axes = _example(work, memory, dtype)
    was_training = work.training
    work.eval()
    try:
        with export_forwards(work, experts), torch.no_grad(), _quiet():
            traced = _Traced(work, memory, experts)
            traced(*args)  # fills `experts` so the output names are known
            output_names = _output_names(work, memory, experts)
            program = torch.onnx.export(traced, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, opset_version=opset, verbose=False,
                                        dynamic_shapes=_dynamic_shapes(axes) if dynamic else None,
                                        optimize=True)
    except MoexportError:
        raise
    except Exception as error:  # torch.export / onnx translation failures carry long internal traces
        raise MoexportError(f"model ({type(model).__name__})", f"could not be traced to ONNX: {first_line(error)}",
                            "run with -v for the full trace") from error
    finally:
        work.train(was_training)
    proto = _strip_wrapper_prefix(program.model_proto)
    if not routing_outputs:
        kept = [o for o in proto.graph.output if not is_routing_name(o.name)]
        del proto.graph.output[:]
        proto.graph.output.extend(kept)
    return proto


def _strip_wrapper_prefix(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name the weights by their path in the user's model ('layers.0.ffn.keys', not 'model.layers...')."""
    taken = {t.name for t in model.graph.initializer}
    renames = {t.name: t.name[len("model."):] for t in model.graph.initializer
               if t.name.startswith("model.") and t.name[len("model."):] not in taken}
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    return model


@contextlib.contextmanager
def _quiet():
    """Silence torch.onnx's progress prints, warnings and registry log lines (we show our own progress)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        registry.setLevel(level)
