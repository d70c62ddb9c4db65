"""Data parallel with torchrun (gloo on CPU): 2 processes with batch_size B give the loss trajectory of 1
process with batch_size 2B, sample the same rollouts, and a 2-process checkpoint resumes in 1 process.

Measured on CPU: SFT and GRPO losses agree to ~1e-6 (different summation order in the gradient
all-reduce); rewards are equal because every row draws the same sampling noise. Tolerance: 1e-5, or 1e-4 of
the value (a grad norm of ~2 after a few steps at lr 1e-2 carries that rounding: 2.5e-5 relative measured).
Every run trains in fp32 (`precision=fp32`) and the online runs sample in fp32 (`rollout_precision=fp32`): bf16
rounds each product to bf16, so the last-bit differences of another per-process batch size (oneDNN's blocking)
can move a logit by a bf16 step and, rarely, a sampled token; the process split is then visible in the losses
and samples, which fp32 keeps to float rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = Path(sys.executable).with_name("torchrun")
ATOL, RTOL = 1e-5, 1e-4

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")


def torchrun(nproc: int, stage: str, out_dir: Path, **overrides) -> None:
    args = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "minirlhf.cli", stage,
            f"out_dir={out_dir}", "progress=false", "device=cpu", "precision=fp32",
            *[f"{k}={v}" for k, v in overrides.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=out_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def trajectory(out_dir: Path, *keys: str) -> list[tuple[float, ...]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in keys) for r in rows if "loss" in r]


def assert_same(a: list[tuple[float, ...]], b: list[tuple[float, ...]]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=ATOL, rel=RTOL), (a, b)


def test_two_process_sft_equals_one_process_with_the_global_batch(tmp_path, start_model_dir, task_data):
    common = {"model": start_model_dir, "data": task_data["sft"], "steps": 4, "max_len": 96, "lr": 1e-3,
              "grad_accum": 2}
    torchrun(1, "sft", tmp_path / "one", batch_size=4, **common)
    torchrun(2, "sft", tmp_path / "two", batch_size=2, **common)
    assert_same(trajectory(tmp_path / "one", "loss", "grad_norm"), trajectory(tmp_path / "two", "loss", "grad_norm"))
    assert not (tmp_path / "two" / "tensorboard").exists() and (tmp_path / "two" / "final").is_dir()


def test_two_process_grpo_equals_one_process_and_its_checkpoint_resumes_in_one(tmp_path, start_model_dir, task_data):
    # A fresh scalar head on the start model is a reward model with varied scores: a real learning signal.
    common = {"model": start_model_dir, "data": task_data["rl"], "steps": 4, "prompts_per_rollout": 4,
              "group_size": 2, "max_new_tokens": 8, "lr": 1e-2, "reward": "rm:1", "reward_model": start_model_dir,
              "save_every": 2, "scale_rewards": "batch", "loss_type": "dapo", "rollout_precision": "fp32"}
    torchrun(1, "grpo", tmp_path / "one", batch_size=8, **common)
    # 2 ranks x 2 micro-batches of 2 uneven rows, token-mean loss: each micro-batch weighs its share of tokens
    torchrun(2, "grpo", tmp_path / "two", batch_size=2, grad_accum=2, **common)
    one = trajectory(tmp_path / "one", "loss", "reward", "reward_std", "grad_norm")
    assert_same(one, trajectory(tmp_path / "two", "loss", "reward", "reward_std", "grad_norm"))
    assert len({r[1] for r in one}) > 1  # rewards moved: the runs did learn, not sit at zero

    resumed = tmp_path / "resumed"  # the 2-process run, cut after its step-2 checkpoint, resumed by 1 process
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    shutil.rmtree(resumed / "final")
    torchrun(1, "grpo", resumed, batch_size=8, resume="true", **common)
    assert_same(trajectory(resumed, "loss", "reward", "grad_norm"), [r[:2] + r[3:] for r in one])


@pytest.mark.parametrize("options", [
    # a surrogate of its own, GDPO's per-reward advantage, adaptive entropy control, TR-DPO reference syncing
    {"loss_type": "cispo", "advantage": "normalize_then_sum", "reward": "rm:1,format:0.1", "entropy_coef": 0.01,
     "entropy_target": 10.0, "ref_sync_every": 2, "ref_mixup_alpha": 0.5, "kl_coef": 0.05},
    # a random policy never formats an answer and rarely ends early (the overlong penalty then differs): most groups
    # have no variance, so dynamic sampling draws more; truncated completions masked, overlong ones penalised
    # (seed 1: with seed 0's noise no group of the first rollout's 3 samplings ended early, so nothing trained)
    {"loss_type": "vespo", "reward": "format:1", "dynamic_sampling": "true", "max_sampling_tries": 3,
     "mask_truncated_completions": "true", "overlong_buffer": 4, "kl_coef": 0.05, "seed": 1},
], ids=["cispo-gdpo-entropy-refsync", "vespo-dynamic-sampling-truncation"])
def test_two_process_grpo_with_toolbox_options_equals_one_process(options, tmp_path, start_model_dir, task_data):
    """The toolbox's options act on the gathered global rollout (or, like the entropy controller and the reference
    sync, on values every rank shares), so 2 processes follow 1 process's trajectory with them on too."""
    common = {"model": start_model_dir, "data": task_data["rl"], "steps": 4, "prompts_per_rollout": 4,
              "group_size": 2, "max_new_tokens": 8, "lr": 1e-2, "reward_model": start_model_dir,
              "rollout_precision": "fp32", **options}
    # (the logged entropy and KL are means of per-micro-batch means, which depend on the split; the loss is not)
    keys = ("loss", "reward", "grad_norm") + (("dynamic_sampling/samplings",) if "dynamic_sampling" in options else ())
    torchrun(1, "grpo", tmp_path / "one", batch_size=8, **common)
    torchrun(2, "grpo", tmp_path / "two", batch_size=2, grad_accum=2, **common)
    one = trajectory(tmp_path / "one", *keys)
    assert_same(one, trajectory(tmp_path / "two", *keys))
    assert len({r[0] for r in one}) > 1  # the runs trained: losses moved
    if "dynamic_sampling" in options:
        assert max(r[3] for r in one) > 1  # further prompts were sampled


def test_fsdp_sft_equals_one_process_and_its_checkpoint_resumes_sharded_or_not(tmp_path, start_model_dir, task_data):
    common = {"model": start_model_dir, "data": task_data["sft"], "steps": 4, "max_len": 96, "lr": 1e-3,
              "save_every": 2, "eval_data": task_data["heldout_rl"], "eval_samples": 2, "max_new_tokens": 4}
    torchrun(1, "sft", tmp_path / "one", batch_size=4, **common)
    torchrun(2, "sft", tmp_path / "fsdp", batch_size=2, parallel="fsdp", **common)
    one = trajectory(tmp_path / "one", "loss", "grad_norm")
    assert_same(one, trajectory(tmp_path / "fsdp", "loss", "grad_norm"))
    for nproc, batch_size, parallel in ((1, 4, "ddp"), (2, 2, "fsdp")):  # FSDP checkpoint -> 1 process / FSDP
        resumed = tmp_path / f"resumed{nproc}"
        shutil.copytree(tmp_path / "fsdp", resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_000004")
        shutil.rmtree(resumed / "final")
        torchrun(nproc, "sft", resumed, batch_size=batch_size, parallel=parallel, resume="true", **common)
        assert_same(trajectory(resumed, "loss", "grad_norm"), one)
