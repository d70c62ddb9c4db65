"""SPO, single-stream policy optimisation (Xu et al., 2025; as in MiniMind's train_spo.py).

One completion per prompt; no group and no critic. The baseline is a Beta(α, β) value tracker, kept per
prompt (or one global tracker, as MiniMind does): v = α / (α + β). After each rollout, with the reward
mapped to [0, 1], the tracker forgets at rate ρ = clip(2^(-D / D_half), ρ_min, ρ_max) and counts the new
outcome: α ← ρα + r, β ← ρβ + (1 - r). D estimates how far the policy moved since the prompt was last
seen: |mean token log-prob now - mean token log-prob then| (0 on a first visit, so ρ = ρ_max).
Advantages r - v are normalised across the batch; prompts are drawn with priority √(v(1-v)) + ε
(prompts the policy solves sometimes teach most). Loss: GRPO's clipped policy gradient + kl_coef·k3 KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..config import field
from ..logprobs import masked_mean
from ..train.loop import train
from .experience import Experience
from .online import OnlineRL, PolicyGradientConfig, load_online
from .policy_gradient import PolicyLoss, aggregate, aggregate_units, policy_gradient_loss


@dataclass
class SPOConfig(PolicyGradientConfig):
    tracker: Literal["per_prompt", "global"] = field("per_prompt", "one Beta tracker per prompt, or one for all")
    d_half: float = field(0.06, "D_half: policy drift at which the tracker forgets half", gt=0)
    rho_min: float = field(0.5, "lower clip of the forgetting factor ρ", gt=0)
    rho_max: float = field(0.96, "upper clip of the forgetting factor ρ", gt=0)
    prioritized: bool = field(True, "sample prompts with weight √(v(1-v)) + priority_eps")
    priority_eps: float = field(0.05, "ε in the sampling weight", min=0)
    reward_min: float = field(0.0, "reward mapped to 0 for the tracker")
    reward_max: float = field(1.0, "reward mapped to 1 for the tracker")


class BetaValueTracker:
    """Beta(α, β) success-rate trackers with KL-adaptive forgetting; one slot per prompt (or a single one).
    α and β are discounted counts of successes and failures, so they are named so."""

    def __init__(self, slots: int, d_half: float, rho_min: float, rho_max: float) -> None:
        n_init = 1.0 / (1.0 - rho_min)  # pseudo-counts at the forgetting horizon of ρ_min (MiniMind's choice)
        self.successes = torch.full((slots,), 0.5 * n_init)
        self.failures = torch.full((slots,), 0.5 * n_init)
        self.last_logp = torch.full((slots,), float("nan"))
        self.d_half, self.rho_min, self.rho_max = d_half, rho_min, rho_max

    def value(self, slots: torch.Tensor) -> torch.Tensor:
        return self.successes[slots] / (self.successes[slots] + self.failures[slots])

    def update(self, slots: torch.Tensor, rewards01: torch.Tensor, mean_logp: torch.Tensor) -> torch.Tensor:
        """Apply one observation per slot (repeated slots are averaged); returns the ρ used."""
        slots, inverse = slots.unique(return_inverse=True)
        counts = torch.zeros(len(slots)).index_add_(0, inverse, torch.ones(len(inverse)))
        reward = torch.zeros(len(slots)).index_add_(0, inverse, rewards01) / counts
        logp = torch.zeros(len(slots)).index_add_(0, inverse, mean_logp) / counts
        drift = (logp - self.last_logp[slots]).abs().nan_to_num(0.0)
        rho = torch.clamp(2.0 ** (-drift / self.d_half), self.rho_min, self.rho_max)
        self.successes[slots] = rho * self.successes[slots] + reward
        self.failures[slots] = rho * self.failures[slots] + (1 - reward)
        self.last_logp[slots] = logp
        return rho

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"successes": self.successes, "failures": self.failures, "last_logp": self.last_logp}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.successes, self.failures = state["successes"], state["failures"]
        self.last_logp = state["last_logp"]


class SPO(OnlineRL):
    def __init__(self, *args, cfg: SPOConfig) -> None:
        super().__init__(*args, cfg=cfg)
        slots = len(self.prompts) if cfg.tracker == "per_prompt" else 1
        self.tracker = BetaValueTracker(slots, cfg.d_half, cfg.rho_min, cfg.rho_max)

    def _slots(self, prompt_index: torch.Tensor) -> torch.Tensor:
        return prompt_index.cpu() if self.cfg.tracker == "per_prompt" else torch.zeros_like(prompt_index.cpu())

    def select_prompts(self, rollout: int) -> list[int]:
        cfg: SPOConfig = self.cfg
        if not cfg.prioritized or cfg.tracker == "global":
            return super().select_prompts(rollout)
        v = self.tracker.value(torch.arange(len(self.prompts)))
        weights = torch.sqrt(v * (1 - v)) + cfg.priority_eps
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rollout)
        replacement = cfg.prompts_per_rollout > len(self.prompts)  # fewer prompts than a rollout needs
        picks = torch.multinomial(weights, cfg.prompts_per_rollout, replacement=replacement, generator=generator)
        return picks.tolist()

    @torch.no_grad()
    def advantages(self, exp: Experience) -> Experience:
        cfg: SPOConfig = self.cfg
        mask = exp.loss_mask
        rewards01 = ((exp.rewards - cfg.reward_min) / (cfg.reward_max - cfg.reward_min)).clamp(0, 1).cpu()
        slots = self._slots(exp.prompt_index)
        baseline = self.tracker.value(slots)
        adv = rewards01 - baseline
        adv = (adv - adv.mean()) / (adv.std() + 1e-4) if len(adv) > 1 else adv
        logps = exp.old_logps if exp.old_logps is not None else self._logprobs(self.policy, exp)[0]
        rho = self.tracker.update(slots, rewards01, masked_mean(logps, mask, dim=1).cpu())
        return exp.replace(advantages=adv.to(mask.device)[:, None] * mask,
                           stats={**exp.stats, "baseline": float(baseline.mean()), "rho": float(rho.mean())})

    def loss(self, batch: Experience):
        cfg: SPOConfig = self.cfg
        terms = self.policy_terms(batch, entropy_grad=self.entropy_bonus.trains_entropy)
        spec = PolicyLoss(aggregation="sequence_mean", eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high,
                          clip_delta=cfg.clip_delta)
        loss, clipped = policy_gradient_loss(terms["logps"], terms["old_logps"], batch.advantages, terms["mask"],
                                             spec, terms.get("kl"), cfg.kl_coef,
                                             rollout_weights=terms.get("rollout_weights"))
        if self.entropy_bonus.applied > 0:
            loss = loss - self.entropy_bonus.applied * aggregate(terms["entropy"], terms["mask"], "sequence_mean")
        return loss, self.common_metrics(batch, terms, clipped)

    def loss_weight(self, batch: Experience) -> float:
        return aggregate_units(batch.loss_mask, "sequence_mean")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])


def run(cfg: SPOConfig) -> dict[str, float]:
    tokenizer, policy, reference, reward, prompts, eval_prompts = load_online(cfg)
    return train(SPO(policy, reference, tokenizer, prompts, reward, eval_prompts, cfg=cfg), cfg, name="spo")
