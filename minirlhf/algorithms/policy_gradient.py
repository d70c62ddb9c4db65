"""Pure policy-gradient math shared by PPO, GRPO, SPO, RLOO and REINFORCE++.

All per-token tensors are (batch, T-1), aligned with `input_ids[:, 1:]` like the log-prob helper, and
`mask` is 1 on completion tokens only. KL estimators follow Schulman (2020), "Approximating KL
Divergence", with log-ratio lr = log π_ref - log π (samples drawn from π):
    k1 = -lr            unbiased, can be negative (PPO's per-token reward penalty)
    k2 = lr² / 2        biased, low variance
    k3 = exp(lr) - lr - 1   unbiased, always >= 0 (GRPO's and SPO's loss penalty)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

# The three choices of a policy-gradient loss, each one idea (TRL's `loss_type` names a combination; the presets in
# grpo.py map those names onto these):
Surrogate = Literal["clip", "cispo", "sapo", "vespo"]  # how a token's loss is formed from its ratio and advantage
RatioLevel = Literal["token", "sequence"]  # an importance ratio per token, or one per sequence (GSPO)
Aggregation = Literal["sequence_mean", "token_mean", "local_token_mean", "constant", "sequence_sum"]


@dataclass(frozen=True)
class PolicyLoss:
    """One policy-gradient loss: surrogate x importance-ratio level x aggregation, and their parameters."""

    surrogate: Surrogate = "clip"
    importance_sampling_level: RatioLevel = "token"
    aggregation: Aggregation = "sequence_mean"
    eps_low: float = 0.2  # clip: ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # clip: ratio clipped above at 1 + eps_high
    clip_delta: float | None = None  # clip: two-sided clipping, the unclipped ratio capped at delta
    cispo_max_ratio: float = 5.0  # cispo: the importance weight's cap (ε_max)
    sapo_temperature_pos: float = 1.0  # sapo: gate temperature where A > 0
    sapo_temperature_neg: float = 1.05  # sapo: gate temperature where A <= 0
    vespo_shape: tuple[float, float] = (2.0, 3.0)  # vespo: (k, λ) of the Gamma weight where A >= 0
    vespo_shape_neg: tuple[float, float] = (3.0, 2.0)  # vespo: (k, λ) where A < 0
    kl_bias_correction: bool = False  # weight the KL term by ρ: an unbiased reverse-KL gradient off-policy


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from log-probs of tokens sampled from π."""
    log_ratio = ref_logps - logps
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - log_ratio - 1


def importance_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                         level: RatioLevel = "token") -> torch.Tensor:
    """log ρ with ρ = π/π_old: per token (B, T-1), or GSPO's length-normalised sequence ratio
    log ρ_i = (1/|y_i|) Σ_t (log π - log π_old)_t, one per sequence (B, 1) (Zheng et al., 2025)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)


def rollout_correction_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                               level: RatioLevel, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS; Yao et al., 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; TRL's `vllm_importance_sampling_correction`, *_truncate modes): the rollout's tokens
    were drawn by a sampler whose numerics differ from the trainer's (bf16 weights), π_s instead of π_old, so each
    token's policy loss is weighted by min(π_old / π_s, cap), per token or with the sequence's product of ratios
    for every token of it. Detached (a constant of the rollout); 1 where mask is 0 (token level)."""
    log_ratio = ((old_logps - sampler_logps) * mask).detach()
    if level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(mask)
    return torch.exp(log_ratio.clamp(max=math.log(cap)))


def clip_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
                   delta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) (Schulman et al., 2017; a separate ε_high is
    DAPO's clip-higher, Yu et al., 2025). `delta` also caps the unclipped ρ at δ, so a negative advantage on an
    exploding ratio cannot give an unbounded loss (two-sided clipping, INTELLECT-2, 2025).
    Returns (loss, 1 where the clip was active)."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    unclipped = (ratio if delta is None else torch.clamp(ratio, max=delta)) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def cispo_surrogate(log_ratio: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, max_ratio: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO's per-token loss -sg(min(ρ, ε_max)) · A · log π: the importance weight is capped and detached instead
    of the update being clipped, so every token keeps its gradient (MiniMax-M1, 2025; ScaleRL, 2025).
    Returns (loss, 1 where the weight was capped)."""
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, max=max_ratio).detach()
    return -weight * advantages * logps, (ratio > max_ratio).float()


def sapo_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float,
                   temperature_neg: float) -> torch.Tensor:
    """SAPO's per-token loss -(4/τ) σ(τ(ρ - 1)) · A: a smooth gate instead of a hard clip; its slope is 1 at ρ = 1
    (the plain policy gradient on-policy) and fades off-policy; τ_pos where A > 0, τ_neg elsewhere (Soft
    Adaptive Policy Optimization, Gao et al., 2025)."""
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg)
    return -torch.sigmoid(tau * (torch.exp(log_ratio) - 1)) * 4 / tau * advantages


def vespo_surrogate(log_ratio: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    shape_pos: tuple[float, float], shape_neg: tuple[float, float],
                    rollout_weights: torch.Tensor | None = None) -> torch.Tensor:
    """VESPO's per-token loss -sg(φ(w)) · A · log π (Variational Sequence-level Soft Policy Optimization, 2026):
    w = Π_t ρ_t is the sequence's importance weight (its summed token log-ratios, clamped to [log 1e-8, 20]) and
    φ(w) = e^λ w^k e^{-λw} a Gamma-shaped weight with φ(1) = 1 (the plain policy gradient on-policy) that fades
    smoothly both for w -> 0 and for large w instead of clipping; (k, λ) = shape_pos where A >= 0, else
    shape_neg. φ is computed in log space and detached. Token-level `rollout_weights` (π_old / π_sampler, truncated)
    join w as factors, log w += Σ_t log weight_t (as TRL: VESPO's own importance weight absorbs the correction)."""
    with torch.no_grad():
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(1, keepdim=True)
        if rollout_weights is not None:
            log_w = log_w + (torch.log(rollout_weights).clamp(math.log(1e-8), 20.0) * mask).sum(1, keepdim=True)
        log_w = torch.clamp(log_w, math.log(1e-8), 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, shape_pos[0], shape_neg[0])
        lam = torch.where(nonneg, shape_pos[1], shape_neg[1]).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * advantages * logps


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token_mean",
              max_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.
    sequence_mean     mean over each sequence's tokens, then over sequences (GRPO, Shao et al., 2024)
    token_mean        mean over every token of the step, all micro-batches and ranks together (DAPO, Yu et al., 2025)
    local_token_mean  mean over each micro-batch's tokens, micro-batches weighted alike (TRL's bnpo)
    constant          token sum / (sequences x max_len): no length bias (Dr. GRPO, Liu et al., 2025)
    sequence_sum      each sequence's token sum, mean over sequences: a sequence weighs its length (LUSPO, 2026)
    Rows whose mask is all 0 (e.g. skipped groups) do not count as sequences."""
    masked = per_token * mask
    rows = (mask.sum(1) > 0).float().sum().clamp(min=1)
    if how == "sequence_mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    if how in ("token_mean", "local_token_mean"):
        return masked.sum() / mask.sum().clamp(min=1)
    if how == "constant":
        return masked.sum() / (rows * (max_len or per_token.shape[1]))
    if how == "sequence_sum":
        return masked.sum() / rows
    raise ValueError(f"unknown aggregation {how!r}")


def aggregate_units(mask: torch.Tensor, how: Aggregation = "token_mean") -> float:
    """How many units `aggregate(..., how)` averages over: tokens for token_mean, 1 for local_token_mean (each
    micro-batch weighs the same), sequences otherwise. The loop weights micro-batches and ranks by it, so the
    accumulated gradient is the gradient of the whole step's loss."""
    if how == "token_mean":
        return float(mask.sum())
    if how == "local_token_mean":
        return 1.0
    return float((mask.sum(1) > 0).sum())


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, share: float) -> torch.Tensor:
    """1 on the `share` of masked tokens with the highest entropy, 0 elsewhere (ties at the threshold kept): the
    "forking" tokens where the policy decides; training on the top 20% alone matches training on all (Wang et
    al., 2025, "Beyond the 80/20 rule"). The threshold is the (1 - share) quantile over this batch's tokens."""
    values = entropy[mask.bool()]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values.float(), 1 - share)
    return ((entropy >= threshold) & mask.bool()).float()


def policy_gradient_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         spec: PolicyLoss, kl: torch.Tensor | None = None, kl_coef: float = 0.0,
                         max_len: int | None = None, policy_mask: torch.Tensor | None = None,
                         rollout_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`spec`'s surrogate per token, plus kl_coef · kl (times ρ with `kl_bias_correction`: samples come from π_old,
    so the KL to the reference needs the importance weight too, DeepSeek-V3.2, 2025), aggregated by
    `spec.aggregation` over `mask`. `policy_mask` (e.g. `high_entropy_mask`) keeps the surrogate on some tokens
    only; the KL term and the average still cover all of `mask`, as in TRL. `rollout_weights`
    (`rollout_correction_weights`) multiply the surrogate per token, before the KL term is added (as TRL; VESPO
    takes them into its sequence weight instead).
    Returns (loss, per-token 0/1 where the ratio was clipped or the weight capped)."""
    log_ratio = importance_log_ratio(logps, old_logps, mask, spec.importance_sampling_level)
    if spec.surrogate == "clip":
        per_token, clipped = clip_surrogate(log_ratio, advantages, spec.eps_low, spec.eps_high, spec.clip_delta)
    elif spec.surrogate == "cispo":
        per_token, clipped = cispo_surrogate(log_ratio, logps, advantages, spec.cispo_max_ratio)
    elif spec.surrogate == "sapo":
        per_token = sapo_surrogate(log_ratio, advantages, spec.sapo_temperature_pos, spec.sapo_temperature_neg)
        clipped = torch.zeros_like(logps)
    elif spec.surrogate == "vespo":  # its sequence weight comes from the token log-ratios, whatever the level
        per_token = vespo_surrogate(logps - old_logps, logps, advantages, mask, spec.vespo_shape,
                                    spec.vespo_shape_neg, rollout_weights)
        rollout_weights = None  # already inside φ
        clipped = torch.zeros_like(logps)
    else:
        raise ValueError(f"unknown surrogate {spec.surrogate!r}")
    if policy_mask is not None:
        per_token = per_token * policy_mask
    if rollout_weights is not None:
        per_token = per_token * rollout_weights
    if kl is not None and kl_coef > 0:
        per_token = per_token + kl_coef * (kl * torch.exp(log_ratio) if spec.kl_bias_correction else kl)
    return aggregate(per_token, mask, spec.aggregation, max_len), clipped.expand_as(logps)


def adaptive_entropy_coef(coef: float, entropy: float, target: float, delta: float, lo: float, hi: float) -> float:
    """Skywork-OR1's adaptive entropy control (He et al., 2025): after a step whose mean token entropy is at or
    below `target` the coefficient grows by `delta`, otherwise it shrinks by `delta`, within [lo, hi]."""
    return min(coef + delta, hi) if entropy <= target else max(coef - delta, lo)


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


def normalize_then_sum_advantages(part_rewards: torch.Tensor, weights: torch.Tensor, group_size: int,
                                  eps: float = 1e-4) -> torch.Tensor:
    """Several rewards (rows, K): each normalised within its group, (r_k - mean_group r_k) / (std_group r_k + ε),
    then the weighted sum normalised over the batch, so a reward with a small spread is not drowned by one with
    a large spread (GDPO, 2026; TRL's multi_objective_aggregation="normalize_then_sum")."""
    grouped = part_rewards.view(-1, group_size, part_rewards.shape[1])
    normalised = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)
    summed = (normalised.view(-1, part_rewards.shape[1]) * weights.to(part_rewards)).sum(1)
    return (summed - summed.mean()) / (summed.std() + eps)


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
