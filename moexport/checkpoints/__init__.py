"""Loading and saving checkpoints: moexport's folders, the paper's training checkpoints, σ-MoE layer state dicts.

Loading never runs code from a file (see `moexport.checkpoints.files`).
"""
from moexport.checkpoints.describe import describe, describe_table
from moexport.checkpoints.loading import FORMATS, load_checkpoint, read_checkpoint, save_checkpoint

__all__ = ["FORMATS", "describe", "describe_table", "load_checkpoint", "read_checkpoint", "save_checkpoint"]
