import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moexport import MoexportError, save_checkpoint
from moexport.checkpoints import describe
from moexport.models import SigmaMoE, TransformerLM, from_preset

from paper_format import write_paper_checkpoint

MOEXPORT = Path(sys.executable).with_name("moexport")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console script, as a user runs it (wide output so that no table cell wraps)."""
    return subprocess.run([str(MOEXPORT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_describe_counts_parameters_and_flops_of_a_preset():
    with torch.device("meta"):
        model = from_preset("wt103_small")
    info = describe(model)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert len(info["layers"]) == 16 and {row["ffn"] for row in info["layers"]} == {"sigma_moe"}
    d, e, g, k = 412, 16, 128, 4
    row = info["layers"][0]
    assert (row["active"], row["dense"]) == (2 * (d * e + k * g * 2 * d), 2 * e * g * 2 * d)
    assert row["parameters"] == 2 * e * d * g + e * d
    flops = info["ffn_flops_per_token"]
    assert flops["active"] == 16 * row["active"] and flops["dense"] == 16 * row["dense"]
    assert flops["active_fraction"] == pytest.approx(row["active"] / row["dense"])


def test_describe_of_a_single_layer():
    info = describe(SigmaMoE(16, 8, 4, 2))
    assert info["kind"] == "sigma_moe" and [row["ffn"] for row in info["layers"]] == ["sigma_moe"]
    assert info["parameters"] == 8 * 16 * 4 * 2 + 8 * 16


def test_describe_of_a_foreign_module_is_a_clear_error():
    with pytest.raises(MoexportError, match="not a moexport module"):
        describe(torch.nn.Linear(2, 2))


@pytest.mark.slow  # runs the console script: a fresh interpreter imports torch
def test_inspect_native_checkpoint(tmp_path):
    moe = {"kind": "sigma_moe", "d_model": 16, "n_experts": 4, "expert_size": 8, "k": 2}
    model = TransformerLM(40, 16, 3, 2, [moe, moe, {"kind": "dense", "d_model": 16, "d_ff": 32}])
    save_checkpoint(model, tmp_path / "ckpt")
    result = run_cli("inspect", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{sum(p.numel() for p in model.parameters()):,}" in out
    assert "transformer_lm" in out and "moexport" in out
    info = describe(model)
    # The two equal σ-MoE layers share one row.
    assert "0–1" in out and "sigma_moe" in out and "4 experts × 8, k=2, sigmoid" in out
    assert "dense" in out and "d_ff=32" in out
    active, dense = info["layers"][0]["active"], info["layers"][0]["dense"]
    assert f"{active / 1e6:.2f}M" in out and f"{100 * active / dense:.1f}" in out


@pytest.mark.slow  # runs the console script: a fresh interpreter imports torch
def test_inspect_paper_checkpoint(tmp_path):
    model = TransformerLM(50, 16, 2, 3, {"kind": "pkm", "d_model": 16, "n_keys": 5, "heads": 2}, head_dim=5)
    path = write_paper_checkpoint(tmp_path, model)
    result = run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "paper" in result.stdout and "5² values, 2 heads" in result.stdout
    assert f"{sum(p.numel() for p in model.parameters()):,}" in result.stdout


@pytest.mark.slow  # runs the console script: a fresh interpreter imports torch
def test_inspect_layer_state_dict_needs_and_takes_k(tmp_path):
    torch.save(SigmaMoE(16, 6, 8, 2).state_dict(), tmp_path / "moe.pt")
    without = run_cli("inspect", str(tmp_path / "moe.pt"))
    assert without.returncode == 1 and "does not record k" in without.stderr and "Traceback" not in without.stderr
    with_k = run_cli("inspect", str(tmp_path / "moe.pt"), "--k", "3")
    assert with_k.returncode == 0 and "6 experts × 8, k=3" in with_k.stdout


@pytest.mark.slow  # runs the console script: a fresh interpreter imports torch
def test_inspect_missing_file_fails_with_one_line(tmp_path):
    result = run_cli("inspect", str(tmp_path / "nope.pth"))
    assert result.returncode == 1
    assert "nope.pth | does not exist" in result.stderr and "Traceback" not in result.stderr
