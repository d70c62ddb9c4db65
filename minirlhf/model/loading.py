"""Loading a policy from a directory: the native format (config.json + model.safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .minimind import MiniMindLM


def load_policy(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A causal LM from a model directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    return MiniMindLM.from_pretrained(path, device=device)
