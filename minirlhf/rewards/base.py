"""The reward interface and the rewards that need no judge: rule-based and reward-model scores."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from ..data.formats import Message
from ..data.task import equations_hold, is_correct
from ..generation import left_pad
from ..tokenizer import Tokenizer


class RewardFunction(Protocol):
    """A reward: `score` rates completions. One that calls out (a judge) may also keep a `stats` dict, its
    report on the last call, which `WeightedSum.reports` collects."""

    name: str

    def score(self, prompts: Sequence[Sequence[Message]], completions: Sequence[str],
              meta: Sequence[dict]) -> torch.Tensor:
        """One float reward per completion, shape (batch,)."""
        ...


class AnswerReward:
    """1 if the completion's final answer equals meta['answer'] (embedded task or GSM8K `#### N`), else 0."""

    name = "answer"

    def score(self, prompts, completions, meta) -> torch.Tensor:
        return torch.tensor([float(m.get("answer") is not None and is_correct(c, m["answer"]))
                             for c, m in zip(completions, meta)])


_FORMAT = re.compile(r"(The answer is -?[\d,]+(\.\d+)?\.?|#### -?[\d,]+(\.\d+)?)\s*$")


class FormatReward:
    """1 if the completion ends by stating its answer ("The answer is N." or "#### N"), else 0."""

    name = "format"

    def score(self, prompts, completions, meta) -> torch.Tensor:
        return torch.tensor([float(bool(_FORMAT.search(c.strip()))) for c in completions])


class WorkingReward:
    """1 if the completion shows its working ("a op b = c." steps) and every step is right, else 0: the
    rubric's "shows its working" as a rule (it checks the arithmetic, not the final answer)."""

    name = "working"

    def score(self, prompts, completions, meta) -> torch.Tensor:
        return torch.tensor([float(equations_hold(c) is True) for c in completions])


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025), added to the reward: 0 for completions of at most
    max_new_tokens - buffer tokens, then falling linearly with each token to -penalty at max_new_tokens."""
    start = max_new_tokens - buffer
    return -penalty * (lengths.float() - start).clamp(min=0) / max(buffer, 1)


class RewardModelReward:
    """r(x, y) from a Bradley–Terry reward model, read at the last token of prompt + response + EOS."""

    name = "rm"

    def __init__(self, reward_model: nn.Module, tokenizer: Tokenizer, max_len: int = 512, batch_size: int = 64):
        self.model, self.tokenizer, self.max_len, self.batch_size = reward_model.eval(), tokenizer, max_len, batch_size

    @torch.no_grad()
    def score(self, prompts, completions, meta) -> torch.Tensor:
        device = next(self.model.parameters()).device
        seqs = [(self.tokenizer.encode_prompt(p) + self.tokenizer.encode_response(c))[-self.max_len:]
                for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(seqs), self.batch_size):
            ids, mask = left_pad(seqs[i:i + self.batch_size], self.tokenizer.pad_id, device)
            out.append(self.model.score(ids, mask).float().cpu())
        return torch.cat(out)


class WeightedSum:
    """sum_i w_i * r_i(x, y) over named reward functions."""

    def __init__(self, parts: Sequence[tuple[RewardFunction, float]]) -> None:
        self.parts = list(parts)
        self.name = "+".join(f"{w:g}*{fn.name}" for fn, w in self.parts)

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor([w for _, w in self.parts])

    def score_parts(self, prompts, completions, meta) -> dict[str, torch.Tensor]:
        """Each reward function's (unweighted) scores, by name, in `parts` order."""
        return {fn.name: fn.score(prompts, completions, meta).float() for fn, _ in self.parts}

    def reports(self) -> list[dict[str, float]]:
        """What each reward function reported about its last call, in `parts` order: a judge's counts of
        requests, failed requests and unparsable replies (its `stats`); {} from functions that report nothing."""
        return [dict(getattr(fn, "stats", {})) for fn, _ in self.parts]

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_i w_i * parts[i]."""
        return sum((w * parts[fn.name] for fn, w in self.parts), torch.zeros_like(next(iter(parts.values()))))

    def score(self, prompts, completions, meta) -> torch.Tensor:
        return self.combine(self.score_parts(prompts, completions, meta))


def build_reward(spec: str, factories: dict[str, Callable[[], RewardFunction]] | None = None) -> WeightedSum:
    """'answer:1,format:0.2' -> WeightedSum. `answer`, `format` and `working` are built in; other names (rm, judge) come
    from `factories`, so the caller decides how to load models."""
    known: dict[str, Callable[[], RewardFunction]] = {"answer": AnswerReward, "format": FormatReward,
                                                      "working": WorkingReward, **(factories or {})}
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        if name not in known:
            raise ValueError(f"reward {name!r} is not available; choose from {sorted(known)}, "
                             "e.g. 'answer:1,format:0.2'")
        try:
            parts.append((known[name](), float(weight) if weight else 1.0))
        except ValueError as e:
            raise ValueError(f"reward {item!r}: {e}") from e
    return WeightedSum(parts)
