"""Learning tests, part one: SFT, the reward model, DPO and the online methods each raise held-out accuracy
(the setting: learning.py; part two: test_learning_judge_and_surrogates.py)."""

from __future__ import annotations

import pytest
from learning import HELD_OUT, assert_held_out_gain, metrics, run_stage


def test_sft_imitates_the_demonstrations_and_guesses_when_greedy(learning_pipeline):
    sft = learning_pipeline["sft"]
    assert sft["style/guess"] >= 0.8  # measured 1.00: "The" is the likeliest first word
    assert sft["accuracy"] <= 0.2  # measured 0.110: room for every method to improve


def test_reward_model_ranks_held_out_pairs_by_the_rubric(learning_pipeline):
    result = run_stage(learning_pipeline["root"], "rm", eval_samples=HELD_OUT)
    assert result["pref_accuracy"] >= 0.85  # measured 0.930 on 200 pairs (chance 0.5)


def test_dpo_prefers_the_rubric_and_raises_held_out_accuracy(learning_pipeline):
    result = run_stage(learning_pipeline["root"], "dpo", eval_samples=HELD_OUT)
    assert result["pref_accuracy"] >= 0.85  # measured 0.955; policy == reference ties every pair
    assert_held_out_gain(result, learning_pipeline["sft"], 0.30)  # measured +0.70 (0.110 -> 0.810) in 30 steps


@pytest.mark.parametrize("stage, at_least", [
    ("grpo", 0.30),  # measured +0.63 (0.740) in 10 steps
    ("ppo", 0.30),  # measured +0.60 (0.710) in 24 steps
    ("spo", 0.30),  # measured +0.685 (0.795) in 12 steps
    ("online-dpo", 0.30),  # measured +0.69 (0.800) in 10 steps
])
def test_online_method_raises_held_out_accuracy_with_bounded_kl(learning_pipeline, stage, at_least):
    result = run_stage(learning_pipeline["root"], stage, eval_samples=HELD_OUT)
    assert_held_out_gain(result, learning_pipeline["sft"], at_least)
    kl = [r["kl"] for r in metrics(learning_pipeline["root"] / stage) if "kl" in r]
    assert kl[-1] < 0.5  # the last rollout's per-token KL to SFT: measured 0.014-0.032
