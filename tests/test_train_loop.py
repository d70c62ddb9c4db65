"""The shared training loop: exact resume, atomic checkpoints, the LR schedule, safe trainer-state loading,
and the non-finite-step guard."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from minirlhf.algorithms import sft
from minirlhf.algorithms.sft import LMConfig
from minirlhf.config import ConfigError, build_config
from minirlhf.train import checkpoint as ckpt
from minirlhf.train.loop import Algorithm, NonFiniteError, TrainConfig, lr_lambda, train


def sft_config(out_dir: Path, task_data, start_model_dir, **overrides) -> LMConfig:
    values = dict(mode="sft", model=str(start_model_dir), data=str(task_data["sft"]), out_dir=str(out_dir),
                  max_len=96, steps=6, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, weight_decay=0.1,
                  save_every=3, keep_checkpoints=2, seed=0, device="cpu", progress=False)
    return build_config(LMConfig, {**values, **overrides}, where="sft")


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(out_dir: Path) -> dict[int, dict]:
    """step -> training metrics (timing dropped: the only field allowed to differ between runs)."""
    return {r["step"]: {k: v for k, v in r.items() if k != "elapsed_s"}
            for r in read_metrics(out_dir) if "loss" in r}


def leftovers(out_dir: Path) -> list[str]:
    return [str(p) for p in out_dir.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, task_data, start_model_dir):
    straight = tmp_path / "straight"
    sft.run(sft_config(straight, task_data, start_model_dir))
    expected = train_rows(straight)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    # Second run to the end, then pretend it crashed after the step-3 checkpoint.
    interrupted = tmp_path / "interrupted"
    sft.run(sft_config(interrupted, task_data, start_model_dir))
    assert train_rows(interrupted) == expected  # same seed, same machine: bit-identical
    assert [p.name for p in ckpt.checkpoint_dirs(interrupted)] == ["step_000003", "step_000006"]
    shutil.rmtree(interrupted / "checkpoints" / "step_000006")
    shutil.rmtree(interrupted / "final")

    sft.run(sft_config(interrupted, task_data, start_model_dir, resume=True))
    resumed = train_rows(interrupted)
    logged = [r["step"] for r in read_metrics(interrupted) if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # rows 1-3 kept, rows 4-6 of the crashed run dropped, then rewritten
    for step in (4, 5, 6):
        assert resumed[step] == expected[step], step  # loss, lr, grad_norm, tokens: exactly equal
    # The final weights are identical too.
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(interrupted / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert leftovers(straight) == [] and leftovers(interrupted) == []
    # Each checkpoint is a loadable model dir per trainable module, plus the trainer state.
    step3 = interrupted / "checkpoints" / "step_000003"
    assert (step3 / "policy" / "model.safetensors").is_file() and (step3 / "policy" / "tokenizer.json").is_file()
    assert ckpt.load_state(step3)["step"] == 3


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, task_data, start_model_dir, capsys):
    sft.run(sft_config(tmp_path / "run", task_data, start_model_dir, steps=1, save_every=0, resume=True))
    assert "no checkpoint" in capsys.readouterr().err
    assert sorted(train_rows(tmp_path / "run")) == [1]
    assert ckpt.checkpoint_dirs(tmp_path / "run") == []


def test_checkpoint_dirs_ignores_temporary_and_incomplete_dirs(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_000003", "step_000012", ".tmp-step_000009-123", ".old-step_000001-77", "step_000020"):
        (root / name).mkdir(parents=True)
        if name != "step_000020":  # step_000020 has no trainer state: an incomplete checkpoint
            ckpt.save_state(root / name, {"step": 1})
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000003", "step_000012"]  # numeric order
    assert ckpt.checkpoint_dirs(tmp_path / "nowhere") == []
    ckpt.prune(tmp_path, keep=1)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000012"]
    assert ckpt.checkpoint_path(tmp_path, 7) == root / "step_000007"


def test_atomic_write_dir_replaces_whole_and_keeps_the_old_on_failure(tmp_path):
    final = tmp_path / "out" / "final"

    def write(content):
        def _write(tmp: Path) -> None:
            assert tmp != final and not tmp.name.startswith("final")
            (tmp / "a.txt").write_text(content)
        return _write

    ckpt.atomic_write_dir(final, write("one"))
    ckpt.atomic_write_dir(final, write("two"))
    assert (final / "a.txt").read_text() == "two"
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]  # no .tmp-/.old- left behind

    def crash(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write_dir(final, crash)
    assert (final / "a.txt").read_text() == "two"  # the previous complete version is untouched


def test_lr_schedule_warmup_then_cosine_by_hand():
    cfg = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)),
                8: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)), 10: 0.1, 15: 0.1}
    for step, value in expected.items():
        assert lr_lambda(step, cfg) == pytest.approx(value), step
    values = [lr_lambda(s, cfg) for s in range(2, 11)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing after warmup
    no_warmup = TrainConfig(steps=4, warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_lambda(s, no_warmup) for s in range(5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])



def test_load_state_refuses_pickled_code(tmp_path, exploit):
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "optimizer": exploit(marker)}, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(ValueError, match="refusing to load trainer state") as info:
        ckpt.load_state(tmp_path)
    assert str(tmp_path / ckpt.STATE_FILE) in str(info.value)
    assert not marker.exists()
    # A state made of tensors, numbers and containers (what the loop writes) loads fine.
    ckpt.save_state(tmp_path, {"step": 3, "rng": torch.get_rng_state(), "nested": {"a": [1, 2.5, "x"]}})
    assert ckpt.load_state(tmp_path)["nested"] == {"a": [1, 2.5, "x"]}


class Toy(Algorithm):
    """One linear layer; the loss is NaN at the listed steps."""

    def __init__(self, nan_steps: set[int]) -> None:
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.modules = {"policy": self.layer}
        self.nan_steps, self.step = nan_steps, 0

    def micro_batches(self, step: int):
        self.step = step
        return [torch.ones(2, 3)]

    def loss(self, batch):
        loss = self.layer(batch).pow(2).mean()
        return (loss * float("nan") if self.step in self.nan_steps else loss), {}

    def save(self, name: str, directory: Path, final: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.modules[name], str(directory / "model.safetensors"))


def toy_config(out_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(out_dir=str(out_dir), steps=10, lr=0.1, device="cpu", progress=False,
                                 max_bad_steps=3), **overrides})


# Skipping the very first optimizer steps makes torch warn that the scheduler stepped first; that is intended.
ignore_scheduler_warning = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


@ignore_scheduler_warning
def test_nan_loss_skips_steps_then_raises_after_max_bad_steps(tmp_path):
    algo = Toy(nan_steps=set(range(100)))
    before = {k: v.clone() for k, v in algo.layer.state_dict().items()}
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        train(algo, toy_config(tmp_path))
    rows = read_metrics(tmp_path)
    assert rows == [{"step": s, "skipped_nonfinite": 1.0, "bad_steps": float(s)} for s in (1, 2, 3)]
    after = algo.layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped steps never touch the weights
    assert not (tmp_path / "final").exists()


@ignore_scheduler_warning
def test_isolated_nan_steps_are_skipped_and_training_continues(tmp_path):
    algo = Toy(nan_steps={1, 2, 5})
    train(algo, toy_config(tmp_path, steps=8))
    rows = read_metrics(tmp_path)
    skipped = [r["step"] for r in rows if r.get("skipped_nonfinite")]
    trained = [r["step"] for r in rows if "loss" in r]
    assert skipped == [2, 3, 6] and trained == [1, 4, 5, 7, 8]
    assert [r["bad_steps"] for r in rows if r.get("skipped_nonfinite")] == [1.0, 2.0, 1.0]  # reset by step 4
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert all(torch.isfinite(p).all() for p in algo.layer.parameters())
    assert (tmp_path / "final" / "model.safetensors").is_file()
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]


@ignore_scheduler_warning
def test_skipped_steps_are_reported_at_the_end(tmp_path, capsys):
    train(Toy(nan_steps={1, 5}), toy_config(tmp_path, steps=8))
    assert "2 of 8 steps were skipped" in capsys.readouterr().err
    assert (tmp_path / "final" / "model.safetensors").is_file()


@ignore_scheduler_warning
def test_a_run_whose_every_step_was_skipped_fails_without_a_final_model(tmp_path):
    """Fewer bad steps in a row than max_bad_steps, yet no step ever trained: that is not a result."""
    with pytest.raises(NonFiniteError, match="all 2 steps"):
        train(Toy(nan_steps={0, 1}), toy_config(tmp_path, steps=2))
    assert not (tmp_path / "final").exists()


class CorruptedAfterFirstStep(Toy):
    """Weights turn NaN after the first update (as an overflowing update would leave them)."""

    def micro_batches(self, step: int):
        if step == 1:
            with torch.no_grad():
                self.layer.weight.fill_(float("nan"))
        return super().micro_batches(step)


@ignore_scheduler_warning
def test_non_finite_weights_are_never_written_as_final(tmp_path):
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        train(CorruptedAfterFirstStep(nan_steps=set()), toy_config(tmp_path, steps=2))
    assert not (tmp_path / "final").exists()


def test_a_fresh_run_refuses_an_out_dir_with_another_runs_checkpoints(tmp_path):
    train(Toy(nan_steps=set()), toy_config(tmp_path, steps=4, save_every=2))
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run"):
        train(Toy(nan_steps=set()), toy_config(tmp_path, steps=2, save_every=1))
    train(Toy(nan_steps=set()), toy_config(tmp_path, steps=2, save_every=1, overwrite=True))
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000001", "step_000002"]


def test_resume_refuses_another_stage_and_changed_options(tmp_path, capsys):
    train(Toy(nan_steps=set()), toy_config(tmp_path, steps=4, save_every=2), name="sft")
    shutil.rmtree(tmp_path / "checkpoints" / "step_000004")
    with pytest.raises(ConfigError, match="written by stage 'sft', not 'dpo'"):
        train(Toy(nan_steps=set()), toy_config(tmp_path, steps=4, resume=True), name="dpo")
    with pytest.raises(ConfigError, match=r"lr: 0.1 -> 0.05; weight_decay: 0.0 -> 0.1.*allow_config_change=true"):
        train(Toy(nan_steps=set()), toy_config(tmp_path, steps=4, resume=True, lr=0.05, weight_decay=0.1), name="sft")
    train(Toy(nan_steps=set()), toy_config(tmp_path, steps=4, resume=True, lr=0.05, allow_config_change=True),
          name="sft")
    assert "changed options: lr: 0.1 -> 0.05" in capsys.readouterr().err
    rows = [r for r in read_metrics(tmp_path) if "lr" in r]
    assert rows[2]["lr"] == pytest.approx(0.05 * lr_lambda(3, toy_config(tmp_path, steps=4)))  # the new lr


def test_resume_drops_a_torn_metrics_line(tmp_path, capsys):
    train(Toy(nan_steps=set()), toy_config(tmp_path, steps=4, save_every=2))
    shutil.rmtree(tmp_path / "checkpoints" / "step_000004")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')  # a crash mid-write
    train(Toy(nan_steps=set()), toy_config(tmp_path, steps=4, resume=True))
    assert f"{metrics}: dropped 1 unreadable line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4]


def test_max_minutes_stops_after_the_step_that_crosses_it_and_saves_the_result(tmp_path, capsys):
    """A time budget ends the run after the first step that finishes past it; the final evaluation and model are
    written as after the last step (here every step takes ~0.1 s and the budget is 0.25 s)."""
    import json
    import time

    class Slow(Toy):
        def loss(self, batch):
            time.sleep(0.1)
            return super().loss(batch)

    train(Slow(set()), toy_config(tmp_path, steps=50, max_minutes=0.25 / 60))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 3 <= max(steps) <= 5 and "max_minutes=0.00416667 reached" in capsys.readouterr().err
    assert (tmp_path / "final" / "model.safetensors").is_file()
