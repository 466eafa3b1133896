import json

import pytest
import torch
import torch.nn.functional as F

from moexport import MoexportError
from moexport.models import TransformerLM, build, from_preset

from attention_reference import randomised, reference_attention

FFNS = {
    "sigma_moe": {"kind": "sigma_moe", "d_model": 16, "n_experts": 4, "expert_size": 8, "k": 2},
    "dense": {"kind": "dense", "d_model": 16, "d_ff": 32},
    "pkm": {"kind": "pkm", "d_model": 16, "n_keys": 5, "heads": 2},
    "topk": {"kind": "topk", "d_model": 16, "d_ff": 32, "k": 5},
}


def small_lm(ffn="sigma_moe", **kwargs) -> TransformerLM:
    model = TransformerLM(50, 16, 2, 3, FFNS[ffn], head_dim=5, **kwargs).eval()
    with torch.no_grad():
        for layer in model.layers:
            randomised(layer.self_attn)
            layer.norm1.weight.normal_()
            layer.norm2.bias.normal_()
    return model


def reference_lm(model: TransformerLM, tokens: torch.Tensor) -> torch.Tensor:
    """Appendix steps 1-3 written out: embedding (scale 1), pre-LN layers, out_norm, output with bias."""
    x = model.embedding.weight[tokens]
    for layer in model.layers:
        h = F.layer_norm(x, (16,), layer.norm1.weight, layer.norm1.bias, eps=1e-5)
        x = x + reference_attention(layer.self_attn, h, h.shape[1]).float()
        x = x + layer.ffn(F.layer_norm(x, (16,), layer.norm2.weight, layer.norm2.bias, eps=1e-5))
    h = F.layer_norm(x, (16,), model.out_norm.weight, model.out_norm.bias, eps=1e-5)
    return h @ model.output.weight.T + model.output.bias


@pytest.mark.parametrize("ffn", list(FFNS))
def test_lm_matches_the_appendix_forward(ffn):
    model = small_lm(ffn)
    tokens = torch.randint(0, 50, (2, 7))
    logits = model(tokens)
    assert logits.shape == (2, 7, 50)
    assert torch.allclose(logits, reference_lm(model, tokens), atol=1e-4)


@pytest.mark.parametrize("ffn", ["sigma_moe", "dense"])
def test_memory_continues_the_sequence(ffn):
    model = small_lm(ffn)
    tokens = torch.randint(0, 50, (2, 12))
    whole = model(tokens)
    first, memory = model(tokens[:, :6], return_memory=True)
    second, _ = model(tokens[:, 6:], memory, return_memory=True)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-5)


def test_memory_holds_each_layers_input_and_rolls():
    model = small_lm()
    tokens = torch.randint(0, 50, (1, 9))
    _, memory = model(tokens[:, :3], return_memory=True)
    assert torch.equal(memory[0], model.embedding.weight[tokens[:, :3]])
    assert torch.allclose(memory[1], model.layers[0](memory[0]))
    _, rolled = model(tokens[:, 3:6], memory, return_memory=True)
    assert rolled[0].shape == (1, 3, 16) and torch.equal(rolled[0], model.embedding.weight[tokens[:, 3:6]])
    _, grown = model(tokens[:, 3:6], memory, return_memory=True, memory_length=5)
    assert torch.equal(grown[0], model.embedding.weight[tokens[:, 1:6]])
    assert not any(m.requires_grad for m in grown)


def test_two_segments_of_memory_match_the_full_window():
    # The last segment sees both earlier ones: the same as running the whole sequence.
    model = small_lm("dense")
    tokens = torch.randint(0, 50, (1, 12))
    _, memory = model(tokens[:, :4], return_memory=True, memory_length=8)
    _, memory = model(tokens[:, 4:8], memory, return_memory=True, memory_length=8)
    last = model(tokens[:, 8:], memory)
    assert torch.allclose(last, model(tokens)[:, 8:], atol=1e-5)


def test_empty_memory_is_no_memory():
    model = small_lm()
    tokens = torch.randint(0, 50, (3, 5))
    assert torch.allclose(model(tokens, model.init_memory(3)), model(tokens), atol=1e-6)


def test_per_layer_ffn_kinds():
    model = TransformerLM(50, 16, 2, 4, [FFNS["sigma_moe"], FFNS["dense"]])
    assert [layer.ffn.kind for layer in model.layers] == ["sigma_moe", "dense"]
    assert build(json.loads(json.dumps(model.config()))).config() == model.config()


def test_config_is_plain_and_rebuilds_the_same_model():
    model = small_lm("pkm", dropout=0.1)
    config = json.loads(json.dumps(model.config()))
    again = build(config)
    assert again.config() == model.config()
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    assert {name: tensor.shape for name, tensor in again.state_dict().items()} == shapes


def test_state_dict_keys_follow_the_paper():
    keys = set(from_preset("tiny").state_dict())
    assert {"embedding.weight", "output.weight", "output.bias", "out_norm.weight", "layers.1.norm2.bias",
            "layers.0.self_attn.data_to_kv.weight", "layers.0.self_attn.global_pos_bias",
            "layers.0.ffn.keys", "layers.0.ffn.values", "layers.0.ffn.expert_sel"} <= keys


def test_dropout_only_in_training():
    model = small_lm("dense", dropout=0.5)
    tokens = torch.randint(0, 50, (2, 6))
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


def test_wrong_memory_is_a_clear_error():
    model = small_lm()
    with pytest.raises(MoexportError, match="one tensor per layer"):
        model(torch.zeros(1, 3, dtype=torch.long), [torch.zeros(1, 2, 16)])


def test_wrong_number_of_ffn_configs_is_a_clear_error():
    with pytest.raises(MoexportError, match="one config per layer"):
        TransformerLM(50, 16, 3, 4, [FFNS["dense"]] * 2)
