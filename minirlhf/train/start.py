"""The start-up every training stage shares: seed, device, tokenizer and starting model, checked to fit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model import check_vocab, load_policy, load_scalar_model
from ..tokenizer import Tokenizer
from .loop import resolve_device, seed_everything


def load_start(cfg: Any, scalar_head: bool = False) -> tuple[Tokenizer, nn.Module, torch.device]:
    """(tokenizer, model, device) for a stage starting from `cfg.model`: seeds everything with `cfg.seed`, resolves
    `cfg.device` (joining the process group under torchrun), loads `cfg.tokenizer` (default: the one saved with the
    model) and the model — a policy, or with `scalar_head` a reward/value model on the policy's backbone — with
    `cfg.lora` and `cfg.gradient_checkpointing`, and refuses a tokenizer that does not fit its embedding."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.model)
    if scalar_head:
        model = load_scalar_model(cfg.model, device, cfg.lora, cfg.gradient_checkpointing)
        check_vocab(model.backbone, tokenizer.vocab_size, cfg.model)
    else:
        model = load_policy(cfg.model, device, cfg.lora, cfg.gradient_checkpointing)
        check_vocab(model, tokenizer.vocab_size, cfg.model)
    return tokenizer, model, device
