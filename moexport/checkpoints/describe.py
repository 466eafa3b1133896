"""What a checkpoint holds: configuration, parameter count, per-layer FFN kind and FF FLOPs per token."""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn
from rich.console import Group
from rich.table import Table
from rich.text import Text

from moexport.checkpoints.loading import read_checkpoint
from moexport.core.errors import MoexportError, some_names
from moexport.models.base import ConfigModule, nonfinite_tensors

_SUMMARIES = {
    "sigma_moe": lambda c: f"{c['n_experts']} experts × {c['expert_size']}, k={c['k']}, {c['selection']}",
    "pkm": lambda c: f"{c['n_keys']}² values, {c['heads']} heads, knn={c['knn']}, {c['activation']}",
    "dense": lambda c: f"d_ff={c['d_ff']}, {c['activation']}",
    "topk": lambda c: f"d_ff={c['d_ff']}, k={c['k']}{', ranked by norm' if c['use_norm'] else ''}",
}


def describe(model_or_path: nn.Module | str | os.PathLike, **layer_options: Any) -> dict[str, Any]:
    """Describe a model, or the checkpoint at a path, as plain data.

    Args:
        model_or_path: A moexport module, or a checkpoint path (anything `load_checkpoint` reads).
        **layer_options: k, selection, activation of a stand-alone σ-MoE state dict.

    Returns:
        {"source", "format", "kind", "config", "parameters", "dtype", "layers": [{"layer", "ffn",
        "summary", "parameters", "active", "dense"}], "ffn_flops_per_token": {"active", "dense",
        "active_fraction"}, "nonfinite": [names of tensors holding NaN or Inf]}; FLOPs are 2 ×
        multiply-accumulates per token, "dense" those of the parameter-equal dense FFN.
    """
    if isinstance(model_or_path, nn.Module):
        model, source, fmt = model_or_path, None, None
    else:
        (model, fmt), source = read_checkpoint(model_or_path, **layer_options), str(model_or_path)
    if not isinstance(model, ConfigModule):
        raise MoexportError(f"model of type {type(model).__name__}", "is not a moexport module")
    ffns = [layer.ffn for layer in model.layers] if hasattr(model, "layers") else [model]
    layers = [{"layer": index, "ffn": ffn.kind, "summary": _SUMMARIES[ffn.kind](ffn.config()),
               "parameters": _count(ffn), **ffn.ffn_flops_per_token()} for index, ffn in enumerate(ffns)]
    active, dense = sum(row["active"] for row in layers), sum(row["dense"] for row in layers)
    first = next(model.parameters())
    return {"source": source, "format": fmt, "kind": model.kind, "config": model.config(),
            "parameters": _count(model), "dtype": str(first.dtype).removeprefix("torch."), "layers": layers,
            "ffn_flops_per_token": {"active": active, "dense": dense, "active_fraction": active / dense},
            "nonfinite": nonfinite_tensors(model)}


def describe_table(info: dict[str, Any]) -> Group:
    """A rich rendering of `describe`'s data: a summary table and a per-layer FFN table."""
    summary = Table(show_header=False, title=info["source"] or info["kind"], title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    for key in ("format", "kind", "dtype"):
        if info[key]:
            summary.add_row(key, str(info[key]))
    summary.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)")
    for key, value in info["config"].items():
        if key not in ("kind", "ffn"):
            summary.add_row(key, str(value))
    flops = info["ffn_flops_per_token"]
    summary.add_row("FF FLOPs/token", f"{_mega(flops['active'])} active vs {_mega(flops['dense'])} dense "
                                      f"({100 * flops['active_fraction']:.1f}%)")
    if info["nonfinite"]:  # export and validate refuse such a checkpoint
        summary.add_row(Text("NaN / Inf in", style="red"), some_names(info["nonfinite"]))
    layers = Table(title="feed-forward layers (FLOPs per token)", title_justify="left")
    for column in ("layer", "FFN", "configuration", "parameters", "active", "dense", "active %"):
        layers.add_column(column, justify="left" if column in ("FFN", "configuration") else "right")
    for first, last, row in _runs(info["layers"]):
        layers.add_row(str(first) if first == last else f"{first}–{last}", row["ffn"], row["summary"],
                       f"{row['parameters']:,}", _mega(row["active"]), _mega(row["dense"]),
                       f"{100 * row['active'] / row['dense']:.1f}")
    return Group(summary, layers)


def _runs(rows: list[dict[str, Any]]):
    """Consecutive identical layers as (first index, last index, row)."""
    start = 0
    for index in range(1, len(rows) + 1):
        if index == len(rows) or {**rows[index], "layer": 0} != {**rows[start], "layer": 0}:
            yield start, index - 1, rows[start]
            start = index


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _mega(flops: int) -> str:
    return f"{flops / 1e6:.2f}M"
