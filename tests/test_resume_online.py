"""Exact resume of online RL, also from a checkpoint taken in the middle of a rollout: the rollout buffer,
RNG states, optimizer and method state (PPO's critic and KL coefficient, SPO's value tracker) are saved, and
rollouts are generated from a generator seeded by (seed, rollout)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.config import build_config
from minirlhf.stages import STAGES
from minirlhf.train import checkpoint as ckpt


def run(stage: str, out_dir, task_data, model_dir, **values) -> None:
    cls, fn = STAGES[stage]
    fn(build_config(cls, {
        "model": str(model_dir), "data": str(task_data["rl"]), "out_dir": str(out_dir), "steps": 4,
        "save_every": 1, "keep_checkpoints": 10, "prompts_per_rollout": 4, "batch_size": 4, "max_new_tokens": 8,
        "lr": 1e-3, "device": "cpu", "progress": False, "seed": 0, "beta": 0.1, **values}, where=stage))


@pytest.fixture
def other_reference(tmp_path, start_model_dir):
    """A perturbed copy of the start model as the KL reference: an untrained policy earns no reward from the task,
    so without it GRPO's loss would be 0 and a resume test would compare runs that never change the weights."""
    from minirlhf.model import load_policy
    from minirlhf.tokenizer import Tokenizer

    other = load_policy(start_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "ref")
    Tokenizer.load(start_model_dir).save(tmp_path / "ref")
    return tmp_path / "ref"


def rows(out_dir) -> dict[int, dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: {k: v for k, v in r.items() if k != "elapsed_s"} for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.parametrize("stage, values", [
    ("grpo", {"group_size": 2}),  # 8 sequences per rollout, 2 updates each: step 1 is mid-rollout
    ("ppo", {"epochs_per_rollout": 2, "adaptive_kl": True}),  # 4 sequences, 1 mini-batch x 2 epochs
    ("spo", {"epochs_per_rollout": 2}),
    ("grpo", {"group_size": 2, "dynamic_sampling": True}),  # no group has variance: every rollout samples 4 times
    ("grpo", {"group_size": 2, "entropy_coef": 0.01, "entropy_target": 100.0}),  # the adapted coefficient is saved
])
def test_online_resume_mid_rollout_is_exact(stage, values, tmp_path, task_data, start_model_dir, other_reference):
    values = {**values, "ref_model": str(other_reference)}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(stage, straight, task_data, start_model_dir, **values)
    run(stage, interrupted, task_data, start_model_dir, **values)
    expected = rows(straight)
    assert sorted(expected) == [1, 2, 3, 4] and rows(interrupted) == expected
    start = load_file(start_model_dir / "model.safetensors")
    trained = load_file(straight / "final" / "model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # the KL term trains the policy
    for later in ("step_000002", "step_000003", "step_000004"):
        shutil.rmtree(interrupted / "checkpoints" / later)
    shutil.rmtree(interrupted / "final")
    assert [p.name for p in ckpt.checkpoint_dirs(interrupted)] == ["step_000001"]

    run(stage, interrupted, task_data, start_model_dir, resume=True, **values)
    resumed = rows(interrupted)
    for step in (2, 3, 4):
        assert resumed[step] == expected[step], step
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(interrupted / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spo_prioritised_sampling_with_fewer_prompts_than_a_rollout(tmp_path, task_data, start_model_dir):
    small = tmp_path / "two_prompts.jsonl"
    small.write_text("".join(task_data["rl"].read_text().splitlines(keepends=True)[:2]))
    run("spo", tmp_path / "out", {**task_data, "rl": small}, start_model_dir, steps=2)  # 4 prompts from 2
    assert len(rows(tmp_path / "out")) == 2


def test_resume_with_a_synced_reference_is_exact(tmp_path, task_data, start_model_dir, other_reference):
    """TR-DPO-style reference syncing moves the reference during training, so checkpoints carry it; resuming
    without the saved reference would give other KL values from the next rollout on."""
    values = {"group_size": 2, "ref_model": str(other_reference), "ref_sync_every": 1, "ref_mixup_alpha": 0.5}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run("grpo", straight, task_data, start_model_dir, **values)
    run("grpo", interrupted, task_data, start_model_dir, **values)
    expected = rows(straight)
    assert all(expected[s]["ref_synced"] == 1.0 and expected[s]["kl"] > 0 for s in (1, 2, 3, 4))
    for later in ("step_000002", "step_000003", "step_000004"):
        shutil.rmtree(interrupted / "checkpoints" / later)
    shutil.rmtree(interrupted / "final")
    run("grpo", interrupted, task_data, start_model_dir, resume=True, **values)
    resumed = rows(interrupted)
    for step in (2, 3, 4):
        assert resumed[step] == expected[step], step
