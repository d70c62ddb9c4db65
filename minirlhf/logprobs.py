"""The one log-prob helper every algorithm uses.

Convention: `logits[:, :-1]` predicts `input_ids[:, 1:]`. Log-probs are gathered in float32 (a bf16
log-softmax loses the precision that ratios and KL terms need). Everything returned is aligned with
`input_ids[:, 1:]`, and the mask is `completion_mask[:, 1:]`: 1 on response tokens (including the EOS
that ends a response), 0 on prompt and padding, so those never count.
"""

from __future__ import annotations

import torch
from torch import nn

from .model.minimind import MiniMindLM, SharedPrompt


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[targets], in float32. logits (..., V), targets (...) -> (...).
    T <= 0 (greedy decoding) reports log-probs under T = 1, as the sampler does."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def shares_prompts(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a DDP wrapper) has the shared-prompt forward (native dense models)."""
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return isinstance(core, MiniMindLM) and not core.config.use_moe


def completion_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float = 1.0,
                        return_entropy: bool = False, entropy_grad: bool = False,
                        shared_prompt: SharedPrompt | None = None):
    """Per-token log-probs of the completion tokens of prompt+completion sequences.

    Returns (logps, mask[, entropy]), each (batch, T-1): logps[i, t] = log pi(ids[i, t+1] | ids[i, :t+1]),
    zeroed where mask = completion_mask[:, 1:] is 0. Padding may sit on either side. The entropy of each
    position's distribution is a detached metric unless `entropy_grad` (an entropy bonus trains on it).
    `shared_prompt` (rows continuing P shared prompt columns, when `shares_prompts(model)`): the same values,
    computed with each prompt run once and logits only where completions are predicted (the P - 1 columns
    before are prompt positions: 0).
    """
    mask = completion_mask[:, 1:].to(torch.float32)
    if shared_prompt is not None and shares_prompts(model):
        skip = shared_prompt.width - 1  # positions that predict prompt tokens
        logits = model(input_ids, attention_mask=attention_mask, shared_prompt=shared_prompt).logits
        targets, own_mask = input_ids[:, skip + 1:], mask[:, skip:]
    else:
        skip = 0
        logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets, own_mask = input_ids[:, 1:], mask
    logps = gather_logprobs(logits, targets, temperature) * own_mask
    entropy = None
    if return_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            log_p = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1) * own_mask
    if skip:
        logps, entropy = (None if x is None else torch.nn.functional.pad(x, (skip, 0)) for x in (logps, entropy))
    return (logps, mask) if not return_entropy else (logps, mask, entropy)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where mask is 1 (over all elements, or along `dim`); 0 where nothing is masked in."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor, shared_prompt: SharedPrompt | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, number of completion tokens), each (batch,)."""
    logps, mask = completion_logprobs(model, input_ids, attention_mask, completion_mask, shared_prompt=shared_prompt)
    return logps.sum(-1), mask.sum(-1)
