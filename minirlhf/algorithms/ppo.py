"""PPO for language models (Ziegler et al., 2019; Ouyang et al., 2022), actor + critic.

Per token t of a completion, the reward is -kl_coef·(log π_old - log π_ref) (the k1 KL estimate), plus the
sequence score at the final token. A critic (a scalar head on a copy of the policy, starting at V = 0,
or a reward model; trained at `critic_lr_scale` x lr) gives V_t; GAE(γ, λ) gives advantages (whitened over
the batch) and returns A + V. Each rollout
is reused for `epochs_per_rollout` passes of mini-batches with
    policy loss  -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A)                   token mean over the batch
    value loss   ½ max((V - R)², (V_old + clip(V - V_old, ±value_clip) - R)²)
An optional adaptive KL controller (Ziegler et al., 2019) moves kl_coef toward `kl_target`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import field
from ..logprobs import masked_mean
from ..model import load_scalar_model
from ..model.heads import has_scalar_head
from ..train.loop import train
from .experience import Experience
from .online import OnlineRL, PolicyGradientConfig, load_online
from .policy_gradient import aggregate, clip_surrogate, gae, kl_estimate, masked_whiten


@dataclass
class PPOConfig(PolicyGradientConfig):
    critic_model: str = field("", "critic init dir: a reward model, or a policy (head starts at 0); empty = model")
    critic_lr_scale: float = field(10.0, "critic learning rate = lr x this (value fitting needs a larger step)", gt=0)
    gamma: float = field(0.99, "discount γ (1.0 is common for LMs)", min=0)
    lam: float = field(0.95, "GAE λ", min=0)
    vf_coef: float = field(0.5, "weight of the value loss", min=0)
    value_clip: float = field(0.2, "clip of V - V_old in the value loss", gt=0)
    whiten_advantages: bool = field(True, "normalise advantages to mean 0, std 1 over the batch")
    adaptive_kl: bool = field(False, "adapt kl_coef toward kl_target (Ziegler et al., 2019)")
    kl_target: float = field(0.1, "target KL per sequence for the adaptive controller", gt=0)
    kl_horizon: int = field(100, "controller horizon in rollouts", min=1)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """½ max((V - R)², (V_old + clip(V - V_old, -c, c) - R)²), token mean; also the share where the clip won."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask)


def adaptive_kl_update(kl_coef: float, kl: float, target: float, horizon: int) -> float:
    """kl_coef ← kl_coef (1 + clip(KL/target - 1, -0.2, 0.2) / horizon)."""
    return kl_coef * (1 + max(-0.2, min(0.2, kl / target - 1)) / horizon)


@dataclass
class PPOExperience(Experience):
    """A PPO rollout: advantages plus the critic's values V_old and the GAE returns it regresses on."""

    returns: torch.Tensor | None = None  # (rows, T-1)
    values: torch.Tensor | None = None   # (rows, T-1)


class PPO(OnlineRL):
    needs_old_logps = True  # the KL penalty in the reward uses them even with one update per rollout
    experience_type = PPOExperience

    def __init__(self, policy, reference, tokenizer, prompts, reward, eval_prompts, critic, cfg: PPOConfig):
        super().__init__(policy, reference, tokenizer, prompts, reward, eval_prompts, cfg=cfg)
        self.critic = critic
        self.modules = {"policy": policy, "critic": critic}
        self.lr_scales = {"critic": cfg.critic_lr_scale}
        self.kl_coef = cfg.kl_coef  # moved by the adaptive controller, if on

    def _values(self, exp: Experience) -> torch.Tensor:
        """V at each position t, aligned with log-probs (it values the state before token t+1)."""
        return self.critic(exp.input_ids, exp.attention_mask)[:, :-1]

    def make_experience(self, rollout: int) -> PPOExperience:
        exp = super().make_experience(rollout)
        if self.cfg.adaptive_kl and self.reference is not None:  # the next rollout's kl_coef, from this one's KL
            self.kl_coef = adaptive_kl_update(self.kl_coef, exp.stats["seq_kl"], self.cfg.kl_target,
                                              self.cfg.kl_horizon)
        return exp

    @torch.no_grad()
    def advantages(self, exp: Experience) -> PPOExperience:
        cfg: PPOConfig = self.cfg
        mask = exp.loss_mask
        self.critic.eval()
        values = self._values(exp) * mask
        token_rewards = torch.zeros_like(mask)
        seq_kl = 0.0
        if exp.ref_logps is not None:
            kl = kl_estimate(exp.old_logps, exp.ref_logps, "k1") * mask
            token_rewards -= self.kl_coef * kl
            seq_kl = float(kl.sum(1).mean())
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        token_rewards[torch.arange(len(last)), last] += exp.rewards
        advantages, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        residual_var = masked_mean((returns - values) ** 2, mask) - masked_mean(returns - values, mask) ** 2
        returns_var = masked_mean(returns**2, mask) - masked_mean(returns, mask) ** 2
        stats = {**exp.stats, "kl_coef": self.kl_coef, "seq_kl": seq_kl,
                 "explained_variance": float(1 - residual_var / returns_var.clamp(min=1e-8))}
        return PPOExperience.extend(exp.replace(advantages=advantages, stats=stats), returns=returns, values=values)

    def loss(self, batch: PPOExperience):
        cfg: PPOConfig = self.cfg
        terms = self.policy_terms(batch, entropy_grad=self.entropy_bonus.trains_entropy)
        per_token, clipped = clip_surrogate(terms["logps"] - terms["old_logps"], batch.advantages,
                                            cfg.clip_eps_low, cfg.clip_eps_high, cfg.clip_delta)
        if "rollout_weights" in terms:  # a bf16 sampler's rollout (truncated importance sampling)
            per_token = per_token * terms["rollout_weights"]
        if self.entropy_bonus.applied > 0:
            per_token = per_token - self.entropy_bonus.applied * terms["entropy"]
        policy_loss = aggregate(per_token, terms["mask"], "token_mean")
        value_loss, value_clip_frac = ppo_value_loss(self._values(batch), batch.values, batch.returns,
                                                     terms["mask"], cfg.value_clip)
        metrics = self.common_metrics(batch, terms, clipped)
        metrics.update(policy_loss=float(policy_loss.detach()), value_loss=float(value_loss.detach()),
                       value_clip_ratio=float(value_clip_frac))
        return policy_loss + cfg.vf_coef * value_loss, metrics

    def loss_weight(self, batch: PPOExperience) -> float:
        return float(batch.loss_mask.sum())  # both terms are means over tokens

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl_coef = state["kl_coef"]


def run(cfg: PPOConfig) -> dict[str, float]:
    tokenizer, policy, reference, reward, prompts, eval_prompts = load_online(cfg)
    device = next(policy.parameters()).device
    critic_dir = Path(cfg.critic_model or cfg.model)
    critic = load_scalar_model(critic_dir, device, cfg.lora, cfg.gradient_checkpointing)
    if not has_scalar_head(critic_dir):  # a fresh head on a policy: start at V = 0
        torch.nn.init.zeros_(critic.head.weight)
    algo = PPO(policy, reference, tokenizer, prompts, reward, eval_prompts, critic, cfg=cfg)
    return train(algo, cfg, name="ppo")
