"""Smoke tests of examples/train_lm.py and its corpus builder, on the CPU with tiny models."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moexport
from moexport.models import SigmaMoE, TransformerLM

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_lm.py"
SAMPLE = ROOT / "moexport" / "data" / "sample.txt"


def _import(name: str):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


train_lm = _import("train_lm")
lm_corpus = _import("lm_corpus")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A corpus folder made of the shipped held-out sample (real text from the real corpus)."""
    text = SAMPLE.read_bytes()
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_bytes(text[:3072])
    (folder / "heldout.txt").write_bytes(text[3072:])
    (folder / "manifest.json").write_text("{}")
    return folder


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a real run of the script: ~15 s on an idle 2-core machine, mostly imports
def test_training_lowers_the_loss_and_writes_a_checkpoint_that_loads_back(corpus, tmp_path):
    out = tmp_path / "run"
    result = _run("--variant", "sigma_moe", "--size", "tiny", "--steps", "40", "--batch", "4", "--context", "32",
                  "--lr", "3e-3", "--warmup", "0", "--log-every", "5", "--eval-every", "20", "--device", "cpu",
                  "--data-dir", str(corpus), "--out", str(out))
    assert result.returncode == 0, result.stderr
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(5, 45, 5))
    assert curve[-1]["train_bpb"] < curve[0]["train_bpb"] - 0.5
    assert all(r["entropy_reg"] < 0 for r in curve)  # −H of the routing: the σ-MoE regulariser ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["stopped_by"] == "steps"
    assert summary["final_heldout_bpb"] < 8.0  # better than uniform over 256 bytes

    model = moexport.load_checkpoint(out / "checkpoint")
    assert isinstance(model, TransformerLM)
    assert sum(isinstance(m, SigmaMoE) for m in model.modules()) == 2
    heldout = torch.frombuffer(bytearray((corpus / "heldout.txt").read_bytes()), dtype=torch.uint8)
    again = train_lm.heldout_bpb(model, heldout, context=32, batch=4, device=torch.device("cpu"), amp=False)
    assert again == pytest.approx(summary["final_heldout_bpb"], rel=1e-5)


def test_heldout_bpb_of_one_segment_is_the_cross_entropy_in_bits():
    model = train_lm.build_model("dense", "tiny", dropout=0.0, expert_dropout=0.0).eval()
    data = torch.frombuffer(bytearray(SAMPLE.read_bytes()[:65]), dtype=torch.uint8)
    expected = F.cross_entropy(model(data[None, :-1].long())[0], data[1:].long()).item() / math.log(2)
    bpb = train_lm.heldout_bpb(model, data, context=64, batch=1, device=torch.device("cpu"), amp=False)
    assert bpb == pytest.approx(expected, rel=1e-6)


def test_the_four_variants_are_parameter_matched():
    with torch.device("meta"):  # shapes only: no time spent initialising weights
        models = {v: train_lm.build_model(v, "small", dropout=0.1, expert_dropout=0.05) for v in train_lm.VARIANTS}
    params = {v: sum(p.numel() for p in m.parameters()) for v, m in models.items()}
    assert max(params.values()) / min(params.values()) < 1.01
    flops = {v: train_lm.ffn_flops(m) for v, m in models.items()}
    # σ-MoE: router + k of E experts; every variant's "dense" figure is the same MLP.
    assert flops["sigma_moe"]["active"] / flops["dense"]["active"] == pytest.approx(2 / 8 + 8 / (2 * 512), rel=1e-6)
    assert flops["sigma_moe"]["dense"] == flops["dense"]["active"] == flops["topk"]["dense"]


def test_streams_continue_where_the_previous_segment_ended():
    data = torch.arange(200, dtype=torch.uint8)
    streams = train_lm.Streams(data, batch=3, context=10, seed=0)
    x1, y1 = streams.next(torch.device("cpu"))
    x2, _ = streams.next(torch.device("cpu"))
    assert torch.equal(y1[:, :-1], x1[:, 1:])
    # data[i] = i: each row's next segment starts one byte after its last one (modulo the wrap).
    assert torch.equal(x2[:, 0], (x1[:, -1] + 1) % streams.usable)


def test_bad_options_give_one_clear_error(corpus, tmp_path, capsys):
    assert train_lm.main(["--eval-every", "7", "--log-every", "5", "--data-dir", str(corpus), "--out", str(tmp_path)]) == 1
    assert "--eval-every 7 | must be a multiple of --log-every 5" in capsys.readouterr().err
    assert train_lm.main(["--data-dir", str(tmp_path / "nowhere"), "--deb", str(tmp_path / "missing.deb"),
                          "--prepare-only"]) == 1
    assert "missing.deb | no such file" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_prepare_builds_the_splits_from_a_package(tmp_path):
    """A .deb with the layout of python3.11-doc goes through the real dpkg-deb path."""
    package = tmp_path / "pkg"
    sources = package / lm_corpus.SOURCES
    names = [f"library/m{i}.rst.txt" for i in range(40)] + [lm_corpus.SAMPLE_FILE]
    for name in names:
        (sources / name).parent.mkdir(parents=True, exist_ok=True)
        (sources / name).write_text(f"{name}\n" * 600)
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN" / "control").write_text(
        f"Package: {lm_corpus.PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    deb = tmp_path / "test.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(package), str(deb)], check=True,
                   capture_output=True)

    folder = lm_corpus.prepare(tmp_path / "corpus", deb=deb)
    manifest = json.loads((folder / "manifest.json").read_text())
    heldout = sorted(n for n in names if zlib.crc32(n.encode()) % lm_corpus.HELDOUT_EVERY == 0)
    assert manifest["heldout_files"] == heldout and manifest["version"] == "1.0"
    assert (folder / "heldout.txt").read_text() == "".join(f"{n}\n" * 600 for n in heldout)
    assert len((folder / "train.txt").read_bytes()) + len((folder / "heldout.txt").read_bytes()) == sum(
        len(f"{n}\n") * 600 for n in names)
    sample = (folder / "sample.txt").read_text()
    assert sample.startswith(lm_corpus.SAMPLE_FILE) and sample.endswith("\n") and len(sample) <= lm_corpus.SAMPLE_BYTES
    data = lm_corpus.load(folder)
    assert data["heldout"].dtype == torch.uint8 and len(data["heldout"]) == (folder / "heldout.txt").stat().st_size
