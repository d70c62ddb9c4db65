"""Evaluation on held-out data: task accuracy by greedy and sampled decoding (embedded task, GSM8K-style
answers) with standard errors, and reward-model pair accuracy. (DPO's implicit-reward accuracy lives in
algorithms/dpo.py, a judge's agreement with the rubric in rewards/judge.py.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data.formats import PromptExample
from .data.pairs import collate_pairs
from .data.task import STYLES, is_correct, response_style
from .generation import SamplingConfig, generate_responses
from .tokenizer import Tokenizer


def standard_error(p: float, n: int) -> float:
    """Standard error of a share p measured on n independent problems: sqrt(p (1 - p) / n)."""
    return (p * (1 - p) / max(1, n)) ** 0.5


def task_metrics(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[PromptExample],
                 max_new_tokens: int = 48, sampled: bool = True, batch_size: int = 256, seed: int = 0
                 ) -> dict[str, float]:
    """Held-out task metrics of a policy:
    accuracy (± accuracy_se)        share of prompts whose greedy response states the right final answer
    sampled_accuracy (± sampled_se) the same for one response sampled at T = 1 (pass@1), if `sampled`
    style/<s>                       share of greedy responses in each rubric style (data.task.STYLES)"""
    was_training = model.training
    model.eval()
    prompts, n = [e.prompt for e in examples], max(1, len(examples))
    greedy = generate_responses(model, tokenizer, prompts, SamplingConfig(max_new_tokens, temperature=0.0),
                                batch_size=batch_size)
    accuracy = sum(is_correct(r, e.answer) for r, e in zip(greedy, examples)) / n
    metrics = {"accuracy": accuracy, "accuracy_se": standard_error(accuracy, n)}
    styles = [response_style(r) for r in greedy]
    metrics.update({f"style/{s}": styles.count(s) / n for s in STYLES})
    if sampled:
        samples = generate_responses(model, tokenizer, prompts, SamplingConfig(max_new_tokens, temperature=1.0),
                                     seed=seed, batch_size=batch_size)
        p = sum(is_correct(r, e.answer) for r, e in zip(samples, examples)) / n
        metrics.update(sampled_accuracy=p, sampled_se=standard_error(p, n))
    model.train(was_training)
    return metrics


@torch.no_grad()
def reward_model_accuracy(reward_model: nn.Module, pairs, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out share of pairs with r(chosen) > r(rejected), and the mean margin r(chosen) - r(rejected)."""
    device = next(reward_model.parameters()).device
    margins = []
    for i in range(0, len(pairs), batch_size):
        rows = pairs[i:i + batch_size]
        ids, attention, _ = collate_pairs(rows, pad_id, device)
        scores = reward_model.score(ids, attention)
        margins.append(scores[: len(rows)] - scores[len(rows):])
    margin = torch.cat(margins)
    return {"pref_accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}
