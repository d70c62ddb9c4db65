"""Loading models from directories: the native format (config.json + model.safetensors), any Hugging Face
causal LM (config.json with a `model_type`), optionally with LoRA adapters, or with a scalar head.

Every module the training loop handles has the same interface: `forward(...) -> ModelOutput`,
`new_cache`, `save_pretrained(dir)`, `load_weights(dir)` (in place, for resume), and, for LoRA,
`save_merged(dir)` (what `save_final` writes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .heads import ScalarHeadModel, has_scalar_head
from .hf import HFCausalLM, is_hf_model_dir
from .lora import AdaptersDisabled, LoRAConfig, LoRAModel
from .minimind import MiniMindLM


def load_policy(path: str | Path, device: torch.device | str = "cpu", lora: LoRAConfig | None = None,
                gradient_checkpointing: bool = False) -> nn.Module:
    """A causal LM from a model directory (native or Hugging Face), with LoRA adapters if `lora.r` > 0."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    model = HFCausalLM.from_pretrained(path, device) if is_hf_model_dir(path) else \
        MiniMindLM.from_pretrained(path, device=device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora is not None and lora.r > 0:
        model = LoRAModel(model, lora)
    return model


def load_scalar_model(path: str | Path, device: torch.device | str = "cpu", lora: LoRAConfig | None = None,
                      gradient_checkpointing: bool = False) -> ScalarHeadModel:
    """A saved reward model / critic, or a fresh scalar head on a policy dir."""
    model = ScalarHeadModel(load_policy(path, device, lora, gradient_checkpointing)).to(device)
    if has_scalar_head(path):
        model.load_head(path)
    return model


def frozen_reference(policy: nn.Module, ref_path: str, model_path: str, device: torch.device | str) -> nn.Module:
    """The reference policy of a KL term or of DPO: `ref_path` if given, else the starting policy, which for a
    LoRA run is the policy itself with its adapters switched off (no second copy)."""
    if isinstance(policy, LoRAModel) and not ref_path:
        return AdaptersDisabled(policy)
    return load_policy(ref_path or model_path, device).eval().requires_grad_(False)


@torch.no_grad()
def mix_into_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's reference update π_ref ← α·π_θ + (1 - α)·π_ref, parameter by parameter (Gorbatovski et al., 2024,
    "Learn Your Reference Model for Real Good Alignment"); α = 1 copies the policy. `policy` may be DDP-wrapped."""
    source = dict(getattr(policy, "module", policy).named_parameters())
    for name, param in reference.named_parameters():
        param.lerp_(source[name].detach().to(param.dtype), alpha)


def check_vocab(model: nn.Module, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table (they would index out of range)."""
    rows = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else \
        model.config.vocab_size
    if vocab_size > rows:
        raise ValueError(f"{where}: the tokenizer has {vocab_size} tokens but the model's embedding has {rows} rows; "
                         "use the tokenizer the model was trained with")
