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

from minirlhf.algorithms.grpo import grpo_loss
from minirlhf.algorithms.policy_gradient import (
    aggregate,
    aggregate_units,
    clipped_surrogate,
    discounted_returns,
    gae,
    group_advantages,
    kl_estimate,
    masked_whiten,
    rloo_advantages,
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
    loss, clipped = clipped_surrogate(logps, old, adv, eps_low, eps_high)
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
    _, clipped_asym = clipped_surrogate(logps, old, adv, 0.2, 0.28)
    _, clipped_sym = clipped_surrogate(logps, old, adv, 0.2, 0.2)
    assert clipped_asym.item() == 0.0 and clipped_sym.item() == 1.0


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
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(grpo) == 6.0
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(dapo) == 4.0
    assert aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(dr_grpo_4) == 2.0
    assert aggregate(per_token, mask, "dr_grpo", max_len=10).item() == pytest.approx(dr_grpo_10)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(per_token, mask, "mean")


def test_aggregate_units_count_what_each_aggregation_averages_over():
    """The data-parallel weight of a rank's loss: tokens for dapo, live sequences for grpo and dr_grpo. Splitting
    the batch above into ranks and re-weighting each rank's aggregate by its units recovers the whole-batch one."""
    per_token, mask = t(PER_TOKEN), t(MASK)
    assert aggregate_units(mask, "dapo") == 4.0  # 3 + 0 + 1 response tokens
    assert aggregate_units(mask, "grpo") == aggregate_units(mask, "dr_grpo") == 2.0  # the empty row does not count
    for how in ("grpo", "dapo"):
        parts = [(aggregate(per_token[i:i + 1], mask[i:i + 1], how), aggregate_units(mask[i:i + 1], how))
                 for i in range(3)]
        total = sum(units for _, units in parts)
        assert sum(loss.item() * units for loss, units in parts) / total == pytest.approx(
            aggregate(per_token, mask, how).item())


def test_aggregate_of_an_all_masked_batch_is_zero_not_nan():
    for how in ("grpo", "dapo", "dr_grpo"):
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


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_with_kl_by_hand(loss_type):
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
    got, clipped = grpo_loss(logps, old, adv, t(mask), eps_low, eps_high, kl, beta, loss_type, max_len)

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
    if loss_type == "grpo":
        expected = sum(sum(r) / len(r) for r in per_row) / len(per_row)
    elif loss_type == "dapo":
        expected = sum(sum(r) for r in per_row) / sum(len(r) for r in per_row)
    else:
        expected = sum(sum(r) for r in per_row) / (len(per_row) * max_len)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    assert clipped.shape == (3, 4)


def test_grpo_loss_without_beta_ignores_the_kl():
    g = torch.Generator().manual_seed(8)
    logps, old = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    adv, mask = torch.randn(2, 3, generator=g), torch.ones(2, 3)
    huge_kl = torch.full((2, 3), 1e6)
    no_kl, _ = grpo_loss(logps, old, adv, mask, 0.2, 0.2, None, 0.0)
    beta_zero, _ = grpo_loss(logps, old, adv, mask, 0.2, 0.2, huge_kl, 0.0)
    no_tensor, _ = grpo_loss(logps, old, adv, mask, 0.2, 0.2, None, 0.5)
    assert beta_zero.item() == no_kl.item() == no_tensor.item()
    with_kl, _ = grpo_loss(logps, old, adv, mask, 0.2, 0.2, torch.ones(2, 3), 0.5)
    assert with_kl.item() == pytest.approx(no_kl.item() + 0.5, abs=1e-6)  # mean of β·1 over tokens


# ----------------------------------------------------------------------------------------------------
# PPO


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
    assert tracker.alpha.tolist() == pytest.approx(a) and tracker.beta.tolist() == pytest.approx(b)
    assert tracker.value(torch.tensor([0, 1, 2])).tolist() == pytest.approx([x / (x + y) for x, y in zip(a, b)])

    # second visit of slot 0: D = |mean logp now - then| = |-1.03 - (-1.0)| = 0.03 → ρ = 2^(-0.5) ≈ 0.707
    # slot 2 drifts a lot: D = 0.5 → 2^(-8.3) clipped up to ρ_min
    rho = tracker.update(torch.tensor([0, 2]), t([0.0, 1.0]), t([-1.03, -1.5]))
    rho0 = min(max(2 ** (-0.03 / d_half), rho_min), rho_max)
    assert rho0 == pytest.approx(2 ** -0.5, abs=1e-6)
    assert rho.tolist() == pytest.approx([rho0, rho_min], abs=1e-5)
    a[0], b[0] = rho0 * a[0] + 0.0, rho0 * b[0] + 1.0
    a[2], b[2] = rho_min * a[2] + 1.0, rho_min * b[2] + 0.0
    assert tracker.alpha.tolist() == pytest.approx(a, abs=1e-5)
    assert tracker.beta.tolist() == pytest.approx(b, abs=1e-5)
    assert tracker.alpha[1].item() == tracker.beta[1].item() == pytest.approx(0.5 * n_init)  # never visited


def test_beta_value_tracker_averages_repeated_slots():
    d_half, rho_min, rho_max = 0.06, 0.5, 0.96
    tracker = BetaValueTracker(2, d_half, rho_min, rho_max)
    n_init = 1 / (1 - rho_min)
    # slot 1 appears three times: reward mean 2/3, logp mean -1.0; slot 0 once
    rho = tracker.update(torch.tensor([1, 0, 1, 1]), t([1.0, 0.0, 1.0, 0.0]), t([-0.5, -3.0, -1.5, -1.0]))
    assert rho.tolist() == pytest.approx([rho_max, rho_max])
    assert tracker.alpha.tolist() == pytest.approx([rho_max * 0.5 * n_init, rho_max * 0.5 * n_init + 2 / 3])
    assert tracker.beta.tolist() == pytest.approx([rho_max * 0.5 * n_init + 1.0, rho_max * 0.5 * n_init + 1 / 3])
    assert tracker.last_logp.tolist() == pytest.approx([-3.0, -1.0])
    # next visit measures drift from the averaged log-prob
    rho = tracker.update(torch.tensor([1]), t([1.0]), t([-1.06]))
    assert rho.tolist() == pytest.approx([min(max(2 ** (-0.06 / d_half), rho_min), rho_max)], abs=1e-5)  # = 0.5
