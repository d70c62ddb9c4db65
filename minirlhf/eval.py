"""Evaluation on held-out data: task accuracy by greedy decoding (embedded task, GSM8K-style answers),
sequence log-probs of preference pairs (implicit DPO rewards), reward-model pair accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data.formats import Message, PromptExample
from .data.pairs import collate_pairs
from .data.task import JUDGE_THRESHOLD, STYLES, is_correct, response_style
from .generation import SamplingConfig, generate
from .logprobs import sequence_logprobs
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


def standard_error(p: float, n: int) -> float:
    """Standard error of a share p measured on n independent problems: sqrt(p (1 - p) / n)."""
    return (p * (1 - p) / max(1, n)) ** 0.5


def task_metrics(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[PromptExample],
                 max_new_tokens: int = 48, sampled: bool = True, batch_size: int = 64, seed: int = 0
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
def pair_sequence_logprobs(model: nn.Module, pairs, pad_id: int, batch_size: int = 32
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen lengths, rejected lengths) for TokenizedPairs, batched, no grad."""
    device = next(model.parameters()).device
    out: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, len(pairs), batch_size):
        rows = pairs[i:i + batch_size]
        ids, attention, completion = collate_pairs(rows, pad_id, device)
        logps, lengths = sequence_logprobs(model, ids, attention, completion)
        n = len(rows)
        out.append((logps[:n], logps[n:], lengths[:n], lengths[n:]))
    return tuple(torch.cat(parts) for parts in zip(*out))  # type: ignore[return-value]


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



def judge_agreement(judge: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]],
                    threshold: int = JUDGE_THRESHOLD, max_new_tokens: int = 8) -> dict[str, float]:
    """How often a generative judge's "Score: N" falls on the same side of `threshold` as the reference
    reply (the conversation's last, assistant, turn); unparsable replies count as disagreement."""
    from .rewards.judge import parse_score

    was_training = judge.training
    judge.eval()
    replies = generate_responses(judge, tokenizer, [c[:-1] for c in conversations],
                                 SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    judge.train(was_training)
    agree = parsed = 0
    for reply, conversation in zip(replies, conversations):
        score, gold = parse_score(reply), parse_score(conversation[-1]["content"])
        parsed += score is not None
        agree += score is not None and gold is not None and (score >= threshold) == (gold >= threshold)
    n = max(1, len(conversations))
    return {"agreement": agree / n, "agreement_se": standard_error(agree / n, n), "parse_rate": parsed / n}
