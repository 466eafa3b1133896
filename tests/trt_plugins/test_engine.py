"""Engine building with TensorRT-RTX on the CPU machine: fused and dispatch graphs with the moexport
plugins, the portable graph without them, and every refusal as one clear error, no engine written.

(Running an engine needs a GPU with TensorRT; nothing here executes one. TensorRT-RTX cannot
deserialise an engine without a CUDA driver either, so what the engine holds is checked on the
network TensorRT builds it from, `plugin_layers`, and in its bytes.)
"""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from trt_cases import ARCHS, LAYER_SHAPES, LM_SHAPES, MAX_TOKENS, sigma_moe_graph

import moexport
from moexport.core.errors import MoexportError
from moexport.exporter.compiled import attach_kernels
from moexport.kernels.bundle import read_bundle
from moexport.models import SigmaMoE, from_preset
from moexport.trt_plugins import build_engine, plugin_layers, trt_library, trtexec_command

pytest.importorskip("tensorrt_rtx", reason="needs `pip install tensorrt-rtx` (or TensorRT >= 10)")


def bundle_bytes(path) -> list[bytes]:
    model = onnx.load(path)
    return [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.name.startswith("moexport.kernels")]


def test_a_fused_layer_becomes_one_plugin_layer_with_its_attributes_and_builds(tmp_path, fused_layer):
    (bundle,) = bundle_bytes(fused_layer)
    key = read_bundle(bundle)["key"]
    (layer,) = plugin_layers(fused_layer)
    assert (layer["layer"], layer["plugin"], layer["version"], layer["namespace"]) == ("layers.0.ffn", "SigmaMoE",
                                                                                       "1", "moexport")
    assert layer["metadata"] == f"moexport::SigmaMoE k=2 selection=sigmoid activation=relu kernels={key}"
    engine = build_engine(fused_layer, tmp_path / "layer.engine", shapes=LAYER_SHAPES)
    assert engine.read_bytes().count(bundle) >= 1  # the kernels travel in the engine


def copies_in_engine(path, engine, shapes) -> int:
    """How many times the engine built from `path` holds the bytes of its (one) kernel bundle."""
    (bundle,) = bundle_bytes(path)
    return build_engine(path, engine, shapes=shapes).read_bytes().count(bundle)


def test_layers_of_one_configuration_share_one_copy_of_their_kernels_in_the_engine(tmp_path, fused_layer,
                                                                                     two_layers):
    layers = plugin_layers(two_layers)
    assert [la["plugin"] for la in layers] == ["SigmaMoE", "SigmaMoE"]
    assert not layers[0]["metadata"].endswith("(shared)") and layers[1]["metadata"].endswith("(shared)")
    one = copies_in_engine(fused_layer, tmp_path / "one.engine", LAYER_SHAPES)
    # as many copies with two layers as with one (TensorRT-RTX keeps two per engine): none per layer
    assert one >= 1 and copies_in_engine(two_layers, tmp_path / "two.engine", LAYER_SHAPES) == one


def test_the_fused_demo_lm_builds_with_one_plugin_layer_per_sigma_moe_layer(tmp_path, fused_layer):
    model = moexport.load_checkpoint(Path(moexport.__file__).parent / "data" / "sigma_moe_lm")
    source = moexport.export_onnx(model, tmp_path / "lm.onnx", routing_outputs=True)
    moexport.fuse(source, tmp_path / "lm.fused.onnx", archs=ARCHS, max_tokens=MAX_TOKENS)
    layers = plugin_layers(tmp_path / "lm.fused.onnx")
    assert [la["layer"] for la in layers] == [f"layers.{i}.ffn" for i in range(4)]
    assert all(la["metadata"].startswith("moexport::SigmaMoE k=2 selection=sigmoid activation=relu kernels=")
               for la in layers)
    assert [la["metadata"].endswith("(shared)") for la in layers] == [False, True, True, True]
    copies = copies_in_engine(tmp_path / "lm.fused.onnx", tmp_path / "lm.engine", LM_SHAPES)
    assert copies == copies_in_engine(fused_layer, tmp_path / "layer.engine", LAYER_SHAPES)


def test_the_dispatch_form_builds_with_topk_dispatch_and_cvmm_plugins(tmp_path):
    path = moexport.export_onnx(SigmaMoE(32, 4, 8, 2).eval(), tmp_path / "layer.onnx", mode="dispatch")
    model = onnx.load(path)
    assert len(attach_kernels(model, archs=ARCHS, max_tokens=MAX_TOKENS).bundles) == 3
    onnx.save(model, path)
    layers = plugin_layers(path)
    assert [la["plugin"] for la in layers] == ["TopKDispatch", "CVMM", "CVMM"]
    assert "reduce=0" in layers[1]["metadata"] and "reduce=1" in layers[2]["metadata"]
    assert build_engine(path, tmp_path / "dispatch.engine", shapes=LAYER_SHAPES).stat().st_size > 0


def edit(path, tmp_path, change):
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "SigmaMoE")
    change(model, node)
    onnx.save(model, tmp_path / "edited.onnx")
    return tmp_path / "edited.onnx"


def set_attribute(name, value):
    def change(model, node):
        attribute = next(a for a in node.attribute if a.name == name)
        if isinstance(value, int):
            attribute.i = value
        else:
            attribute.s = value.encode()
    return change


def other_shape_bundle(tmp_path):
    """Kernels of a layer of width 48, put in the place of the width-32 layer's."""
    (data,) = bundle_bytes(sigma_moe_graph(tmp_path / "other.onnx", d=48))

    def change(model, node):
        tensor = next(t for t in model.graph.initializer if t.name == node.input[6])
        tensor.CopyFrom(numpy_helper.from_array(np.frombuffer(data, np.uint8), tensor.name))
    return change


@pytest.mark.parametrize("case, message", [
    ("k=5", r"is not parsed by tensorrt_rtx .*: node 'layers.0.ffn' \(SigmaMoE\): has k=5, more than its 4 experts"),
    ("selection", r"node 'layers.0.ffn' \(SigmaMoE\): has selection='top2', which is not one of sigmoid, softmax, "
                  r"softmax_after_topk"),
    ("k=1", r"has k=1 but its kernels were compiled for k=2: fuse the model again"),
    ("another shape", r"failed to build an engine: node 'layers.0.ffn' \(SigmaMoE\): input 'x' has shape "
                      r"\[32, 32\]; the compiled kernels expect \[32, 48\]"),
    ("too many tokens", r"node 'layers.0.ffn' \(SigmaMoE\): 64 tokens is more than the compiled kernels were built "
                        r"for \(32\); fuse the model again with a larger --max-tokens"),
])
def test_bad_plugin_fields_are_one_clear_build_error_and_no_engine(tmp_path, fused_layer, case, message):
    changes = {"k=5": set_attribute("k", 5), "selection": set_attribute("selection", "top2"),
               "k=1": set_attribute("k", 1)}
    path, shapes = fused_layer, LAYER_SHAPES
    if case in changes:
        path = edit(fused_layer, tmp_path, changes[case])
    elif case == "another shape":
        path = edit(fused_layer, tmp_path, other_shape_bundle(tmp_path))
    else:
        shapes = {"x": ((1, 1, 32), (1, 8, 32), (2, 32, 32))}
    with pytest.raises(MoexportError, match=message):
        build_engine(path, tmp_path / "bad.engine", shapes=shapes)
    assert not (tmp_path / "bad.engine").exists()


def test_a_precision_the_kernels_were_not_compiled_for_is_refused(tmp_path, fused_layer):
    with pytest.raises(MoexportError, match=r"has σ-MoE kernels compiled for float32, not float16\n  Note: .*export "
                                             r"the model in float16"):
        build_engine(fused_layer, tmp_path / "l.engine", shapes=LAYER_SHAPES, dtype="float16")


def test_a_float16_layer_with_its_router_weight_in_float16_builds(tmp_path):
    path = sigma_moe_graph(tmp_path / "half.onnx", dtype="float16")
    (layer,) = plugin_layers(path)
    assert layer["plugin"] == "SigmaMoE"
    assert build_engine(path, tmp_path / "half.engine", shapes=LAYER_SHAPES, dtype="float16").stat().st_size > 0


def test_nodes_without_kernels_are_named_with_the_way_out(tmp_path, fused_layer):
    path = edit(fused_layer, tmp_path, lambda model, node: node.input.pop())
    with pytest.raises(MoexportError, match=r"node 'layers.0.ffn' \(SigmaMoE\) \| carries no compiled kernels.*\n"
                                             r"  Note: fuse the model with them .* or export the portable form"):
        build_engine(path, tmp_path / "layer.engine", shapes=LAYER_SHAPES)


def test_embedding_the_plugin_puts_the_library_in_the_engine(tmp_path, fused_layer):
    plain = build_engine(fused_layer, tmp_path / "plain.engine", shapes=LAYER_SHAPES).stat().st_size
    embedded = build_engine(fused_layer, tmp_path / "embedded.engine", shapes=LAYER_SHAPES, embed_plugin=True)
    library = trt_library().read_bytes()
    assert embedded.read_bytes().count(library[-4096:]) == 1 and embedded.stat().st_size >= plain + len(library) // 2


def test_the_saved_graph_is_the_parsers_and_builds_again(tmp_path, two_layers):
    saved = tmp_path / "layers.trt.onnx"
    build_engine(two_layers, tmp_path / "layers.engine", shapes=LAYER_SHAPES, save_onnx=saved,
                 timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    model = onnx.load(saved)
    nodes = [n for n in model.graph.node if n.op_type == "SigmaMoE"]
    fields = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    (bundle,) = bundle_bytes(two_layers)
    assert [f["kernels"] for f in fields] == [bundle, b""]  # the bytes with the first node only
    assert len({f["kernels_key"] for f in fields}) == 1 and all(len(n.input) == 4 for n in nodes)
    assert not model.functions and not any(t.data_type == onnx.TensorProto.UINT8 for t in model.graph.initializer)
    # what trtexec would get builds here too, and the timing cache is read back
    build_engine(saved, tmp_path / "again.engine", shapes=LAYER_SHAPES, timing_cache=tmp_path / "timing.cache")


def test_trtexec_command_names_the_plugin_library_and_the_profile():
    command = trtexec_command("lm.trt.onnx", "lm.engine", shapes=LM_SHAPES, embed_plugin=True, workspace_mb=512)
    assert command == (f"trtexec --onnx=lm.trt.onnx --saveEngine=lm.engine --dynamicPlugins={trt_library()} "
                       f"--stronglyTyped --setPluginsToSerialize={trt_library()} --minShapes=input_ids:1x1 "
                       "--optShapes=input_ids:1x16 --maxShapes=input_ids:1x32 --memPoolSize=workspace:512M")
    portable = trtexec_command("lm.onnx", "lm.engine", shapes={"x": (1, 4)}, plugins=False, dtype="float16")
    assert portable == "trtexec --onnx=lm.onnx --saveEngine=lm.engine --fp16 --minShapes=x:1x4 --optShapes=x:1x4 " \
                       "--maxShapes=x:1x4"


def test_the_build_command_says_what_it_built_and_the_trtexec_equivalent(tmp_path, fused_layer, capsys):
    from moexport.cli import main

    status = main(["build", str(fused_layer), "-o", str(tmp_path / "l.engine"), "--min-shapes", "x:[1,1,32]",
                   "--opt-shapes", "x:[1,8,32]", "--max-shapes", "x:[2,16,32]", "--save-onnx", str(tmp_path / "l.trt.onnx")])
    out = capsys.readouterr().out.splitlines()  # results go to stdout
    assert status == 0 and (tmp_path / "l.engine").is_file()
    assert out[:2] == [f"wrote {tmp_path / 'l.engine'}", "built, not run: TensorRT-RTX engines run on RTX GPUs only"]
    assert out[2].startswith(f"trtexec equivalent (TensorRT >= 10): trtexec --onnx={tmp_path / 'l.trt.onnx'} "
                             f"--saveEngine={tmp_path / 'l.engine'} --dynamicPlugins=")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_portable_lm_with_memory_builds_an_engine(tmp_path, dtype):
    model = from_preset("tiny").eval()
    path = moexport.export_onnx(model, tmp_path / "lm.onnx", mode="portable", dtype=dtype, memory=True,
                                routing_outputs=True)
    memory = ((1, 0, 64), (1, 8, 64), (4, 64, 64))
    engine = build_engine(path, tmp_path / "lm.engine", dtype=dtype,
                          shapes={"input_ids": ((1, 1), (1, 16), (4, 64)), "memory.0": memory, "memory.1": memory})
    # Deserialising needs a GPU; here the build succeeding (parse + AOT compile) is the check. The weights
    # are in the engine, so it is at least as large as the half-precision weights.
    weights = sum(p.numel() for p in model.parameters()) * 2
    assert engine.stat().st_size > weights


def test_dynamic_input_needs_shapes(tmp_path, fused_layer):
    with pytest.raises(MoexportError, match=r"input 'x' \| has dynamic dims"):
        build_engine(fused_layer, tmp_path / "layer.engine")


def test_shapes_must_fit_the_input(tmp_path, fused_layer):
    with pytest.raises(MoexportError, match=r"do not fit the input's dims"):
        build_engine(fused_layer, tmp_path / "layer.engine", shapes={"x": ((1, 32), (1, 32), (1, 32))})


@pytest.mark.parametrize("value", [((1, 1, 32), (2, 8, 32)), 32])
def test_shapes_must_be_one_shape_or_three(tmp_path, fused_layer, value):
    with pytest.raises(MoexportError, match=r"shapes\['x'\] = .* \| is neither one shape nor"):
        build_engine(fused_layer, tmp_path / "layer.engine", shapes={"x": value})


def test_unreadable_onnx_is_a_clear_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(MoexportError, match=r"bad.onnx \| is not a readable ONNX model"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine")


def test_missing_output_folder_is_named_before_building(tmp_path, fused_layer):
    with pytest.raises(MoexportError, match=r"layer.engine \| is in a folder that does not exist"):
        build_engine(fused_layer, tmp_path / "missing" / "layer.engine", shapes=LAYER_SHAPES)
