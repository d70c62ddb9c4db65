"""Shared fixtures: a tiny model factory, a small BPE tokenizer trained on the embedded task, task data files,
and a saved starting model (weights + tokenizer) for short training runs.

Everything is seeded and small; the learning tests (tests/learning.py) share one pretrained + SFT pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from minirlhf.data.task import generate_problems, pretrain_texts, sft_records, write_task_data
from minirlhf.model import MiniMindLM, preset
from minirlhf.tokenizer import train_tokenizer

# A 2-layer, 64-wide model: big enough to exercise GQA, RoPE and the cache, small enough to be instant.
TINY = dict(vocab_size=64, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)
TOKENIZER_VOCAB = 320

# Tiny matrices gain nothing from intra-op threads, and oversubscribed OpenMP threads (another job on the
# same cores) can make each op 20x slower. One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


@pytest.fixture
def make_model():
    """`make_model(seed=0, **overrides)` -> an eval-mode tiny MiniMindLM with seeded weights."""

    def make(seed: int = 0, **overrides) -> MiniMindLM:
        torch.manual_seed(seed)
        return MiniMindLM(preset("tiny", **{**TINY, **overrides})).eval()

    return make


def _task_texts() -> list[str]:
    problems = generate_problems(300, seed=0)
    texts = pretrain_texts(problems, seed=0)
    for rec in sft_records(problems[:100]):  # chat-formatted text too, so role names get merges
        texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in rec["conversations"]))
    return texts


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE with 320 tokens trained on the embedded arithmetic task."""
    return train_tokenizer(_task_texts(), TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """{name: path} of the generated task files (200 training problems, 20 held out)."""
    return write_task_data(tmp_path_factory.mktemp("task_data"), seed=0, n_train=200, n_heldout=20)


@pytest.fixture(scope="session")
def start_model_dir(tmp_path_factory, tokenizer):
    """A model dir (config, weights, tokenizer) holding a 2-layer tiny model: the `model` of SFT test runs."""
    directory = tmp_path_factory.mktemp("start_model")
    torch.manual_seed(0)
    model = MiniMindLM(preset("tiny", **{**TINY, "vocab_size": tokenizer.vocab_size, "hidden_size": 96,
                                         "num_heads": 6, "intermediate_size": 256}))
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


class _Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint or weights file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def exploit():
    """`exploit(marker)`: an object whose unpickling creates the file `marker` (so a test can see code ran)."""
    return _Exploit


@pytest.fixture(scope="session")
def learning_pipeline(tmp_path_factory, worker_id) -> dict:
    """The learning tests' start (tests/learning.py `build_pipeline`: the demo's pretraining and SFT, minutes),
    built once per test session. Under xdist the first worker to ask builds it in the session's shared temp dir
    while another waits on a file lock, then reads what the first wrote."""
    from filelock import FileLock
    from learning import build_pipeline

    if worker_id == "master":  # no xdist
        return build_pipeline(tmp_path_factory.mktemp("learning"))
    root = tmp_path_factory.getbasetemp().parent / "learning"
    done = root / "sft_metrics.json"
    with FileLock(f"{root}.lock"):
        if not done.is_file():
            sft = build_pipeline(root)["sft"]
            done.write_text(json.dumps(sft))
    return {"root": root, "sft": json.loads(done.read_text())}


# With `make test`'s two xdist workers and `--no-loadscope-reorder`, files go to the workers in this order: the
# first learning file (whose worker builds the shared pipeline, minutes, then trains its methods) first, the
# second last, so that the other worker runs everything else while the pipeline is built and then shares the
# learning tests' second half.
FIRST, LAST = "test_learning.py", "test_learning_judge_and_surrogates.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: (item.path.name != FIRST) + (item.path.name == LAST))
