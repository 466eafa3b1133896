"""Writes checkpoints exactly as the paper's training code does (paper_code.md, appendix).

The training state is pickled as a real `framework.data_structures.dotdict.DotDict` (the class is
registered under that module name only while saving, so loading cannot import it); the file is written
as `save_tmp` and renamed, so the archive's inner folder is `save_tmp/`, as the paper's Saver leaves it.
"""
from __future__ import annotations

import os
import re
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

from moexport.models import TransformerLM

VARIANT_OF = {"sigma_moe": "preln_moe", "dense": "preln_relative", "topk": "preln_topk", "pkm": "preln_kvmem"}


class DotDict(dict):
    """The paper's class (framework/data_structures/dotdict.py)."""

    def __getattr__(self, item):
        if item not in self:
            raise AttributeError
        return self.get(item)

    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__


DotDict.__module__ = "framework.data_structures.dotdict"


@contextmanager
def paper_framework_importable():
    names = ["framework", "framework.data_structures", "framework.data_structures.dotdict"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["framework.data_structures.dotdict"].DotDict = DotDict
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in names:
            del sys.modules[name]


def paper_state_dict(model: TransformerLM) -> "OrderedDict[str, torch.Tensor]":
    """The model's tensors under the paper's names, with the MoE's persistent logging buffers."""
    state = OrderedDict()
    for name, tensor in model.state_dict().items():
        match = re.match(r"(layers\.\d+\.)ffn\.(.*)", name)
        if match:
            ffn = model.layers[int(name.split(".")[1])].ffn
            name = match.group(1) + ("pkm." if ffn.kind in ("sigma_moe", "pkm") else "") + match.group(2)
        state[name] = tensor.clone()
        if name.endswith("pkm.expert_sel"):
            state[name.replace("expert_sel", "kv_sel_counts_100")] = torch.zeros(tensor.shape[0], 8)
    return state


def paper_args(model: TransformerLM, **overrides) -> dict:
    """run_invariants['args'] as the paper's ArgumentParser.to_dict() leaves them: raw strings included."""
    config, ffn = model.config(), model.layers[0].ffn.config()
    args = {
        "name": "test", "task": "wikitext103_sp_transformer", "profile": None, "seed": "1234", "grad_clip": "0.25",
        "test_batch_size": "None", "adam.betas": "0.9,0.999", "lr": 0.003, "stop_after": "30", "amp": 0,
        "state_size": config["d_model"], "transformer.n_heads": config["n_heads"],
        "transformer.encoder_n_layers": config["n_layers"], "transformer.variant": VARIANT_OF[ffn["kind"]],
        "transformer.head_projection_size": str(config["head_dim"]), "transformer.ff_multiplier": 4.0,
        "transformer.activation": ffn.get("activation", "relu"), "dropout": config["dropout"],
        "embedding_size": "none", "tied_embedding": 0, "transformer.ln_affine": 1,
        "transformer.output_mode": "normal",
        "lm.trafo.context_blocks": 1, "lm.trafo.test_context_blocks": "none", "lm.trafo.same_length_eval": 0,
        "lm.trafo.test_pos_clamp": "none", "kvmem.standard_parallel": 0, "kvmem.linproj": 0,
        "kvmem.dropout": "none",
        "moe.selection_mode": "sigmoid", "moe.activation_after_topk": 0, "moe.bias": 0, "moe.sel_bias": 0,
        "moe.n_experts": ffn.get("n_experts", 128), "moe.expert_size": ffn.get("expert_size", 128),
        "moe.drop_expert": 0.0, "moe.init_scale": 1.0, "pkm.n_heads": ffn.get("k", ffn.get("heads", 1)),
        "pkm.n_keys": str(ffn.get("n_keys", 128)), "pkm.knn": ffn.get("knn", 0), "pkm.custom_init": 5,
        "transformer.topk_value": ffn.get("k", 32), "transformer.topk_use_norm": int(ffn.get("use_norm", True)),
    }
    args.update(overrides)
    return args


def write_paper_checkpoint(folder: Path, model: TransformerLM, *, args: dict | None = None,
                           state: dict | None = None) -> Path:
    """Save `model` as the paper's Saver does, to folder/model-30.pth; returns the path."""
    state = paper_state_dict(model) if state is None else state
    params = [torch.nn.Parameter(t.clone()) for n, t in state.items() if not n.endswith("kv_sel_counts_100")]
    optimizer = torch.optim.AdamW(params, lr=0.003, betas=(0.9, 0.999), weight_decay=0.0)
    for name, p in zip([n for n in state if not n.endswith("kv_sel_counts_100")], params):
        if not name.endswith("s_bias"):  # s_bias never gets a gradient in the paper's model
            p.grad = torch.randn_like(p)
    optimizer.step()
    content = {
        "state": DotDict({"iter": 30, "best_losses": {}, "best_accuracies": {}, "epoch": 0}),
        "run_invariants": {"args": paper_args(model) if args is None else args, "wandb_id": {}},
        "sampler": {"pos": 36},
        "interface": {},
        "optimizer": optimizer.state_dict(),
        "scaler": {},
        "model": state,
    }
    tmp, final = folder / "save_tmp", folder / "model-30.pth"
    with paper_framework_importable():
        torch.save(content, tmp)
    os.replace(tmp, final)
    return final
