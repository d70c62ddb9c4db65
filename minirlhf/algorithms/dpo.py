"""Direct preference optimisation and its family, one pure loss with a `loss_type` switch.

With h = [log π(y_c|x) - log π_ref(y_c|x)] - [log π(y_r|x) - log π_ref(y_r|x)] (summed token log-probs):
- sigmoid  -log σ(βh)                                        DPO, Rafailov et al., 2023
           with label_smoothing ε: -(1-ε) log σ(βh) - ε log σ(-βh)     cDPO, Mitchell, 2023
- robust   [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1 - 2ε)      rDPO, Chowdhury et al., 2024
- hinge    max(0, 1 - βh)                                    SLiC-HF, Zhao et al., 2023
- ipo      (h - 1/(2β))², log-probs averaged over tokens     IPO, Azar et al., 2023 (as TRL)
- simpo    -log σ(β Δ - γ), Δ = mean-token log π(y_c) - mean-token log π(y_r), no reference
                                                             SimPO, Meng et al., 2024
Implicit rewards β (log π - log π_ref) are logged as rewards/chosen, rewards/rejected (and their margin). Their
scale follows the loss: summed sequence log-probs for sigmoid/robust/hinge, but per-token averages for ipo
(β · mean-token log ratio) and simpo (β · mean-token log π), so ipo/simpo rewards are about 1/length of the
others'; compare runs of the same loss_type only.

Reference log-probs are computed once, in batched no-grad passes before training (with the initial
policy when no separate reference is given), so no reference model is held during training; set
`precompute_ref: false` to keep a live frozen reference instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import field
from ..data.batching import StepBatches
from ..data.formats import load_prompts
from ..data.pairs import collate_pairs, collate_shared_prompts, load_pairs, tokenize_pairs
from ..eval import task_metrics
from ..logprobs import sequence_logprobs, shares_prompts
from ..model import frozen_reference
from ..model.minimind import SharedPrompt
from ..tokenizer import Tokenizer
from ..train import distributed
from ..train.loop import Algorithm, TrainConfig, evaluated, train, training_autocast
from ..train.reference import ReferenceSyncConfig, check_reference_sync, sync_reference
from ..train.start import load_start

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo"]


def pair_batch(model: nn.Module, rows, pad_id: int, device: torch.device, share_prompts: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SharedPrompt | None]:
    """(input_ids, attention_mask, completion_mask, shared prompt) of B pairs, chosen rows then rejected rows.
    When the model has the shared-prompt forward, a pair's two rows continue one left-padded prompt that runs
    once (the same log-probs, less work); otherwise the "concatenated forward" layout of `collate_pairs`."""
    if share_prompts and shares_prompts(model):
        shared = collate_shared_prompts(rows, pad_id, device)
        if shared is not None:
            ids, attention, completion, width = shared
            pair = torch.arange(len(rows), device=device)
            return ids, attention, completion, SharedPrompt(width, pair.repeat(2), pair)
    return (*collate_pairs(rows, pad_id, device), None)


@torch.no_grad()
def pair_sequence_logprobs(model: nn.Module, pairs, pad_id: int, batch_size: int = 32
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen lengths, rejected lengths) for TokenizedPairs, batched, no grad."""
    device = next(model.parameters()).device
    out: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, len(pairs), batch_size):
        rows = pairs[i:i + batch_size]
        logps, lengths = sequence_logprobs(model, *pair_batch(model, rows, pad_id, device))
        n = len(rows)
        out.append((logps[:n], logps[n:], lengths[:n], lengths[n:]))
    return tuple(torch.cat(parts) for parts in zip(*out))  # type: ignore[return-value]


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None,
                    ref_rejected_logps: torch.Tensor | None, chosen_lengths: torch.Tensor,
                    rejected_lengths: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5, rpo_alpha: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (chosen, rejected) from summed sequence log-probs (batch,).
    `rpo_alpha` adds α x the chosen response's mean token NLL, -log π(y_w) / |y_w| (RPO, Pang et al., 2024): DPO
    alone can lower the chosen response's likelihood along with the rejected one's; this holds it up."""
    nll = -chosen_logps / chosen_lengths.clamp(min=1)
    losses, r_chosen, r_rejected = _preference_terms(chosen_logps, rejected_logps, ref_chosen_logps,
                                                     ref_rejected_logps, chosen_lengths, rejected_lengths, beta,
                                                     loss_type, label_smoothing, simpo_gamma)
    return (losses + rpo_alpha * nll if rpo_alpha > 0 else losses), r_chosen, r_rejected


def _preference_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None,
                      ref_rejected_logps: torch.Tensor | None, chosen_lengths: torch.Tensor,
                      rejected_lengths: torch.Tensor, beta: float, loss_type: str, label_smoothing: float,
                      simpo_gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if loss_type in ("ipo", "simpo"):
        chosen_logps, rejected_logps = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths
    if loss_type == "simpo":
        losses = -F.logsigmoid(beta * (chosen_logps - rejected_logps) - simpo_gamma)
        return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    if loss_type == "ipo":
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps / chosen_lengths, ref_rejected_logps / rejected_lengths
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def implicit_reward_accuracy(policy: nn.Module, pairs, ref_logps: tuple[torch.Tensor, torch.Tensor] | None,
                             beta: float, pad_id: int, loss_type: str = "sigmoid", simpo_gamma: float = 0.5
                             ) -> dict[str, float]:
    """Held-out share of pairs whose implicit DPO reward β(log π - log π_ref) is higher for the chosen response
    (SimPO: length-normalised log π, no reference), and the mean reward margin."""
    chosen, rejected, c_len, r_len = pair_sequence_logprobs(policy, pairs, pad_id)
    ref_c, ref_r = ref_logps if ref_logps is not None else (None, None)
    _, r_c, r_r = preference_loss(chosen, rejected, ref_c, ref_r, c_len, r_len, beta, loss_type,
                                  simpo_gamma=simpo_gamma)
    return {"pref_accuracy": float((r_c > r_r).float().mean()), "margin": float((r_c - r_r).mean())}


@dataclass
class DPOConfig(ReferenceSyncConfig, TrainConfig):
    model: str = field("", "policy dir to start from (usually the SFT model)")
    ref_model: str = field("", "reference policy dir; empty = the starting policy")
    tokenizer: str = field("", "tokenizer dir; empty = the one saved with `model`")
    data: str = field("", "preference JSONL: {prompt, chosen, rejected}, message lists, or hh-rlhf transcripts")
    eval_data: str = field("", "held-out preference JSONL (preference accuracy of the implicit reward)")
    eval_prompts: str = field("", "held-out {prompt, answer} JSONL (task accuracy by greedy decoding)")
    eval_samples: int = field(200, "held-out examples to evaluate", min=1)
    max_len: int = field(256, "tokens per sequence (prompt cut from the left first)", min=8)
    max_new_tokens: int = field(48, "generation budget for held-out task accuracy", min=1)
    beta: float = field(0.1, "β: strength of the implicit KL constraint (SimPO: reward scale)", min=0)
    loss_type: LossType = field("sigmoid", "sigmoid (DPO) | ipo | hinge | robust | simpo")
    label_smoothing: float = field(0.0, "ε: assumed label-noise rate (sigmoid = cDPO, robust = rDPO)", min=0,
                                   lt=0.5)
    simpo_gamma: float = field(0.5, "γ: SimPO target margin", min=0)
    rpo_alpha: float = field(0.0, "α: add α x the chosen response's mean token NLL to each pair's loss (RPO, Pang "
                                  "et al., 2024; TRL's rpo_alpha takes a token mean over the batch instead)", min=0)
    precompute_ref: bool = field(True, "compute reference log-probs once before training (no reference model held)")
    share_prompts: bool = field(True, "run a pair's prompt once for both responses (native dense models; exact, "
                                      "only faster)")


class DPO(Algorithm):
    def __init__(self, policy, reference, tokenizer: Tokenizer, pairs, eval_pairs, eval_prompts, cfg: DPOConfig):
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg
        self.pairs, self.eval_pairs, self.eval_prompts = pairs, eval_pairs, eval_prompts
        self.modules = {"policy": policy}
        self.num_examples = len(pairs)
        self.batches = StepBatches(len(pairs), cfg.batch_size, cfg.grad_accum, cfg.seed,
                                   distributed.rank(), distributed.world_size())
        self.device = next(policy.parameters()).device
        self.uses_ref = cfg.loss_type != "simpo"
        self.reference = None
        self.ref_logps = self.eval_ref_logps = None
        if self.uses_ref and cfg.precompute_ref:
            # in the loss's precision (the evaluation's log-probs below stay float32, as its policy forward)
            with training_autocast(cfg, self.device.type):
                self.ref_logps = self._visited_pair_logprobs(reference)
            if eval_pairs:
                self.eval_ref_logps = pair_sequence_logprobs(reference, eval_pairs, tokenizer.pad_id)[:2]
        elif self.uses_ref:
            self.reference = reference.eval().requires_grad_(False)
        check_reference_sync(cfg, self.reference, "dpo")

    def _visited_pair_logprobs(self, reference: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's (chosen, rejected) log-probs, indexed by pair, computed for the pairs this process's
        `cfg.steps` steps visit and NaN for the rest (the demo's 40 steps x 16 pairs read 640 of its 4000 pairs)."""
        visited = sorted({i for step in range(self.cfg.steps) for idx in self.batches.indices(step) for i in idx})
        rows = [self.pairs[i] for i in visited]
        chosen, rejected = pair_sequence_logprobs(reference, rows, self.tokenizer.pad_id)[:2]
        full = torch.full((2, len(self.pairs)), float("nan"), dtype=chosen.dtype, device=chosen.device)
        full[:, visited] = torch.stack([chosen, rejected])
        return full[0], full[1]

    def micro_batches(self, step: int):
        return [(torch.as_tensor(idx), pair_batch(self.policy, [self.pairs[i] for i in idx], self.tokenizer.pad_id,
                                                  self.device, self.cfg.share_prompts))
                for idx in self.batches.indices(step)]

    def _reference_logps(self, idx: torch.Tensor, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.uses_ref:
            return None, None
        if self.ref_logps is not None:
            return self.ref_logps[0][idx].to(self.device), self.ref_logps[1][idx].to(self.device)
        with torch.no_grad():
            ref, _ = sequence_logprobs(self.reference, *batch)
        return ref.chunk(2)

    def loss_weight(self, item) -> float:
        return float(len(item[0]))  # the loss is a mean over pairs

    def after_step(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        return sync_reference(self.cfg, self.reference, self.policy, step)

    def state_dict(self) -> dict:
        return {"reference": self.reference.state_dict()} if self.cfg.ref_sync_every else {}

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.ref_sync_every:
            self.reference.load_state_dict(state["reference"])

    def loss(self, item):
        idx, batch = item
        logps, lengths = sequence_logprobs(self.policy, *batch)
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(idx, batch)
        c = self.cfg
        losses, r_chosen, r_rejected = preference_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len,
                                                       rejected_len, c.beta, c.loss_type, c.label_smoothing,
                                                       c.simpo_gamma, c.rpo_alpha)
        return losses.mean(), {
            "rewards/chosen": float(r_chosen.mean()), "rewards/rejected": float(r_rejected.mean()),
            "rewards/accuracy": float((r_chosen > r_rejected).float().mean()),
            "rewards/margin": float((r_chosen - r_rejected).mean()),
            "logps/chosen": float(chosen.detach().mean()), "logps/rejected": float(rejected.detach().mean()),
        }

    def evaluate(self, final: bool = True) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.eval_pairs:
            ref = self.eval_ref_logps
            if ref is None and self.uses_ref:
                ref = pair_sequence_logprobs(self.reference, self.eval_pairs, self.tokenizer.pad_id)[:2]
            metrics.update(implicit_reward_accuracy(self.policy, self.eval_pairs, ref, self.cfg.beta,
                                                    self.tokenizer.pad_id, self.cfg.loss_type, self.cfg.simpo_gamma))
        if self.eval_prompts:
            metrics.update(task_metrics(self.policy, self.tokenizer, evaluated(self.eval_prompts, self.cfg, final),
                                        self.cfg.max_new_tokens, sampled=final))
        return metrics


def run(cfg: DPOConfig) -> dict[str, float]:
    if not cfg.data or not cfg.model:
        raise ValueError("dpo: set `model` (the SFT model dir) and `data` (preference JSONL)")
    tokenizer, policy, device = load_start(cfg)
    if (cfg.precompute_ref and not cfg.ref_model) or cfg.loss_type == "simpo":
        reference = policy  # log-probs taken once before the first update (SimPO needs none)
    else:
        reference = frozen_reference(policy, cfg.ref_model, cfg.model, device)
    pairs = tokenize_pairs(tokenizer, load_pairs(cfg.data), cfg.max_len)
    eval_pairs = tokenize_pairs(tokenizer, load_pairs(cfg.eval_data)[: cfg.eval_samples], cfg.max_len) \
        if cfg.eval_data else []
    eval_prompts = load_prompts(cfg.eval_prompts)[: cfg.eval_samples] if cfg.eval_prompts else []
    algo = DPO(policy, reference, tokenizer, pairs, eval_pairs, eval_prompts, cfg)
    return train(algo, cfg, name="dpo")
