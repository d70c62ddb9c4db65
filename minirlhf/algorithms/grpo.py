"""GRPO (Shao et al., 2024) and the variants that differ only in the advantage or the aggregation.

Per prompt, G completions are sampled; each gets the advantage (r - mean_group) / (std_group + ε) on every
token (`scale_rewards`: group | batch | none). The loss is the clipped surrogate with separate ε_low /
ε_high plus β·k3 KL to the reference, aggregated per `loss_type`:
    grpo     token mean per sequence, then mean over sequences
    dapo     token mean over the batch (Yu et al., 2025)
    dr_grpo  token sum / (sequences x max_new_tokens) (Liu et al., 2025)
`advantage` swaps the baseline: `rloo` = leave-one-out (Ahmadian et al., 2024); `reinforce_pp` =
REINFORCE++ (Hu, 2025): token KL folded into the reward (k1), undiscounted returns, advantages whitened
over the global batch. `skip_zero_variance` drops groups whose G rewards are all equal (no signal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import field
from ..train.loop import train
from .online import OnlineConfig, OnlineRL, load_online
from .policy_gradient import (
    aggregate,
    aggregate_units,
    clipped_surrogate,
    discounted_returns,
    group_advantages,
    kl_estimate,
    masked_whiten,
    rloo_advantages,
)


@dataclass
class GRPOConfig(OnlineConfig):
    group_size: int = field(4, "G: completions sampled per prompt", min=2)
    scale_rewards: Literal["group", "batch", "none"] = field("group", "divide centred rewards by this std")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = field("grpo", "how per-token losses are averaged")
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = field("grpo", "baseline / advantage estimator")
    skip_zero_variance: bool = field(False, "drop groups whose rewards are all equal")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float, eps_high: float, kl: torch.Tensor | None = None, beta: float = 0.0,
              loss_type: str = "grpo", max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate + β·KL per token, aggregated by loss_type. Returns (loss, clip indicator)."""
    per_token, clipped = clipped_surrogate(logps, old_logps, advantages, eps_low, eps_high)
    if kl is not None and beta > 0:
        per_token = per_token + beta * kl
    return aggregate(per_token, mask, loss_type, max_len), clipped


class GRPO(OnlineRL):
    def __init__(self, *args, cfg: GRPOConfig) -> None:
        self.samples_per_prompt = cfg.group_size
        super().__init__(*args, cfg=cfg)

    def advantages(self, exp: dict[str, torch.Tensor]) -> dict[str, float]:
        cfg: GRPOConfig = self.cfg
        rewards, mask = exp["rewards"], exp["completion_mask"][:, 1:].float()
        if cfg.advantage == "reinforce_pp":
            token_rewards = torch.zeros_like(mask)
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
            token_rewards[torch.arange(len(rewards)), last] = rewards
            if "ref_logps" in exp:
                policy_logps = exp.get("old_logps")
                if policy_logps is None:
                    policy_logps = self._logprobs(self.policy, exp)[0]
                token_rewards = token_rewards - cfg.beta * kl_estimate(policy_logps, exp["ref_logps"], "k1") * mask
            exp["advantages"] = masked_whiten(discounted_returns(token_rewards, mask), mask)
            return {}
        if cfg.advantage == "rloo":
            per_sequence = rloo_advantages(rewards, cfg.group_size)
        else:
            per_sequence = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        flat = rewards.view(-1, cfg.group_size)
        informative = (flat.max(1).values > flat.min(1).values).repeat_interleave(cfg.group_size)
        if cfg.skip_zero_variance:
            exp["completion_mask"] = exp["completion_mask"] * informative[:, None]
        exp["advantages"] = per_sequence[:, None] * mask
        return {"zero_variance_groups": float(1 - informative.float().mean())}

    def loss(self, batch):
        cfg: GRPOConfig = self.cfg
        terms = self.policy_terms(batch)
        kl_in_loss = terms.get("kl") if cfg.advantage != "reinforce_pp" else None
        loss, clipped = grpo_loss(terms["logps"], terms["old_logps"], batch["advantages"], terms["mask"],
                                  cfg.clip_eps_low, cfg.clip_eps_high, kl_in_loss, cfg.beta, cfg.loss_type,
                                  cfg.max_new_tokens)
        return loss, self.common_metrics(terms, clipped)

    def loss_weight(self, batch) -> float:
        return aggregate_units(batch["completion_mask"][:, 1:], self.cfg.loss_type)


def run(cfg: GRPOConfig) -> dict[str, float]:
    tokenizer, policy, reference, reward, prompts, eval_prompts = load_online(cfg)
    return train(GRPO(policy, reference, tokenizer, prompts, reward, eval_prompts, cfg=cfg), cfg, name="grpo")
