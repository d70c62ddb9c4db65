"""Pieces shared by the benchmarks against TRL: the task tokenizer and a quiet, equal-threads setup."""

from __future__ import annotations

import argparse
import time
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


def matmul_gflops(hidden: int, rows: int = 4096, repeats: int = 20, dtype: torch.dtype = torch.float32
                  ) -> dict[str, float]:
    """The rates this machine reaches at the model's shape ((rows, hidden) x (hidden, 2·hidden), the current torch
    threads, in `dtype`), by stock `F.linear` (fp32: MKL sgemm on x86, what HF models and TRL use; bf16: oneDNN,
    AMX where the CPU has it) and by oneDNN (what our model's fp32 linears use on non-Intel x86 CPUs,
    `minirlhf.model.linear`); a step's GFLOP/s is read against the higher."""
    from minirlhf.model.linear import has_onednn_linear, onednn_linear

    x, w = torch.randn(rows, hidden).to(dtype), torch.randn(2 * hidden, hidden).to(dtype)
    products = {"F.linear": torch.nn.functional.linear}
    if has_onednn_linear():
        products["oneDNN"] = onednn_linear
    rates = {}
    for name, product in products.items():
        for _ in range(3):
            product(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            product(x, w)
        rates[name] = round(2 * rows * hidden * 2 * hidden * repeats / (time.perf_counter() - start) / 1e9, 1)
    return rates


def read_bandwidth_gbs(megabytes: float, repeats: int = 10) -> float:
    """The rate (GB/s) at which this machine reads `megabytes` over and over, as a decode step re-reads its weights
    and cache every step, at the current torch threads: the best of `repeats` sums over a float32 tensor of that
    size (a working set that fits the last-level cache is read faster than one that streams from memory)."""
    x = torch.ones(max(int(megabytes * 2**20) // 4, 1024))
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return round(x.nbytes / best / 1e9, 1)


def quiet_hf(threads: int) -> None:
    """Silence transformers/datasets progress and warnings, and give both engines the same torch threads."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.disable_caching()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


# A size people train (18M parameters with the task's 320-token vocabulary, 2 threads) by default; `--tiny` is the
# old 95k-parameter, 1-thread setting, where per-step framework overhead is all there is to measure.
REALISTIC = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 2, "threads": 2}
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "threads": 1}


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    """Flags both TRL benchmarks take: the model's shape, rounds, threads, seed."""
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab", type=int, default=320, help="BPE vocabulary trained on the task")
    parser.add_argument("--tiny", action="store_true", help="the tiny setting: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()))
    parser.add_argument("--hidden", type=int, help=f"default {REALISTIC['hidden']}")
    parser.add_argument("--layers", type=int, help=f"default {REALISTIC['layers']}")
    parser.add_argument("--heads", type=int, help=f"default {REALISTIC['heads']}")
    parser.add_argument("--kv-heads", type=int, help=f"default {REALISTIC['kv_heads']}")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per engine; the median is reported")
    parser.add_argument("--threads", type=int, help=f"torch threads, both engines (default {REALISTIC['threads']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aten-linears", action="store_true",
                        help="ours with every fp32 product through stock F.linear (MKL), as the peer: no oneDNN")


def use_aten_linears(on: bool = True) -> None:
    """Ours without oneDNN (`on`) or with it again: the model's linears and the sampler's decode step multiply by
    stock `F.linear`."""
    from minirlhf.generation import decode
    from minirlhf.model import linear

    linear.ONEDNN_CPU_LINEARS = decode.PACK_CPU_LINEARS = not on


def resolve_size(args: argparse.Namespace) -> None:
    """Fill the shape flags left unset from the realistic default, or from the tiny one with --tiny."""
    for key, value in (TINY if args.tiny else REALISTIC).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
