import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from moexport import MoexportError, export_onnx, save_checkpoint
from moexport.validate import validate
from moexport.models import SigmaMoE, TransformerLM


N_EXPERTS, TIED = 8, (1, 5)  # experts 1 and 5 get identical router rows: every token ties between them


def small_lm(*, ties: bool = False) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=256, d_model=48, n_layers=2, n_heads=4,
                          ffn={"kind": "sigma_moe", "d_model": 48, "n_experts": N_EXPERTS, "expert_size": 16, "k": 2})
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


def test_a_file_with_another_tie_rule_fails_and_the_ties_are_explained(tmp_path):
    tied = small_lm(ties=True)
    exported = export_onnx(tied, tmp_path / "tied.onnx", mode="dispatch", routing_outputs=True)
    assert validate(exported, tied).passed  # our graph breaks the ties exactly like PyTorch

    report = validate(reverse_experts(exported, tmp_path / "reversed.onnx"), tied)
    assert not report.passed
    assert any(not o.passed for o in report.outputs)
    disagreeing = sum(r.tokens - r.agreeing for r in report.routing)
    assert disagreeing > 0
    assert all(r.unexplained == 0 for r in report.routing)  # every disagreement is explained:
    first = report.routing[0]
    assert first.layer == "layers.0.ffn" and first.near_ties == first.tokens - first.agreeing > 0
    for ex in first.examples:  # in the first layer by an exact tie between the two tied experts
        assert ex["kind"] == "near-tie" and ex["margin"] == 0.0
        assert set(ex["reference"]) ^ set(ex["runner"]) == set(TIED)


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


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moexport.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_exit_status_says_passed_or_failed(lm, lm_dispatch, tmp_path):
    save_checkpoint(lm, tmp_path / "good")
    changed = copy.deepcopy(lm)
    with torch.no_grad():
        changed.layers[0].ffn.keys[2] *= 1.01
    save_checkpoint(changed, tmp_path / "changed")
    ok = run_cli("validate", lm_dispatch, "--checkpoint", tmp_path / "good", "--save-report", tmp_path / "r")
    assert ok.returncode == 0, ok.stderr
    assert "PASSED | Runtime" in ok.stderr and (tmp_path / "r" / "report.html").is_file()
    bad = run_cli("validate", lm_dispatch, "--checkpoint", tmp_path / "changed")
    assert bad.returncode == 3 and "FAILED" in bad.stderr
    missing = run_cli("validate", tmp_path / "nope.onnx", "--checkpoint", tmp_path / "good")
    assert missing.returncode == 1 and "nope.onnx | does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
