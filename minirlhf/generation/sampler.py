"""The rollout engine: batched sampling with a static KV cache.

Prompts are left-padded so every row's next token sits in the same column; one forward of the whole
prompt fills the cache, then each step feeds one token per row. Per step there is a fixed number of tensor
ops whatever the batch size: no Python loop over sequences. A row that emitted EOS keeps being fed (the
batch stays rectangular) but its later tokens are padding with mask 0.

Returned log-probs are those of the sampled tokens under softmax(logits / temperature), before top-k /
top-p filtering, which is what `completion_logprobs(..., temperature=T)` recomputes for the same ids (from a bf16
sampler, `dtype=torch.bfloat16`, they are its own: close to that recomputation, not equal).

Native dense models decode through `decode.decode_step` (fused q/k/v and gate/up matrices, packed once per call
for oneDNN on CPU, optionally bf16: `dtype`); other models (HF, LoRA-wrapped, MoE) through their own forward, with
their fp32 CPU `nn.Linear`s packed for oneDNN for the length of the call (`packed_cpu_linears`: stock fp32
`F.linear`, MKL sgemm, is 2-3x slower at a few rows on some CPUs) or, for bf16, under autocast. Either way the
weights cannot change mid-call and the originals are untouched; results agree with the model's forward to float32
rounding (a different summation order), not bit for bit. `decode.PACK_CPU_LINEARS = False` turns packing off.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..logprobs import gather_logprobs
from ..model.linear import cpu_autocast_on, onednn_linear
from ..model.minimind import KVCache
from . import decode


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        """Refuse settings that would sample nonsense (a negative temperature flips the distribution)."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Rollout:
    """A batch of prompts and their sampled completions (all tensors on the model's device)."""

    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, N), right-padded with pad_id
    completion_mask: torch.Tensor  # (B, N), 1 on sampled tokens up to and including EOS
    logprobs: torch.Tensor  # (B, N), 0 where completion_mask is 0

    @property
    def input_ids(self) -> torch.Tensor:
        """prompt + completion, (B, P + N): feed this to `completion_logprobs`."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def full_completion_mask(self) -> torch.Tensor:
        """(B, P + N) mask that is 1 on completion tokens only."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1)

    def completions(self) -> list[list[int]]:
        lengths = self.completion_mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu",
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with every row right-aligned, `width` columns (default: the longest row)."""
    width = max(max(len(s) for s in sequences), width or 0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (Holtzman et al., 2019)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, self._packed_weight, self.bias)


def _can_pack(linears: list[nn.Linear]) -> bool:
    return bool(linears) and not cpu_autocast_on() and all(
        decode.can_pack_cpu_linears(m.weight) and not hasattr(m.weight, "device_mesh")  # FSDP: gathered per forward
        and "_packed_weight" not in m.__dict__ for m in linears)


@contextmanager
def packed_cpu_linears(model: nn.Module, batch_size: int) -> Iterator[None]:
    """Inside the block, the fp32 CPU `nn.Linear`s of `model` use oneDNN with weights packed once (inference
    only: the packed copies do not follow later weight updates). A no-op off CPU, for other dtypes, under
    autocast, when already active, or when this torch build lacks the oneDNN ops. (Models that `decode.py`
    serves get fused packed weights instead; this is for the others: HF, LoRA-wrapped, MoE.)"""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not _can_pack(linears):
        yield
        return
    saved = [(m, m.__dict__.get("forward")) for m in linears]
    try:
        for m in linears:
            m._packed_weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size)
            m.forward = _packed_linear_forward.__get__(m)
        yield
    finally:
        for m, forward in saved:
            m.__dict__.pop("_packed_weight", None)
            m.__dict__.pop("forward", None)
            if forward is not None:
                m.forward = forward


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None, rows: tuple[int, int] | None = None
                  ) -> torch.Tensor:
    """One token per row from `probs` (B, V), an exact categorical draw by inverting the CDF: the first token
    whose cumulative probability exceeds u * (total mass), u ~ U[0, 1), one uniform per row (a cumsum and a
    binary search: 20x cheaper than a noise value per vocabulary entry). `rows = (offset, total)`: these B rows
    are rows offset..offset+B-1 of a batch of `total` rows, and the uniforms are drawn for the whole batch and
    sliced, so a row's sample does not depend on how the batch was split over processes."""
    offset, total = rows if rows is not None else (0, probs.shape[0])
    u = torch.rand((total, 1), generator=generator, device=probs.device)[offset:offset + probs.shape[0]]
    cdf = probs.cumsum(-1)
    mass = cdf[:, -1:].contiguous()
    token = torch.searchsorted(cdf, u * mass, right=True)
    # u * mass can round up to the mass itself; the last token that carries probability is the first where the
    # (non-decreasing) cdf reaches the mass: a binary search, where cdf.argmax would read the whole row
    return torch.minimum(token, torch.searchsorted(cdf, mass)).squeeze(1)


def prefill(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache, keys: list[tuple]
            ) -> torch.Tensor:
    """Run the prompts into `cache`; the last position's logits (B, V). Rows with the same prompt (`keys`; a GRPO
    group samples G completions of one prompt) share one prompt forward, whose keys/values are copied into each
    row's slot of the static cache (native models; other caches get the plain batched forward)."""
    first: dict[tuple, int] = {}  # each distinct prompt -> the first row holding it
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    if len(first) == len(keys) or not isinstance(cache, KVCache):
        return model(prompt_ids, attention_mask=prompt_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    slot = {key: u for u, key in enumerate(first)}
    unique = torch.as_tensor(list(first.values()), device=prompt_ids.device)
    rows = torch.as_tensor([slot[key] for key in keys], device=prompt_ids.device)
    shared = model.new_cache(len(unique), prompt_ids.shape[1])
    logits = model(prompt_ids[unique], attention_mask=prompt_mask[unique], cache=shared, logits_to_keep=1).logits
    width = prompt_ids.shape[1]
    for cached, prompt_cached in zip(cache.keys + cache.values, shared.keys + shared.values):
        cached[:, :, :width] = prompt_cached[rows]
    cache.length = width
    return logits[:, -1][rows]


def lower_precision(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to `dtype` (nothing for float32)."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, eos_id: int,
             pad_id: int, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None,
             prompt_width: int | None = None, dtype: torch.dtype = torch.float32) -> Rollout:
    """Sample completions for token-id prompts. Deterministic for a given `generator` seed.

    Data-parallel rollouts pass `rows = (offset, total)` (this process's slice of the global batch) and the
    global `prompt_width`, so every row's tokens equal those of a single process sampling the whole batch.
    `dtype=torch.bfloat16` multiplies by bf16 copies of the weights (the decode step's packed matrices; the prefill
    and models without a fused step run under autocast): about twice the tokens/s where the hardware has bf16,
    from a slightly different distribution than the fp32 trainer's (the returned log-probs are the sampler's own:
    what a truncated importance-sampling correction needs)."""
    if decode.DecodeWeights.supports(model):
        return _generate(model, prompts, sampling, eos_id, pad_id, generator, rows, prompt_width, dtype,
                         decode.DecodeWeights(model, len(prompts), dtype))
    with packed_cpu_linears(model, len(prompts)) if dtype == torch.float32 else nullcontext():  # else: autocast
        return _generate(model, prompts, sampling, eos_id, pad_id, generator, rows, prompt_width, dtype, None)


def _generate(model: nn.Module, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, eos_id: int,
              pad_id: int, generator: torch.Generator | None, rows: tuple[int, int] | None,
              prompt_width: int | None, dtype: torch.dtype, weights: decode.DecodeWeights | None) -> Rollout:
    """The sampling loop; each step feeds the last tokens through `decode.decode_step` given `weights`, else
    through the model's forward."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device, prompt_width)
    batch, prompt_len = prompt_ids.shape
    steps = sampling.max_new_tokens
    cache = model.new_cache(batch, prompt_len + steps)
    mask = torch.cat([prompt_mask, torch.ones(batch, steps, dtype=prompt_mask.dtype, device=device)], 1)
    key_bias = torch.zeros(mask.shape, device=device).masked_fill(mask == 0, float("-inf"))
    positions = prompt_mask.sum(1) - 1
    completion = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((batch, steps), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, steps), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    with lower_precision(device, dtype):
        logits = prefill(model, prompt_ids, prompt_mask, cache, [tuple(p) for p in prompts])
    if weights is not None:
        weights.to_pair_order(cache)
    graphed = None
    if weights is not None and steps > 1 and decode.GraphedDecodeStep.applies(device):
        graphed = decode.GraphedDecodeStep(weights, cache, key_bias, batch)
    for t in range(steps):
        logits = logits.float()
        if sampling.temperature > 0:
            scaled = logits / sampling.temperature if sampling.temperature != 1 else logits
            probs = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(-1)
            token = sample_tokens(probs, generator, rows)
        else:
            scaled = logits
            token = logits.argmax(-1)
        alive = ~finished
        token = torch.where(alive, token, pad_id)
        completion[:, t] = token
        completion_mask[:, t] = alive
        logprobs[:, t] = gather_logprobs(scaled, token) * alive
        finished = finished | (token == eos_id)
        if t + 1 == steps or (t % 8 == 7 and bool(finished.all())):
            break
        positions = positions + 1
        if graphed is not None:
            logits = graphed(token, positions)
        elif weights is not None:
            logits = decode.decode_step(weights, token, positions, cache, key_bias)
        else:
            with lower_precision(device, dtype):
                logits = model(token[:, None], attention_mask=mask[:, : prompt_len + t + 1],
                               position_ids=positions[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
    width = int(completion_mask.sum(1).max().item()) if batch else 0
    return Rollout(prompt_ids, prompt_mask, completion[:, :width], completion_mask[:, :width],
                   logprobs[:, :width])
