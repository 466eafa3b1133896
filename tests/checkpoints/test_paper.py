import os
import sys
import zipfile

import pytest
import torch

from moexport import MoexportError, load_checkpoint
from moexport.checkpoints import describe
from moexport.models import TransformerLM

from paper_format import DotDict, paper_args, paper_framework_importable, paper_state_dict, write_paper_checkpoint

FFNS = {
    "sigma_moe": {"kind": "sigma_moe", "d_model": 16, "n_experts": 4, "expert_size": 8, "k": 2},
    "dense": {"kind": "dense", "d_model": 16, "d_ff": 32},
    "topk": {"kind": "topk", "d_model": 16, "d_ff": 32, "k": 5},
    "pkm": {"kind": "pkm", "d_model": 16, "n_keys": 5, "heads": 2},
    "pkm_knn": {"kind": "pkm", "d_model": 16, "n_keys": 6, "heads": 2, "knn": 4},
}


def trained_looking(ffn: str) -> TransformerLM:
    """A small LM whose every tensor is random (so that no zero bias hides a wiring mistake)."""
    model = TransformerLM(50, 16, 2, 3, FFNS[ffn], head_dim=5, dropout=0.1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("ffn", list(FFNS))
def test_paper_checkpoint_reproduces_the_model(tmp_path, ffn):
    model = trained_looking(ffn)
    path = write_paper_checkpoint(tmp_path, model)
    assert "framework.data_structures.dotdict" not in sys.modules
    assert {name.split("/")[0] for name in zipfile.ZipFile(path).namelist()} == {"save_tmp"}
    loaded = load_checkpoint(path)
    assert not loaded.training
    tokens = torch.randint(0, 50, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))
    loaded_ffn = loaded.config()["ffn"]
    assert {key: loaded_ffn[key] for key in FFNS[ffn]} == FFNS[ffn]


def test_values_only_in_the_arguments_are_read_from_them(tmp_path):
    model = trained_looking("sigma_moe")
    args = paper_args(model) | {"pkm.n_heads": 3, "moe.selection_mode": "gate", "moe.activation_after_topk": 1,
                                "dropout": 0.2}
    loaded = load_checkpoint(write_paper_checkpoint(tmp_path, model, args=args))
    ffn = loaded.layers[0].ffn
    assert (ffn.k, ffn.selection, loaded.dropout) == (3, "softmax_after_topk", 0.2)


def test_topk_and_pkm_settings_come_from_raw_string_arguments(tmp_path):
    model = trained_looking("topk")
    args = paper_args(model) | {"transformer.topk_value": "7", "transformer.topk_use_norm": "1"}
    ffn = load_checkpoint(write_paper_checkpoint(tmp_path, model, args=args)).layers[0].ffn
    assert (ffn.k, ffn.use_norm) == (7, True)
    model = trained_looking("pkm")
    args = paper_args(model) | {"pkm.knn": "3", "transformer.activation": "softmax"}
    ffn = load_checkpoint(write_paper_checkpoint(tmp_path, model, args=args)).layers[0].ffn
    assert (ffn.knn, ffn.activation, ffn.uses_dense_path) == (3, "softmax", False)


def test_tied_embedding_loads_as_separate_equal_tensors(tmp_path):
    model = trained_looking("dense")
    with torch.no_grad():
        model.output.weight.copy_(model.embedding.weight)
    state = paper_state_dict(model)
    state["output.weight"] = state["embedding.weight"]  # one tensor under two names, as tying pickles it
    args = paper_args(model) | {"tied_embedding": 1}
    loaded = load_checkpoint(write_paper_checkpoint(tmp_path, model, args=args, state=state))
    assert torch.equal(loaded.output.weight, loaded.embedding.weight)
    assert loaded.output.weight.data_ptr() != loaded.embedding.weight.data_ptr()


def test_unknown_variant_lists_the_supported_ones(tmp_path):
    model = trained_looking("dense")
    args = paper_args(model) | {"transformer.variant": "preln_moe_universal"}
    path = write_paper_checkpoint(tmp_path, model, args=args)
    with pytest.raises(MoexportError, match=r"transformer\.variant.*preln_moe_universal(.|\n)*preln_kvmem"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value", [("moe.sel_bias", 1), ("kvmem.standard_parallel", "1"),
                                        ("transformer.output_mode", "sum"), ("embedding_size", "256")])
def test_options_that_change_the_forward_are_refused_by_name(tmp_path, key, value):
    model = trained_looking("sigma_moe")
    path = write_paper_checkpoint(tmp_path, model, args=paper_args(model) | {key: value})
    with pytest.raises(MoexportError, match=f"argument '{key}'"):
        load_checkpoint(path)


def test_argument_shape_mismatch_names_the_tensor(tmp_path):
    model = trained_looking("sigma_moe")
    path = write_paper_checkpoint(tmp_path, model, args=paper_args(model) | {"state_size": 32})
    with pytest.raises(MoexportError, match="embedding.weight.*width 16.*state_size is 32"):
        load_checkpoint(path)


def resize_a_tensor(state):
    state["layers.1.linear2.weight"] = torch.randn(16, 30)


def drop_a_tensor(state):
    del state["layers.1.self_attn.global_pos_bias"]


@pytest.mark.parametrize("edit, match", [
    (resize_a_tensor, r"layers\.1\.ffn\.linear2\.weight.*\(16, 30\), expected \(16, 32\)"),
    (drop_a_tensor, r"model-30\.pth, tensor 'layers\.1\.self_attn\.global_pos_bias' \| is missing"),
])
def test_tensor_problems_name_the_file_and_tensor(tmp_path, edit, match):
    model = trained_looking("dense")
    state = paper_state_dict(model)
    edit(state)
    with pytest.raises(MoexportError, match=match):
        load_checkpoint(write_paper_checkpoint(tmp_path, model, state=state))


def test_missing_argument_is_named(tmp_path):
    model = trained_looking("sigma_moe")
    args = paper_args(model)
    del args["pkm.n_heads"]
    with pytest.raises(MoexportError, match=r"argument 'pkm\.n_heads' \| is missing"):
        load_checkpoint(write_paper_checkpoint(tmp_path, model, args=args))


def test_nonfinite_weights_are_named_by_describe(tmp_path):
    model = trained_looking("sigma_moe")
    state = paper_state_dict(model)
    state["layers.0.pkm.values"][1, 2, 3] = float("nan")
    state["output.bias"][0] = float("inf")
    info = describe(write_paper_checkpoint(tmp_path, model, state=state))
    assert info["nonfinite"] == ["layers.0.ffn.values", "output.bias"]  # named as moexport names them


class Evil:
    def __reduce__(self):
        return os.system, (f"touch {Evil.target}",)


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    Evil.target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"keys": Evil()}, "run_invariants": {}}, path)
    with pytest.raises(MoexportError, match=r"evil\.pth \| pickles the global '(posix|os)\.system'.*refuses"):
        load_checkpoint(path)
    assert not Evil.target.exists()


def test_unknown_classes_are_refused_even_when_importable(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {}, "run_invariants": {}, "extra": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(MoexportError, match="torch.nn.modules.linear.Linear"):
        load_checkpoint(path)


def test_dotdict_reads_as_a_plain_dict(tmp_path):
    path = tmp_path / "state.pth"
    with paper_framework_importable():
        torch.save({"state": DotDict(iter=30)}, path)
    from moexport.checkpoints.files import read_file

    state = read_file(path)["state"]
    assert type(state) is dict and state == {"iter": 30}


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = write_paper_checkpoint(tmp_path, trained_looking("dense"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MoexportError, match=r"model-30\.pth \| is not a readable torch\.save file"):
        load_checkpoint(path)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(MoexportError, match=r"noise\.pth \| is not a readable"):
        load_checkpoint(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(MoexportError, match=r"model-1\.pth \| does not exist"):
        load_checkpoint(tmp_path / "model-1.pth")


def test_layer_options_are_refused_for_full_checkpoints(tmp_path):
    path = write_paper_checkpoint(tmp_path, trained_looking("sigma_moe"))
    with pytest.raises(MoexportError, match="k=2.*records its own"):
        load_checkpoint(path, k=2)
