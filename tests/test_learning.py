"""Learning tests: on the embedded task, each method improves the model on held-out problems.

The embedded world (data/task.py) has mixed-quality demonstrations: most show their working, but a bare
guess ("The answer is N.") is the single commonest opening, so the SFT model, decoding greedily, guesses and
is mostly wrong, while its samples hold every style. The rubric behind every reward, preference and judge
label prefers the working. Each method must move the policy there and raise greedy accuracy on held-out
problems it never saw, by more than three standard errors of the difference.

Every stage runs with its section of configs/rlhf.yaml (what `make demo` runs) on the demo's data and seeds,
shortened to keep the suite fast (FEWER_STEPS per method), on 200 held-out problems, without intermediate
evaluation. CPU runs are deterministic; the values measured on
the project's 2-core machine are noted next to each assert, whose bounds leave room for other CPU kernels
(the issue tracker saw 5-10 points of float-rounding spread between machines).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minirlhf.config import load_stage_config
from minirlhf.stages import STAGES

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rlhf.yaml"
HELD_OUT = 200
# The demo's pretraining and SFT as they are (a shorter start leaves working too weak to pay off), then each
# method for fewer steps than the demo gives it.
FEWER_STEPS = {"rm": 60, "dpo": 30, "ppo": 24, "grpo": 10, "spo": 12, "online-dpo": 10, "rlaif": 12}


def run_stage(root: Path, stage: str, **values) -> dict[str, float]:
    """Run `stage` with its configs/rlhf.yaml section, every runs/demo path moved under `root`."""
    cls, run = STAGES[stage]
    cfg = load_stage_config(cls, CONFIG, stage, {})
    paths = {k: str(v).replace("runs/demo", str(root)) for k, v in vars(cfg).items()
             if isinstance(v, str) and "runs/demo" in v}
    overrides = {**paths, **({"progress": False, "eval_every": 0} if hasattr(cls, "progress") else {}),
                 **({"steps": FEWER_STEPS[stage]} if stage in FEWER_STEPS else {}), **values}
    result = run(load_stage_config(cls, CONFIG, stage, overrides))
    print(f"{stage}: {result}")
    return result


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """The demo's data, tokenizer and pretrained + SFT policy: the starting point of every method."""
    root = tmp_path_factory.mktemp("learning")
    run_stage(root, "data", n_heldout=HELD_OUT)
    run_stage(root, "tokenizer")
    run_stage(root, "pretrain")
    sft = run_stage(root, "sft", eval_samples=HELD_OUT)
    return {"root": root, "sft": sft}


def gain(result: dict, start: dict) -> tuple[float, float]:
    """(held-out greedy accuracy gain over the start, that gain in standard errors of the difference)."""
    difference = result["accuracy"] - start["accuracy"]
    return difference, difference / max(math.hypot(result["accuracy_se"], start["accuracy_se"]), 1e-9)


def assert_held_out_gain(result: dict, start: dict, at_least: float) -> None:
    difference, z = gain(result, start)
    assert difference >= at_least and z >= 3, (difference, z, result)
    assert result["style/working"] + result["style/slip"] > 0.5, result  # it now shows its working


def test_sft_imitates_the_demonstrations_and_guesses_when_greedy(pipeline):
    sft = pipeline["sft"]
    assert sft["style/guess"] >= 0.8  # measured 1.00: "The" is the likeliest first word
    assert sft["accuracy"] <= 0.2  # measured 0.105: room for every method to improve


def test_reward_model_ranks_held_out_pairs_by_the_rubric(pipeline):
    result = run_stage(pipeline["root"], "rm", eval_samples=HELD_OUT)
    assert result["pref_accuracy"] >= 0.85  # measured 0.905 on 200 pairs (chance 0.5)


def test_dpo_prefers_the_rubric_and_raises_held_out_accuracy(pipeline):
    result = run_stage(pipeline["root"], "dpo", eval_samples=HELD_OUT)
    assert result["pref_accuracy"] >= 0.85  # measured 0.945; policy == reference ties every pair
    assert_held_out_gain(result, pipeline["sft"], 0.30)  # measured +0.695 (0.105 -> 0.80) in 30 steps


@pytest.mark.parametrize("stage, at_least", [
    ("grpo", 0.30),  # measured +0.685 (0.79) in 10 steps
    ("ppo", 0.30),  # measured +0.595 (0.70) in 24 steps
    ("spo", 0.30),  # measured +0.645 (0.75) in 12 steps
    ("online-dpo", 0.30),  # measured +0.705 (0.81) in 10 steps
])
def test_online_method_raises_held_out_accuracy_with_bounded_kl(pipeline, stage, at_least):
    result = run_stage(pipeline["root"], stage, eval_samples=HELD_OUT)
    assert_held_out_gain(result, pipeline["sft"], at_least)
    kl = [r["kl"] for r in metrics(pipeline["root"] / stage) if "kl" in r]
    assert kl[-1] < 0.5  # the last rollout's per-token KL to SFT: measured 0.05-0.07 (GRPO 0.18)


def test_judge_learns_the_rubric_styles_and_rlaif_follows_its_score_alone(pipeline):
    """The judge learns the style half of the rubric but not (yet) the answer half (README, "What limits it"),
    so RLAIF moves the policy to showing its working like the other methods, and accuracy follows."""
    judge = run_stage(pipeline["root"], "judge", eval_samples=HELD_OUT)
    # measured 0.845; rating every reply bad agrees 0.60, judging the styles right and slips as good 0.85
    assert judge["agreement"] >= 0.75
    result = run_stage(pipeline["root"], "rlaif", eval_samples=HELD_OUT)  # reward: judge:1, no answer checking
    assert_held_out_gain(result, pipeline["sft"], 0.30)  # measured +0.69 (0.795) in 12 steps


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
def test_each_surrogate_raises_the_reward_of_fresh_samples_on_focus_prompts(pipeline, loss_type):
    """GRPO with each newer loss (CISPO, SAPO, GSPO, LUSPO presets) for 6 steps on 16 prompts: fresh samples on
    those prompts (a sampling seed the training never used) earn more reward than the SFT model's."""
    root = pipeline["root"]
    focus = root / "focus.jsonl"
    if not focus.exists():
        focus.write_text("".join((root / "data" / "rl.jsonl").read_text().splitlines(keepends=True)[:FOCUS_PROMPTS]))
    before = focus_reward(root / "sft" / "final", focus, seed=123)
    out = root / f"grpo-{loss_type}"
    run_stage(root, "grpo", loss_type=loss_type, data=str(focus), out_dir=str(out), steps=6, prompts_per_rollout=8,
              batch_size=64, grad_accum=1, eval_data="")
    after = focus_reward(out / "final", focus, seed=123)
    print(f"{loss_type}: focus-prompt reward {before:.3f} -> {after:.3f}")
    assert after - before >= 0.15, (loss_type, before, after)  # measured 0.452 -> 0.68-0.73 (+0.23 to +0.28)


def test_kl_coef_zero_loads_no_reference(pipeline):
    from minirlhf.algorithms.grpo import GRPOConfig
    from minirlhf.algorithms.online import load_online

    root = pipeline["root"]
    cfg = load_stage_config(GRPOConfig, CONFIG, "grpo", {"kl_coef": 0.0, "model": str(root / "sft/final"),
                                                          "data": str(root / "data/rl.jsonl"), "eval_data": ""})
    assert load_online(cfg)[2] is None


def test_online_dpo_first_step_is_exactly_log2_on_fresh_pairs(pipeline):
    """Online DPO samples responses, labels the best and worst by the reward, drops ties and takes the DPO loss
    against the reference; at the first step policy == reference, so the loss is log 2."""
    run_stage(pipeline["root"], "online-dpo", out_dir=str(pipeline["root"] / "online_dpo_first"), steps=1,
              eval_data="")
    first = metrics(pipeline["root"] / "online_dpo_first")[0]
    assert 0 < first["valid_pairs"] <= 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
