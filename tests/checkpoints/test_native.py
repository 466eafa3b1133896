import json

import pytest
import torch

from moexport import MoexportError, load_checkpoint, save_checkpoint
from moexport.checkpoints import describe
from moexport.models import PKM, DenseMLP, SigmaMoE, TopKMLP, TransformerLM, from_preset

MODULES = {
    "lm_sigma_moe": lambda: from_preset("tiny"),
    "lm_pkm": lambda: from_preset("tiny", "pkm"),
    "lm_mixed": lambda: TransformerLM(40, 16, 2, 2, [{"kind": "topk", "d_model": 16, "d_ff": 24, "k": 3},
                                                     {"kind": "dense", "d_model": 16, "d_ff": 24}]),
    "sigma_moe_bias": lambda: SigmaMoE(16, 4, 8, 2, bias=True, v_dim=12, selection="softmax"),
    "pkm_knn": lambda: PKM(16, 6, heads=2, knn=4),
    "dense": lambda: DenseMLP(16, 24, activation="gelu"),
    "topk": lambda: TopKMLP(16, 24, 3, use_norm=True),
}


def example_input(module):
    if isinstance(module, TransformerLM):
        return torch.randint(0, module.vocab_size, (2, 5))
    return torch.randn(2, 5, 16)


@pytest.mark.parametrize("name", list(MODULES))
def test_round_trip_is_bit_exact(tmp_path, name):
    module = MODULES[name]().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))  # no zero or default-initialised tensor hides a dropped one
    assert save_checkpoint(module, tmp_path / "ckpt") == tmp_path / "ckpt"
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is type(module) and loaded.config() == module.config() and not loaded.training
    original, again = module.state_dict(), loaded.state_dict()
    assert list(original) == list(again)
    for key in original:
        assert original[key].dtype == again[key].dtype and torch.equal(original[key], again[key]), key
    x = example_input(module)
    assert torch.equal(loaded(x), module(x))


def test_half_precision_round_trips_in_its_dtype(tmp_path):
    model = from_preset("tiny", "dense").to(torch.bfloat16)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "bf16"))
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))


def test_folder_holds_exactly_the_two_files(tmp_path):
    save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config == {"format": "moexport", "format_version": 1, "model": DenseMLP(8, 16).config()}


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    save_checkpoint(SigmaMoE(8, 4, 4, 2), tmp_path / "ckpt")
    assert isinstance(load_checkpoint(tmp_path / "ckpt"), SigmaMoE)


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import moexport.checkpoints.native as native

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_saving_a_foreign_module_is_a_clear_error(tmp_path):
    with pytest.raises(MoexportError, match="Linear.*not a moexport module"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "ckpt")


def test_saving_onto_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoexportError, match=r"file \| exists and is not a folder"):
        save_checkpoint(DenseMLP(8, 16), tmp_path / "file")


def test_saving_a_model_without_values_is_a_clear_error(tmp_path):
    with torch.device("meta"):
        model = DenseMLP(8, 16)
    with pytest.raises(MoexportError, match=r"tensor 'linear1\.weight' \| is on the meta device"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(MoexportError, match="without config.json"):
        load_checkpoint(tmp_path)


def test_corrupt_config_names_the_file(tmp_path):
    save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text('{"format": "moexport", "model": ')
    with pytest.raises(MoexportError, match=r"config\.json \| is not readable JSON"):
        load_checkpoint(tmp_path / "ckpt")


def test_unknown_module_kind_names_the_file_and_the_kinds(tmp_path):
    save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["kind"] = "mamba"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    match = r"config\.json \| describes a model moexport cannot build \(config kind='mamba'(.|\n)*sigma_moe"
    with pytest.raises(MoexportError, match=match):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_weights_are_a_clear_error(tmp_path):
    save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(MoexportError, match=r"model\.safetensors \| does not exist"):
        load_checkpoint(tmp_path / "ckpt")


def test_truncated_weights_are_a_clear_error(tmp_path):
    save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(MoexportError, match=r"model\.safetensors \| is not a readable safetensors file"):
        load_checkpoint(tmp_path / "ckpt")


def test_config_tensor_shape_mismatch_names_the_tensor(tmp_path):
    save_checkpoint(DenseMLP(8, 16), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["d_ff"] = 20
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoexportError, match=r"'linear1\.weight' \| has shape \(16, 8\), expected \(20, 8\)"):
        load_checkpoint(tmp_path / "ckpt")


def test_nonfinite_weights_load_as_they_are_and_describe_names_them(tmp_path):
    layer = SigmaMoE(8, 4, 4, 2)
    with torch.no_grad():
        layer.keys[0, 0, 0] = float("inf")
    loaded = load_checkpoint(save_checkpoint(layer, tmp_path / "ckpt"))
    assert torch.equal(loaded.keys, layer.keys)  # inf == inf: the value is kept, nothing is patched
    assert describe(loaded)["nonfinite"] == ["keys"] and describe(layer.eval())["nonfinite"] == ["keys"]
    assert describe(SigmaMoE(8, 4, 4, 2))["nonfinite"] == []
