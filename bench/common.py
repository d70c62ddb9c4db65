"""Pieces shared by the benchmarks against TRL: the task tokenizer and a quiet, equal-threads setup."""

from __future__ import annotations

import argparse
import warnings

import torch

from minirlhf.data.task import generate_problems, pretrain_texts, sft_records
from minirlhf.tokenizer import Tokenizer, train_tokenizer


def task_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on the embedded task (plain text plus chat-formatted conversations)."""
    problems = generate_problems(300, seed=0)
    texts = pretrain_texts(problems, seed=0)
    for rec in sft_records(problems[:100]):
        texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in rec["conversations"]))
    return train_tokenizer(texts, vocab_size)


def quiet_hf(threads: int) -> None:
    """Silence transformers/datasets progress and warnings, and give both engines the same torch threads."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.disable_caching()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    """Flags both TRL benchmarks take: the tiny model's shape, rounds, threads, seed."""
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab", type=int, default=320, help="BPE vocabulary trained on the task")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per engine; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both engines")
    parser.add_argument("--seed", type=int, default=0)
