"""Pure policy-gradient math shared by PPO, GRPO, SPO, RLOO and REINFORCE++.

All per-token tensors are (batch, T-1), aligned with `input_ids[:, 1:]` like the log-prob helper, and
`mask` is 1 on completion tokens only. KL estimators follow Schulman (2020), "Approximating KL
Divergence", with log-ratio lr = log π_ref - log π (samples drawn from π):
    k1 = -lr            unbiased, can be negative (PPO's per-token reward penalty)
    k2 = lr² / 2        biased, low variance
    k3 = exp(lr) - lr - 1   unbiased, always >= 0 (GRPO's and SPO's loss penalty)
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["grpo", "dapo", "dr_grpo"]


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from log-probs of tokens sampled from π."""
    log_ratio = ref_logps - logps
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A), ρ = π/π_old (Schulman et al., 2017;
    separate ε_high is DAPO's clip-higher, Yu et al., 2025). Returns (loss, 1 where the clip was active)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "dapo",
              max_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.
    grpo:    mean over tokens of each sequence, then over sequences (Shao et al., 2024)
    dapo:    mean over all tokens of the batch (Yu et al., 2025)
    dr_grpo: sum over tokens / (sequences * max_len), no length bias (Liu et al., 2025)
    Rows whose mask is all 0 (e.g. skipped groups) do not count as sequences."""
    masked = per_token * mask
    rows = (mask.sum(1) > 0).float()
    if how == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / rows.sum().clamp(min=1)
    if how == "dapo":
        return masked.sum() / mask.sum().clamp(min=1)
    if how == "dr_grpo":
        return masked.sum() / (rows.sum().clamp(min=1) * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown aggregation {how!r}")


def aggregate_units(mask: torch.Tensor, how: Aggregation = "dapo") -> float:
    """How many units `aggregate(..., how)` averages over (tokens for dapo, sequences otherwise): the weight
    that makes data-parallel ranks average to the global-batch loss."""
    return float(mask.sum()) if how == "dapo" else float((mask.sum(1) > 0).sum())


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (r - mean_group) / (std_group + ε); `batch` divides by the batch std, `none` only centres
    (Dr. GRPO). Rewards are laid out group by group: rows [g*G, (g+1)*G) share a prompt."""
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        return centred / (grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    return centred


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i - mean of the other G-1 rewards of the same prompt (Ahmadian et al., 2024)."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries (mean kept if not shift_mean); 0 outside the mask."""
    n = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / n
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{k>=t} γ^(k-t) r_k over each sequence's masked tokens (REINFORCE++'s return)."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over each sequence's masked tokens:
    δ_t = r_t + γ V_{t+1} - V_t (V = 0 after the last token), A_t = δ_t + γλ A_{t+1}. Returns (A, A + V)."""
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(token_rewards[:, 0])
    next_advantage = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m
        advantages[:, t] = advantage
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask
