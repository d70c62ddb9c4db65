"""Pretraining and supervised fine-tuning: next-token cross-entropy on the tokens that should be learned.

Pretraining packs documents into fixed-length blocks and learns every token. SFT renders conversations
with the chat template and learns only assistant tokens (content + the `<|im_end|>` that ends each turn):
the user's words and the template headers are context, not targets.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import field
from ..data.batching import StepBatches, pack, pad_right
from ..data.formats import DataError, load_pretrain, load_prompts, load_sft
from ..eval import task_metrics
from ..logprobs import gather_logprobs
from ..model import MiniMindLM, preset
from ..rewards.judge import judge_agreement
from ..tokenizer import Tokenizer
from ..train import distributed
from ..train.loop import Algorithm, TrainConfig, evaluated, resolve_device, seed_everything, train
from ..train.start import load_start


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """mean over {t : loss_mask[t+1] = 1} of -log p(ids[t+1] | ids[:t+1]); logits (B, T, V)."""
    mask = loss_mask[:, 1:].float()
    nll = -gather_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (nll * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class LMConfig(TrainConfig):
    """Pretraining (`mode: pretrain`) or SFT (`mode: sft`)."""

    mode: Literal["pretrain", "sft"] = field("sft", "pretrain: packed plain text; sft: chat, assistant tokens")
    model: str = field("", "model dir to start from; empty = a new model from `preset`")
    preset: str = field("tiny", "model size for a new model: tiny | mini | base")
    tokenizer: str = field("", "tokenizer dir; empty = the one saved with `model`")
    data: str = field("", "training JSONL ({text} for pretrain, {conversations|messages} for sft)")
    eval_data: str = field("", "held-out JSONL: {text} (pretrain: loss), {prompt, answer} (sft: task accuracy) "
                                "or judge conversations (eval_kind: judge)")
    eval_kind: Literal["task", "judge"] = field("task", "sft eval: task accuracy, or agreement of a trained judge")
    eval_samples: int = field(200, "held-out examples to evaluate", min=1)
    max_len: int = field(128, "tokens per sequence; longer conversations are truncated (and counted)", min=8)
    max_new_tokens: int = field(48, "generation budget for held-out accuracy", min=1)


class LanguageModeling(Algorithm):
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, examples: list[tuple[list[int], list[int]]],
                 cfg: LMConfig, eval_examples: list | None = None) -> None:
        self.model, self.tokenizer, self.examples, self.cfg = model, tokenizer, examples, cfg
        self.modules = {"policy": model}
        self.batches = StepBatches(len(examples), cfg.batch_size, cfg.grad_accum, cfg.seed,
                                   distributed.rank(), distributed.world_size())
        self.num_examples = len(examples)
        self.eval_examples = eval_examples or []
        self.device = next(model.parameters()).device

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [self._collate([self.examples[i] for i in idx]) for idx in self.batches.indices(step)]

    def _collate(self, rows):
        ids = pad_right([r[0] for r in rows], self.tokenizer.pad_id)
        loss_mask = pad_right([r[1] for r in rows], 0)
        attention = pad_right([[1] * len(r[0]) for r in rows], 0)
        return ids.to(self.device), attention.to(self.device), loss_mask.to(self.device)

    def loss(self, batch):
        ids, attention, loss_mask = batch
        out = self.model(ids, attention_mask=attention)
        loss = lm_loss(out.logits, ids, loss_mask)
        metrics = {"tokens": float(loss_mask[:, 1:].sum())}
        if out.aux_loss is not None:
            metrics["aux_loss"] = float(out.aux_loss.detach())
            loss = loss + out.aux_loss
        return loss, metrics

    def loss_weight(self, batch) -> float:
        return float(batch[2][:, 1:].sum())  # lm_loss is a mean over target tokens

    def evaluate(self, final: bool = True) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        if self.cfg.mode == "sft" and self.cfg.eval_kind == "judge":
            return judge_agreement(self.model, self.tokenizer, evaluated(self.eval_examples, self.cfg, final))
        if self.cfg.mode == "sft":
            return task_metrics(self.model, self.tokenizer, evaluated(self.eval_examples, self.cfg, final),
                                self.cfg.max_new_tokens, sampled=final)
        losses = [float(self.loss(self._collate(self.eval_examples[i:i + 32]))[0])
                  for i in range(0, len(self.eval_examples), 32)]
        return {"loss": sum(losses) / len(losses)}


def tokenize_conversations(tokenizer: Tokenizer, conversations, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) per conversation, truncated to max_len; reports how many were cut or dropped."""
    examples, truncated, dropped = [], 0, 0
    for messages in conversations:
        ids, mask = tokenizer.encode_chat(messages)
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        examples.append((ids, mask))
    if (truncated or dropped) and examples:  # (with no examples left the caller raises instead)
        print(f"sft: truncated {truncated} conversations to max_len={max_len}; dropped {dropped} left with no "
              "assistant tokens", file=sys.stderr)
    return examples


def build(cfg: LMConfig) -> LanguageModeling:
    """Load data, tokenizer and model for a pretrain/SFT run."""
    if not cfg.data:
        raise ValueError(f"{cfg.mode}: set `data` to a JSONL file")
    if cfg.model:
        tokenizer, model, device = load_start(cfg)
    else:  # pretraining from scratch: a new model sized for the tokenizer
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        tokenizer = Tokenizer.load(cfg.tokenizer)
        model = MiniMindLM(preset(cfg.preset, vocab_size=tokenizer.vocab_size)).to(device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    if cfg.mode == "pretrain":
        blocks = pack([tokenizer.encode(t) for t in load_pretrain(cfg.data)], cfg.max_len, tokenizer.pad_id)
        examples = [(b, [1] * len(b)) for b in blocks]
        eval_examples = None
        if cfg.eval_data:
            texts = load_pretrain(cfg.eval_data)
            eval_blocks = pack([tokenizer.encode(t) for t in texts], cfg.max_len, tokenizer.pad_id)
            eval_examples = [(b, [1] * len(b)) for b in eval_blocks[: cfg.eval_samples]]
    else:
        conversations = load_sft(cfg.data)
        examples = tokenize_conversations(tokenizer, conversations, cfg.max_len)
        if not examples:
            raise DataError(cfg.data, None, None, f"all {len(conversations)} conversations were dropped: none has an "
                                                  f"assistant token within max_len={cfg.max_len}; raise max_len")
        eval_examples = None
        if cfg.eval_data:
            loader = load_sft if cfg.eval_kind == "judge" else load_prompts
            eval_examples = loader(cfg.eval_data)[: cfg.eval_samples]
    return LanguageModeling(model, tokenizer, examples, cfg, eval_examples)


def run(cfg: LMConfig) -> dict[str, float]:
    algo = build(cfg)
    return train(algo, cfg, name=cfg.mode)
