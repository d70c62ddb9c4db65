"""The policy-gradient math of PPO / GRPO / SPO against hand computations on tiny tensors.

Every expected value here is written as plain Python scalars and loops, never with the vectorised code under
test: KL estimators k1/k2/k3, the clipped surrogate and its clip indicator, the three aggregations, the
advantage estimators (group / batch / none, RLOO, whitening, discounted returns, GAE), GRPO's loss, PPO's
clipped value loss and adaptive KL controller, and SPO's Beta value tracker.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from minirlhf.algorithms.policy_gradient import (
    PolicyLoss,
    aggregate,
    aggregate_units,
    cispo_surrogate,
    clip_surrogate,
    discounted_returns,
    gae,
    group_advantages,
    importance_log_ratio,
    kl_estimate,
    masked_whiten,
    policy_gradient_loss,
    rloo_advantages,
    rollout_correction_weights,
    sapo_surrogate,
    vespo_surrogate,
)
from minirlhf.algorithms.ppo import adaptive_kl_update, ppo_value_loss
from minirlhf.algorithms.spo import BetaValueTracker


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_by_hand():
    logps = [-0.5, -1.2, -2.0, -0.1]
    refs = [-0.7, -1.2, -1.0, -3.0]
    for kind in ("k1", "k2", "k3"):
        got = kl_estimate(t(logps), t(refs), kind)
        for i, (lp, rp) in enumerate(zip(logps, refs)):
            r = rp - lp  # log(π_ref / π)
            expected = {"k1": -r, "k2": 0.5 * r * r, "k3": math.exp(r) - r - 1}[kind]
            assert got[i].item() == pytest.approx(expected, abs=1e-6), (kind, i)
    # identical policies: every estimator is exactly 0
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(t(logps), t(logps), kind), torch.zeros(4))


def test_k3_is_never_negative():
    g = torch.Generator().manual_seed(0)
    logps = torch.randn(2000, generator=g) * 3
    refs = torch.randn(2000, generator=g) * 3
    assert (kl_estimate(logps, refs, "k3") >= 0).all()
    assert (kl_estimate(logps, refs, "k1") < 0).any()  # k1 is unbiased but can be negative


def test_k1_and_k3_means_approximate_the_true_kl_of_a_categorical():
    p = [0.5, 0.3, 0.15, 0.05]  # π (we sample from it)
    q = [0.25, 0.25, 0.25, 0.25]  # π_ref
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # KL(π || π_ref) ≈ 0.2442
    g = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(torch.tensor(p), 20_000, replacement=True, generator=g)
    logps, refs = torch.log(torch.tensor(p))[samples], torch.log(torch.tensor(q))[samples]
    k3 = kl_estimate(logps, refs, "k3").mean().item()
    k1 = kl_estimate(logps, refs, "k1").mean().item()
    # Measured with this seed: k3 - KL ≈ -0.0022 and k1 - KL ≈ +0.0025, against Monte-Carlo standard errors of
    # 0.0035 (k3) and 0.0042 (k1) at n = 20k; the tolerance is three standard errors.
    assert k3 == pytest.approx(true_kl, abs=0.011)
    assert k1 == pytest.approx(true_kl, abs=0.013)
    # k2 is biased: here E[k2] - KL ≈ -0.035, about 19 standard errors (0.0019) away from 0.
    k2 = kl_estimate(logps, refs, "k2").mean().item()
    assert true_kl - k2 > 0.02


# ----------------------------------------------------------------------------------------------------
# Clipped surrogate


def test_clipped_surrogate_engages_only_in_the_direction_that_matters():
    eps_low, eps_high = 0.1, 0.3  # deliberately different: DAPO's clip-higher
    # (ratio, advantage, clipped?) — the ratio is exp(logp - old_logp)
    cases = [
        (1.5, 2.0, True),    # A > 0, ratio > 1 + ε_high: clipped at 1.3
        (1.25, 2.0, False),  # A > 0, ratio inside [0.9, 1.3]  (would be clipped with ε_high = ε_low = 0.1)
        (0.5, 2.0, False),   # A > 0, ratio < 1 - ε_low: the min keeps the unclipped (more pessimistic) value
        (0.5, -1.0, True),   # A < 0, ratio < 1 - ε_low: clipped at 0.9
        (0.95, -1.0, False),  # A < 0, ratio inside
        (1.5, -1.0, False),  # A < 0, ratio > 1 + ε_high: unclipped (pessimistic) value kept
        (1.0, 3.0, False),   # on-policy
    ]
    old = torch.zeros(len(cases))
    logps = torch.tensor([math.log(r) for r, _, _ in cases], requires_grad=True)
    adv = t([a for _, a, _ in cases])
    loss, clipped = clip_surrogate(logps - old, adv, eps_low, eps_high)
    loss.sum().backward()
    for i, (ratio, a, is_clipped) in enumerate(cases):
        clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
        expected = -min(ratio * a, clipped_ratio * a)
        assert loss[i].item() == pytest.approx(expected, abs=1e-6), i
        assert clipped[i].item() == float(is_clipped), i
        # d loss / d logp = -ratio * A on the unclipped branch, 0 where the clip is active
        expected_grad = 0.0 if is_clipped else -ratio * a
        assert logps.grad[i].item() == pytest.approx(expected_grad, abs=1e-5), i


def test_clip_higher_widens_only_the_upper_clip():
    logps, old, adv = t([math.log(1.25)]), t([0.0]), t([1.0])
    _, clipped_asym = clip_surrogate(logps - old, adv, 0.2, 0.28)
    _, clipped_sym = clip_surrogate(logps - old, adv, 0.2, 0.2)
    assert clipped_asym.item() == 0.0 and clipped_sym.item() == 1.0


def test_two_sided_clip_caps_the_ratio_of_a_negative_advantage():
    """INTELLECT-2's δ: with A < 0 the min picks the unclipped ρA, unbounded as ρ grows; δ caps it."""
    logps, old, adv = torch.tensor([math.log(3.0)], requires_grad=True), t([0.0]), t([-1.0])
    loss, _ = clip_surrogate(logps - old, adv, 0.2, 0.2)
    assert loss.item() == pytest.approx(3.0)  # -min(3 * -1, 1.2 * -1)
    capped, _ = clip_surrogate(logps - old, adv, 0.2, 0.2, delta=2.0)
    assert capped.item() == pytest.approx(2.0)  # -min(2 * -1, 1.2 * -1)
    capped.backward()
    assert logps.grad.item() == 0.0  # the capped ratio passes no gradient
    inside, _ = clip_surrogate(t([math.log(1.5)]), adv, 0.2, 0.2, delta=2.0)
    assert inside.item() == pytest.approx(1.5)  # below δ nothing changes


def test_cispo_keeps_every_tokens_gradient_with_a_capped_detached_weight():
    ratios, adv = [0.5, 1.0, 2.0, 8.0], [1.0, -2.0, 1.5, 1.0]
    cap = 5.0
    logps = torch.tensor([math.log(r) - 1.0 for r in ratios], requires_grad=True)
    old = logps.detach() - t([math.log(r) for r in ratios])  # exp(logps - old) == ratios
    loss, capped = cispo_surrogate(logps - old, logps, t(adv), cap)
    loss.sum().backward()
    for i, (r, a) in enumerate(zip(ratios, adv)):
        weight = min(r, cap)
        assert loss[i].item() == pytest.approx(-weight * a * logps[i].item(), rel=1e-5), i
        assert logps.grad[i].item() == pytest.approx(-weight * a, rel=1e-5), i  # never zeroed, unlike clip
        assert capped[i].item() == float(r > cap), i


def test_sapo_gate_by_hand_slope_one_on_policy():
    tau_pos, tau_neg = 1.0, 1.05
    cases = [(1.0, 2.0), (1.0, -1.0), (1.8, 1.0), (0.4, -0.5)]  # (ratio, advantage)
    logps = torch.tensor([math.log(r) for r, _ in cases], requires_grad=True)
    adv = t([a for _, a in cases])
    loss = sapo_surrogate(logps, adv, tau_pos, tau_neg)
    loss.sum().backward()
    for i, (r, a) in enumerate(cases):
        tau = tau_pos if a > 0 else tau_neg
        gate = 1 / (1 + math.exp(-tau * (r - 1)))
        assert loss[i].item() == pytest.approx(-gate * 4 / tau * a, rel=1e-5), i
        # d/dlogp of -(4/τ)σ(τ(ρ-1))A = -4 σ (1 - σ) ρ A
        assert logps.grad[i].item() == pytest.approx(-4 * gate * (1 - gate) * r * a, rel=1e-5), i
    assert logps.grad[0].item() == pytest.approx(-2.0)  # on-policy: the plain policy gradient -A


def test_vespo_gamma_weight_by_hand_one_on_policy_and_fading_both_ways():
    """φ(w) = e^λ w^k e^{-λw} with w = exp(Σ_t masked token log-ratios), (k, λ) by the advantage's sign; the loss is
    -φ·A·log π with φ detached, so d/dlog π = -φ·A (the plain policy gradient when w = 1)."""
    shape_pos, shape_neg = (2.0, 3.0), (3.0, 2.0)
    mask = t([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    token_log_ratio = t([[0.1, -0.1, 5.0], [0.2, 0.3, 0.1], [-1.0, 0.0, 0.0], [0.5, 0.4, 0.0]])  # masked 5.0 ignored
    adv = t([1.0, 1.0, -2.0, -0.5])[:, None] * mask
    logps = (-torch.rand(4, 3, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    loss = vespo_surrogate(token_log_ratio, logps, adv, mask, shape_pos, shape_neg)
    loss.sum().backward()
    for i in range(4):
        w = math.exp(sum(token_log_ratio[i, j].item() for j in range(3) if mask[i, j]))
        k, lam = shape_pos if adv[i, 0] >= 0 else shape_neg
        phi = math.exp(lam) * w**k * math.exp(-lam * w)
        for j in range(3):
            a = adv[i, j].item()
            assert loss[i, j].item() == pytest.approx(-phi * a * logps[i, j].item(), rel=1e-5, abs=1e-7), (i, j)
            assert logps.grad[i, j].item() == pytest.approx(-phi * a, rel=1e-5, abs=1e-7), (i, j)
    assert loss[0, 0].item() == pytest.approx(-adv[0, 0].item() * logps[0, 0].item(), rel=1e-5)  # w = 1: φ = 1
    phis = [math.exp(3.0) * w**2 * math.exp(-3.0 * w) for w in (0.3, 1.0, 2.0)]
    assert phis[0] < 1 and phis[2] < 1 and phis[1] == pytest.approx(1.0)  # below 1 on both sides of on-policy


def test_vespo_takes_rollout_weights_into_its_sequence_weight_by_hand():
    """With a bf16 sampler's truncated weights ω_t = π_old/π_sampler, VESPO's w = Π_t ρ_t ω_t over masked tokens
    (as TRL); the weights do not multiply the loss a second time."""
    shape = (2.0, 3.0)
    mask = t([[1, 1, 0], [1, 0, 0]])
    token_log_ratio = t([[0.1, -0.2, 0.0], [0.3, 0.0, 0.0]])
    weights = t([[1.5, 0.5, 9.0], [2.0, 1.0, 1.0]])  # 9.0 sits on a masked token: ignored
    adv = t([1.0, 1.0])[:, None] * mask
    logps = -t([[0.4, 0.7, 0.1], [0.2, 0.3, 0.5]])
    loss = vespo_surrogate(token_log_ratio, logps, adv, mask, shape, shape, rollout_weights=weights)
    for i in range(2):
        log_w = sum(token_log_ratio[i, j].item() + math.log(weights[i, j].item()) for j in range(3) if mask[i, j])
        w = math.exp(log_w)
        phi = math.exp(3.0) * w**2 * math.exp(-3.0 * w)
        for j in range(3):
            assert loss[i, j].item() == pytest.approx(-phi * adv[i, j].item() * logps[i, j].item(), rel=1e-5,
                                                      abs=1e-7), (i, j)


def test_sequence_level_ratio_is_the_mean_token_log_ratio_of_each_sequence():
    logps = t([[0.0, -1.0, -2.0, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    old = t([[5.0, -1.5, -1.0, -3.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = t([[0, 1, 1, 1], [1, 1, 0, 0]])
    seq = importance_log_ratio(logps, old, mask, "sequence")
    assert seq.shape == (2, 1)
    assert seq[0, 0].item() == pytest.approx((0.5 - 1.0 + 0.0) / 3)  # the prompt position (log-ratio -5) is masked
    assert seq[1, 0].item() == pytest.approx(1.0)
    assert torch.equal(importance_log_ratio(logps, old, mask, "token"), logps - old)


def test_gspo_clips_whole_sequences():
    """With the sequence ratio every token of a sequence shares one ratio, so a sequence is clipped as a whole."""
    logps = torch.zeros(2, 3)
    old = t([[-0.5, 0.0, 0.0], [0.0, 0.0, -0.9]])  # sequence 0: mean log-ratio 1/6 -> ρ 1.18 (inside 1.2)
    mask, adv = torch.ones(2, 3), torch.ones(2, 3)  # sequence 1: mean 0.3 -> ρ 1.35 (clipped)
    _, clipped = policy_gradient_loss(logps, old, adv, mask, PolicyLoss(importance_sampling_level="sequence"))
    assert clipped.tolist() == [[0.0] * 3, [1.0] * 3]
    _, per_token = policy_gradient_loss(logps, old, adv, mask, PolicyLoss())
    assert per_token.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


# ----------------------------------------------------------------------------------------------------
# Aggregation

PER_TOKEN = [[1.0, 2.0, 3.0, 4.0],
             [5.0, 6.0, 7.0, 8.0],
             [9.0, 10.0, 11.0, 12.0]]
MASK = [[1, 1, 1, 0],   # 3 tokens
        [0, 0, 0, 0],   # skipped group: not a sequence
        [0, 1, 0, 0]]   # 1 token (a prompt position first)


def test_aggregate_by_hand_with_a_skipped_row():
    per_token, mask = t(PER_TOKEN), t(MASK)
    rows = [[v for v, m in zip(pr, mr) if m] for pr, mr in zip(PER_TOKEN, MASK)]
    live = [r for r in rows if r]  # 2 sequences
    grpo = sum(sum(r) / len(r) for r in live) / len(live)  # ((1+2+3)/3 + 10/1) / 2 = 6
    dapo = sum(sum(r) for r in live) / sum(len(r) for r in live)  # 16 / 4 = 4
    dr_grpo_4 = sum(sum(r) for r in live) / (len(live) * 4)  # 16 / 8 = 2
    dr_grpo_10 = sum(sum(r) for r in live) / (len(live) * 10)  # max_len from config: 16 / 20
    luspo = sum(sum(r) for r in live) / len(live)  # 16 / 2 = 8
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx(grpo) == 6.0
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(dapo) == 4.0
    assert aggregate(per_token, mask, "local_token_mean").item() == pytest.approx(dapo) == 4.0
    assert aggregate(per_token, mask, "constant").item() == pytest.approx(dr_grpo_4) == 2.0
    assert aggregate(per_token, mask, "constant", max_len=10).item() == pytest.approx(dr_grpo_10)
    assert aggregate(per_token, mask, "sequence_sum").item() == pytest.approx(luspo) == 8.0
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(per_token, mask, "mean")


def test_aggregate_units_count_what_each_aggregation_averages_over():
    """The data-parallel weight of a rank's loss: tokens for token_mean, live sequences for the sequence
    aggregations, 1 for local_token_mean (each micro-batch alike, as TRL's bnpo). Splitting the batch above into
    ranks and re-weighting each rank's aggregate by its units recovers the whole-batch one."""
    per_token, mask = t(PER_TOKEN), t(MASK)
    assert aggregate_units(mask, "token_mean") == 4.0  # 3 + 0 + 1 response tokens
    assert aggregate_units(mask, "local_token_mean") == 1.0
    for how in ("sequence_mean", "constant", "sequence_sum"):
        assert aggregate_units(mask, how) == 2.0  # the empty row does not count
    for how in ("sequence_mean", "token_mean", "sequence_sum"):
        parts = [(aggregate(per_token[i:i + 1], mask[i:i + 1], how), aggregate_units(mask[i:i + 1], how))
                 for i in range(3)]
        total = sum(units for _, units in parts)
        assert sum(loss.item() * units for loss, units in parts) / total == pytest.approx(
            aggregate(per_token, mask, how).item())


def test_aggregate_of_an_all_masked_batch_is_zero_not_nan():
    for how in ("sequence_mean", "token_mean", "local_token_mean", "constant", "sequence_sum"):
        assert aggregate(t(PER_TOKEN), torch.zeros(3, 4), how).item() == 0.0


# ----------------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.5]  # two groups of G = 4
    G, eps = 4, 1e-4
    groups = [rewards[:4], rewards[4:]]
    batch_std = statistics.stdev(rewards)  # unbiased, like torch.std
    exp_group, exp_batch, exp_none = [], [], []
    for g in groups:
        mean, std = sum(g) / G, statistics.stdev(g)
        for r in g:
            exp_group.append((r - mean) / (std + eps))
            exp_batch.append((r - mean) / (batch_std + eps))
            exp_none.append(r - mean)
    for scale, expected in (("group", exp_group), ("batch", exp_batch), ("none", exp_none)):
        got = group_advantages(t(rewards), G, scale).tolist()
        assert got == pytest.approx(expected, abs=1e-5), scale
    # a group with all-equal rewards gets exactly zero advantage (no NaN from std = 0)
    assert group_advantages(t([1.0, 1.0, 1.0]), 3).tolist() == [0.0, 0.0, 0.0]


def test_rloo_advantages_by_hand():
    rewards = [1.0, 0.0, 3.0, 2.0, 5.0, 5.0]  # two groups of G = 3
    G = 3
    expected = []
    for start in range(0, len(rewards), G):
        g = rewards[start:start + G]
        for i, r in enumerate(g):
            others = [x for j, x in enumerate(g) if j != i]
            expected.append(r - sum(others) / (G - 1))
    assert rloo_advantages(t(rewards), G).tolist() == pytest.approx(expected, abs=1e-6)


def test_masked_whiten_has_zero_mean_unit_std_inside_and_zero_outside():
    values = [[3.0, 1.0, 4.0, 1.0, 5.0],
              [9.0, 2.0, 6.0, 5.0, 3.0]]
    mask = [[0, 1, 1, 1, 0],
            [1, 1, 1, 0, 0]]
    got = masked_whiten(t(values), t(mask))
    inside = [v for vr, mr in zip(values, mask) for v, m in zip(vr, mr) if m]
    mean = sum(inside) / len(inside)
    std = math.sqrt(sum((v - mean) ** 2 for v in inside) / len(inside))  # population std (biased, as in code)
    for b in range(2):
        for i in range(5):
            expected = (values[b][i] - mean) / std if mask[b][i] else 0.0
            assert got[b, i].item() == pytest.approx(expected, abs=1e-5)
    got_inside = [got[b, i].item() for b in range(2) for i in range(5) if mask[b][i]]
    assert statistics.fmean(got_inside) == pytest.approx(0.0, abs=1e-6)
    assert statistics.pstdev(got_inside) == pytest.approx(1.0, abs=1e-5)
    # shift_mean=False keeps the original mean
    kept = masked_whiten(t(values), t(mask), shift_mean=False)
    assert kept[0, 1].item() == pytest.approx((values[0][1] - mean) / std + mean, abs=1e-5)
    assert kept[0, 0].item() == 0.0


# Masks with prompt positions (leading zeros) and padding (trailing zeros), different lengths.
RL_MASK = [[0, 0, 1, 1, 1, 0],
           [0, 1, 1, 1, 1, 1],
           [0, 0, 0, 1, 0, 0]]


def _rl_tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(3, 6, generator=g)
    values = torch.randn(3, 6, generator=g)
    return rewards, values


def test_discounted_returns_by_hand():
    rewards, _ = _rl_tensors()
    for gamma in (1.0, 0.9):
        got = discounted_returns(rewards, t(RL_MASK), gamma)
        for b, mrow in enumerate(RL_MASK):
            positions = [i for i, m in enumerate(mrow) if m]
            for i in range(6):
                if i not in positions:
                    assert got[b, i].item() == 0.0
                    continue
                later = [p for p in positions if p >= i]
                expected = sum(gamma ** k * rewards[b, p].item() for k, p in enumerate(later))
                assert got[b, i].item() == pytest.approx(expected, abs=1e-5), (gamma, b, i)


def hand_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE over one sequence of completion tokens; V after the last token is 0."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for i in reversed(range(n)):
        next_v = values[i + 1] if i + 1 < n else 0.0
        delta = rewards[i] + gamma * next_v - values[i]
        running = delta + gamma * lam * running
        adv[i] = running
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 1.0)])
def test_gae_matches_a_per_sequence_loop(gamma, lam):
    rewards, values = _rl_tensors(seed=3)
    advantages, returns = gae(rewards, values, t(RL_MASK), gamma, lam)
    for b, mrow in enumerate(RL_MASK):
        positions = [i for i, m in enumerate(mrow) if m]
        adv, ret = hand_gae([rewards[b, p].item() for p in positions], [values[b, p].item() for p in positions],
                            gamma, lam)
        for i in range(6):
            if i in positions:
                k = positions.index(i)
                assert advantages[b, i].item() == pytest.approx(adv[k], abs=1e-5), (b, i)
                assert returns[b, i].item() == pytest.approx(ret[k], abs=1e-5), (b, i)
            else:
                assert advantages[b, i].item() == 0.0 and returns[b, i].item() == 0.0
    if gamma == lam == 1.0:  # γ = λ = 1: the return is the plain reward-to-go
        reward_to_go = discounted_returns(rewards, t(RL_MASK), 1.0)
        assert torch.allclose(returns, reward_to_go, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# GRPO loss


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_clip_loss_with_kl_by_hand(aggregation):
    g = torch.Generator().manual_seed(7)
    mask = [[0, 1, 1, 1],
            [0, 0, 0, 0],
            [1, 1, 0, 0]]
    logps = torch.randn(3, 4, generator=g) * 0.5 - 1
    old = logps + torch.randn(3, 4, generator=g) * 0.3
    refs = logps + torch.randn(3, 4, generator=g) * 0.3
    adv = t([[0.8] * 4, [0.0] * 4, [-1.1] * 4])
    eps_low, eps_high, beta, max_len = 0.2, 0.28, 0.05, 6
    kl = kl_estimate(logps, refs, "k3")
    spec = PolicyLoss(aggregation=aggregation, eps_low=eps_low, eps_high=eps_high)
    got, clipped = policy_gradient_loss(logps, old, adv, t(mask), spec, kl, beta, max_len)

    per_row: list[list[float]] = []
    for b in range(3):
        row = []
        for i in range(4):
            if not mask[b][i]:
                continue
            ratio = math.exp(logps[b, i].item() - old[b, i].item())
            a = adv[b, i].item()
            surrogate = -min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
            lr = refs[b, i].item() - logps[b, i].item()
            row.append(surrogate + beta * (math.exp(lr) - lr - 1))
        if row:
            per_row.append(row)
    if aggregation == "sequence_mean":
        expected = sum(sum(r) / len(r) for r in per_row) / len(per_row)
    elif aggregation == "token_mean":
        expected = sum(sum(r) for r in per_row) / sum(len(r) for r in per_row)
    else:
        expected = sum(sum(r) for r in per_row) / (len(per_row) * max_len)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    assert clipped.shape == (3, 4)


def test_rollout_correction_weights_by_hand():
    """min(π_old / π_sampler, cap) per token, or the sequence's product for all its tokens; masked tokens weigh 1."""
    old = torch.log(t([[0.5, 0.2, 0.9, 0.3], [0.4, 0.4, 0.5, 0.5]]))
    sampler = torch.log(t([[0.25, 0.4, 0.1, 0.9], [0.5, 0.8, 0.5, 0.5]]))
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    token = rollout_correction_weights(old, sampler, mask, "token", cap=3.0)
    torch.testing.assert_close(token, t([[2.0, 0.5, 3.0, 1.0], [0.8, 0.5, 1.0, 1.0]]))  # 9 truncated to 3
    sequence = rollout_correction_weights(old, sampler, mask, "sequence", cap=3.0)
    torch.testing.assert_close(sequence, t([[3.0] * 4, [0.4] * 4]))  # 2 x 0.5 x 9 = 9 -> 3; 0.8 x 0.5
    assert not rollout_correction_weights(old.requires_grad_(), sampler, mask, "token", 3.0).requires_grad


def test_rollout_weights_scale_the_surrogate_and_not_the_kl():
    g = torch.Generator().manual_seed(9)
    logps, old = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    adv, mask, kl = torch.randn(2, 3, generator=g), torch.ones(2, 3), torch.rand(2, 3, generator=g)
    weights = torch.rand(2, 3, generator=g) * 2
    spec = PolicyLoss(aggregation="token_mean")
    plain, _ = policy_gradient_loss(logps, old, adv, mask, spec)
    per_token = -torch.minimum(torch.exp(logps - old) * adv, torch.exp(logps - old).clamp(0.8, 1.2) * adv)
    weighted, _ = policy_gradient_loss(logps, old, adv, mask, spec, kl, 0.1, rollout_weights=weights)
    assert plain.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    assert weighted.item() == pytest.approx((per_token * weights + 0.1 * kl).mean().item(), abs=1e-6)


def test_policy_loss_without_kl_coef_ignores_the_kl():
    g = torch.Generator().manual_seed(8)
    logps, old = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    adv, mask = torch.randn(2, 3, generator=g), torch.ones(2, 3)
    huge_kl = torch.full((2, 3), 1e6)
    spec = PolicyLoss()
    no_kl, _ = policy_gradient_loss(logps, old, adv, mask, spec, None, 0.0)
    beta_zero, _ = policy_gradient_loss(logps, old, adv, mask, spec, huge_kl, 0.0)
    no_tensor, _ = policy_gradient_loss(logps, old, adv, mask, spec, None, 0.5)
    assert beta_zero.item() == no_kl.item() == no_tensor.item()
    with_kl, _ = policy_gradient_loss(logps, old, adv, mask, spec, torch.ones(2, 3), 0.5)
    assert with_kl.item() == pytest.approx(no_kl.item() + 0.5, abs=1e-6)  # mean of β·1 over tokens


# ----------------------------------------------------------------------------------------------------
# PPO


def test_ppo_policy_loss_weights_each_tokens_clipped_surrogate_by_its_rollout_weight():
    """PPO's policy loss with a bf16 sampler's truncated weights: token mean of ω_t · -min(ρA, clip(ρ)A) (entropy
    bonus off), by hand; the value loss is not weighted."""
    from types import SimpleNamespace

    from minirlhf.algorithms.ppo import PPO

    mask = t([[0, 1, 1], [0, 1, 0]])
    logps, old = t([[0.0, -0.5, -1.0], [0.0, -0.2, 0.0]]), t([[0.0, -0.7, -0.9], [0.0, -0.6, 0.0]])
    weights = t([[1.0, 2.0, 0.5], [1.0, 3.0, 1.0]])
    adv, values = t([[0.0, 1.0, -1.0], [0.0, 0.5, 0.0]]), torch.zeros(2, 3)
    ppo = PPO.__new__(PPO)  # only what `loss` reads
    ppo.cfg = SimpleNamespace(clip_eps_low=0.2, clip_eps_high=0.2, clip_delta=None, vf_coef=0.5, value_clip=0.2)
    ppo.entropy_bonus = SimpleNamespace(applied=0.0, trains_entropy=False)
    ppo.policy_terms = lambda batch, entropy_grad=False: {"logps": logps, "old_logps": old, "mask": mask,
                                                          "entropy": torch.zeros(2, 3), "rollout_weights": weights}
    ppo._values = lambda batch: values
    batch = SimpleNamespace(advantages=adv, values=values, returns=values, stats={})
    _, metrics = PPO.loss(ppo, batch)
    per_token = []
    for b in range(2):
        for i in range(3):
            if mask[b, i]:
                ratio, a = math.exp(logps[b, i].item() - old[b, i].item()), adv[b, i].item()
                per_token.append(-weights[b, i].item() * min(ratio * a, min(max(ratio, 0.8), 1.2) * a))
    assert metrics["policy_loss"] == pytest.approx(sum(per_token) / len(per_token), abs=1e-6)
    assert metrics["value_loss"] == 0.0


def test_ppo_value_loss_uses_the_clipped_branch_when_it_is_worse():
    clip = 0.2
    values = [1.0, 0.1, 0.5, 9.0]      # V
    old = [0.0, 0.0, 0.0, 0.0]         # V_old
    returns = [2.0, 0.3, -1.0, 9.0]    # R
    mask = [1, 1, 1, 0]
    v = torch.tensor(values, requires_grad=True)
    loss, frac = ppo_value_loss(v, t(old), t(returns), t(mask), clip)
    loss.backward()
    terms, wins = [], []
    for vi, oi, ri, mi in zip(values, old, returns, mask):
        if not mi:
            continue
        vc = oi + min(max(vi - oi, -clip), clip)
        unclipped, clipped = (vi - ri) ** 2, (vc - ri) ** 2
        terms.append(max(unclipped, clipped))
        wins.append(clipped > unclipped)
    # row 0: V moved 1.0 past the clip toward R = 2: clipped V = 0.2, error 3.24 > 1.0, so the clipped error counts
    assert wins == [True, False, False]
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-6)
    assert frac.item() == pytest.approx(1 / 3, abs=1e-6)
    # the clipped branch is flat in V (gradient 0); the others get (V - R) / n; padding gets nothing
    assert v.grad.tolist() == pytest.approx([0.0, (0.1 - 0.3) / 3, (0.5 + 1.0) / 3, 0.0], abs=1e-6)


def test_adaptive_kl_update_by_hand():
    beta, target, horizon = 0.1, 0.5, 10
    for kl in (0.5, 0.55, 0.4, 5.0, 0.0):
        error = min(0.2, max(-0.2, kl / target - 1))
        expected = beta * (1 + error / horizon)
        assert adaptive_kl_update(beta, kl, target, horizon) == pytest.approx(expected, rel=1e-12)
    assert adaptive_kl_update(beta, 5.0, target, horizon) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_update(beta, 0.0, target, horizon) == pytest.approx(0.1 * 0.98)


# ----------------------------------------------------------------------------------------------------
# SPO value tracker


def test_beta_value_tracker_by_hand():
    d_half, rho_min, rho_max = 0.06, 0.5, 0.96
    tracker = BetaValueTracker(3, d_half, rho_min, rho_max)
    n_init = 1 / (1 - rho_min)
    a = [0.5 * n_init] * 3
    b = [0.5 * n_init] * 3
    assert tracker.value(torch.arange(3)).tolist() == pytest.approx([0.5] * 3)

    # first visit of slots 0 and 2: D = 0, so ρ = ρ_max
    rho = tracker.update(torch.tensor([0, 2]), t([1.0, 0.25]), t([-1.0, -2.0]))
    assert rho.tolist() == pytest.approx([rho_max, rho_max])
    a[0], b[0] = rho_max * a[0] + 1.0, rho_max * b[0] + 0.0
    a[2], b[2] = rho_max * a[2] + 0.25, rho_max * b[2] + 0.75
    assert tracker.successes.tolist() == pytest.approx(a) and tracker.failures.tolist() == pytest.approx(b)
    assert tracker.value(torch.tensor([0, 1, 2])).tolist() == pytest.approx([x / (x + y) for x, y in zip(a, b)])

    # second visit of slot 0: D = |mean logp now - then| = |-1.03 - (-1.0)| = 0.03 → ρ = 2^(-0.5) ≈ 0.707
    # slot 2 drifts a lot: D = 0.5 → 2^(-8.3) clipped up to ρ_min
    rho = tracker.update(torch.tensor([0, 2]), t([0.0, 1.0]), t([-1.03, -1.5]))
    rho0 = min(max(2 ** (-0.03 / d_half), rho_min), rho_max)
    assert rho0 == pytest.approx(2 ** -0.5, abs=1e-6)
    assert rho.tolist() == pytest.approx([rho0, rho_min], abs=1e-5)
    a[0], b[0] = rho0 * a[0] + 0.0, rho0 * b[0] + 1.0
    a[2], b[2] = rho_min * a[2] + 1.0, rho_min * b[2] + 0.0
    assert tracker.successes.tolist() == pytest.approx(a, abs=1e-5)
    assert tracker.failures.tolist() == pytest.approx(b, abs=1e-5)
    assert tracker.successes[1].item() == tracker.failures[1].item() == pytest.approx(0.5 * n_init)  # never visited


def test_beta_value_tracker_averages_repeated_slots():
    d_half, rho_min, rho_max = 0.06, 0.5, 0.96
    tracker = BetaValueTracker(2, d_half, rho_min, rho_max)
    n_init = 1 / (1 - rho_min)
    # slot 1 appears three times: reward mean 2/3, logp mean -1.0; slot 0 once
    rho = tracker.update(torch.tensor([1, 0, 1, 1]), t([1.0, 0.0, 1.0, 0.0]), t([-0.5, -3.0, -1.5, -1.0]))
    assert rho.tolist() == pytest.approx([rho_max, rho_max])
    assert tracker.successes.tolist() == pytest.approx([rho_max * 0.5 * n_init, rho_max * 0.5 * n_init + 2 / 3])
    assert tracker.failures.tolist() == pytest.approx([rho_max * 0.5 * n_init + 1.0, rho_max * 0.5 * n_init + 1 / 3])
    assert tracker.last_logp.tolist() == pytest.approx([-3.0, -1.0])
    # next visit measures drift from the averaged log-prob
    rho = tracker.update(torch.tensor([1]), t([1.0]), t([-1.06]))
    assert rho.tolist() == pytest.approx([min(max(2 ** (-0.06 / d_half), rho_min), rho_max)], abs=1e-5)  # = 0.5


def test_loss_type_presets_set_three_choices_and_explicit_options_win():
    from minirlhf.algorithms.grpo import LOSS_PRESETS, GRPOConfig, policy_loss_spec
    from minirlhf.config import ConfigError

    assert set(LOSS_PRESETS) == {"grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "gspo", "luspo", "vespo"}
    gspo = policy_loss_spec(GRPOConfig(loss_type="gspo"))
    assert (gspo.surrogate, gspo.aggregation, gspo.importance_sampling_level) == ("clip", "sequence_mean", "sequence")
    cispo = policy_loss_spec(GRPOConfig(loss_type="cispo", cispo_max_ratio=4.0))
    assert (cispo.surrogate, cispo.aggregation, cispo.cispo_max_ratio) == ("cispo", "token_mean", 4.0)
    mixed = policy_loss_spec(GRPOConfig(loss_type="dapo", surrogate="sapo", importance_sampling_level="sequence"))
    assert (mixed.surrogate, mixed.aggregation, mixed.importance_sampling_level) == ("sapo", "token_mean", "sequence")
    vespo = policy_loss_spec(GRPOConfig(loss_type="vespo", vespo_k_neg=1.5))
    assert (vespo.surrogate, vespo.aggregation, vespo.vespo_shape, vespo.vespo_shape_neg) == \
        ("vespo", "token_mean", (2.0, 3.0), (1.5, 2.0))
    with pytest.raises(ConfigError, match="vespo"):
        policy_loss_spec(GRPOConfig(loss_type="vespo", importance_sampling_level="sequence"))


def test_overlong_penalty_by_hand():
    from minirlhf.rewards.base import overlong_penalty

    lengths = torch.tensor([10, 12, 13, 15, 16])  # max_new_tokens 16, buffer 4: free up to 12 tokens
    assert overlong_penalty(lengths, 16, 4, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.125, -0.375, -0.5])


def test_high_entropy_mask_keeps_the_top_share_of_masked_tokens():
    from minirlhf.algorithms.policy_gradient import high_entropy_mask

    entropy = t([[9.0, 0.1, 0.5, 0.9, 0.3], [9.0, 0.7, 0.2, 0.0, 0.0]])
    mask = t([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0]])  # 6 tokens: 0.1 0.5 0.9 0.3 0.7 0.2 (the 9.0s are prompt)
    # the 0.5 quantile of the 6 masked entropies (linear interpolation) is 0.4: keeps 0.5, 0.9, 0.7
    assert high_entropy_mask(entropy, mask, 0.5).tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.tolist()
    assert high_entropy_mask(entropy, torch.zeros(2, 5), 0.5).sum() == 0


def test_normalize_then_sum_advantages_by_hand():
    """GDPO: each reward normalised in its group (unbiased std, as TRL's nanstd), weighted sum, then normalised
    over the batch. Reward 2's spread is 100x smaller than reward 1's but counts as much."""
    from minirlhf.algorithms.policy_gradient import normalize_then_sum_advantages

    parts = [[1.0, 0.00], [0.0, 0.02], [1.0, 0.01], [0.0, 0.00],   # group 0
             [0.0, 0.01], [0.0, 0.00], [1.0, 0.01], [1.0, 0.02]]   # group 1
    weights = [1.0, 0.5]
    summed = []
    for g in range(2):
        rows = parts[4 * g:4 * g + 4]
        normalised = []
        for k in range(2):
            column = [r[k] for r in rows]
            normalised.append([(v - statistics.fmean(column)) / (statistics.stdev(column) + 1e-4) for v in column])
        summed += [sum(weights[k] * normalised[k][i] for k in range(2)) for i in range(4)]
    expected = [(v - statistics.fmean(summed)) / (statistics.stdev(summed) + 1e-4) for v in summed]
    got = normalize_then_sum_advantages(t(parts), t(weights), 4)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_adaptive_entropy_control_by_hand():
    """Skywork-OR1: the coefficient grows by delta after a step at or below the target entropy, shrinks above it,
    within [lo, hi]; the bonus is applied only while the entropy is at or below the target."""
    from minirlhf.algorithms.grpo import GRPOConfig
    from minirlhf.algorithms.online import EntropyBonus
    from minirlhf.algorithms.policy_gradient import adaptive_entropy_coef

    assert adaptive_entropy_coef(0.01, 0.1, 0.2, 0.005, 0.0, 0.02) == pytest.approx(0.015)
    assert adaptive_entropy_coef(0.018, 0.2, 0.2, 0.005, 0.0, 0.02) == pytest.approx(0.02)  # at the target: up, capped
    assert adaptive_entropy_coef(0.003, 0.5, 0.2, 0.005, 0.0, 0.02) == 0.0  # above: down, floored
    bonus = EntropyBonus(GRPOConfig(entropy_coef=0.01, entropy_target=0.2, entropy_coef_delta=0.005))
    assert bonus.applied == 0.01 and bonus.trains_entropy
    assert bonus.after_step(0.1) == {"entropy_coef": pytest.approx(0.015)}
    assert bonus.after_step(0.9) == {"entropy_coef": 0.0} and bonus.coef == pytest.approx(0.01)
    fixed = EntropyBonus(GRPOConfig(entropy_coef=0.01))
    assert fixed.after_step(0.9) == {} and fixed.applied == 0.01
    assert not EntropyBonus(GRPOConfig()).trains_entropy


# ----------------------------------------------------------------------------------------------------
# Parity with TRL


@pytest.mark.parametrize("loss_type, level, delta, kl_correction, entropy_share, rollout_correction", [
    ("grpo", "token", None, False, 1.0, None), ("bnpo", "token", None, False, 1.0, None),
    ("dapo", "token", None, False, 1.0, None), ("dr_grpo", "token", None, False, 1.0, None),
    ("cispo", "token", None, False, 1.0, None), ("sapo", "token", None, False, 1.0, None),
    ("luspo", "sequence", None, False, 1.0, None), ("vespo", "token", None, False, 1.0, None),
    ("grpo", "sequence", None, False, 1.0, None),  # GSPO, TRL's spelling
    ("dapo", "token", 1.5, False, 1.0, None),  # two-sided clipping
    ("grpo", "token", None, True, 1.0, None), ("grpo", "sequence", None, True, 1.0, None),  # KL weighted by ρ
    ("dapo", "token", None, False, 0.5, None),  # only the high-entropy half of the tokens
    # a bf16 sampler's rollout: truncated importance sampling (TRL's vllm_importance_sampling_correction)
    ("grpo", "token", None, False, 1.0, "token"), ("dapo", "token", None, False, 1.0, "sequence"),
    ("vespo", "token", None, False, 1.0, "token"),  # inside VESPO's sequence weight
])
def test_policy_loss_matches_trl_grpo_trainer(loss_type, level, delta, kl_correction, entropy_share,
                                              rollout_correction, tokenizer, tmp_path):
    """Our `policy_gradient_loss` (with the preset `loss_type` sets, and the log-prob helper) vs TRL 1.16's
    `GRPOTrainer._compute_loss` on the same tiny HF Llama, batch, advantages, old and reference log-probs:
    loss and every parameter's gradient agree to 1e-6. Prompts share a length (TRL left-pads them without
    position ids); completions are right-padded to different lengths. One micro-batch, one process. With a
    rollout correction, TRL gets the truncated ratio its `_generate_and_score_completions` forms (token_truncate /
    sequence_truncate) from the same sampler log-probs."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from minirlhf.algorithms.grpo import GRPOConfig, policy_loss_spec
    from minirlhf.algorithms.policy_gradient import high_entropy_mask
    from minirlhf.logprobs import completion_logprobs

    vocab, pad, prompt_len, completion_len, rows = tokenizer.vocab_size, tokenizer.pad_id, 3, 5, 4
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer.backend.to_str()),
                                           eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=pad)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, vocab, (rows, prompt_len), generator=g)
    completion_ids = torch.randint(3, vocab, (rows, completion_len), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)  # right padding
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5])
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        attention = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
        full_completion = torch.cat([torch.zeros_like(prompt_ids), completion_mask], 1)
        current, _ = completion_logprobs(model, ids, attention, full_completion)
    # old / reference log-probs off the current ones by up to ±0.6, so ratios reach past every clip and cap
    old = current[:, -completion_len:] + (torch.rand(rows, completion_len, generator=g) - 0.5) * 1.2
    ref = current[:, -completion_len:] + (torch.rand(rows, completion_len, generator=g) - 0.5) * 1.2
    beta, max_len = 0.05, 8

    # ours: the stage's config -> its PolicyLoss; per-token tensors aligned with input_ids[:, 1:]
    cfg = GRPOConfig(loss_type=loss_type, importance_sampling_level=level, clip_eps_low=0.2, clip_eps_high=0.28,
                     clip_delta=delta, cispo_max_ratio=1.3, max_new_tokens=max_len, kl_bias_correction=kl_correction)
    if loss_type == "cispo":
        cfg.clip_eps_high = 1.3  # TRL reads ε_max from epsilon_high
    logps, mask, entropy = completion_logprobs(model, ids, attention, full_completion, return_entropy=True)
    forking = high_entropy_mask(entropy, mask, entropy_share) if entropy_share < 1 else None
    pad = torch.zeros(rows, prompt_len - 1)
    old_full, ref_full = torch.cat([pad, old], 1) * mask, torch.cat([pad, ref], 1) * mask
    kl = kl_estimate(logps, ref_full, "k3")
    sampler = old + (torch.rand(rows, completion_len, generator=g) - 0.5) * 0.8  # the sampler's log-probs
    cap = 1.3  # some ratios above it, some below
    weights = None
    if rollout_correction:
        weights = rollout_correction_weights(old_full, torch.cat([pad, sampler], 1) * mask, mask, rollout_correction,
                                             cap)
    ours, _ = policy_gradient_loss(logps, old_full, advantages[:, None] * mask, mask, policy_loss_spec(cfg), kl, beta,
                                   max_len, forking, weights)
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # TRL's
    args = TRLConfig(output_dir=str(tmp_path), loss_type=loss_type, importance_sampling_level=level, beta=0.0,
                     epsilon=0.2, epsilon_high=cfg.clip_eps_high, delta=delta, max_completion_length=max_len,
                     use_bias_correction_kl=kl_correction, top_entropy_quantile=entropy_share, num_generations=2,
                     per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=hf_tokenizer)
    trainer.beta = beta  # set after construction: with beta > 0 TRL would load a reference model from the Hub
    trainer.model.eval()  # one micro-batch: the eval branch divides by no accumulation count
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    if rollout_correction:  # as TRL forms it from vLLM's log-probs, *_truncate modes
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        diff = (old - sampler) * completion_mask
        if rollout_correction == "sequence":
            diff = diff.sum(-1, keepdim=True)
        inputs["importance_sampling_ratio"] = torch.clamp(torch.exp(diff), max=cap)
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert abs(ours.item()) > 1e-3
    for name, param in model.named_parameters():
        torch.testing.assert_close(our_grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
