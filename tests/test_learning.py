"""Learning tests: on the embedded task, each method moves the metric it optimises the right way.

One module-scoped fixture trains a small policy (pretrain + SFT, about a minute on two cores); each test
then runs its method for a few steps from that checkpoint and compares against the starting point. CPU runs
are deterministic, so the measured values (noted next to each assert) repeat; the bounds sit below them with
room to spare, yet fail if the method did nothing or moved the wrong way. Offline methods (reward model, DPO)
are judged on held-out preference pairs; online methods on the reward of fresh samples for the prompts they
optimise (see the note above the GRPO test). About 8 minutes on two cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minirlhf.config import build_config
from minirlhf.data.task import make_splits, preference_records, rl_records
from minirlhf.stages import STAGES

FOCUS = 16  # training problems the online methods optimise on


def run_stage(stage: str, **values) -> dict[str, float]:
    cls, run = STAGES[stage]
    defaults = {k: v for k, v in {"progress": False, "seed": 0}.items() if k in cls.__dataclass_fields__}
    result = run(build_config(cls, {**defaults, **values}, where=stage))
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
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """Generated data, a tokenizer, and a pretrained + SFT policy (the starting point of every method)."""
    root = tmp_path_factory.mktemp("learning")
    run_stage("data", out_dir=str(root / "data"), n_train=4000, n_heldout=200)
    run_stage("tokenizer", data=str(root / "data/pretrain.jsonl"), out_dir=str(root / "tok"), vocab_size=512)
    run_stage("pretrain", mode="pretrain", tokenizer=str(root / "tok"), data=str(root / "data/pretrain.jsonl"),
              out_dir=str(root / "pretrain"), max_len=128, steps=600, batch_size=16, lr=3e-3, warmup_steps=20,
              weight_decay=0.1)
    sft = run_stage("sft", mode="sft", model=str(root / "pretrain/final"), data=str(root / "data/sft.jsonl"),
                    eval_data=str(root / "data/heldout_rl.jsonl"), eval_samples=200, out_dir=str(root / "sft"),
                    max_len=256, steps=300, batch_size=32, lr=1e-3, warmup_steps=10)
    train, _ = make_splits(0, 4000, 200)  # the problems the data stage wrote, in order
    focus = root / "data" / "focus_rl.jsonl"
    focus.write_text("".join(json.dumps(r) + "\n" for r in rl_records(train[:FOCUS])))
    focus_pref = root / "data" / "focus_pref.jsonl"
    focus_pref.write_text("".join(json.dumps(r) + "\n" for seed in range(1, 6)
                                  for r in preference_records(train[:FOCUS], seed)))
    return {"root": root, "data": root / "data", "sft": root / "sft/final", "sft_accuracy": sft["accuracy"],
            "focus_prompts": focus, "focus_pref": focus_pref}


def online_values(pipeline, name: str, **values) -> dict:
    """An online run on the focus prompts, evaluated on the 200 held-out problems."""
    d = pipeline["data"]
    return {"model": str(pipeline["sft"]), "data": str(pipeline["focus_prompts"]),
            "eval_data": str(d / "heldout_rl.jsonl"), "eval_samples": 200, "out_dir": str(pipeline["root"] / name),
            "max_new_tokens": 40, "lr": 5e-5, "warmup_steps": 2, "grad_accum": 1, "steps": 30, **values}


def reward_gain(out_dir: Path, k: int = 10) -> float:
    """Mean reward of the last k optimizer steps' rollouts minus that of the first k (fresh samples each)."""
    rewards = [r["reward"] for r in metrics(out_dir) if "loss" in r]
    return sum(rewards[-k:]) / k - sum(rewards[:k]) / k


def _max_kl(out_dir: Path) -> float:
    return max(r["kl"] for r in metrics(out_dir) if "kl" in r)


def test_sft_learns_the_task(pipeline):
    assert 0.4 <= pipeline["sft_accuracy"] <= 0.9  # measured 0.49: real, with headroom for RL


def test_reward_model_ranks_held_out_pairs(pipeline):
    d = pipeline["data"]
    result = run_stage("rm", model=str(pipeline["sft"]), data=str(d / "pref.jsonl"),
                       eval_data=str(d / "heldout_pref.jsonl"), eval_samples=100,
                       out_dir=str(pipeline["root"] / "rm"), max_len=128, steps=60, batch_size=16, lr=5e-4)
    assert result["pref_accuracy"] >= 0.6  # measured 0.66 (chance: 0.5; 100 pairs)


def test_dpo_raises_held_out_preference_accuracy(pipeline):
    d = pipeline["data"]
    result = run_stage("dpo", model=str(pipeline["sft"]), data=str(d / "pref.jsonl"),
                       eval_data=str(d / "heldout_pref.jsonl"), eval_samples=100,
                       out_dir=str(pipeline["root"] / "dpo"), max_len=128, steps=60, batch_size=16, lr=2e-5,
                       beta=0.1)
    assert result["pref_accuracy"] >= 0.7  # measured 0.78; policy == reference ties every pair (accuracy 0)



# Online methods are judged on what they optimise: the expected reward of fresh samples on the prompts they
# train on (16 fixed training problems, 30-40 steps at lr 5e-5), with the per-token KL to the SFT policy
# bounded. Ten rollouts hold 320-640 samples, so the first-vs-last difference has a standard error of about
# 0.03-0.04 and a gain of 0.06 is two of them; the measured gains are two to four times that. At this model
# size the gain does not carry over to held-out problems (held-out greedy accuracy falls, 0.49 -> 0.35-0.42:
# the policy narrows onto the focus prompts), so held-out accuracy is reported by the demo, not asserted.


def test_grpo_raises_the_reward_it_optimises_with_bounded_kl(pipeline):
    out = pipeline["root"] / "grpo"
    run_stage("grpo", **online_values(pipeline, "grpo", group_size=8, prompts_per_rollout=8, batch_size=64,
                                      beta=0.04))
    assert reward_gain(out) >= 0.06  # measured 0.13 (0.40 -> 0.53)
    assert _max_kl(out) < 0.1  # measured max 0.046


def test_ppo_raises_the_reward_it_optimises_with_bounded_kl(pipeline):
    out = pipeline["root"] / "ppo"
    run_stage("ppo", **online_values(pipeline, "ppo", prompts_per_rollout=64, batch_size=64, epochs_per_rollout=2,
                                     beta=0.05, steps=40))
    assert reward_gain(out) >= 0.1  # measured 0.20 (0.39 -> 0.59)
    assert _max_kl(out) < 0.15  # measured max 0.063


def test_spo_raises_the_reward_it_optimises_with_bounded_kl(pipeline):
    out = pipeline["root"] / "spo"
    run_stage("spo", **online_values(pipeline, "spo", prompts_per_rollout=64, batch_size=64, beta=0.05, steps=40))
    assert reward_gain(out) >= 0.06  # measured 0.12 (0.41 -> 0.53)
    assert _max_kl(out) < 0.15  # measured max 0.09


def test_beta_zero_loads_no_reference(pipeline):
    from minirlhf.algorithms.grpo import GRPOConfig
    from minirlhf.algorithms.online import load_online

    cfg = build_config(GRPOConfig, online_values(pipeline, "unused", beta=0.0))
    assert load_online(cfg)[2] is None


def test_online_dpo_first_step_is_exactly_log2_on_fresh_pairs(pipeline):
    """Online DPO samples two responses per prompt, labels them (here by answer correctness), drops ties and
    takes the DPO loss against the reference; at the first step policy == reference, so the loss is log 2."""
    out_dir = pipeline["root"] / "online_dpo"
    run_stage("online-dpo", **online_values(pipeline, "online_dpo", preference="reward", reward="answer:1",
                                            data=str(pipeline["data"] / "rl.jsonl"), prompts_per_rollout=32,
                                            batch_size=64, steps=2, beta=0.1, lr=2e-5, eval_samples=20))
    first = metrics(out_dir)[0]
    assert 0 < first["valid_pairs"] < 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)



def test_online_dpo_raises_reward_and_held_out_preference_accuracy(pipeline):
    """Online DPO on the focus prompts: 8 samples per prompt, the best and the worst (by answer correctness)
    make each fresh pair. The expected reward of its samples rises, and so does its implicit-reward accuracy
    on 80 held-out pairs for the same problems (correct vs plausible wrong solutions, never sampled or trained
    on): from 0 (policy = reference ties every pair) to above chance."""
    out = pipeline["root"] / "online_dpo_focus"
    result = run_stage("online-dpo", **online_values(
        pipeline, "online_dpo_focus", preference="reward", reward="answer:1", samples_per_prompt=8,
        prompts_per_rollout=16, batch_size=32, steps=40, beta=0.1, eval_pref_data=str(pipeline["focus_pref"]),
        eval_samples=80))
    assert reward_gain(out) >= 0.06  # measured 0.12 (0.33 -> 0.45)
    assert result["pref_accuracy"] >= 0.55  # measured 0.59 (chance 0.5; 80 pairs)
