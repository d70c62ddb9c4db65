"""Learning tests, part one: SFT, the reward model, DPO and the online methods each raise held-out accuracy
(the setting: learning.py; part two: test_learning_judge_and_surrogates.py)."""

from __future__ import annotations

import pytest
from learning import HELD_OUT, assert_held_out_gain, metrics, run_stage


def test_sft_imitates_the_demonstrations_and_guesses_when_greedy(learning_pipeline):
    sft = learning_pipeline["sft"]
    assert sft["style/guess"] >= 0.8  # measured 1.00: "The" is the likeliest first word
    assert sft["accuracy"] <= 0.2  # measured 0.115: room for every method to improve


def test_reward_model_ranks_held_out_pairs_by_the_rubric(learning_pipeline):
    result = run_stage(learning_pipeline["root"], "rm", eval_samples=HELD_OUT)
    assert result["pref_accuracy"] >= 0.85  # measured 0.920 on 200 pairs (chance 0.5)


def test_dpo_prefers_the_rubric_and_raises_held_out_accuracy(learning_pipeline):
    result = run_stage(learning_pipeline["root"], "dpo", eval_samples=HELD_OUT)
    assert result["pref_accuracy"] >= 0.85  # measured 0.925; policy == reference ties every pair
    assert_held_out_gain(result, learning_pipeline["sft"], 0.30)  # measured +0.675 (0.115 -> 0.790) in 30 steps


@pytest.mark.parametrize("stage, at_least", [
    ("grpo", 0.30),  # measured +0.645 (0.760) in 10 steps
    ("ppo", 0.30),  # measured +0.585 (0.700) in 24 steps
    ("spo", 0.30),  # measured +0.605 (0.720) in 12 steps
    ("online-dpo", 0.30),  # measured +0.55 (0.665) in 10 steps
])
def test_online_method_raises_held_out_accuracy_with_bounded_kl(learning_pipeline, stage, at_least):
    result = run_stage(learning_pipeline["root"], stage, eval_samples=HELD_OUT)
    assert_held_out_gain(result, learning_pipeline["sft"], at_least)
    kl = [r["kl"] for r in metrics(learning_pipeline["root"] / stage) if "kl" in r]
    assert kl[-1] < 0.5  # the last rollout's per-token KL to SFT: measured 0.01-0.19 (GRPO)
