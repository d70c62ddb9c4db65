"""Numerical guards and safe loading.

- A NaN/inf loss or gradient skips the step (weights untouched), is counted in metrics.jsonl, and after
  `max_bad_steps` in a row aborts: `NonFiniteError` in the library, one line and exit 2 from the CLI, with the
  last good checkpoint still loadable and resumable.
- Rewards are clipped to [-reward_clip, reward_clip] before advantages are computed.
- Log-probs and their ratios are float32 under bf16 autocast.
- Pickles are never executed: a trainer_state.pt or a model's weights carrying code are refused, and the code
  does not run (a marker file it would create stays absent).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from minirlhf.algorithms.grpo import GRPO, GRPOConfig
from minirlhf.algorithms.policy_gradient import PolicyLoss, policy_gradient_loss
from minirlhf.config import build_config
from minirlhf.data.formats import PromptExample
from minirlhf.logprobs import completion_logprobs, gather_logprobs, sequence_logprobs
from minirlhf.model import load_policy
from minirlhf.tokenizer import Tokenizer
from minirlhf.train import checkpoint as ckpt
from minirlhf.train.loop import Algorithm, NonFiniteError, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

# Skipping the very first optimizer steps makes torch warn that the scheduler stepped first; that is intended.
ignore_scheduler_warning = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


def run_cli(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minirlhf.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("minirlhf: error: "), proc.stderr
    return lines[0]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------
# Non-finite steps


class _InfGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite); infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Faulty(Algorithm):
    """One linear layer; from `bad_from` on, each step's loss is NaN, +inf, or finite with an infinite gradient."""

    def __init__(self, bad_from: int | None, kind: str) -> None:
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.modules = {"policy": self.layer}
        self.bad_from, self.kind, self.step = bad_from, kind, 0

    def micro_batches(self, step: int):
        self.step = step
        return [torch.ones(2, 3), torch.full((2, 3), 0.5)]  # two micro-batches: accumulation is guarded too

    def loss(self, batch):
        out = self.layer(batch)
        if self.bad_from is not None and self.step >= self.bad_from:
            if self.kind == "nan":
                out = out * float("nan")
            elif self.kind == "inf":
                out = out + float("inf")
            else:
                out = _InfGrad.apply(out)
        return out.pow(2).mean(), {}

    def save(self, name: str, directory: Path, final: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.modules[name], str(directory / "model.safetensors"))


def toy_config(out_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(out_dir=str(out_dir), steps=12, lr=0.05, device="cpu", progress=False,
                                 max_bad_steps=3, save_every=2, keep_checkpoints=2), **overrides})


@ignore_scheduler_warning
@pytest.mark.parametrize("kind", ["nan", "inf", "inf-grad"])
def test_non_finite_steps_are_skipped_counted_then_abort_with_the_last_good_checkpoint(kind, tmp_path):
    algo = Faulty(bad_from=5, kind=kind)  # steps 1-5 train (0-based 0..4), 6, 7, 8 go bad
    with pytest.raises(NonFiniteError) as info:
        train(algo, toy_config(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "3 steps in a row had a non-finite loss or gradient (last at step 8)" in message
    assert str(tmp_path / "checkpoints") in message
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert [(r["step"], r["bad_steps"]) for r in rows if r.get("skipped_nonfinite")] == [(6, 1.0), (7, 2.0), (8, 3.0)]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows if "loss" in r)
    assert not (tmp_path / "final").exists()
    # The last good checkpoint (step 4) loads, holds the weights the bad steps never touched, and resumes.
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000002", "step_000004"]
    latest = ckpt.checkpoint_dirs(tmp_path)[-1]
    state = ckpt.load_state(latest)
    assert state["step"] == 4 and state["bad_steps"] == 0
    weights = load_file(latest / "policy" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(p).all() for p in algo.layer.parameters())
    fixed = Faulty(bad_from=None, kind=kind)
    train(fixed, toy_config(tmp_path, resume=True))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # bad rows after step 4 dropped
    assert not any(r.get("skipped_nonfinite") for r in rows)
    assert (tmp_path / "final" / "model.safetensors").is_file()


@ignore_scheduler_warning
def test_a_good_step_resets_the_bad_step_count(tmp_path):
    class Intermittent(Faulty):
        def loss(self, batch):
            self.bad_from = self.step if self.step % 3 == 1 else None  # every third step is NaN
            return super().loss(batch)

    algo = Intermittent(bad_from=None, kind="nan")
    train(algo, toy_config(tmp_path, max_bad_steps=2))
    rows = read_metrics(tmp_path)
    skipped = [r for r in rows if r.get("skipped_nonfinite")]
    assert [r["step"] for r in skipped] == [2, 5, 8, 11] and {r["bad_steps"] for r in skipped} == {1.0}
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_cli_diverging_run_stops_with_one_line_and_exit_2(tmp_path, start_model_dir, task_data):
    """lr = 1e30 blows the weights up after one step; every later loss is non-finite."""
    out = tmp_path / "out"
    args = ["sft", f"model={start_model_dir}", f"data={task_data['sft']}", f"out_dir={out}", "steps=8",
            "batch_size=2", "max_len=192", "lr=1e30", "max_grad_norm=0", "save_every=1", "max_bad_steps=2",
            "device=cpu", "progress=false"]
    line = one_error_line(run_cli(args, tmp_path))
    assert "sft: 2 steps in a row had a non-finite loss or gradient (last at step" in line, line
    assert "try a lower lr" in line
    rows = read_metrics(out)
    assert sum(1 for r in rows if r.get("skipped_nonfinite")) == 2
    assert not (out / "final").exists()
    latest = ckpt.checkpoint_dirs(out)[-1]
    good = max(r["step"] for r in rows if "loss" in r)
    assert latest.name == f"step_{good:06d}"  # the last good step's checkpoint, intact
    assert ckpt.load_state(latest)["step"] == good
    assert load_file(latest / "policy" / "model.safetensors")


# ------------------------------------------------------------------------------------------------------
# Reward clipping


class FixedReward:
    def __init__(self, values: list[float]) -> None:
        self.values = values

    def score(self, prompts, completions, meta) -> torch.Tensor:
        return torch.tensor(self.values[: len(completions)])


def _grpo(start_model_dir, reward, **values) -> GRPO:
    cfg = build_config(GRPOConfig, {"model": str(start_model_dir), "data": "unused", "group_size": 2,
                                    "prompts_per_rollout": 2, "batch_size": 4, "max_new_tokens": 4, "beta": 0.0,
                                    "device": "cpu", "seed": 0, **values}, where="grpo")
    prompts = [PromptExample([{"role": "user", "content": f"What is {i} + 1?"}], str(i + 1)) for i in range(2)]
    policy = load_policy(start_model_dir)
    return GRPO(policy, None, Tokenizer.load(start_model_dir), prompts, reward, [], cfg=cfg)


@pytest.mark.parametrize("clip,expected", [(10.0, [10.0, -10.0, 3.0, -0.5]), (2.0, [2.0, -2.0, 2.0, -0.5])])
def test_rewards_are_clipped_to_the_configured_range(clip, expected, start_model_dir):
    algo = _grpo(start_model_dir, FixedReward([1e6, -1e6, 3.0, -0.5]), reward_clip=clip)
    exp = algo.make_experience(0)
    assert exp.rewards.tolist() == expected
    assert torch.isfinite(exp.advantages).all()
    assert exp.stats["reward"] == pytest.approx(sum(expected) / 4)


def test_infinite_rewards_are_clipped(start_model_dir):
    algo = _grpo(start_model_dir, FixedReward([float("inf"), float("-inf"), 1.0, 0.0]), reward_clip=5.0)
    exp = algo.make_experience(0)
    assert exp.rewards.tolist() == [5.0, -5.0, 1.0, 0.0]
    assert torch.isfinite(exp.advantages).all()


def test_truncated_completions_are_masked_out_and_overlong_ones_penalised(start_model_dir):
    """An untrained model rarely says EOS in 4 tokens: rows without EOS are `truncated`; with
    mask_truncated_completions they keep their reward (group baselines) but no loss token; overlong_buffer=2
    takes 0.5 per token past max_new_tokens - 2 off the reward."""
    algo = _grpo(start_model_dir, FixedReward([1.0, 0.0, 1.0, 0.0]), mask_truncated_completions=True,
                 overlong_buffer=2, overlong_penalty=1.0)
    exp = algo.make_experience(0)
    completion = exp.input_ids[:, -4:]
    sampled = exp.attention_mask[:, -4:].bool()
    no_eos = ~((completion == algo.tokenizer.eos_id) & sampled).any(1)
    assert exp.truncated.bool().tolist() == no_eos.tolist() and no_eos.any()
    assert (exp.completion_mask.sum(1) == 0).tolist() == no_eos.tolist()  # no loss on truncated rows
    lengths = sampled.sum(1).float()
    assert exp.rewards.tolist() == pytest.approx(
        (torch.tensor([1.0, 0.0, 1.0, 0.0]) - (lengths - 2).clamp(min=0) / 2).tolist())
    assert exp.stats["truncated"] == pytest.approx(float(no_eos.float().mean()))


# ------------------------------------------------------------------------------------------------------
# float32 log-probs under bf16 autocast


def test_logprobs_and_ratios_are_float32_under_bf16_autocast(make_model):
    model = make_model(seed=0)
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (2, 10))
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, 6:] = 1
    products = []
    model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: products.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, attention_mask=attention).logits.bfloat16()  # (bf16 logits, as a Hugging Face model's)
        assert products == [torch.bfloat16]  # the forward pass really is in bf16 ...
        logps, mask, entropy = completion_logprobs(model, ids, attention, completion, return_entropy=True)
        old = logps.detach() + 0.01
        ratio = torch.exp(logps - old)
        seq, count = sequence_logprobs(model, ids, attention, completion)
        gathered = gather_logprobs(logits[:, :-1], ids[:, 1:], temperature=0.7)
        loss, clipped = policy_gradient_loss(logps, old, torch.ones_like(logps), mask, PolicyLoss(), max_len=10)
    for name, t in [("logps", logps), ("mask", mask), ("entropy", entropy), ("ratio", ratio), ("seq", seq),
                    ("gathered", gathered), ("loss", loss)]:
        assert t.dtype == torch.float32, name  # ... but log-probs, ratios and the loss are float32
    # Gathered in float32 from the bf16 logits: equal to doing it by hand in float64, to float32 precision.
    by_hand = torch.log_softmax(logits[:, :-1].double() / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(gathered.double(), by_hand, atol=1e-5)
    assert torch.allclose(ratio[mask.bool()], torch.full_like(ratio[mask.bool()], math.exp(-0.01)), atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
def test_training_precision_auto_is_bf16_only_where_the_hardware_has_it(native, monkeypatch):
    from minirlhf.generation import decode
    from minirlhf.train.loop import TrainConfig, uses_bf16

    monkeypatch.setattr(decode, "has_native_bf16", lambda device_type: native)
    assert uses_bf16(TrainConfig(), "cpu") is native  # the default: auto
    assert uses_bf16(TrainConfig(precision="bf16"), "cpu") and not uses_bf16(TrainConfig(precision="fp32"), "cpu")


@pytest.mark.parametrize("padded", [False, True])
def test_native_attention_under_cpu_bf16_autocast_is_the_formula(padded, make_model, monkeypatch):
    """Under CPU bf16 autocast the native model's attention skips SDPA's fused kernel (its bf16 backward is 3-4x
    slower than float32's): short sequences take the materialised product (`masked_attention`), longer ones the
    fused kernel in float32. Either way logits and gradients match the float32 model to bf16 rounding."""
    import torch.nn.functional as F

    from minirlhf.model import minimind

    model = make_model(seed=0).train()
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (3, 12))
    attention = torch.ones_like(ids)
    if padded:
        attention[1, :4] = 0  # left padding
    fused_inputs = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        fused_inputs.append(q.dtype)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(minimind.F, "scaled_dot_product_attention", spy)

    def forward_backward(bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, attention_mask=attention).logits
        (logits.float() * attention[..., None]).square().mean().backward()
        return logits.float().detach(), [p.grad.clone() for p in model.parameters()]

    exact, exact_grads = forward_backward(False)
    assert fused_inputs == [torch.float32] * 2  # float32: the fused kernel, one call per layer
    fused_inputs.clear()
    for threshold, calls in ((1 << 23, []), (0, [torch.float32] * 2)):
        monkeypatch.setattr(minimind, "MATERIALISED_SCORES_MAX", threshold)
        logits, grads = forward_backward(True)
        assert fused_inputs == calls
        fused_inputs.clear()
        real = attention.bool()
        torch.testing.assert_close(logits[real], exact[real], atol=0.05, rtol=0.02)
        for g, e in zip(grads, exact_grads):
            assert (g - e).norm() <= 0.05 * e.norm() + 1e-6


# ------------------------------------------------------------------------------------------------------
# Safe loading



def test_the_exploit_pickle_really_runs_code_when_unpickled_unsafely(tmp_path, exploit):
    """Positive control for the tests below: a plain unpickle of the file does create the marker."""
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": exploit(marker)}, tmp_path / "evil.pt")
    code = f"import torch; torch.load({str(tmp_path / 'evil.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=60)
    assert marker.exists()


def test_resume_refuses_a_malicious_trainer_state_without_running_it(tmp_path, start_model_dir, task_data, exploit):
    out = tmp_path / "out"
    args = ["sft", f"model={start_model_dir}", f"data={task_data['sft']}", f"out_dir={out}", "steps=2",
            "batch_size=2", "max_len=192", "save_every=1", "keep_checkpoints=5", "device=cpu", "progress=false"]
    assert run_cli(args, tmp_path).returncode == 0
    latest = ckpt.checkpoint_dirs(out)[-1]
    marker = tmp_path / "pwned"
    state_file = latest / ckpt.STATE_FILE
    torch.save({"step": 2, "bad_steps": 0, "optimizer": exploit(marker)}, state_file)

    with pytest.raises(ValueError, match="refusing to load trainer state"):  # the library
        ckpt.load_state(latest)
    assert not marker.exists()
    line = one_error_line(run_cli([*args, "steps=4", "resume=true"], tmp_path))  # the CLI
    assert f"{state_file}: refusing to load trainer state: it holds objects other than tensors" in line, line
    assert "unsupported GLOBAL posix.system" in line and "weights_only` set to `False`" not in line
    assert not marker.exists()
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == ["step_000001", "step_000002"]  # nothing new written


def test_native_model_dir_with_pickled_weights_is_refused(tmp_path, start_model_dir, task_data, exploit):
    model = tmp_path / "model"
    model.mkdir()
    for f in start_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"embed_tokens.weight": exploit(marker)}, model / "model.safetensors")  # a pickle, misnamed
    args = ["sft", f"model={model}", f"data={task_data['sft']}", f"out_dir={tmp_path / 'out'}", "steps=1",
            "device=cpu", "progress=false"]
    line = one_error_line(run_cli(args, tmp_path))
    assert f"{model / 'model.safetensors'}: cannot load weights" in line, line
    assert not marker.exists()
    # Pickled weights under the PyTorch name are not a native model dir at all.
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    line = one_error_line(run_cli(args, tmp_path))
    assert f"{model}: not a minirlhf model dir" in line, line
    assert not marker.exists() and not (tmp_path / "out" / "final").exists()


def test_hugging_face_model_dir_with_pickled_weights_is_refused(tmp_path, task_data, start_model_dir, exploit):
    """A transformers-format dir (config.json with `model_type`) whose only weights are a pickle: transformers
    loads .bin files with weights_only=True, so the code never runs and the load fails with one line."""
    model = tmp_path / "hf_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 128}))
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": exploit(marker)}, model / "pytorch_model.bin")
    args = ["sft", f"model={model}", f"tokenizer={start_model_dir}", f"data={task_data['sft']}",
            f"out_dir={tmp_path / 'out'}", "steps=1", "device=cpu", "progress=false"]
    proc = run_cli(args, tmp_path)
    assert not marker.exists(), "the pickle ran"
    line = one_error_line(proc)
    assert "refusing to load a weights file that holds objects other than tensors" in line, line
    assert "unsupported GLOBAL posix.system" in line
    assert not (tmp_path / "out" / "final").exists()


def test_nan_rewards_do_not_poison_the_rollout(start_model_dir):
    algo = _grpo(start_model_dir, FixedReward([float("nan"), 1.0, 0.0, 1.0]), reward_clip=5.0)
    exp = algo.make_experience(0)
    assert torch.isfinite(exp.rewards).all() and torch.isfinite(exp.advantages).all()
    assert exp.rewards[0] == 0.0 and exp.stats["reward/nonfinite"] >= 1


class LengthMultipleOf5:
    """1 for a completion whose length in characters is a multiple of 5, else 0: on an untrained model's samples
    some groups of 4 get different rewards and some do not."""

    name = "length5"

    def score(self, prompts, completions, meta) -> torch.Tensor:
        return torch.tensor([float(len(c) % 5 == 0) for c in completions])


def test_dynamic_sampling_keeps_groups_whose_rewards_differ(start_model_dir):
    """DAPO's dynamic sampling: further prompts are sampled until the rollout holds prompts_per_rollout groups
    with reward variance; the kept rows are whole groups, the run is deterministic, and one try is plain GRPO."""
    from minirlhf.algorithms.grpo import group_has_variance

    def experience(**values):
        algo = _grpo(start_model_dir, LengthMultipleOf5(), group_size=4, prompts_per_rollout=2, batch_size=8,
                     max_new_tokens=6, **values)
        exp = algo.make_experience(0)
        return exp, exp.stats

    plain, plain_stats = experience()
    dynamic, stats = experience(dynamic_sampling=True, max_sampling_tries=8)
    assert group_has_variance(dynamic.rewards, 4).all() and dynamic.rewards.shape == (8,)
    assert group_has_variance(plain.rewards, 4).float().mean() == stats["dynamic_sampling/first_informative"]
    assert stats["dynamic_sampling/first_informative"] < 1  # measured: a group of the first sampling had none ...
    assert stats["dynamic_sampling/samplings"] >= 2  # ... so more samplings were drawn
    for g in range(2):  # whole groups: 4 samples of one prompt each
        assert dynamic.prompt_index[4 * g:4 * g + 4].unique().numel() == 1
    again, _ = experience(dynamic_sampling=True, max_sampling_tries=8)
    assert all(torch.equal(v, again.tensors()[k]) for k, v in dynamic.tensors().items())
    one_try, _ = experience(dynamic_sampling=True, max_sampling_tries=1)
    assert all(torch.equal(v, one_try.tensors()[k]) for k, v in plain.tensors().items())


def test_normalize_then_sum_uses_each_rewards_scores(start_model_dir):
    """The rollout keeps each reward function's scores (rows, K) for GDPO's advantage; a single reward function
    has nothing to normalise one by one and is refused."""
    from minirlhf.algorithms.policy_gradient import normalize_then_sum_advantages
    from minirlhf.config import ConfigError
    from minirlhf.rewards import WeightedSum

    class Length:
        name = "length"

        def score(self, prompts, completions, meta) -> torch.Tensor:
            return torch.tensor([float(len(c)) for c in completions])

    reward = WeightedSum([(LengthMultipleOf5(), 1.0), (Length(), 0.01)])
    algo = _grpo(start_model_dir, reward, group_size=4, prompts_per_rollout=2, batch_size=8, max_new_tokens=6,
                 advantage="normalize_then_sum")
    exp = algo.make_experience(0)
    assert exp.reward_parts.shape == (8, 2)
    assert torch.equal(exp.rewards, exp.reward_parts @ torch.tensor([1.0, 0.01]))
    expected = normalize_then_sum_advantages(exp.reward_parts, torch.tensor([1.0, 0.01]), 4)
    torch.testing.assert_close(exp.advantages.sum(1) / exp.completion_mask[:, 1:].sum(1), expected)
    with pytest.raises(ConfigError, match="normalize_then_sum"):
        _grpo(start_model_dir, LengthMultipleOf5(), advantage="normalize_then_sum")
