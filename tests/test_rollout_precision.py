"""Rollouts from bf16 weights (`rollout_precision=bf16`): the rollout records the sampler's log-probs aligned with
the trainer's, the policy-gradient loss is corrected with truncated importance weights and logs the mismatch as
`sampler_kl`. (Elsewhere: the bf16 sampler in test_sampler.py, the weights' formula and TRL parity in
test_policy_gradient.py, exact gradient accumulation in test_grad_accum.py.)"""

from __future__ import annotations

import pytest
import torch

from minirlhf.algorithms.grpo import GRPO, GRPOConfig
from minirlhf.config import ConfigError, build_config
from minirlhf.data.formats import PromptExample
from minirlhf.model import load_policy
from minirlhf.tokenizer import Tokenizer


class Alternating:
    def score(self, prompts, completions, meta):
        return torch.tensor([float(i % 2) for i in range(len(completions))])


PROMPTS = [PromptExample([{"role": "user", "content": f"What is {i} + 1?"}], str(i + 1)) for i in range(2)]


def _grpo(start_model_dir, **values) -> GRPO:
    cfg = build_config(GRPOConfig, {"model": str(start_model_dir), "data": "unused", "group_size": 4,
                                    "prompts_per_rollout": 2, "batch_size": 8, "max_new_tokens": 6, "beta": 0.0,
                                    "device": "cpu", "seed": 0, **values}, where="grpo")
    return GRPO(load_policy(start_model_dir), None, Tokenizer.load(start_model_dir), PROMPTS, Alternating(), [],
                cfg=cfg)


def test_a_bf16_rollout_records_the_samplers_logprobs_and_the_loss_logs_the_gap(start_model_dir):
    fp32 = _grpo(start_model_dir, rollout_precision="fp32").make_experience(0)
    assert fp32.sampler_logps is None
    algo = _grpo(start_model_dir, rollout_precision="bf16")
    exp = algo.make_experience(0)
    mask = exp.loss_mask
    assert exp.sampler_logps.shape == mask.shape
    assert bool((exp.sampler_logps[mask == 0] == 0).all()) and bool((exp.sampler_logps[mask > 0] < 0).all())
    loss, metrics = algo.loss(exp)
    assert torch.isfinite(loss)
    assert 0 < metrics["sampler_kl"] < 0.01
    assert metrics["rollout_weight"] == pytest.approx(1.0, abs=0.05)
    off = _grpo(start_model_dir, rollout_precision="bf16", rollout_correction="off")
    _, off_metrics = off.loss(exp)
    assert "rollout_weight" not in off_metrics and off_metrics["sampler_kl"] == metrics["sampler_kl"]


def test_online_dpo_records_no_sampler_logprobs_its_t1_logprobs_could_not_be_compared_with(start_model_dir):
    """Online DPO scores responses at T = 1, the sampler draws them at the sampling temperature: a KL between the
    two would measure the temperature, not the bf16 mismatch."""
    from minirlhf.algorithms.online_dpo import OnlineDPO, OnlineDPOConfig

    cfg = build_config(OnlineDPOConfig, {"model": str(start_model_dir), "data": "unused", "prompts_per_rollout": 2,
                                         "batch_size": 4, "max_new_tokens": 6, "temperature": 0.7,
                                         "preference": "reward", "rollout_precision": "bf16", "device": "cpu"},
                       where="online_dpo")
    algo = OnlineDPO(load_policy(start_model_dir), load_policy(start_model_dir), Tokenizer.load(start_model_dir),
                     PROMPTS, Alternating(), [], pairwise=None, eval_pairs=[], cfg=cfg)
    assert algo.rollout_dtype == torch.bfloat16
    exp = algo.make_experience(0)
    assert exp.sampler_logps is None
    assert "sampler_kl" not in algo.loss(exp)[1]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_samples_in_bf16_only_where_the_hardware_has_it(native, start_model_dir, monkeypatch):
    from minirlhf.generation import decode

    monkeypatch.setattr(decode, "has_native_bf16", lambda device_type: native)
    algo = _grpo(start_model_dir)  # rollout_precision: auto
    assert algo.rollout_dtype == (torch.bfloat16 if native else torch.float32)


def test_vespo_takes_token_level_rollout_weights_only():
    from minirlhf.algorithms.grpo import policy_loss_spec

    with pytest.raises(ConfigError, match="rollout_correction=token"):
        policy_loss_spec(GRPOConfig(loss_type="vespo", rollout_correction="sequence"))
    policy_loss_spec(GRPOConfig(loss_type="vespo", rollout_correction="token"))
