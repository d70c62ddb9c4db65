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


def check_vocab(model: nn.Module, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table (they would index out of range)."""
    rows = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else \
        model.config.vocab_size
    if vocab_size > rows:
        raise ValueError(f"{where}: the tokenizer has {vocab_size} tokens but the model's embedding has {rows} rows; "
                         "use the tokenizer the model was trained with")
