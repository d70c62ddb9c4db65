"""A language-model backbone with a scalar head: reward models (read at the last real token) and PPO
critics (read at every token). Saved like a policy (config.json + model.safetensors) plus a marker file,
so `load_scalar_model` can tell it apart and the training loop can checkpoint it the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .config import ModelConfig
from .minimind import CONFIG_FILE, WEIGHTS_FILE, MiniMindLM

MARKER_FILE = "scalar_head.json"


class ScalarHeadModel(nn.Module):
    """values[b, t] = w . h[b, t] + c, with h the backbone's final-norm hidden states."""

    def __init__(self, backbone: MiniMindLM) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True, return_logits=False).hidden
        return self.head(hidden).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per sequence, read at its last real token (works for left or right padding)."""
        values = self(input_ids, attention_mask)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return values.gather(1, last[:, None]).squeeze(1)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE)
        (directory / MARKER_FILE).write_text('{"head": "scalar"}\n')
        save_model(self, str(directory / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ScalarHeadModel:
        """Load a saved scalar model, or start one from a policy dir (backbone weights, fresh head)."""
        directory = Path(directory)
        if not (directory / MARKER_FILE).is_file():
            return cls(MiniMindLM.from_pretrained(directory, device)).to(device)
        model = cls(MiniMindLM(ModelConfig.load(directory / CONFIG_FILE)))
        try:
            load_model(model, str(directory / WEIGHTS_FILE), device=str(device))
        except Exception as e:
            raise ValueError(f"{directory / WEIGHTS_FILE}: cannot load weights ({e})") from e
        return model.to(device)
