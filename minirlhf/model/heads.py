"""A language-model backbone with a scalar head: reward models (read at the last real token) and PPO
critics (read at every token). Saved as the backbone's own model dir (native or Hugging Face format, so a
reward model dir is also a loadable policy) plus `scalar_head.safetensors` and a marker file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .linear import in_float32
from .lora import save_final

MARKER_FILE = "scalar_head.json"
HEAD_FILE = "scalar_head.safetensors"


class ScalarHeadModel(nn.Module):
    """values[b, t] = w . h[b, t] + c, with h the backbone's final-norm hidden states."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True, return_logits=False).hidden
        return in_float32(self.head, hidden).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence, read at its last real token (works for left or right padding)."""
        values = self(input_ids, attention_mask)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return values.gather(1, last[:, None]).squeeze(1)

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()

    def _save_head(self, directory: Path) -> None:
        (directory / MARKER_FILE).write_text('{"head": "scalar"}\n')
        save_model(self.head, str(directory / HEAD_FILE))

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        self._save_head(directory)

    def save_merged(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_final(self.backbone, directory)
        self._save_head(directory)

    def load_weights(self, directory: str | Path) -> None:
        self.backbone.load_weights(directory)
        self.load_head(directory)

    def load_head(self, directory: str | Path) -> None:
        path = Path(directory) / HEAD_FILE
        try:
            load_model(self.head, str(path), device=str(self.head.weight.device))
        except Exception as e:
            raise ValueError(f"{path}: cannot load the scalar head ({e})") from e


def has_scalar_head(directory: str | Path) -> bool:
    return (Path(directory) / MARKER_FILE).is_file()
