"""Reward model: a policy backbone plus a scalar head, trained on preference pairs with the
Bradley–Terry loss  -log σ(r(x, y_chosen) - r(x, y_rejected) - m)  (Ouyang et al., 2022; the optional
margin m as in Llama 2, Touvron et al., 2023). The score is read at the last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import field
from ..data.batching import StepBatches
from ..data.pairs import collate_pairs, load_pairs, tokenize_pairs
from ..eval import reward_model_accuracy
from ..model.heads import ScalarHeadModel
from ..tokenizer import Tokenizer
from ..train import distributed
from ..train.loop import Algorithm, TrainConfig, train
from ..train.start import load_start


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """mean of -log σ(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


@dataclass
class RMConfig(TrainConfig):
    model: str = field("", "policy dir whose backbone starts the reward model (usually the SFT model)")
    tokenizer: str = field("", "tokenizer dir; empty = the one saved with `model`")
    data: str = field("", "preference JSONL for training")
    eval_data: str = field("", "held-out preference JSONL")
    eval_samples: int = field(200, "held-out pairs to evaluate", min=1)
    max_len: int = field(256, "tokens per sequence (prompt cut from the left first)", min=8)
    margin: float = field(0.0, "margin m in -log σ(r_c - r_r - m)")


class RewardModelTraining(Algorithm):
    def __init__(self, model: ScalarHeadModel, tokenizer: Tokenizer, pairs, eval_pairs, cfg: RMConfig) -> None:
        self.model, self.tokenizer, self.pairs, self.eval_pairs, self.cfg = model, tokenizer, pairs, eval_pairs, cfg
        self.modules = {"reward_model": model}
        self.num_examples = len(pairs)
        self.batches = StepBatches(len(pairs), cfg.batch_size, cfg.grad_accum, cfg.seed,
                                   distributed.rank(), distributed.world_size())
        self.device = next(model.parameters()).device

    def micro_batches(self, step: int):
        return [collate_pairs([self.pairs[i] for i in idx], self.tokenizer.pad_id, self.device)
                for idx in self.batches.indices(step)]

    def loss_weight(self, batch) -> float:
        return batch[0].shape[0] / 2  # the loss is a mean over pairs (chosen rows, then rejected rows)

    def loss(self, batch):
        ids, attention, _ = batch
        scores = self.model.score(ids, attention)
        chosen, rejected = scores.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, self.cfg.margin)
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {"accuracy": float((chosen > rejected).float().mean()),
                      "margin": float((chosen - rejected).mean()), "reward/chosen": float(chosen.mean())}

    def evaluate(self, final: bool = True) -> dict[str, float]:
        if not self.eval_pairs:
            return {}
        return reward_model_accuracy(self.model, self.eval_pairs, self.tokenizer.pad_id)


def run(cfg: RMConfig) -> dict[str, float]:
    if not cfg.data or not cfg.model:
        raise ValueError("rm: set `model` (the SFT model dir) and `data` (preference JSONL)")
    tokenizer, model, _ = load_start(cfg, scalar_head=True)
    pairs = tokenize_pairs(tokenizer, load_pairs(cfg.data), cfg.max_len)
    eval_pairs = []
    if cfg.eval_data:
        eval_pairs = tokenize_pairs(tokenizer, load_pairs(cfg.eval_data)[: cfg.eval_samples], cfg.max_len)
    return train(RewardModelTraining(model, tokenizer, pairs, eval_pairs, cfg), cfg, name="rm")
