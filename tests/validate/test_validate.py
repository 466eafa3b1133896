import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import moexport
from moexport import MoexportError, export_onnx, load_checkpoint, save_checkpoint
from moexport.core.dtypes import TOLERANCES
from moexport.validate import validate
from moexport.models import SigmaMoE, TransformerLM


N_EXPERTS, TIED = 8, (1, 5)  # experts 1 and 5 get identical router rows: every token ties between them


def small_lm(*, ties: bool = False, near_ties: bool = False) -> TransformerLM:
    """A small LM; `ties`: experts 1 and 5 have the same router row (4x the norm), `near_ties`: router rows
    that differ by a factor 1 + 1e-6, so that each token ranks them a hair apart."""
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=256, d_model=48, n_layers=2, n_heads=4,
                          ffn={"kind": "sigma_moe", "d_model": 48, "n_experts": N_EXPERTS, "expert_size": 16, "k": 2})
    if near_ties:
        with torch.no_grad():
            for layer in model.layers:
                layer.ffn.expert_sel[TIED[1]] = layer.ffn.expert_sel[TIED[0]] * (1 + 1e-6)
    if ties:
        with torch.no_grad():
            for layer in model.layers:
                sel = layer.ffn.expert_sel
                sel[TIED[1]] = sel[TIED[0]]
                sel[TIED[0]] *= 4  # large norm: the tied pair is in most tokens' top-2
                sel[TIED[1]] = sel[TIED[0]]
    return model.eval()


@pytest.fixture(scope="module")
def lm():
    return small_lm()


@pytest.fixture(scope="module")
def lm_dispatch(lm, tmp_path_factory):
    return export_onnx(lm, tmp_path_factory.mktemp("lm") / "lm.dispatch.onnx", mode="dispatch", routing_outputs=True)


def test_untouched_export_passes_with_full_routing_agreement(lm, lm_dispatch, tmp_path):
    report = validate(lm_dispatch, lm, report_dir=tmp_path)
    assert report.passed
    assert {o.output for o in report.outputs} == {"logits"}
    assert all(o.max_abs < 1e-4 for o in report.outputs)
    assert {r.layer for r in report.routing} == {"layers.0.ffn", "layers.1.ffn"}
    assert all(r.agreement == 1.0 and r.tokens == 3 * 2 * 64 for r in report.routing)  # 2 random + text
    assert "onnxrt (CPU) ran the moexport nodes on their function bodies" in report.notes
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["passed"] is True and "PASSED" in (tmp_path / "report.html").read_text()


def test_one_expert_changed_by_one_percent_fails(lm, lm_dispatch):
    changed = copy.deepcopy(lm)
    with torch.no_grad():
        changed.layers[1].ffn.values[3] *= 1.01
    report = validate(lm_dispatch, changed)
    assert not report.passed
    (logits,) = [o for o in report.outputs if o.output == "logits"]
    assert not logits.passed and logits.max_abs > 1e-4
    assert all(r.passed for r in report.routing)  # the router was untouched: the failure is numeric


def reverse_experts(src, dst):
    """Rewrite an exported dispatch graph so that ties go to the HIGHER expert index.

    Reversing the expert axis of every σ-MoE weight (and mapping the exposed indices back) leaves the
    function unchanged except where two experts tie: the file computes the same layer with the
    opposite tie rule.
    """
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if init.name.endswith(".router_w"):
            array = array[:, ::-1]
        elif init.name.endswith((".keys", ".values")):
            array = array[::-1]
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), init.name))
    graph = model.graph
    for out in graph.output:
        if out.name.startswith("experts"):
            for node in graph.node:
                node.output[:] = [o + ".reversed" if o == out.name else o for o in node.output]
            top = onnx.helper.make_tensor(out.name + ".top", onnx.TensorProto.INT64, [], [N_EXPERTS - 1])
            graph.initializer.append(top)
            graph.node.append(onnx.helper.make_node("Sub", [out.name + ".top", out.name + ".reversed"], [out.name]))
    onnx.save(model, str(dst))
    return dst


def test_a_file_with_another_tie_rule_fails_on_its_exact_ties(tmp_path):
    tied = small_lm(ties=True)
    exported = export_onnx(tied, tmp_path / "tied.onnx", mode="dispatch", routing_outputs=True)
    assert validate(exported, tied).passed  # our graph breaks the ties exactly like PyTorch

    report = validate(reverse_experts(exported, tmp_path / "reversed.onnx"), tied)
    assert not report.passed
    first = report.routing[0]  # the first layer picks the higher of the two tied experts: against the rule
    assert first.layer == "layers.0.ffn" and first.unexplained == first.tokens - first.agreeing > 0
    for ex in first.examples:
        assert ex["kind"] == "unexplained" and ex["margin"] == 0.0
        assert set(ex["reference"]) ^ set(ex["runner"]) == set(TIED)
    # The inputs with unexplained routing are compared on the reference's own routing: the logits show it.
    assert any(not o.passed for o in report.outputs)


def test_near_ties_routed_the_other_way_are_judged_on_the_artifacts_routing(tmp_path):
    model = small_lm(near_ties=True)
    exported = onnx.load(str(export_onnx(model, tmp_path / "lm.onnx")))
    for init in exported.graph.initializer:  # the file ranks the near-tied pair the other way round
        if init.name.endswith(".router_w"):
            array = numpy_helper.to_array(init).copy()
            array[:, TIED[1]] = array[:, TIED[0]] * (1 - 1e-6)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(exported, str(tmp_path / "flipped.onnx"))
    report = validate(tmp_path / "flipped.onnx", model)
    assert report.passed, report.to_dict()
    assert sum(r.near_ties for r in report.routing) > 0 and all(r.unexplained == 0 for r in report.routing)
    (logits,) = report.outputs
    assert logits.rerouted > 0
    # Against the reference's own routing the other experts' outputs would have failed the numeric check.
    assert logits.max_abs_own_routing > logits.atol + logits.rtol * logits.scale > logits.max_abs


def test_routing_difference_without_a_tie_is_unexplained(lm, lm_dispatch, tmp_path):
    model = onnx.load(str(lm_dispatch))
    for out in model.graph.output:  # report expert e as (e + 1) % E: a wrong, tie-free routing
        if out.name == "experts.layers.0.ffn":
            for node in model.graph.node:
                node.output[:] = [o + ".raw" if o == out.name else o for o in node.output]
            model.graph.initializer.extend([
                onnx.helper.make_tensor("one", onnx.TensorProto.INT64, [], [1]),
                onnx.helper.make_tensor("n_experts", onnx.TensorProto.INT64, [], [N_EXPERTS])])
            model.graph.node.extend([onnx.helper.make_node("Add", [out.name + ".raw", "one"], ["shifted"]),
                                     onnx.helper.make_node("Mod", ["shifted", "n_experts"], [out.name])])
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    report = validate(tmp_path / "wrong.onnx", lm)
    (layer0,) = [r for r in report.routing if r.layer == "layers.0.ffn"]
    assert layer0.unexplained > 0 and not layer0.passed and not report.passed
    assert all(o.passed for o in report.outputs)  # the logits themselves are untouched


def test_portable_export_passes(lm, tmp_path):
    path = export_onnx(lm, tmp_path / "lm.portable.onnx", mode="portable", routing_outputs=True)
    report = validate(path, lm, shapes="input_ids:[1,32]", iterations=1)
    assert report.passed and report.routing and all(r.agreement == 1.0 for r in report.routing)


def test_a_single_layer_is_checked_with_its_routing(tmp_path):
    torch.manual_seed(0)
    layer = SigmaMoE(32, 8, 16, 2).eval()
    path = export_onnx(layer, tmp_path / "layer.onnx", routing_outputs=True)
    report = validate(path, layer, iterations=1)
    assert report.passed and {o.output for o in report.outputs} == {"y"}
    assert [(r.layer, r.tokens, r.agreement) for r in report.routing] == [("", 2 * 64, 1.0)]


def test_a_float16_layer_is_judged_as_float16_against_the_float32_layer(tmp_path):
    torch.manual_seed(0)
    layer = SigmaMoE(64, 8, 32, 2).eval()
    report = validate(export_onnx(layer, tmp_path / "layer.onnx", dtype="float16"), layer, iterations=1)
    (y,) = report.outputs
    assert report.dtype == "float16" and report.passed, report.to_dict()
    assert TOLERANCES["float32"].atol < y.max_abs <= y.atol + y.rtol * y.scale  # float16 rounding, not float32's
    assert [r.layer for r in report.routing] == [""]


def test_bfloat16_inputs_and_outputs_reach_onnx_runtime_as_float32_with_bfloat16_values():
    """ONNX Runtime's Python API has no bfloat16 arrays, so validate widens a bfloat16 graph's edges: a
    Cast beside each input and output, names kept (an output read inside the graph too), and feeds
    rounded to bfloat16 so the float32 reference sees the artifact's numbers."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from moexport.validate import make_inputs
    from moexport.validate.api import _widen_bfloat16

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 8])
    z = helper.make_tensor_value_info("z", TensorProto.BFLOAT16, [2, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["y"], ["z"])],
                              "edges", [x], [y, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    assert _widen_bfloat16(model.graph) == ["x", "y", "z"]
    onnx.checker.check_model(model, full_check=True)
    assert [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]] == \
        [("x", TensorProto.FLOAT), ("y", TensorProto.FLOAT), ("z", TensorProto.FLOAT)]

    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    metadata = TensorMetadata().add("x", DataType.FLOAT32, (2, 8))
    (feed,) = make_inputs(metadata, iterations=1, bfloat16=["x"])
    values = torch.from_numpy(feed["x"])
    assert torch.equal(values.to(torch.bfloat16).float(), values) and values.unique().numel() > 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out_y, out_z = session.run(["y", "z"], dict(feed))
    assert out_y.dtype == np.float32 and np.array_equal(out_y, feed["x"]) and np.array_equal(out_z, feed["x"])


def test_bad_input_is_one_clear_error(lm, lm_dispatch, tmp_path):
    with pytest.raises(MoexportError, match="does not exist"):
        validate(tmp_path / "missing.onnx", lm)
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a model")
    with pytest.raises(MoexportError, match="garbage.onnx"):
        validate(tmp_path / "garbage.onnx", lm)
    with pytest.raises(MoexportError, match="runner 'tensorflow'"):
        validate(lm_dispatch, lm, runners=["tensorflow"])
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # never a silent CPU fallback
        with pytest.raises(MoexportError, match=r"runner 'onnxrt-cuda' \| needs ONNX Runtime's CUDA"):
            validate(lm_dispatch, lm, runners=["onnxrt-cuda"])
    with pytest.raises(MoexportError, match="--shapes tokens"):
        validate(lm_dispatch, lm, shapes="tokens:[1,8]")
    (tmp_path / "model.plan").write_bytes(b"engine")
    with pytest.raises(MoexportError, match="TensorRT is not installed"):
        validate(tmp_path / "model.plan", lm)


def run_cli(*args, columns: int | None = None):
    env = {**os.environ, **({"COLUMNS": str(columns)} if columns else {})}
    return subprocess.run([sys.executable, "-m", "moexport.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.mark.slow
def test_cli_exit_status_says_passed_or_failed(lm, lm_dispatch, tmp_path):
    save_checkpoint(lm, tmp_path / "good")
    changed = copy.deepcopy(lm)
    with torch.no_grad():
        changed.layers[0].ffn.keys[2] *= 1.01
    save_checkpoint(changed, tmp_path / "changed")
    ok = run_cli("validate", lm_dispatch, "--checkpoint", tmp_path / "good", "--save-report", tmp_path / "r")
    assert ok.returncode == 0, ok.stderr
    assert "PASSED | Runtime" in ok.stdout and (tmp_path / "r" / "report.html").is_file()
    bad = run_cli("validate", lm_dispatch, "--checkpoint", tmp_path / "changed")
    assert bad.returncode == 3 and "FAILED" in bad.stdout
    missing = run_cli("validate", tmp_path / "nope.onnx", "--checkpoint", tmp_path / "good")
    assert missing.returncode == 1 and "nope.onnx | does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


# ---- float16: the shipped trained model, as a user exports it --------------------------------------

SHIPPED = Path(moexport.__file__).parent / "data" / "sigma_moe_lm"


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(SHIPPED)


@pytest.fixture(scope="module")
def shipped_fp16(shipped, tmp_path_factory):
    """`moexport export moexport/data/sigma_moe_lm -o fp16.onnx --fp16`: default options otherwise."""
    return export_onnx(shipped, tmp_path_factory.mktemp("fp16") / "fp16.onnx", dtype="float16")


def test_the_shipped_model_in_float16_passes_with_default_options(shipped, shipped_fp16):
    report = validate(shipped_fp16, shipped)
    assert report.passed, report.to_dict()
    assert report.dtype == "float16"  # read from the file: float16 tolerances and near-tie margin
    (logits,) = report.outputs
    assert (logits.atol, logits.rtol) == (TOLERANCES["float16"].atol, TOLERANCES["float16"].rtol)
    # Routing is read from the file although it has no routing outputs: every layer, every token.
    assert {r.layer for r in report.routing} == {f"layers.{i}.ffn" for i in range(4)}
    assert all(r.tokens == 3 * 2 * 64 and r.unexplained == 0 for r in report.routing)
    # The reference is the float32 model: closer than float16 rounding of the logits' scale.
    assert logits.max_rel < 2e-3


def test_a_float16_file_with_one_corrupted_expert_fails(shipped, shipped_fp16, tmp_path):
    model = onnx.load(str(shipped_fp16))
    (values,) = [i for i in model.graph.initializer if i.name == "layers.2.ffn.values"]
    array = numpy_helper.to_array(values).copy()
    array[3] *= 1.25  # one expert of one layer, 25% off
    values.CopyFrom(numpy_helper.from_array(array, values.name))
    onnx.save(model, str(tmp_path / "corrupted.onnx"))
    report = validate(tmp_path / "corrupted.onnx", shipped)
    assert not report.passed
    (logits,) = report.outputs
    assert not logits.passed and logits.max_abs > logits.atol + logits.rtol * logits.scale
    assert all(r.passed for r in report.routing[:3])  # the routers are intact; only the expert's output is off


@pytest.mark.slow
def test_the_cli_passes_the_shipped_float16_export_and_its_piped_report_is_whole(shipped_fp16):
    done = run_cli("validate", shipped_fp16, "--checkpoint", SHIPPED, columns=80)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("PASSED | Runtime") and done.stderr == ""
    assert "…" not in done.stdout and "float16" in lines[0]
    for layer in range(4):  # every routing row keeps its layer name, whatever the width
        assert any(f"layers.{layer}.ffn" in line for line in lines)
