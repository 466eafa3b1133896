import pytest
import torch
from safetensors.torch import save_file

from moexport import MoexportError, load_checkpoint
from moexport.models import SigmaMoE


def trained_layer(**kwargs) -> SigmaMoE:
    layer = SigmaMoE(16, 6, 8, 2, **kwargs).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_torch_saved_layer_state_dict_reproduces_the_layer(tmp_path, bias):
    layer = trained_layer(bias=bias)
    state = dict(layer.state_dict())
    state["kv_sel_counts_100"] = torch.zeros(6, 8)  # the research code's persistent logging buffer
    state["iter"] = torch.tensor(30)  # MoEUT-era persistent buffer
    torch.save(state, tmp_path / "moe.pt")
    loaded = load_checkpoint(tmp_path / "moe.pt", k=2)
    x = torch.randn(3, 7, 16)
    assert isinstance(loaded, SigmaMoE) and loaded.config() == layer.config() | {"weight_std_scale": 1.0}
    assert torch.equal(loaded(x), layer(x))


def test_safetensors_layer_with_a_linear_router(tmp_path):
    layer = trained_layer(v_dim=10)
    state = {name: tensor.contiguous() for name, tensor in layer.state_dict().items()}
    state["expert_sel.weight"] = state.pop("expert_sel")  # the HF port's nn.Linear router
    save_file(state, tmp_path / "moe.safetensors")
    loaded = load_checkpoint(tmp_path / "moe.safetensors", k=2, selection="sigmoid", activation="relu")
    x = torch.randn(5, 16)
    assert loaded.v_dim == 10 and torch.equal(loaded(x), layer(x))


def test_selection_and_activation_options_apply(tmp_path):
    layer = trained_layer(selection="softmax_after_topk", activation="gelu")
    torch.save(layer.state_dict(), tmp_path / "moe.pt")
    loaded = load_checkpoint(tmp_path / "moe.pt", k=2, selection="softmax_after_topk", activation="gelu")
    x = torch.randn(5, 16)
    assert torch.equal(loaded(x), layer(x))


def test_missing_k_says_how_to_give_it(tmp_path):
    torch.save(trained_layer().state_dict(), tmp_path / "moe.pt")
    with pytest.raises(MoexportError, match=r"moe\.pt \| is a σ-MoE layer state dict(.|\n)*k=…"):
        load_checkpoint(tmp_path / "moe.pt")


def test_inconsistent_shapes_name_the_tensor(tmp_path):
    state = dict(trained_layer().state_dict())
    state["expert_sel"] = torch.randn(5, 16)
    torch.save(state, tmp_path / "moe.pt")
    with pytest.raises(MoexportError, match=r"tensor 'expert_sel' \| has shape \(5, 16\), expected \(6, 16\)"):
        load_checkpoint(tmp_path / "moe.pt", k=2)


def test_router_bias_is_refused(tmp_path):
    state = dict(trained_layer().state_dict()) | {"sel_bias": torch.zeros(6)}
    torch.save(state, tmp_path / "moe.pt")
    with pytest.raises(MoexportError, match="sel_bias"):
        load_checkpoint(tmp_path / "moe.pt", k=2)


def test_k_larger_than_the_experts_names_the_file(tmp_path):
    torch.save(trained_layer().state_dict(), tmp_path / "moe.pt")
    with pytest.raises(MoexportError, match=r"moe\.pt \| describes a model moexport cannot build \(k=7"):
        load_checkpoint(tmp_path / "moe.pt", k=7)


def test_an_unknown_state_dict_lists_the_formats(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(MoexportError, match=r"other\.pt \| holds no checkpoint moexport knows \(found 'weight'\)"):
        load_checkpoint(tmp_path / "other.pt")
