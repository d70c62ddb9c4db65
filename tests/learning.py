"""What the learning tests share (test_learning.py, test_learning_judge_and_surrogates.py): on the embedded task,
each method improves the model on held-out problems.

The embedded world (data/task.py) has mixed-quality demonstrations: most show their working, but a bare
guess ("The answer is N.") is the single commonest opening, so the SFT model, decoding greedily, guesses and
is mostly wrong, while its samples hold every style. The rubric behind every reward, preference and judge
label prefers the working. Each method must move the policy there and raise greedy accuracy on held-out
problems it never saw, by more than three standard errors of the difference.

Every stage runs with its section of configs/rlhf.yaml (what `make demo` runs: its precision too, so on a CPU
with bf16 every stage trains under bf16 autocast, the output heads in float32) on the demo's data and seeds,
shortened to keep the suite fast (FEWER_STEPS per method), on 200 held-out problems, without intermediate
evaluation, on one thread as every test (conftest.py: with two threads beside the other test worker, pretraining
ran 2x slower) except SFT. Every method starts from one pretrained + SFT policy (`build_pipeline`), built once
per test session and shared by the test workers (conftest's `learning_pipeline`). CPU runs are deterministic;
the values measured (on the 2-core Intel Xeon of README "Speed") are noted next to each assert, whose bounds
leave room for other CPU kernels and thread counts (the issue tracker saw 5-10 points of float-rounding spread
between machines).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from minirlhf.config import load_stage_config
from minirlhf.stages import STAGES
from minirlhf.train.plots import read_metrics

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rlhf.yaml"
HELD_OUT = 200
# The demo's pretraining and SFT as they are (a shorter start leaves working too weak to pay off), then each
# method for no more steps than the demo gives it (the judge keeps its 48: at 32 it agreed only 0.735 in CI).
FEWER_STEPS = {"rm": 40, "dpo": 30, "ppo": 24, "grpo": 10, "spo": 12, "online-dpo": 10, "rlaif": 12}


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


def build_pipeline(root: Path) -> dict:
    """The demo's data, tokenizer and pretrained + SFT policy under `root`: the starting point of every method.
    {"root": root, "sft": the SFT model's held-out metrics}."""
    run_stage(root, "data", n_heldout=HELD_OUT)
    run_stage(root, "tokenizer")
    run_stage(root, "pretrain")
    # Pretraining runs on one thread while the other test worker runs the rest of the suite; by the time SFT
    # starts that worker has nothing left but to wait for this pipeline, so SFT takes both cores (measured 135 s
    # against 224 s on one). A fixed choice, so the SFT model is the same every run.
    with torch_threads(2):
        return {"root": root, "sft": run_stage(root, "sft", eval_samples=HELD_OUT)}


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def metrics(out_dir: Path) -> list[dict]:
    """The rows a stage logged to out_dir/metrics.jsonl."""
    return read_metrics(out_dir / "metrics.jsonl")


def gain(result: dict, start: dict) -> tuple[float, float]:
    """(held-out greedy accuracy gain over the start, that gain in standard errors of the difference)."""
    difference = result["accuracy"] - start["accuracy"]
    return difference, difference / max(math.hypot(result["accuracy_se"], start["accuracy_se"]), 1e-9)


def assert_held_out_gain(result: dict, start: dict, at_least: float) -> None:
    difference, z = gain(result, start)
    assert difference >= at_least and z >= 3, (difference, z, result)
    assert result["style/working"] + result["style/slip"] > 0.5, result  # it now shows its working


