"""GRPO (Shao et al., 2024) and the variants that differ in the advantage, the surrogate or the aggregation.

Per prompt, G completions are sampled; each gets the advantage (r - mean_group) / (std_group + ε) on every
token (`scale_rewards`: group | batch | none). The loss is a policy-gradient surrogate plus kl_coef·k3 KL to the
reference, three independent choices (policy_gradient.py):
    surrogate                  clip (PPO/GRPO, ε_low / ε_high, optional two-sided `clip_delta`) | cispo | sapo | vespo
    importance_sampling_level  token | sequence (GSPO's length-normalised sequence ratio)
    aggregation                sequence_mean | token_mean | local_token_mean | constant | sequence_sum
`loss_type` is a preset with TRL's names (LOSS_PRESETS: grpo, bnpo, dapo, dr_grpo, cispo, sapo, luspo, vespo; and gspo)
that sets all three; `surrogate`, `importance_sampling_level` and `aggregation` override its parts.
`advantage` swaps the baseline: `rloo` = leave-one-out (Ahmadian et al., 2024); `reinforce_pp` =
REINFORCE++ (Hu, 2025): token KL folded into the reward (k1), undiscounted returns, advantages whitened
over the global batch. `skip_zero_variance` drops groups whose G rewards are all equal (no signal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import ConfigError, field
from ..data.batching import ExampleOrder
from ..rewards import WeightedSum
from ..train.loop import train
from .experience import Experience
from .online import OnlineRL, PolicyGradientConfig, load_online
from .policy_gradient import (
    Aggregation,
    PolicyLoss,
    RatioLevel,
    Surrogate,
    aggregate,
    aggregate_units,
    discounted_returns,
    group_advantages,
    high_entropy_mask,
    kl_estimate,
    masked_whiten,
    normalize_then_sum_advantages,
    policy_gradient_loss,
    rloo_advantages,
)

LossPreset = Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "gspo", "luspo", "vespo"]
# TRL 1.16's GRPOTrainer `loss_type` names (plus gspo, which TRL spells importance_sampling_level=sequence) as
# (surrogate, aggregation, importance_sampling_level); tests/test_policy_gradient.py checks each against TRL.
LOSS_PRESETS: dict[str, tuple[Surrogate, Aggregation, RatioLevel]] = {
    "grpo": ("clip", "sequence_mean", "token"),
    "bnpo": ("clip", "local_token_mean", "token"),
    "dapo": ("clip", "token_mean", "token"),
    "dr_grpo": ("clip", "constant", "token"),
    "cispo": ("cispo", "token_mean", "token"),
    "sapo": ("sapo", "sequence_mean", "token"),
    "gspo": ("clip", "sequence_mean", "sequence"),
    "luspo": ("clip", "sequence_sum", "sequence"),
    "vespo": ("vespo", "token_mean", "token"),
}


@dataclass
class GRPOConfig(PolicyGradientConfig):
    group_size: int = field(4, "G: completions sampled per prompt", min=2)
    scale_rewards: Literal["group", "batch", "none"] = field("group", "divide centred rewards by this std")
    loss_type: LossPreset = field("grpo", "preset of surrogate + aggregation (+ ratio level) by TRL's names: grpo, "
                                          "bnpo, dapo, dr_grpo, cispo, sapo, gspo, luspo, vespo")
    surrogate: Surrogate | None = field(None, "per-token loss: clip | cispo | sapo | vespo (empty: from loss_type)")
    aggregation: Aggregation | None = field(None, "average of token losses: sequence_mean | token_mean | "
                                                  "local_token_mean | constant | sequence_sum (empty: from loss_type)")
    importance_sampling_level: RatioLevel | None = field(None, "token | sequence ratios (GSPO) (empty: from loss_type)")
    cispo_max_ratio: float = field(5.0, "cispo: cap ε_max of the detached importance weight (ScaleRL: 5)", gt=0)
    sapo_temperature_pos: float = field(1.0, "sapo: gate temperature where the advantage is positive", gt=0)
    sapo_temperature_neg: float = field(1.05, "sapo: gate temperature where it is not", gt=0)
    vespo_k_pos: float = field(2.0, "vespo: power k of the Gamma weight where the advantage is >= 0 (how fast "
                                    "sequences with w < 1 fade)", min=0)
    vespo_lambda_pos: float = field(3.0, "vespo: decay λ of the Gamma weight where the advantage is >= 0 (how fast "
                                         "sequences with w > 1 fade)", gt=0)
    vespo_k_neg: float = field(3.0, "vespo: k where the advantage is negative", min=0)
    vespo_lambda_neg: float = field(2.0, "vespo: λ where the advantage is negative", gt=0)
    top_entropy_quantile: float = field(1.0, "train the surrogate on this share of each micro-batch's tokens, those "
                                             "of highest entropy (1 = all; 0.2 in Wang et al., 2025)", gt=0, max=1)
    kl_bias_correction: bool = field(False, "weight the KL term by the importance ratio (DeepSeek-V3.2; TRL's "
                                            "use_bias_correction_kl, on by default there)")
    advantage: Literal["grpo", "rloo", "reinforce_pp", "normalize_then_sum"] = field(
        "grpo", "baseline / advantage estimator; normalize_then_sum: each reward of `reward` normalised in its group, "
                "then summed (GDPO)")
    skip_zero_variance: bool = field(False, "drop groups whose rewards are all equal")
    dynamic_sampling: bool = field(False, "DAPO: sample more prompts until the rollout holds prompts_per_rollout "
                                          "groups whose rewards differ (at most max_sampling_tries samplings)")
    max_sampling_tries: int = field(4, "dynamic sampling: samplings per rollout at most, the first included; groups "
                                       "without variance fill what is still missing after them", min=1)


def group_has_variance(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of `group_size` consecutive rows: whether its rewards are not all equal."""
    grouped = rewards.view(-1, group_size)
    return grouped.max(1).values > grouped.min(1).values


def policy_loss_spec(cfg: GRPOConfig) -> PolicyLoss:
    """The loss `cfg` asks for: its `loss_type` preset, with any part set explicitly taking precedence."""
    surrogate, aggregation, level = LOSS_PRESETS[cfg.loss_type]
    spec = PolicyLoss(surrogate=cfg.surrogate or surrogate, aggregation=cfg.aggregation or aggregation,
                      importance_sampling_level=cfg.importance_sampling_level or level,
                      eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high, clip_delta=cfg.clip_delta,
                      cispo_max_ratio=cfg.cispo_max_ratio, sapo_temperature_pos=cfg.sapo_temperature_pos,
                      sapo_temperature_neg=cfg.sapo_temperature_neg,
                      vespo_shape=(cfg.vespo_k_pos, cfg.vespo_lambda_pos),
                      vespo_shape_neg=(cfg.vespo_k_neg, cfg.vespo_lambda_neg),
                      kl_bias_correction=cfg.kl_bias_correction)
    if spec.surrogate == "vespo" and spec.importance_sampling_level == "sequence":
        raise ConfigError("surrogate=vespo forms its own sequence weight from the token ratios; leave "
                          "importance_sampling_level at token")
    if spec.surrogate == "vespo" and cfg.rollout_correction == "sequence":
        raise ConfigError("surrogate=vespo takes the rollout correction's token weights into its own sequence weight; "
                          "use rollout_correction=token (or off)")
    return spec


class GRPO(OnlineRL):
    def __init__(self, *args, cfg: GRPOConfig) -> None:
        self.samples_per_prompt = cfg.group_size
        self.loss_spec = policy_loss_spec(cfg)
        super().__init__(*args, cfg=cfg)
        if cfg.advantage == "normalize_then_sum" and not isinstance(self.reward, WeightedSum):
            raise ConfigError("advantage=normalize_then_sum normalises each reward of a `reward` list "
                              "(e.g. answer:1,working:0.2) on its own; this run has a single reward function")
        if cfg.dynamic_sampling:  # rows of several samplings are stacked: give them all one prompt width
            self.prompt_width = max(len(ids) for ids in self.prompt_ids)
            self.refill_order = ExampleOrder(len(self.prompts), cfg.seed + 1)

    def complete_rollout(self, exp: Experience, rollout: int) -> Experience:
        """DAPO's dynamic sampling (Yu et al., 2025): a group whose G rewards are all equal has zero advantage and
        teaches nothing, so sample further prompts (from their own seeded stream, so resume stays exact) until
        prompts_per_rollout groups have reward variance, then keep those; after max_sampling_tries samplings,
        groups without variance fill the rest. Logs the samplings used and the first sampling's share of
        informative groups."""
        cfg: GRPOConfig = self.cfg
        if not cfg.dynamic_sampling:
            return exp
        n, parts = cfg.prompts_per_rollout, [exp]
        flags = [group_has_variance(exp.rewards, cfg.group_size)]
        first_share = float(flags[0].float().mean())
        while sum(int(f.sum()) for f in flags) < n and len(parts) < cfg.max_sampling_tries:
            prompts = self.refill_order.take((rollout * cfg.max_sampling_tries + len(parts) - 1) * n, n)
            parts.append(self.sample_rows(prompts, rollout, attempt=len(parts)))
            flags.append(group_has_variance(parts[-1].rewards, cfg.group_size))
        stacked, informative = Experience.concat(parts), torch.cat(flags)
        # informative groups first, groups without variance to fill up; kept in sampling order
        groups = torch.cat([informative.nonzero().flatten(), (~informative).nonzero().flatten()])[:n].sort().values
        rows = (groups[:, None] * cfg.group_size + torch.arange(cfg.group_size, device=groups.device)).flatten()
        stats = {**exp.stats, "dynamic_sampling/samplings": float(len(parts)),
                 "dynamic_sampling/first_informative": first_share}
        return stacked.select(rows).replace(stats=stats)

    def advantages(self, exp: Experience) -> Experience:
        cfg: GRPOConfig = self.cfg
        rewards, mask = exp.rewards, exp.loss_mask
        if cfg.advantage == "reinforce_pp":
            token_rewards = torch.zeros_like(mask)
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
            token_rewards[torch.arange(len(rewards)), last] = rewards
            if exp.ref_logps is not None:
                policy_logps = exp.old_logps if exp.old_logps is not None else self._logprobs(self.policy, exp)[0]
                token_rewards = token_rewards - cfg.kl_coef * kl_estimate(policy_logps, exp.ref_logps, "k1") * mask
            return exp.replace(advantages=masked_whiten(discounted_returns(token_rewards, mask), mask))
        if cfg.advantage == "rloo":
            per_sequence = rloo_advantages(rewards, cfg.group_size)
        elif cfg.advantage == "normalize_then_sum":  # the parts unclipped and unshaped, as the reward functions gave
            per_sequence = normalize_then_sum_advantages(exp.reward_parts, self.reward.weights, cfg.group_size)
        else:
            per_sequence = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        informative = group_has_variance(rewards, cfg.group_size).repeat_interleave(cfg.group_size)
        completion_mask = exp.completion_mask * informative[:, None] if cfg.skip_zero_variance else exp.completion_mask
        return exp.replace(advantages=per_sequence[:, None] * mask, completion_mask=completion_mask,
                           stats={**exp.stats, "zero_variance_groups": float(1 - informative.float().mean())})

    def loss(self, batch: Experience):
        cfg: GRPOConfig = self.cfg
        terms = self.policy_terms(batch, entropy_grad=self.entropy_bonus.trains_entropy)
        kl_in_loss = terms.get("kl") if cfg.advantage != "reinforce_pp" else None
        forking = None
        if cfg.top_entropy_quantile < 1:  # per micro-batch (as TRL): not exact under gradient accumulation
            forking = high_entropy_mask(terms["entropy"], terms["mask"], cfg.top_entropy_quantile)
        loss, clipped = policy_gradient_loss(terms["logps"], terms["old_logps"], batch.advantages, terms["mask"],
                                             self.loss_spec, kl_in_loss, cfg.kl_coef, cfg.max_new_tokens, forking,
                                             terms.get("rollout_weights"))
        if self.entropy_bonus.applied > 0:  # averaged like the policy loss, so gradient accumulation stays exact
            entropy = aggregate(terms["entropy"], terms["mask"], self.loss_spec.aggregation, cfg.max_new_tokens)
            loss = loss - self.entropy_bonus.applied * entropy
        return loss, self.common_metrics(batch, terms, clipped)

    def loss_weight(self, batch: Experience) -> float:
        return aggregate_units(batch.loss_mask, self.loss_spec.aggregation)


def run(cfg: GRPOConfig) -> dict[str, float]:
    tokenizer, policy, reference, reward, prompts, eval_prompts = load_online(cfg)
    return train(GRPO(policy, reference, tokenizer, prompts, reward, eval_prompts, cfg=cfg), cfg, name="grpo")
