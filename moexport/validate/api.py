"""`validate`: run an artifact beside the PyTorch model it came from and report parity."""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from pathlib import Path

import onnx
import torch
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.datatype import DataType
from polygraphy.logger import G_LOGGER

from moexport.core.dtypes import Tolerance, dtype_name, tolerance_for
from moexport.core.errors import MoexportError
from moexport.core.files import check_output_folder
from moexport.core.onnx_files import load_model, model_dtype
from moexport.core.options import check_count, check_tolerance
from moexport.core.shapes import parse_shapes
from moexport.exporter.forms import routing_name
from moexport.models import check_finite
from moexport.opset import DOMAIN
from moexport.plugins import compiled_calls
from moexport.validate.compare import compare_numeric, compare_routing, explained_only, follow_routing
from moexport.validate.inputs import concrete_metadata, make_inputs
from moexport.validate.report import ValidationReport
from moexport.validate.runners import TorchRunner, check_io, onnxrt_runner, sigma_moe_layers, trt_runner

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
CUDA_FULL_FLOAT32 = {"use_tf32": "0"}  # the CUDA provider options of the onnxrt-cuda runner
RUNNERS = ("onnxrt", "onnxrt-cuda", "trt")


def validate(artifact: str | os.PathLike, checkpoint: str | os.PathLike | torch.nn.Module, *,
             runners: list[str] | None = None, dtype: str | None = None, shapes: str | dict | None = None,
             seed: int | None = None, iterations: int | None = None, atol: float | None = None,
             rtol: float | None = None, use_text: bool | None = None, report_dir: str | os.PathLike | None = None,
             k: int | None = None, verbose: bool = False) -> ValidationReport:
    """Compare an exported artifact with the PyTorch model it was exported from.

    Every runner gets identical inputs (seeded random data, and the shipped text sample for byte-level
    LMs); the reference is the model in float32, whatever the artifact's dtype. Each output passes when
    max |err| <= atol + rtol · max |reference|; for every σ-MoE layer whose expert indices the artifact
    exposes, the share of tokens with identical top-k sets is reported and every disagreement is either
    explained by a near-tie of the reference's router logits (or by an earlier layer's) or fails. Inputs
    on which the artifact routed a near-tie the other way are compared with the reference run on the
    artifact's routing, so that the other expert's output is not counted as numeric error.

    Args:
        artifact: An ONNX file or a serialized TensorRT engine (.plan / .engine).
        checkpoint: The reference: a checkpoint path (anything `moexport.load_checkpoint` reads) or a model.
        runners: Runtimes for the artifact, compared in this order: "onnxrt" (CPU), "onnxrt-cuda", "trt".
            Defaults to "onnxrt" (plus "onnxrt-cuda" where ONNX Runtime has CUDA) for ONNX files and
            "trt" for engines.
        dtype: The dtype the artifact computes in, which sets the tolerances and the near-tie margin.
            Defaults to the dtype recorded by the exporter (for other ONNX files, that of the first
            floating-point output; float32 for engines).
        shapes: Input shapes, {name: shape} or "name:[d0,d1] ..."; dynamic dimensions default to batch 2,
            sequence 64.
        seed: Seed of the random inputs. Defaults to 1.
        iterations: Number of random input sets, at least 1. Defaults to 2.
        atol: Absolute tolerance, finite and >= 0. Defaults to the dtype's (moexport.core.TOLERANCES).
        rtol: Relative tolerance, finite and >= 0. Defaults to the dtype's.
        use_text: Also feed the text sample to byte-level LMs. Defaults to True.
        report_dir: Folder for report.json and report.html (checked before any work). Defaults to writing none.
        k: Experts per token, for a checkpoint that is a σ-MoE layer state dict (which does not record it).
        verbose: Show polygraphy's own log. Defaults to False.

    Returns:
        The report; truthy when everything passed.

    Raises:
        MoexportError: unreadable artifact or checkpoint, an artifact that does not fit the checkpoint,
            non-finite weights, an unknown runner or one that cannot run the artifact, a runtime that is
            not installed, a bad option value.
    """
    artifact = Path(artifact)
    if not artifact.is_file():
        raise MoexportError(str(artifact), "does not exist")
    iterations = 2 if iterations is None else check_count("iterations", iterations)
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None:
            check_tolerance(name, value)
    report_dir = None if report_dir is None else check_output_folder(report_dir)
    is_engine = artifact.suffix in ENGINE_SUFFIXES
    runners = runners or (["trt"] if is_engine else _default_onnx_runners())
    for name in runners:
        _check_runner(name, artifact, is_engine)
    model, reference = _reference_model(checkpoint, k)
    check_finite(model, reference)
    routing_names = {routing_name(path) for path in sigma_moe_layers(model)}
    with contextlib.ExitStack() as stack:
        if is_engine:
            source, metadata, outputs, recorded_dtype, widened = artifact, None, None, None, []
        else:
            source, metadata, outputs, recorded_dtype, widened = _prepare_onnx(artifact, routing_names, stack)
        dtype = dtype_name(dtype or recorded_dtype or "float32")
        if recorded_dtype == "bfloat16" and "onnxrt" in runners:
            raise MoexportError(str(artifact), "is a bfloat16 model, and ONNX Runtime's CPU provider has no "
                                "bfloat16 MatMul", "validate it on a GPU runtime (--onnxrt-cuda, or a TensorRT "
                                "engine with --trt --bf16), or export float16 or float32 to check it on the CPU")
        tolerance = tolerance_for(dtype)
        tolerance = Tolerance(rtol=tolerance.rtol if rtol is None else rtol,
                              atol=tolerance.atol if atol is None else atol, tie=tolerance.tie)
        artifact_runners = [_make_runner(name, source, artifact) for name in runners]
        if metadata is None:
            metadata, outputs = _engine_io(artifact_runners[0])
        check_io(model, str(artifact), metadata, outputs)
        metadata = concrete_metadata(metadata, parse_shapes(shapes))
        torch_runner = TorchRunner(model, input_metadata=metadata, output_names=outputs, dtype="float32")
        seed = 1 if seed is None else seed
        with _polygraphy_log(verbose):
            feeds = make_inputs(metadata, seed=seed, iterations=iterations, bfloat16=widened,
                                vocab_size=getattr(model, "vocab_size", None), use_text=use_text is not False)
            compiled_before = compiled_calls()
            results = Comparator.run([torch_runner, *artifact_runners], data_loader=feeds)
            compiled = compiled_calls() - compiled_before
            followed = follow_routing(torch_runner, feeds, results)
            routing = compare_routing(results, tolerance=tolerance, reference=torch_runner.name, followed=followed)
            followed = explained_only(followed, results, torch_runner.name, routing)
            numeric = compare_numeric(results, tolerance=tolerance, reference=torch_runner.name, followed=followed)
    report = ValidationReport(
        artifact=str(artifact), reference=reference, dtype=dtype, runners=[r.name for r in artifact_runners],
        inputs=[f"{iterations} x random (seed {seed})"] + (["text sample"] if len(feeds) > iterations else []),
        outputs=numeric, routing=routing,
        latency_ms={name: 1e3 * statistics.median(it.runtime for it in iters) for name, iters in results})
    if not is_engine:
        report.notes += _execution_notes(runners, source, compiled, dtype)
    if widened:
        report.notes.append(f"the bfloat16 inputs and outputs ({', '.join(widened)}) were cast from and to float32 at "
                            "the graph's edges (ONNX Runtime's Python API has no bfloat16 arrays); the inputs "
                            "hold bfloat16 values, so both sides saw the same numbers")
    if routing_names and not routing_names & set(outputs or []):
        report.notes.append("the artifact exposes no expert indices, so routing agreement was not checked; "
                            "export with routing outputs (moexport export --routing-outputs)")
    if report_dir is not None:
        report.save(report_dir)
    return report


def _execution_notes(runners: list[str], source, compiled: int, dtype: str) -> list[str]:
    """Where each ONNX Runtime runner ran the moexport nodes: compiled kernels or function bodies."""
    proto = source if isinstance(source, onnx.ModelProto) else load_model(source, load_external_data=False)
    if not any(node.domain == DOMAIN for node in proto.graph.node):
        return []
    notes = []
    if "onnxrt" in runners:
        notes.append("onnxrt (CPU) ran the moexport nodes on their function bodies")
    if "onnxrt-cuda" in runners:
        notes.append(f"onnxrt-cuda ran the moexport nodes on the compiled kernels ({compiled} node executions)"
                     if compiled else "onnxrt-cuda ran the moexport nodes on their function bodies (the file "
                     "carries no compiled kernels: moexport fuse --arch SM attaches them)")
    if "onnxrt-cuda" in runners and dtype == "float32":
        notes.append("onnxrt-cuda ran float32 without TF32 (use_tf32=0): with TF32 (ONNX Runtime's default) "
                     "its MatMuls differ from float32 by about 1e-3 relative, which no float32 tolerance admits")
    return notes


def _reference_model(checkpoint, k: int | None) -> tuple[torch.nn.Module, str]:
    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint, type(checkpoint).__name__
    from moexport.checkpoints import load_checkpoint

    return load_checkpoint(checkpoint, k=k), str(checkpoint)


def _check_runner(name: str, artifact: Path, is_engine: bool) -> None:
    """A known runner that can run this kind of artifact (TensorRT runs engines, ONNX Runtime ONNX files)."""
    if name not in RUNNERS:
        raise MoexportError(f"runner {name!r}", "is not known", f"use one of {', '.join(RUNNERS)}")
    if (name == "trt") == is_engine:
        return
    if is_engine:
        raise MoexportError(f"runner {name!r} (--{name})", f"runs ONNX files, and {artifact} is a TensorRT engine",
                            "validate the engine with --trt, or the ONNX file it was built from with --onnxrt")
    raise MoexportError("runner 'trt' (--trt)", f"runs TensorRT engines, and {artifact} is an ONNX file",
                        f"build an engine first (moexport build {artifact} -o model.plan ...) and validate "
                        f"that, or run the ONNX file in ONNX Runtime (--onnxrt)")


def _default_onnx_runners() -> list[str]:
    return ["onnxrt"] + (["onnxrt-cuda"] if _ort_has_cuda() else [])


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _make_runner(name: str, source: Path | onnx.ModelProto, artifact: Path):
    if name == "trt":
        return trt_runner(source)
    if name == "onnxrt":
        return onnxrt_runner(source, source=str(artifact))
    if not _ort_has_cuda():
        raise MoexportError(f"runner {name!r}", "needs ONNX Runtime's CUDA execution provider, which is not installed",
                            "install onnxruntime-gpu (pip install 'moexport[gpu]') on a machine with a CUDA GPU")
    # parity is checked at the artifact's own precision: TF32 MatMuls would swamp a float32 comparison
    return onnxrt_runner(source, providers=[("CUDAExecutionProvider", CUDA_FULL_FLOAT32)], source=str(artifact))


def _prepare_onnx(path: Path, routing_names: set[str], stack: contextlib.ExitStack):
    """Read the graph's inputs/outputs and dtype; expose internal expert-index tensors as outputs;
    widen bfloat16 inputs and outputs to float32 (`_widen_bfloat16`).

    The exporter names each σ-MoE layer's expert indices ``experts.<module path>`` even when they are
    not graph outputs; marking them as outputs lets routing be compared without re-exporting. The file
    is read once: the runners get the graph itself (or, over protobuf's 2 GB, a temporary copy).
    """
    model = load_model(path)
    graph = model.graph
    recorded = model_dtype(model)
    widened = _widen_bfloat16(graph)
    initializers = {i.name for i in graph.initializer}
    metadata = TensorMetadata()
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)
        metadata.add(value.name, DataType.from_dtype(value.type.tensor_type.elem_type, "onnx"), dims)
    outputs = [o.name for o in graph.output]
    internal = sorted({o for node in graph.node for o in node.output if o in routing_names} - set(outputs))
    if internal:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        for name in internal:
            graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.INT64), None))
    if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        return model, metadata, outputs + internal, recorded, widened
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="moexport-validate-"))
    copy = Path(folder) / path.name
    onnx.save(model, str(copy), save_as_external_data=True)
    return copy, metadata, outputs + internal, recorded, widened


def _widen_bfloat16(graph: onnx.GraphProto) -> list[str]:
    """Make the graph's bfloat16 inputs and outputs float32, in place, with a Cast beside each: ONNX
    Runtime's Python API (and so polygraphy's runner) has no NumPy type for bfloat16. Names stay, so
    feeds and comparisons are unchanged; the inputs then need bfloat16 values (`make_inputs`).

    Returns:
        The names of the inputs widened, then of the outputs.
    """
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.type.tensor_type.elem_type == bf16 and v.name not in initializers]
    outputs = [v for v in graph.output if v.type.tensor_type.elem_type == bf16]
    inner = {v.name: f"{v.name}.bfloat16" for v in inputs + outputs}  # the bfloat16 tensor inside
    for node in graph.node:
        node.input[:] = [inner.get(name, name) for name in node.input]
        node.output[:] = [inner.get(name, name) for name in node.output]
    casts_in = [onnx.helper.make_node("Cast", [v.name], [inner[v.name]], to=bf16, name=f"widen_{v.name}")
                for v in inputs]
    casts_out = [onnx.helper.make_node("Cast", [inner[v.name]], [v.name], to=f32, name=f"widen_{v.name}")
                 for v in outputs]
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    for value in inputs + outputs:
        value.type.tensor_type.elem_type = f32
    return [v.name for v in inputs + outputs]


def _engine_io(runner) -> tuple[TensorMetadata, list[str]]:
    import tensorrt

    with runner:
        metadata = runner.get_input_metadata(use_numpy_dtypes=False)
        engine = runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outputs = [n for n in names if engine.get_tensor_mode(n) == tensorrt.TensorIOMode.OUTPUT]
    return metadata, outputs


@contextlib.contextmanager
def _polygraphy_log(verbose: bool):
    previous = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.module_severity = previous
