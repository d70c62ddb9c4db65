"""Evaluation on held-out data: task accuracy by greedy decoding (the embedded task, GSM8K-style answers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data.formats import Message, PromptExample
from .data.task import is_correct
from .generation import SamplingConfig, generate
from .tokenizer import Tokenizer


@torch.no_grad()
def generate_responses(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Sequence[Message]],
                       sampling: SamplingConfig, seed: int = 0, batch_size: int = 64) -> list[str]:
    """Decoded responses, one per chat prompt."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode_prompt(p) for p in prompts[i:i + batch_size]]
        rollout = generate(model, ids, sampling, tokenizer.eos_id, tokenizer.pad_id, generator)
        texts += tokenizer.batch_decode(rollout.completions())
    return texts


def task_accuracy(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[PromptExample],
                  max_new_tokens: int = 48, batch_size: int = 64) -> float:
    """Share of prompts whose greedy response states the right final answer."""
    was_training = model.training
    model.eval()
    responses = generate_responses(model, tokenizer, [e.prompt for e in examples],
                                   SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                                   batch_size=batch_size)
    model.train(was_training)
    return sum(is_correct(r, e.answer) for r, e in zip(responses, examples)) / max(1, len(examples))
