"""Every CLI stage as (config dataclass, run function). Algorithms register here, nowhere else."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .algorithms import dpo, grpo, online_dpo, ppo, rm, sft, spo
from .config import ConfigError, field
from .data.formats import load_pretrain
from .data.task import write_task_data
from .tokenizer import train_tokenizer


@dataclass
class DataConfig:
    out_dir: str = field("runs/demo/data", "where the generated JSONL files go")
    seed: int = field(0, "generator seed")
    n_train: int = field(4000, "training problems", min=1)
    n_heldout: int = field(200, "held-out problems (never seen in training)", min=1)


def run_data(cfg: DataConfig) -> dict[str, Any]:
    paths = write_task_data(cfg.out_dir, seed=cfg.seed, n_train=cfg.n_train, n_heldout=cfg.n_heldout)
    return {"files": len(paths)}


@dataclass
class TokenizerConfig:
    data: str = field("runs/demo/data/pretrain.jsonl", "pretraining JSONL ({text}) to learn merges from")
    vocab_size: int = field(512, "vocabulary size including 3 special tokens", min=260)
    out_dir: str = field("runs/demo/tokenizer", "where tokenizer.json goes")


def run_tokenizer(cfg: TokenizerConfig) -> dict[str, Any]:
    tokenizer = train_tokenizer(load_pretrain(cfg.data), cfg.vocab_size)
    tokenizer.save(Path(cfg.out_dir))
    return {"vocab_size": tokenizer.vocab_size}


STAGES: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "data": (DataConfig, run_data),
    "tokenizer": (TokenizerConfig, run_tokenizer),
    "pretrain": (sft.LMConfig, sft.run),
    "sft": (sft.LMConfig, sft.run),
    "rm": (rm.RMConfig, rm.run),
    "dpo": (dpo.DPOConfig, dpo.run),
    "ppo": (ppo.PPOConfig, ppo.run),
    "grpo": (grpo.GRPOConfig, grpo.run),
    "spo": (spo.SPOConfig, spo.run),
    "judge": (sft.LMConfig, sft.run),  # SFT of a generative judge (eval_kind: judge)
    "sft-control": (sft.LMConfig, sft.run),  # continued SFT: the control every method's gain is compared with
    "rlaif": (grpo.GRPOConfig, grpo.run),  # GRPO with `reward: judge`
    "online-dpo": (online_dpo.OnlineDPOConfig, online_dpo.run),
}


def check_context_window(stage: str, cfg: Any) -> None:
    """Refuse sequence budgets longer than the starting model's context window (`max_seq_len` in its
    config.json): such a run would load everything and then fail at the first over-long batch. Budgets are
    `max_len` (sequences are truncated to it) and `max_prompt_len + max_new_tokens` (rollouts)."""
    model = getattr(cfg, "model", "")
    if not model:
        return
    try:
        window = int(json.loads((Path(model) / "config.json").read_text())["max_seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a missing or broken model dir is reported, with its path, when the model is loaded
    budgets = []
    if hasattr(cfg, "max_len"):
        budgets.append(("max_len", cfg.max_len))
    if hasattr(cfg, "max_prompt_len") and hasattr(cfg, "max_new_tokens"):
        budgets.append(("max_prompt_len + max_new_tokens", cfg.max_prompt_len + cfg.max_new_tokens))
    for name, value in budgets:
        if value > window:
            raise ConfigError(f"{stage}.{name}: {value} tokens exceed the context window of {model} "
                              f"(max_seq_len={window}); lower it to at most {window}")
