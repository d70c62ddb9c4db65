"""Online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback").

Each rollout samples responses from the current policy; a pairwise AI judge (both orders, to cancel position
bias) or the configured reward decides which is chosen; ties are dropped. With the reward and
`samples_per_prompt` n > 2, the pair is the best and the worst of the n samples (as in iterative / online
DPO recipes that rank several samples, e.g. Xiong et al., 2024), which turns far more prompts into usable
pairs. The DPO loss (any `loss_type` of dpo.py) is then taken on these fresh pairs, with reference
log-probs from a batched no-grad pass at rollout time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import field
from ..data.pairs import load_pairs, tokenize_pairs
from ..rewards.judge import PairwiseJudge
from ..train.loop import train
from .dpo import LossType, implicit_reward_accuracy, pair_sequence_logprobs, preference_loss
from .experience import Experience
from .online import OnlineConfig, OnlineRL, judge_backend, load_online


@dataclass
class OnlineDPOConfig(OnlineConfig):
    preference: Literal["judge", "reward"] = field("judge", "who picks the chosen response: the pairwise judge, "
                                                   "or the pointwise `reward` (e.g. answer correctness)")
    beta: float = field(0.1, "DPO's β: strength of the implicit KL constraint to the reference", gt=0)
    loss_type: LossType = field("sigmoid", "DPO loss variant (see dpo.py)")
    label_smoothing: float = field(0.0, "ε for cDPO / robust DPO", min=0)
    samples_per_prompt: int = field(2, "responses sampled per prompt; with preference=reward the pair is the "
                                        "best and the worst of them", min=2)
    eval_pref_data: str = field("", "held-out preference JSONL: implicit-reward preference accuracy")
    max_len: int = field(256, "tokens per held-out preference sequence", min=8)


@dataclass
class PreferencePairs(Experience):
    """An online-DPO rollout: consecutive rows (2i, 2i+1) are a pair of responses to one prompt."""

    is_chosen: torch.Tensor | None = None   # (rows,) 1 for the chosen response of its pair, 0 for the rejected
    pair_valid: torch.Tensor | None = None  # (rows,) 1 where the pair is usable (not a tie), on both rows


def preference_pairs(exp: Experience, samples_per_prompt: int) -> PreferencePairs:
    """Keep the best and the worst of each prompt's `samples_per_prompt` responses (in sampling order; all of
    them when there are two), label each row chosen or rejected, and mark ties as unusable."""
    n = samples_per_prompt
    if n > 2:
        grouped = exp.rewards.view(-1, n)
        best, worst = grouped.argmax(1), grouped.argmin(1)
        first, second = torch.minimum(best, worst), torch.maximum(best, worst)
        second = torch.where(first == second, (first + 1) % n, second)  # all equal: any two (a tie)
        base = torch.arange(grouped.shape[0], device=grouped.device) * n
        exp = exp.select(torch.stack([base + first, base + second], dim=1).view(-1))
    pairs = exp.rewards.view(-1, 2)
    valid = (pairs[:, 0] != pairs[:, 1]).float()
    first_wins = (pairs[:, 0] > pairs[:, 1]).float()
    return PreferencePairs.extend(exp.replace(stats={**exp.stats, "valid_pairs": float(valid.mean())}),
                                  is_chosen=torch.stack([first_wins, 1 - first_wins], dim=1).view(-1),
                                  pair_valid=valid.repeat_interleave(2))


class OnlineDPO(OnlineRL):
    rows_per_prompt = 2
    shuffle_rows = False
    logprobs_at_sampling_temperature = False  # DPO's log-probs are the model's own (T = 1), as in TRL's OnlineDPO
    experience_type = PreferencePairs

    def __init__(self, *args, pairwise: PairwiseJudge | None, eval_pairs, cfg: OnlineDPOConfig) -> None:
        self.samples_per_prompt = cfg.samples_per_prompt
        super().__init__(*args, cfg=cfg)
        if cfg.batch_size % 2:
            raise ValueError("online-dpo: batch_size must be even (pairs stay together)")
        if pairwise is not None and cfg.samples_per_prompt != 2:
            raise ValueError("online-dpo: the pairwise judge compares two responses; use samples_per_prompt=2")
        self.pairwise, self.eval_pairs = pairwise, eval_pairs
        self.eval_ref_logps = pair_sequence_logprobs(self.reference, eval_pairs, self.tokenizer.pad_id)[:2] \
            if eval_pairs else None

    def score(self, examples, texts):
        if self.pairwise is None:
            return super().score(examples, texts)
        p_first = self.pairwise.compare([e.prompt for e in examples[0::2]], texts[0::2], texts[1::2])
        return torch.stack([p_first, 1 - p_first], dim=1).view(-1), {}, [dict(self.pairwise.stats)]

    def reward_stats(self, rewards: torch.Tensor) -> dict[str, float]:
        # With the pairwise judge a pair's "rewards" are [p, 1 - p]: their mean is 0.5 by construction and says
        # nothing; the judge's counts for this rollout (in the stats already) say what it decided.
        return super().reward_stats(rewards) if self.pairwise is None else {}

    def advantages(self, exp: Experience) -> PreferencePairs:
        """No advantages: the rollout's preference pairs."""
        return preference_pairs(exp, self.samples_per_prompt)

    def loss(self, batch: PreferencePairs):
        cfg: OnlineDPOConfig = self.cfg
        terms = self.policy_terms(batch)
        mask = terms["mask"]
        seq = (terms["logps"] * mask).sum(1).view(-1, 2)
        ref = (batch.ref_logps * mask).sum(1).view(-1, 2)
        lengths = mask.sum(1).view(-1, 2)
        first = batch.is_chosen.view(-1, 2)[:, 0] > 0

        def chosen_rejected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.where(first, x[:, 0], x[:, 1]), torch.where(first, x[:, 1], x[:, 0])

        (chosen, rejected), (ref_c, ref_r), (len_c, len_r) = map(chosen_rejected, (seq, ref, lengths))
        losses, r_c, r_r = preference_loss(chosen, rejected, ref_c, ref_r, len_c, len_r, cfg.beta, cfg.loss_type,
                                           cfg.label_smoothing)
        valid = batch.pair_valid.view(-1, 2)[:, 0]
        loss = (losses * valid).sum() / valid.sum().clamp(min=1)
        metrics = self.common_metrics(batch, terms, None)  # no ratio is clipped in DPO
        if valid.sum() > 0:
            metrics["rewards/accuracy"] = float(((r_c > r_r).float() * valid).sum() / valid.sum())
            metrics["rewards/margin"] = float(((r_c - r_r) * valid).sum() / valid.sum())
        return loss, metrics

    def loss_weight(self, batch: PreferencePairs) -> float:
        return float(batch.pair_valid.view(-1, 2)[:, 0].sum())  # the loss is a mean over usable pairs

    def evaluate(self, final: bool = True) -> dict[str, float]:
        metrics = super().evaluate(final)
        if self.eval_pairs:
            metrics.update(implicit_reward_accuracy(self.policy, self.eval_pairs, self.eval_ref_logps,
                                                    self.cfg.beta, self.tokenizer.pad_id, self.cfg.loss_type))
        return metrics


def run(cfg: OnlineDPOConfig) -> dict[str, float]:
    tokenizer, policy, reference, reward, prompts, eval_prompts = load_online(cfg)
    device = next(policy.parameters()).device
    pairwise = PairwiseJudge(judge_backend(cfg, device)) if cfg.preference == "judge" else None
    eval_pairs = tokenize_pairs(tokenizer, load_pairs(cfg.eval_pref_data)[: cfg.eval_samples], cfg.max_len) \
        if cfg.eval_pref_data else []
    algo = OnlineDPO(policy, reference, tokenizer, prompts, reward, eval_prompts, pairwise=pairwise,
                     eval_pairs=eval_pairs, cfg=cfg)
    return train(algo, cfg, name="online-dpo")
