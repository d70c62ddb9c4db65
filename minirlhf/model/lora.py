"""LoRA adapters through `peft`, for native and Hugging Face policies alike (Hu et al., 2021).

W x + (alpha / r) B A x on the target linears; only A and B train. With adapters disabled the model is
exactly the base model, so it doubles as the frozen reference policy (`AdaptersDisabled`) without a
second copy in memory. Checkpoints hold only the adapter weights (`adapter_model.safetensors`); the final
model is merged (W + (alpha / r) B A) and saved in the base model's own format.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import field

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    """`lora.r=8 lora.alpha=16` on the command line, or a `lora:` mapping in the YAML section."""

    r: int = field(0, "LoRA rank (0 = off: train all weights)", min=0)
    alpha: float = field(16.0, "scaling numerator: the update is (alpha / r) B A", gt=0)
    dropout: float = field(0.0, "dropout on the adapter input", min=0)
    target_modules: list = field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                 "names of the linear layers that get adapters")


class LoRAModel(nn.Module):
    """A policy (native or HF adapter) with LoRA adapters; same interface as the policy it wraps."""

    def __init__(self, base: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.peft = get_peft_model(base, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                    target_modules=list(cfg.target_modules)))
        self.config = base.config

    @property
    def base(self) -> nn.Module:
        return self.peft.get_base_model()

    def forward(self, *args, **kwargs):
        return self.peft(*args, **kwargs)

    def new_cache(self, batch_size: int, max_len: int):
        return self.base.new_cache(batch_size, max_len)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base.get_input_embeddings()

    def gradient_checkpointing_enable(self) -> None:
        self.base.gradient_checkpointing_enable()

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        with self.peft.disable_adapter():
            yield

    def save_pretrained(self, directory: str | Path) -> None:
        """Adapter weights only (checkpoints)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.peft).items()}
        save_file(state, str(directory / ADAPTER_FILE))

    def save_merged(self, directory: str | Path) -> None:
        """The base model with the adapters folded in, in the base model's format (final results)."""
        copy.deepcopy(self.peft).merge_and_unload().save_pretrained(directory)

    def load_weights(self, directory: str | Path) -> None:
        from peft import set_peft_model_state_dict

        path = Path(directory) / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {ADAPTER_FILE} (not a LoRA checkpoint)")
        result = set_peft_model_state_dict(self.peft, load_file(str(path)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{path}: adapter weights do not match the model ({result.unexpected_keys[:3]})")


def save_final(module: nn.Module, directory: str | Path) -> None:
    """The result a user loads: LoRA merged into the base weights, in the base model's format."""
    getattr(module, "save_merged", module.save_pretrained)(directory)


class AdaptersDisabled(nn.Module):
    """The reference policy of a LoRA run: the same module with its adapters switched off (no copy)."""

    def __init__(self, model: LoRAModel) -> None:
        super().__init__()
        self.model = [model]  # a list, so the policy's parameters are not registered twice

    def forward(self, *args, **kwargs):
        model = self.model[0]
        with model.adapters_disabled(), torch.no_grad():
            return model(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.model[0].parameters(recurse)

    def new_cache(self, batch_size: int, max_len: int):
        return self.model[0].new_cache(batch_size, max_len)
