"""`load_checkpoint` / `save_checkpoint`: one entry point for every checkpoint format moexport reads."""
from __future__ import annotations

import os
from pathlib import Path

from moexport.checkpoints.files import read_file
from moexport.checkpoints.layer import is_sigma_moe_state, load_sigma_moe_state
from moexport.checkpoints.native import load_native, save_native
from moexport.checkpoints.paper import is_paper_checkpoint, load_paper
from moexport.core.errors import MoexportError
from moexport.models.base import ConfigModule

FORMATS = ("moexport", "paper", "sigma_moe_state_dict")


def load_checkpoint(path: str | os.PathLike, *, k: int | None = None, selection: str | None = None,
                    activation: str | None = None) -> ConfigModule:
    """Load a model or layer from a checkpoint, in eval mode. Never runs code from the file.

    Reads, recognised by content:
    - moexport's folder (`config.json` + `model.safetensors`, from `save_checkpoint`);
    - the paper's training checkpoints (`model-<iter>.pth`: variants preln_moe, preln_relative,
      preln_kvmem, preln_topk), as a `TransformerLM`;
    - stand-alone σ-MoE layer state dicts (torch.save or .safetensors), as a `SigmaMoE`.

    Args:
        path: The checkpoint folder or file.
        k: Experts per token of a stand-alone σ-MoE state dict (the file does not record it).
        selection: Its selection mode. Defaults to 'sigmoid'.
        activation: Its hidden activation. Defaults to 'relu'.

    Returns:
        The module (a `TransformerLM`, or the layer), on the CPU, in the checkpoint's dtype.

    Raises:
        MoexportError: Missing, truncated or corrupt file; a refused pickle global; an unknown variant;
            a tensor whose shape disagrees with the configuration (named, expected vs found).
    """
    return read_checkpoint(path, k=k, selection=selection, activation=activation)[0]


def read_checkpoint(path: str | os.PathLike, *, k: int | None = None, selection: str | None = None,
                    activation: str | None = None) -> tuple[ConfigModule, str]:
    """`load_checkpoint`, also returning the format that was recognised (one of `FORMATS`)."""
    path = Path(path)
    layer_options = {"k": k, "selection": selection, "activation": activation}
    if path.is_dir():
        _refuse_layer_options(path, layer_options)
        return load_native(path), "moexport"
    content = read_file(path)
    if is_paper_checkpoint(content):
        _refuse_layer_options(path, layer_options)
        return load_paper(content, path), "paper"
    if is_sigma_moe_state(content):
        return load_sigma_moe_state(content, path, **layer_options), "sigma_moe_state_dict"
    found = (", ".join(f"'{key}'" for key in list(content)[:6]) if isinstance(content, dict)
             else type(content).__name__)
    raise MoexportError(path, f"holds no checkpoint moexport knows (found {found})",
                        "expected a moexport folder, a paper training checkpoint (with 'model' and "
                        "'run_invariants') or a σ-MoE layer state dict ('keys', 'values', 'expert_sel')")


def save_checkpoint(model: ConfigModule, path: str | os.PathLike) -> Path:
    """Save a moexport model or layer as a folder with `config.json` and `model.safetensors`.

    `load_checkpoint(path)` gives back the same module with bit-identical tensors. Each file is written
    under a temporary name and renamed, so an interrupted save never leaves a half-written file.

    Returns:
        The folder.
    """
    return save_native(model, Path(path))


def _refuse_layer_options(path: Path, options: dict) -> None:
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise MoexportError(f"{given[0]}={options[given[0]]!r}",
                            f"applies only to σ-MoE layer state dicts; {path} records its own configuration")
