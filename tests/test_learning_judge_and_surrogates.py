"""Learning tests, part two: the judge and RLAIF, GRPO's newer surrogate losses, and two checks of the online
methods' set-up (the setting: learning.py; conftest.py runs this file last, so that its worker has run the
other files meanwhile while the shared pipeline was built)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from learning import CONFIG, HELD_OUT, assert_held_out_gain, metrics, run_stage

from minirlhf.config import load_stage_config


def test_judge_learns_the_rubric_styles_and_rlaif_follows_its_score_alone(learning_pipeline):
    """The judge learns the style half of the rubric but not (yet) the answer half (README, "What limits it"),
    so RLAIF moves the policy to showing its working like the other methods, and accuracy follows."""
    judge = run_stage(learning_pipeline["root"], "judge", eval_samples=HELD_OUT)
    # measured 0.850; rating every reply bad agrees 0.60, judging the styles right and slips as good 0.85
    assert judge["agreement"] >= 0.75
    result = run_stage(learning_pipeline["root"], "rlaif", eval_samples=HELD_OUT)  # reward: judge:1, no answer checking
    assert_held_out_gain(result, learning_pipeline["sft"], 0.30)  # measured +0.64 (0.110 -> 0.750) in 12 steps


FOCUS_PROMPTS, FOCUS_SAMPLES = 16, 8


def focus_reward(model_dir: Path, prompts_file: Path, seed: int) -> float:
    """Mean rule reward (the demo's answer:1,working:0.2) of 8 fresh samples (T = 0.7) per focus prompt."""
    from minirlhf.data.formats import load_prompts
    from minirlhf.generation import SamplingConfig, generate_responses
    from minirlhf.model import load_policy
    from minirlhf.rewards import build_reward
    from minirlhf.tokenizer import Tokenizer

    examples = [e for e in load_prompts(prompts_file) for _ in range(FOCUS_SAMPLES)]
    texts = generate_responses(load_policy(model_dir).eval(), Tokenizer.load(model_dir), [e.prompt for e in examples],
                               SamplingConfig(48, temperature=0.7), seed=seed)
    rewards = build_reward("answer:1,working:0.2").score([e.prompt for e in examples], texts,
                                                         [{"answer": e.answer} for e in examples])
    return float(rewards.mean())


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "gspo", "luspo", "vespo"])
def test_each_surrogate_raises_the_reward_of_fresh_samples_on_focus_prompts(learning_pipeline, loss_type):
    """GRPO with each newer loss (CISPO, SAPO, GSPO, LUSPO, VESPO presets) for 10 steps on 16 prompts: fresh samples
    on those prompts (a sampling seed the training never used) earn more reward than the SFT model's. (Trained in
    float32, at 6 steps two of them gained only +0.11 and +0.15 from this SFT model, at 10 steps +0.24 to +0.43; in
    bf16 with bf16 logits, at 10 steps +0.21 to +0.30; as here, bf16 with float32 heads: +0.28 to +0.36.)"""
    root = learning_pipeline["root"]
    focus = root / "focus.jsonl"
    if not focus.exists():
        focus.write_text("".join((root / "data" / "rl.jsonl").read_text().splitlines(keepends=True)[:FOCUS_PROMPTS]))
    before = focus_reward(root / "sft" / "final", focus, seed=123)
    out = root / f"grpo-{loss_type}"
    run_stage(root, "grpo", loss_type=loss_type, data=str(focus), out_dir=str(out), steps=10, prompts_per_rollout=8,
              batch_size=64, grad_accum=1, eval_data="")
    after = focus_reward(out / "final", focus, seed=123)
    print(f"{loss_type}: focus-prompt reward {before:.3f} -> {after:.3f}")
    assert after - before >= 0.15, (loss_type, before, after)  # measured 0.520 -> 0.80-0.88 (+0.28 to +0.36)


def test_kl_coef_zero_loads_no_reference(learning_pipeline):
    from minirlhf.algorithms.grpo import GRPOConfig
    from minirlhf.algorithms.online import load_online

    root = learning_pipeline["root"]
    cfg = load_stage_config(GRPOConfig, CONFIG, "grpo", {"kl_coef": 0.0, "model": str(root / "sft/final"),
                                                          "data": str(root / "data/rl.jsonl"), "eval_data": ""})
    assert load_online(cfg)[2] is None


def test_online_dpo_first_step_is_exactly_log2_on_fresh_pairs(learning_pipeline):
    """Online DPO samples responses, labels the best and worst by the reward, drops ties and takes the DPO loss
    against the reference; at the first step policy == reference, so the loss is log 2."""
    root = learning_pipeline["root"]
    run_stage(root, "online-dpo", out_dir=str(root / "online_dpo_first"), steps=1, eval_data="")
    first = metrics(root / "online_dpo_first")[0]
    assert 0 < first["valid_pairs"] <= 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
