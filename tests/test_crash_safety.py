"""Crash safety: `kill -9` a real training run at seeded random moments, including while a checkpoint is being
written, several times; after each kill the latest checkpoint must load (trainer state through the checkpoint
module, weights through safetensors) and `resume=true` must continue from it; at the end the resumed run's
metrics.jsonl must equal an uninterrupted run's exactly (CPU runs are deterministic)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from minirlhf.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
STEPS = 30


def write_config(path: Path, out_dir: Path, model_dir: Path, data: Path) -> Path:
    section = dict(mode="sft", model=str(model_dir), data=str(data), out_dir=str(out_dir), max_len=96,
                   steps=STEPS, batch_size=2, lr=3e-3, warmup_steps=2, save_every=1, keep_checkpoints=2, seed=0,
                   device="cpu", progress=False)
    path.write_text(json.dumps({"sft": section}))
    return path


def launch(config: Path, cwd: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "minirlhf.cli", "sft", "--config", str(config)] + (["resume=true"] if resume else [])
    return subprocess.Popen(args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_rows(out_dir: Path) -> dict[int, dict]:
    """step -> training metrics, timing dropped (the only field allowed to differ between runs)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k != "elapsed_s"} for r in rows if "loss" in r}


def n_rows(out_dir: Path) -> int:
    try:
        return sum(1 for line in (out_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    except OSError:
        return 0


def writing_checkpoint(out_dir: Path) -> bool:
    root = out_dir / "checkpoints"
    try:
        return any(p.name.startswith(".tmp-") for p in root.iterdir())
    except OSError:
        return False


def assert_latest_checkpoint_loads(out_dir: Path) -> int:
    """The newest complete checkpoint loads: trainer state (weights_only) and safetensors weights. Returns its step
    (0 when there is none yet)."""
    dirs = ckpt.checkpoint_dirs(out_dir)
    if not dirs:
        return 0
    latest = dirs[-1]
    state = ckpt.load_state(latest)
    assert state["step"] == int(latest.name.removeprefix("step_")), latest
    assert {"optimizer", "scheduler", "rng_torch", "rng_python", "algorithm"} <= set(state)
    weights = load_file(latest / "policy" / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
    assert (latest / "policy" / "config.json").is_file() and (latest / "policy" / "tokenizer.json").is_file()
    return state["step"]


def kill_when(proc: subprocess.Popen, out_dir: Path, mode: str, rng: random.Random, deadline: float) -> bool:
    """Wait for the moment `mode` picks, then SIGKILL. Returns False if the run finished first."""
    start_rows = n_rows(out_dir)
    target = start_rows + rng.randint(1, 6)
    while proc.poll() is None and time.monotonic() < deadline:
        if mode == "startup" or (mode == "checkpoint" and n_rows(out_dir) > start_rows
                                 and writing_checkpoint(out_dir)):
            if mode == "startup":
                time.sleep(rng.uniform(0.2, 1.2))  # while importing, loading data or the model, or resuming
            os.kill(proc.pid, signal.SIGKILL)
            break
        if mode == "step" and n_rows(out_dir) >= target:
            time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside a later step, or its checkpoint
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.0005 if mode == "checkpoint" else 0.005)
    proc.communicate()
    return proc.returncode == -signal.SIGKILL


def test_kill_9_at_random_moments_then_resume_reproduces_the_straight_run(tmp_path, start_model_dir, task_data):
    straight = tmp_path / "straight"
    proc = subprocess.run([sys.executable, "-m", "minirlhf.cli", "sft", "--config",
                           str(write_config(tmp_path / "straight.yaml", straight, start_model_dir, task_data["sft"]))],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = train_rows(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))

    crashed = tmp_path / "crashed"
    config = write_config(tmp_path / "crashed.yaml", crashed, start_model_dir, task_data["sft"])
    rng = random.Random(1234)
    plan = ["step", "checkpoint", "startup", "checkpoint", "step", "checkpoint"]
    deadline = time.monotonic() + 90
    kills, torn_writes, resumed_at = 0, 0, []
    for i, mode in enumerate(plan):
        proc = launch(config, tmp_path, resume=i > 0)
        before = assert_latest_checkpoint_loads(crashed) if i else 0
        if not kill_when(proc, crashed, mode, rng, deadline):
            assert proc.returncode == 0, proc.stderr  # the run finished before this kill: fine
            break
        kills += 1
        torn_writes += writing_checkpoint(crashed)  # a .tmp- dir left behind: the kill hit a checkpoint write
        step = assert_latest_checkpoint_loads(crashed)
        assert step >= before
        resumed_at.append(step)
    assert kills >= 4, f"only {kills} kills landed before the run ended (checkpoints at kill: {resumed_at})"
    assert torn_writes >= 1, "no kill landed inside a checkpoint write"

    # Resume to the end.
    proc = launch(config, tmp_path, resume=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    latest = resumed_at[-1]
    if latest:
        assert f"resumed from {ckpt.checkpoint_path(crashed, latest)} at step {latest}" in err, err
    assert train_rows(crashed) == expected  # loss, lr, grad_norm, tokens at every step: exactly equal
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(crashed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    leftovers = [p.name for p in (crashed / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == [], leftovers  # half-written dirs of the killed runs were cleaned up on resume


def test_leftovers_of_a_killed_writer_are_tidied_on_the_next_write(tmp_path):
    """A writer killed mid-write leaves `.tmp-<name>-<pid>`; one killed between its two renames leaves the previous
    complete version as `.old-<name>-<pid>` and no `<name>`. The next write of that name deletes the first and puts
    the second back (so even if that write fails too, the old version is where `--resume` looks)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited and been reaped
    final = tmp_path / "checkpoints" / "step_000004"
    (final.parent / f".tmp-step_000004-{pid}").mkdir(parents=True)
    (final.parent / f".tmp-step_000004-{pid}" / "half").write_text("x")
    (final.parent / f".old-step_000004-{pid}").mkdir()
    (final.parent / f".old-step_000004-{pid}" / "complete").write_text("previous")
    live = final.parent / f".tmp-step_000004-{os.getppid()}"  # a running process's write is left alone
    live.mkdir()

    def crash(tmp: Path) -> None:
        raise RuntimeError("killed again")

    try:
        ckpt.atomic_write_dir(final, crash)
    except RuntimeError:
        pass
    assert (final / "complete").read_text() == "previous"
    names = sorted(p.name for p in final.parent.iterdir())
    assert names == sorted(["step_000004", live.name]), names  # the failed write removed its own .tmp- dir


def sigterm_after_rows(tmp_path: Path, start_model_dir, task_data, save_every: int) -> subprocess.CompletedProcess:
    """Start a run, send SIGTERM (how Slurm, Docker and Kubernetes stop a job) after two steps, collect it."""
    config = write_config(tmp_path / "run.yaml", tmp_path / "out", start_model_dir, task_data["sft"])
    config.write_text(config.read_text().replace('"save_every": 1', f'"save_every": {save_every}'))
    proc = launch(config, tmp_path, resume=False)
    deadline = time.monotonic() + 120
    while n_rows(tmp_path / "out") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigterm_acts_like_ctrl_c_and_says_how_to_resume(tmp_path, start_model_dir, task_data):
    result = sigterm_after_rows(tmp_path, start_model_dir, task_data, save_every=1)
    assert result.returncode == 143, result.stderr
    assert "stopped by SIGTERM; the last checkpoint" in result.stderr and "resume=true" in result.stderr
    assert "Traceback" not in result.stderr
    assert assert_latest_checkpoint_loads(tmp_path / "out") >= 1


def test_sigterm_without_checkpoints_does_not_promise_one(tmp_path, start_model_dir, task_data):
    result = sigterm_after_rows(tmp_path, start_model_dir, task_data, save_every=0)
    assert result.returncode == 143, result.stderr
    assert "no checkpoint was written" in result.stderr and "save_every=0" in result.stderr
    assert "intact" not in result.stderr


# A stop (SIGTERM or Ctrl-C's SIGINT) that arrives while a finalizer runs: its KeyboardInterrupt cannot leave the
# finalizer (Python prints "Exception ignored in ..." and goes on); the command's handlers must still stop the run.
STOP_IN_A_FINALIZER = """
import os, signal, sys, time
from minirlhf.cli import install_stop_handlers
install_stop_handlers()
class Finalised:
    def __del__(self):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        for _ in range(1000):  # the signal's handler runs here, inside the finalizer
            pass
try:
    Finalised()  # collected at once
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pass
    print("went on")
except KeyboardInterrupt as e:
    print("stopped", e)
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_that_lands_in_a_finalizer_still_stops_the_run(stop):
    result = subprocess.run([sys.executable, "-c", STOP_IN_A_FINALIZER, stop], capture_output=True, text=True,
                            env=ENV, timeout=60)
    assert result.stdout.startswith("stopped"), (result.stdout, result.stderr)
    assert ("by SIGTERM" in result.stdout) == (stop == "SIGTERM")
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_failed_write_leaves_no_temporary_dir(tmp_path):
    """A full disk mid-checkpoint: the error propagates, the previous checkpoint stays, no `.tmp-` dir is left."""
    target = tmp_path / "checkpoints" / "step_000002"
    ckpt.atomic_write_dir(target, lambda tmp: (tmp / "a").write_text("old"))

    def full_disk(tmp: Path) -> None:
        (tmp / "a").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "b"))

    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_write_dir(target, full_disk)
    assert (target / "a").read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["step_000002"]


def test_a_write_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save reports a full disk as its own RuntimeError; the user reads that the disk is full."""
    from minirlhf.errors import SetupError

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1024})())

    def torch_style_failure(tmp: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    with pytest.raises(SetupError, match="cannot write, the disk is full"):
        ckpt.atomic_write_dir(tmp_path / "checkpoints" / "step_000001", torch_style_failure)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
