"""Pieces shared by the benchmarks against TRL: the task tokenizer and a quiet, equal-threads setup."""

from __future__ import annotations

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
