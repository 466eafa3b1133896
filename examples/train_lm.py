"""Train small byte-level language models with the paper's four feed-forward variants, parameter-matched.

A small-scale reproduction of the parameter-equal comparison of Csordás, Irie & Schmidhuber (2023):
the same pre-LN Transformer-XL with a dense FFN, a σ-MoE (k/E = 25%), the improved PKM and a Top-K MLP
in the FFN slot, trained with the paper's recipe (AdamW, cosine decay with optional warmup, entropy
regularisation γ summed over the σ-MoE layers, expert dropout δ, σ-MoE init with
weight_std_scale = sqrt(2 / n_layers), bf16 autocast on the GPU, gradient clipping) on the Python
documentation corpus of `lm_corpus.py`. Reports held-out bits per byte, logs a learning curve
(JSON lines) and saves a native moexport checkpoint.

    python examples/train_lm.py --prepare-only                       # build the corpus (apt-get download)
    python examples/train_lm.py --variant sigma_moe --steps 2000     # one model
    python examples/train_lm.py --variant all --time-budget 300 --device cuda --out runs/paper
        # the four variants at once on one GPU, then each alone for tokens/s, then the table and plot
    python examples/train_lm.py --report runs/paper/dense runs/paper/sigma_moe --results out/
        # the table and plot again, from finished runs

Each run writes into ``--out``: ``curve.jsonl``, ``summary.json``, ``checkpoint/`` (config.json +
model.safetensors) and, for ``--variant all``, ``training.{md,json,png}`` with every variant compared.
With ``--time-budget``, runs started together by ``--variant all`` agree after a short timed probe on one
step count that the slowest fits into the budget (never more than ``--steps``), so every variant sees the
same data; the cosine follows whichever of steps and time runs out first, so a run that hits the budget
still ends at a learning rate of 0 (and its schedule then depends on timing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_corpus  # noqa: E402

import moexport  # noqa: E402
import moexport.kernels  # noqa: E402,F401  (registers the Triton σ-MoE path for CUDA inputs; --reference disables it)
from moexport.core import accel  # noqa: E402
from moexport.core.errors import MoexportError  # noqa: E402
from moexport.core.files import write_atomically
from moexport.core.progress import progress  # noqa: E402
from moexport.models import DenseMLP, PKM, SigmaMoE, TopKMLP, TransformerLM, from_preset  # noqa: E402

VARIANTS = ("dense", "sigma_moe", "pkm", "topk")
VOCAB = 256  # bytes
# Shapes on top of the paper's enwik8 preset (its recipe: init scale sqrt(2/n_layers), dropout in the
# dense and Top-K hidden layers, PKM relu with knn 128 and 4 heads). E experts of G units, k active;
# the dense twin has d_ff = E·G, Top-K keeps k/E of d_ff and PKM's n_keys gives it the dense parameters.
SIZES = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, head_dim=16, n_experts=4, expert_size=16, k=1),
    # head_dim 48 (not 256/4) keeps the σ-MoE and dense checkpoints together under 20 MB.
    "small": dict(d_model=256, n_layers=4, n_heads=4, head_dim=48, n_experts=8, expert_size=64, k=2),
}
PKM_HEADS = 4
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moexport" / "corpus"


def pkm_n_keys(d_ff: int, heads: int) -> int:
    """The n_keys whose PKM (values n_keys²·d, keys heads·n_keys·d) has the weights of a d_ff MLP (2·d·d_ff)."""
    return round((-heads + math.sqrt(heads * heads + 8 * d_ff)) / 2)


def build_model(variant: str, size_name: str, *, dropout: float, expert_dropout: float) -> TransformerLM:
    """The `size_name` byte-level LM with the `variant` FFN, parameter-matched to the others."""
    size = SIZES[size_name]
    d_ff = size["n_experts"] * size["expert_size"]
    ffn = {
        "dense": dict(d_ff=d_ff),
        "topk": dict(d_ff=d_ff, k=d_ff * size["k"] // size["n_experts"]),
        "pkm": dict(n_keys=pkm_n_keys(d_ff, PKM_HEADS), heads=PKM_HEADS),
        "sigma_moe": dict(n_experts=size["n_experts"], expert_size=size["expert_size"], k=size["k"],
                          expert_dropout=expert_dropout),
    }[variant]
    return from_preset("enwik8", variant, vocab_size=VOCAB, d_model=size["d_model"], n_layers=size["n_layers"],
                       n_heads=size["n_heads"], head_dim=size["head_dim"], dropout=dropout, **ffn)


def ffn_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (DenseMLP, SigmaMoE, PKM, TopKMLP))]


def ffn_flops(model: torch.nn.Module) -> dict[str, int]:
    """FF FLOPs per token summed over the layers: active, and the parameter-equal dense FFN's."""
    total = {"active": 0, "dense": 0}
    for layer in ffn_layers(model):
        for key, value in layer.ffn_flops_per_token().items():
            total[key] = total.get(key, 0) + value
    return total


def lr_factor(step: int, progress_fraction: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 over the run's progress (0..1)."""
    return min(1.0, (step + 1) / warmup if warmup else 1.0) * 0.5 * (1 + math.cos(math.pi * min(progress_fraction, 1.0)))


class Streams:
    """`batch` cursors spread over `data`, each reading it on in segments of `context` bytes (wrapping).

    Consecutive segments of a row are contiguous text, so the model can carry the previous segment as
    Transformer-XL memory, as the paper trains (truncated back-propagation through time).
    """

    def __init__(self, data: torch.Tensor, batch: int, context: int, seed: int):
        if len(data) < 2 * (context + 1):
            raise MoexportError(f"training text of {len(data)} bytes", f"is too short for --context {context}")
        self.data, self.context, self.usable = data, context, len(data) - context - 1
        shift = torch.randint(0, self.usable, (1,), generator=torch.Generator().manual_seed(seed))
        self.cursor = (torch.arange(batch) * (self.usable // batch) + shift) % self.usable

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next segment of every row: inputs [batch, context] and next-byte targets."""
        windows = self.data[self.cursor[:, None] + torch.arange(self.context + 1)].long().to(device)
        self.cursor = (self.cursor + self.context) % self.usable
        return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def heldout_bpb(model: TransformerLM, data: torch.Tensor, *, context: int, batch: int, device: torch.device,
                amp: bool, limit: int | None = None) -> float:
    """Bits per byte on `data` (its first `limit` bytes).

    The text is cut into `batch` contiguous rows, read in segments of `context` bytes, each segment
    with the previous one as memory; every byte but the first of a row is scored once.
    """
    data = data[:limit] if limit else data
    length = (len(data) - 1) // batch
    if length < 1:
        raise MoexportError(f"held-out text of {len(data)} bytes", f"is too short for --batch {batch}")
    rows = torch.arange(batch)[:, None] * length
    was_training = model.training
    model.eval()
    total_nats, memory = 0.0, None
    for start in range(0, length, context):
        positions = rows + torch.arange(start, min(start + context, length) + 1)
        windows = data[positions].long().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, memory = model(windows[:, :-1], memory, return_memory=True, memory_length=context)
        total_nats += F.cross_entropy(logits.float().reshape(-1, VOCAB), windows[:, 1:].reshape(-1),
                                      reduction="sum").item()
    model.train(was_training)
    return total_nats / (batch * length) / math.log(2)


def agree_on_steps(match_dir: Path, count: int, name: str, feasible: int, timeout: float = 120.0) -> int:
    """Runs started together share their feasible step counts through files; all take the smallest.

    The parent writes ``<run>.failed`` for a run that died, so nobody waits for it.
    """
    # whole or absent: the other runs poll the folder
    write_atomically(match_dir / f"{name}.steps", lambda tmp: tmp.write_text(str(feasible)))
    deadline = time.monotonic() + timeout
    while len([*match_dir.glob("*.steps"), *match_dir.glob("*.failed")]) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return min(int(p.read_text()) for p in match_dir.glob("*.steps"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoexportError(f"--device {name}", "CUDA is not available on this machine", "use --device cpu")
    return torch.device(name)


def sigma_moe_path(model: TransformerLM, device: torch.device) -> str:
    """Which implementation the σ-MoE layers run: the registered kernels or the PyTorch reference."""
    layers = [m for m in model.modules() if isinstance(m, SigmaMoE)]
    if not layers:
        return "n/a"
    probe = torch.zeros(1, layers[0].d_model, device=device)
    return "reference" if accel.lookup("sigma_moe", probe) is None else "kernels"


def train_step(model: TransformerLM, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               memory: list[torch.Tensor] | None, *, args: argparse.Namespace, amp: bool):
    """One AdamW step on CE + γ·Σ(σ-MoE entropy regularisers) of a segment continuing `memory`.

    Returns:
        (CE in nats, Σ regularisers, the memory for the next segment), the first two detached.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits, memory = model(x, memory, return_memory=True, memory_length=x.shape[1])
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
    moe_layers = [m for m in model.modules() if isinstance(m, SigmaMoE)]
    reg = sum((m.entropy_regularizer() for m in moe_layers), torch.zeros((), device=x.device))
    optimizer.zero_grad(set_to_none=True)
    (loss + args.gamma * reg).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    return loss.detach(), reg.detach(), memory


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def train(args: argparse.Namespace) -> dict:
    """Train one variant; write curve.jsonl, summary.json and checkpoint/ into args.out."""
    device = resolve_device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    data = lm_corpus.load(lm_corpus.prepare(args.data_dir, deb=args.deb))
    model = build_model(args.variant, args.size, dropout=args.dropout, expert_dropout=args.expert_dropout).to(device)
    optimizer = make_optimizer(model, args.lr)
    streams, memory = Streams(data["train"], args.batch, args.context, args.seed), None
    tokens_per_step = args.batch * args.context
    steps, budget = args.steps, args.time_budget or math.inf
    curve = (out / "curve.jsonl").open("w")
    loss_sum, reg_sum, logged_steps, train_time, eval_time = 0.0, 0.0, 0, 0.0, 0.0
    start = time.monotonic()
    step = 0
    with progress(f"training {args.variant}", total=None if args.match_steps else steps) as advance:
        while step < steps and time.monotonic() - start < budget:
            tick = time.monotonic()
            fraction = max(step / steps, (tick - start) / budget)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor(step, fraction, args.warmup)
            loss, reg, memory = train_step(model, optimizer, *streams.next(device), memory, args=args, amp=amp)
            step += 1
            loss_sum, reg_sum = loss_sum + loss, reg_sum + reg  # on the device: no sync per step
            logged_steps += 1
            probe_point = args.match_steps and step in (args.probe_steps // 3, args.probe_steps)
            if probe_point:
                sync(device)  # the first third of the probe warms up; the rest is timed
            train_time += time.monotonic() - tick
            if probe_point and step < args.probe_steps:
                probe_start = train_time
            elif probe_point:
                rate = (step - args.probe_steps // 3) / (train_time - probe_start)
                left = budget * (1 - args.eval_reserve) - (time.monotonic() - start)
                steps = agree_on_steps(Path(args.match_steps), args.match_count, out.name,
                                       max(min(step + int(rate * left), steps), step))
            if step % args.log_every == 0 or step == steps:
                record = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": round(time.monotonic() - start, 2),
                          "lr": optimizer.param_groups[0]["lr"],
                          "train_bpb": float(loss_sum) / logged_steps / math.log(2),
                          "entropy_reg": float(reg_sum) / logged_steps}
                if step % args.eval_every == 0 or step == steps:
                    tick = time.monotonic()
                    record["heldout_bpb"] = heldout_bpb(model, data["heldout"], context=args.context,
                                                        batch=args.batch, device=device, amp=amp, limit=args.eval_bytes)
                    eval_time += time.monotonic() - tick
                curve.write(json.dumps(record) + "\n")
                curve.flush()
                loss_sum, reg_sum, logged_steps = 0.0, 0.0, 0
                advance(args.log_every, description=f"training {args.variant}: step {step}/{steps} "
                                                    f"train {record['train_bpb']:.3f} bpb")
    curve.close()
    counts = {"steps": step, "planned_steps": steps, "tokens": step * tokens_per_step,
              "stopped_by": "steps" if step >= steps else "time budget", "train_s": round(train_time, 1),
              "eval_s": round(eval_time, 1), "tokens_per_s": round(step * tokens_per_step / train_time) if train_time else None}
    final_bpb = heldout_bpb(model, data["heldout"], context=args.context, batch=args.batch, device=device, amp=amp)
    summary = summarize(model, args, device, amp=amp, counts=counts, final_bpb=final_bpb,
                        heldout_bytes=len(data["heldout"]))
    moexport.save_checkpoint(model.eval().cpu(), out / "checkpoint")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(model: TransformerLM, args: argparse.Namespace, device: torch.device, *, amp: bool, counts: dict,
              final_bpb: float, heldout_bytes: int) -> dict:
    """The run's summary.json: model size and FF FLOPs, where and how it trained, its counts and result."""
    flops = ffn_flops(model)
    return {
        "variant": args.variant, "size": args.size, "seed": args.seed, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "amp_bf16": amp, "sigma_moe_path": sigma_moe_path(model, device),
        "params": sum(p.numel() for p in model.parameters()),
        "ffn_params": sum(p.numel() for layer in ffn_layers(model) for p in layer.parameters()),
        "ffn_flops_per_token": flops["active"], "ffn_flops_dense_equal": flops["dense"],
        **counts, "final_heldout_bpb": final_bpb, "heldout_bytes": heldout_bytes,
        "hyper": {key: getattr(args, key) for key in ("batch", "context", "lr", "warmup", "gamma", "expert_dropout",
                                                       "dropout", "grad_clip", "time_budget")},
    }


def measure_throughput(checkpoint: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """Tokens/s of a trained model alone on the device: training steps, and inference forwards of
    segments with memory, both at the training batch and context."""
    model = moexport.load_checkpoint(checkpoint).to(device)
    amp = device.type == "cuda" and not args.no_amp
    windows = torch.randint(0, VOCAB, (args.batch, args.context + 1), device=device)
    x, y = windows[:, :-1], windows[:, 1:]
    optimizer = make_optimizer(model, lr=0.0)
    memory = {"train": None, "infer": None}

    def train_once() -> None:
        memory["train"] = train_step(model.train(), optimizer, x, y, memory["train"], args=args, amp=amp)[2]

    @torch.no_grad()
    def infer_once() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            memory["infer"] = model.eval()(x, memory["infer"], return_memory=True, memory_length=args.context)[1]

    def tokens_per_s(fn) -> int:
        for _ in range(3):  # warm-up; also fills the memory to its steady length
            fn()
        sync(device)
        tick = time.perf_counter()
        for _ in range(args.bench_steps):
            fn()
        sync(device)
        return round(args.bench_steps * x.numel() / (time.perf_counter() - tick))

    return {"train_tokens_per_s_alone": tokens_per_s(train_once), "infer_tokens_per_s_alone": tokens_per_s(infer_once)}


def plot_curves(rows: list[dict], path: Path, run_dirs: dict[str, Path]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_held, ax_train) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for row in rows:
        curve = [json.loads(line) for line in (run_dirs[row["run"]] / "curve.jsonl").read_text().splitlines()]
        label = f"{row['run']} ({row['heldout_bpb']:.3f} bpb)"
        held = [r for r in curve if "heldout_bpb" in r]
        ax_held.plot([r["tokens"] / 1e6 for r in held], [r["heldout_bpb"] for r in held], marker=".", label=label)
        ax_train.plot([r["tokens"] / 1e6 for r in curve], [r["train_bpb"] for r in curve], label=row["run"])
    ax_held.set(title="held-out (subset during training; final on all)", xlabel="training bytes (M)",
                ylabel="bits per byte")
    ax_train.set(title="training (mean over the log interval)", xlabel="training bytes (M)")
    for ax in (ax_held, ax_train):
        ax.grid(alpha=0.3)
        ax.legend()
    # The first steps sit near 8 bits; show the range where the variants differ.
    values = [y for ax in (ax_held, ax_train) for line in ax.get_lines() for y in line.get_ydata()]
    ax_held.set_ylim(min(values) - 0.05, min(max(values), min(values) + 1.5) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMN_NOTES = """Columns: `params` all weights; `ffn_params` the FFN weights of all layers; `ffn_MFLOPs_per_token`
the FFN's multiply-adds ×2 per token over all layers (each module's `ffn_flops_per_token()`, σ-MoE's router
included), `ffn_flops_vs_dense` that over the parameter-equal dense FFN; `heldout_bpb` bits per byte on the
whole held-out split after training (segments with memory, bf16 autocast on the GPU); `tokens_M` training
bytes seen; `*_tokens_per_s_alone` one model alone on the device at the training batch and context
(training step with AdamW; inference forward with memory); `tokens_per_s` training speed while the runs
shared the device; `sigma_moe_path` which σ-MoE implementation ran (registered kernels or the reference).
"""


def report(run_dirs: dict[str, Path], results_dir: Path, *, notes: str = "") -> dict:
    """Write training.{md,json,png} comparing finished runs (their summary.json and curve.jsonl)."""
    from moexport.bench import write_results

    rows = []
    for name, run_dir in run_dirs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"run": name, **summary, "heldout_bpb": summary["final_heldout_bpb"],
                     "params_M": summary["params"] / 1e6, "tokens_M": summary["tokens"] / 1e6,
                     "ffn_MFLOPs_per_token": summary["ffn_flops_per_token"] / 1e6,
                     "ffn_flops_vs_dense": summary["ffn_flops_per_token"] / summary["ffn_flops_dense_equal"]})
    first = rows[0]
    environment = {"device": first["device_name"], "size": first["size"],
                   **{key: first[key] for key in ("python", "torch", "date")},
                   **{key: first["hyper"][key] for key in ("batch", "context", "lr", "warmup", "gamma", "expert_dropout",
                                                           "dropout", "grad_clip")}}
    columns = ["run", "params", "ffn_params", "ffn_MFLOPs_per_token", "ffn_flops_vs_dense", "heldout_bpb",
               "steps", "tokens_M", "train_tokens_per_s_alone", "infer_tokens_per_s_alone", "tokens_per_s",
               "sigma_moe_path"]
    return write_results("training", rows, columns=columns, out_dir=results_dir, environment=environment,
                         title="Byte-level LMs, four parameter-matched FFN variants", notes=COLUMN_NOTES + notes,
                         plot=lambda rows, path: plot_curves(rows, path, run_dirs))


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    """Train the variants as concurrent processes on one device, then measure them alone and report.

    With --compare-reference a fifth run trains σ-MoE on the PyTorch reference beside the one on the
    registered kernels: the same seed and data, so its curve checks the kernels' training path.
    """
    out = Path(args.out)
    match_dir = out / "match"
    match_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*match_dir.glob("*.steps"), *match_dir.glob("*.failed")]:
        stale.unlink()
    lm_corpus.prepare(args.data_dir, deb=args.deb)  # once, before the runs read it
    # argparse keeps the last value of a repeated option, so these override the caller's.
    runs = {variant: [*argv, "--variant", variant] for variant in VARIANTS}
    if args.compare_reference:
        runs["sigma_moe_reference"] = [*argv, "--variant", "sigma_moe", "--reference"]
    processes = {}
    for name, run_argv in runs.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, *run_argv, "--out", str(out / name)]
        if args.time_budget:
            command += ["--match-steps", str(match_dir), "--match-count", str(len(runs))]
        with (out / name / "log.txt").open("w") as log:
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    failed = []
    while len(failed) < len(processes) and any(p.poll() is None for p in processes.values()):
        for name, process in processes.items():
            if process.poll() not in (None, 0) and name not in failed:
                failed.append(name)
                (match_dir / f"{name}.failed").touch()
        time.sleep(0.5)
    failed += [name for name, p in processes.items() if p.wait() != 0 and name not in failed]
    for name in failed:
        tail = "\n".join((out / name / "log.txt").read_text().splitlines()[-15:])
        print(f"FAILED | {name} | see {out / name / 'log.txt'}:\n{tail}", file=sys.stderr)
    run_dirs = {name: out / name for name in runs if name not in failed}
    device = resolve_device(args.device)
    for name, run_dir in run_dirs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        with accel.disabled("sigma_moe") if name.endswith("_reference") else contextlib.nullcontext():
            summary.update(measure_throughput(run_dir / "checkpoint", args, device))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if run_dirs:
        print(report(run_dirs, Path(args.results or out))["md"].read_text())
    return 1 if failed else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variant", choices=(*VARIANTS, "all"), default="sigma_moe",
                        help="FFN of the model; 'all' trains the four at once and writes the comparison")
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (length of the cosine decay)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training; the cosine follows whichever of steps and time runs out first")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=256, help="bytes per training window")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    parser.add_argument("--gamma", type=float, default=1e-4, help="entropy regularisation γ (paper, enwik8: 1e-4)")
    parser.add_argument("--expert-dropout", type=float, default=0.05, help="σ-MoE expert dropout δ (paper, enwik8)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto picks cuda when present")
    parser.add_argument("--no-amp", action="store_true", help="train in float32 on the GPU too (no bf16 autocast)")
    parser.add_argument("--reference", action="store_true",
                        help="run σ-MoE through the PyTorch reference even where kernels are registered")
    parser.add_argument("--compare-reference", action="store_true",
                        help="with --variant all: also train σ-MoE on the PyTorch reference, to check the kernels")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the prepared corpus")
    parser.add_argument("--deb", type=Path, default=None, help=f"a downloaded {lm_corpus.PACKAGE} .deb")
    parser.add_argument("--prepare-only", action="store_true", help="build the corpus and stop")
    parser.add_argument("--out", type=Path, default=None, help="output folder; defaults to runs/<variant>")
    parser.add_argument("--results", type=Path, default=None,
                        help="with --variant all: where training.{md,json,png} go; defaults to --out")
    parser.add_argument("--report", nargs="+", type=Path, default=None, metavar="RUN_DIR",
                        help="only write training.{md,json,png} (into --results) from finished run folders")
    parser.add_argument("--notes", type=Path, default=None, help="with --report: markdown put under the table")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-bytes", type=int, default=131072, help="held-out bytes scored during training")
    parser.add_argument("--eval-reserve", type=float, default=0.1,
                        help="share of the time budget kept for evaluation when runs agree on steps")
    parser.add_argument("--probe-steps", type=int, default=60, help="steps timed before runs agree on steps")
    parser.add_argument("--bench-steps", type=int, default=20, help="timed steps of the alone-throughput check")
    parser.add_argument("--match-steps", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--match-count", type=int, default=len(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs") / args.variant
    for name in ("steps", "batch", "context", "log_every", "eval_every", "probe_steps", "bench_steps"):
        if getattr(args, name) < 1:
            raise MoexportError(f"--{name.replace('_', '-')} {getattr(args, name)}", "must be at least 1")
    if args.eval_every % args.log_every:
        raise MoexportError(f"--eval-every {args.eval_every}", f"must be a multiple of --log-every {args.log_every}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.report:
            paths = report({Path(d).name: Path(d) for d in args.report}, Path(args.results or args.out),
                           notes=args.notes.read_text() if args.notes else "")
            print(paths["md"].read_text())
            return 0
        if args.prepare_only:
            print(lm_corpus.prepare(args.data_dir, deb=args.deb))
            return 0
        with accel.disabled("sigma_moe") if args.reference else contextlib.nullcontext():
            if args.variant == "all":
                return run_all(args, argv)
            summary = train(args)
        print(json.dumps({k: v for k, v in summary.items() if k != "hyper"}))
        return 0
    except MoexportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
