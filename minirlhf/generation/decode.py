"""The sampler's decode step for native dense MiniMind models: one token per row through fused, packed weights.

A decode step multiplies a few rows by every weight matrix, so its cost is reading the weights plus the fixed
cost of each op (on CPU each elementwise op also re-reads its operands from memory the weights just streamed
through). `DecodeWeights` lays the weights out for that once per `generate` call, so that a layer is few ops:
- q/k/v are one matrix and gate/up another (2 products per layer instead of 5 for those, the same math:
  [q; k; v] x = (q x, k x, v x));
- each RMSNorm's weight is folded into the matrix it feeds, W (w * x̂) = (W diag w) x̂, so a norm is only the
  normalisation x̂ = x / sqrt(mean(x²) + eps);
- RoPE is one complex multiplication: the rows of q and k are reordered so that the two halves a rotation pairs
  (dimensions j and j + d/2 in the rotate-half convention) sit side by side, (x_j + i x_{j+d/2}) e^{iθ_j} is the
  rotate-half formula, and q·k is unchanged since q and k share the order (the cache holds keys in that order:
  `to_pair_order` reorders what the prefill wrote); 6 ops a layer become 1 (with the change above and the next,
  `generate` on a 2-core Intel Xeon: +9-19% tokens/s in bf16 at 16-64 rows, +2% in fp32 at 16);
- in bf16 a product's output stays bf16 where the next op takes it so (SwiGLU and the down projection; the
  residual adds promote), instead of a cast to float32 and back;
- on CPU each matrix is packed once for oneDNN (`torch.ops.mkldnn`), 2-3x faster than stock fp32 `F.linear`
  (MKL sgemm) per matrix at 16 rows on the AMD EPYC we measure on (on a 2-core Intel Xeon with all of an 18M
  model's matrices streamed from memory: 1.4x at 16 rows, 1.1x at 64; bf16 1.3x and 1.8x); elsewhere a plain
  `F.linear`;
- attention of one query against the cache is two batched products and a softmax, with the left padding as an
  additive -inf bias per row (cheaper than `scaled_dot_product_attention`'s general kernel at one query).
The step equals `MiniMindLM.forward` with the same cache to float32 rounding (a different summation order), which
tests/test_sampler.py checks. The packed copies do not follow weight updates: build them per call, as `generate`
does. The checkpoint format and the model's own modules are untouched (the HF export keeps q/k/v apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..model.linear import cpuinfo, has_onednn_linear, onednn_linear
from ..model.minimind import KVCache, MiniMindLM, normalised

PACK_CPU_LINEARS = True  # False: plain F.linear on CPU too (the benchmark's `ours_plain` setting)


def can_pack_cpu_linears(weight: torch.Tensor) -> bool:
    """oneDNN packing applies: an fp32 or bf16 CPU weight, `has_onednn_linear()` (x86-64, a build with the ops),
    and the switch on."""
    return (PACK_CPU_LINEARS and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and has_onednn_linear())


@cache
def has_native_bf16(device_type: str) -> bool:
    """Whether the device multiplies bf16 in hardware: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX (read
    from /proc/cpuinfo; elsewhere assumed not, since emulated bf16 is slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    flags = cpuinfo("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_chosen(choice: str, device_type: str) -> bool:
    """A precision option (auto | fp32 | bf16) resolved: bf16, or auto on a device with native bf16."""
    return choice == "bf16" or (choice == "auto" and has_native_bf16(device_type))


class FrozenLinear:
    """y = x W^T for inference, W stored in `dtype` (x is rounded to it; y comes back in `dtype`), packed once for
    oneDNN on CPU (or kept for `F.linear`)."""

    def __init__(self, weight: torch.Tensor, batch_size: int, dtype: torch.dtype) -> None:
        weight = weight.detach().to(dtype)
        self.dtype = dtype
        self.packed = can_pack_cpu_linears(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return onednn_linear(x, self.weight) if self.packed else F.linear(x, self.weight)


@dataclass
class DecodeLayer:
    attn_eps: float  # the RMSNorms' eps (their weights are folded into qkv and gate_up)
    qkv: FrozenLinear  # rows: q and k in pair order, then v
    o: FrozenLinear
    mlp_eps: float
    gate_up: FrozenLinear
    down: FrozenLinear


def pair_order(head_dim: int) -> torch.Tensor:
    """The order of a head's dimensions that puts j and j + d/2 side by side: (0, d/2, 1, d/2 + 1, ...)."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], 1).reshape(-1)


class DecodeWeights:
    """A native dense `MiniMindLM`'s weights laid out for `decode_step` (see the module docstring); the matrices in
    `dtype` (bfloat16 halves the bytes every step reads); the residual stream, norms, RoPE, attention and the KV
    cache stay float32 (bf16 batched products of one query are slower on CPU, not faster); in bf16 only SwiGLU,
    between two bf16 products, runs in bf16."""

    def __init__(self, model: MiniMindLM, batch_size: int, dtype: torch.dtype = torch.float32) -> None:
        config = model.config
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.intermediate = config.intermediate_size
        self.embed = model.embed_tokens.weight.detach()
        half = self.head_dim // 2  # the tables repeat: cos[:, j] = cos[:, j + d/2]
        self.rotation = torch.complex(model.rope_cos[:, :half], model.rope_sin[:, :half])  # e^{iθ} per position
        self.key_order = pair_order(self.head_dim)
        rotated_rows = (self.num_heads + self.num_kv_heads) * self.head_dim
        # rows of the fused q/k/v matrix: each q and k head's rows in pair order, then v's as they are
        rows = torch.cat([(torch.arange(rotated_rows) // self.head_dim) * self.head_dim
                          + self.key_order.repeat(self.num_heads + self.num_kv_heads),
                          torch.arange(rotated_rows, rotated_rows + self.num_kv_heads * self.head_dim)])
        self.layers = []
        with torch.no_grad():
            for layer in model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                attn_norm, mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
                qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])[rows]
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                self.layers.append(DecodeLayer(
                    attn_eps=attn_norm.eps,
                    qkv=FrozenLinear(qkv * attn_norm.weight, batch_size, dtype),
                    o=FrozenLinear(attn.o_proj.weight, batch_size, dtype),
                    mlp_eps=mlp_norm.eps,
                    gate_up=FrozenLinear(gate_up * mlp_norm.weight, batch_size, dtype),
                    down=FrozenLinear(mlp.down_proj.weight, batch_size, dtype)))
            self.norm_eps = model.norm.eps
            self.lm_head = FrozenLinear(model.lm_head.weight * model.norm.weight, batch_size, dtype)

    def to_pair_order(self, cache: KVCache) -> None:
        """Reorder the keys the model's own forward (the prefill) wrote to the cache into the decode step's pair
        order, in place."""
        for keys in cache.keys:
            written = keys[:, :, :cache.length]
            written.copy_(written[..., self.key_order])

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """A plain native dense model in float32 (HF, LoRA-wrapped, MoE and FSDP-sharded models decode through
        their own forward)."""
        if type(model) is not MiniMindLM or model.config.use_moe:
            return False
        weight = model.lm_head.weight
        return weight.dtype == torch.float32 and not hasattr(weight, "device_mesh")


@torch.no_grad()
def decode_step(weights: DecodeWeights, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                key_bias: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one token per row (B,) at `positions` (B,) after the cache's `length` positions; next-token logits
    (B, V). `key_bias` (B, >= length + 1) is 0 on keys a row may attend to and -inf on its left padding.

    With `slot` (a 1-element tensor holding the cache position to write, = cache.length) every shape is fixed:
    the keys/values go in with `index_copy_` and attention covers the whole cache, the slots after `slot` masked;
    more work per step, but a step that a CUDA graph can capture once and replay (`GraphedDecodeStep`).
    The cache's keys are in pair order (`DecodeWeights.to_pair_order` after the prefill)."""
    w = weights
    b, h, kv, d = token.shape[0], w.num_heads, w.num_kv_heads, w.head_dim
    start = cache.length
    if slot is None:
        width = start + 1
        keys_bias = key_bias[:, :width]
    else:
        width = cache.max_len
        unwritten = torch.arange(width, device=slot.device) > slot
        keys_bias = key_bias[:, :width].masked_fill(unwritten, float("-inf"))
    # (B * kv, 1, L): each row's bias once per key/value head, added to the scores inside the product (baddbmm:
    # C = bias + d^-1/2 q kᵀ, one op instead of three; 190 vs 224 us a layer at 64 rows, the same numbers)
    keys_bias = keys_bias[:, None].expand(b, kv, width).reshape(b * kv, 1, width)
    rotation = w.rotation[positions][:, None]  # (B, 1, d/2)
    x = w.embed[token]
    for i, layer in enumerate(w.layers):
        qkv = layer.qkv(normalised(x, layer.attn_eps)).float()
        qk = qkv[:, :(h + kv) * d].view(b, h + kv, d // 2, 2)  # q and k in pair order: complex numbers
        qk = torch.view_as_real(torch.view_as_complex(qk) * rotation).view(b, h + kv, d)
        new_k, new_v = qk[:, h:], qkv[:, (h + kv) * d:].view(b, kv, d)
        if slot is None:
            cache.keys[i][:, :, start] = new_k
            cache.values[i][:, :, start] = new_v
        else:
            cache.keys[i].index_copy_(2, slot, new_k[:, :, None])
            cache.values[i].index_copy_(2, slot, new_v[:, :, None])
        q = qk[:, :h].reshape(b * kv, h // kv, d)  # query heads grouped by the key/value head they share
        keys = cache.keys[i][:, :, :width].reshape(b * kv, width, d)  # views: (B, kv) merge in the cache
        scores = torch.baddbmm(keys_bias, q, keys.transpose(1, 2), alpha=d ** -0.5)
        out = torch.bmm(scores.softmax(-1), cache.values[i][:, :, :width].reshape(b * kv, width, d))
        x = x + layer.o(out.reshape(b, h * d))  # a bf16 product's output: the add promotes it to float32
        gate, up = layer.gate_up(normalised(x, layer.mlp_eps)).split(w.intermediate, -1)
        x = x + layer.down(F.silu(gate) * up)  # in bf16, SwiGLU's product feeds `down` without a cast
    cache.length = start + 1
    return w.lm_head(normalised(x, w.norm_eps)).float()


USE_CUDA_GRAPHS = True  # False: decode eagerly on CUDA too


class GraphedDecodeStep:
    """On CUDA, `decode_step` (fixed-shape form) captured once per `generate` call as a CUDA graph and replayed
    for every token: at a few rows a step is ~10 small kernels per layer whose launches, not the GPU, set the pace.
    Inputs are copied into the graph's static tensors before each replay; the returned logits are the graph's
    output buffer, overwritten by the next replay. Same results as the eager step (tests/test_sampler.py checks
    the fixed-shape form on CPU; the graph was checked on an H200)."""

    def __init__(self, weights: DecodeWeights, cache: KVCache, key_bias: torch.Tensor, batch: int) -> None:
        device = key_bias.device
        self.cache = cache
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=device)

        def step() -> torch.Tensor:
            length = cache.length
            logits = decode_step(weights, self.token, self.positions, cache, key_bias, self.slot)
            cache.length = length  # the sampler advances it
            return logits

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (writes the slot the first real step overwrites)
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    @staticmethod
    def applies(device: torch.device) -> bool:
        return USE_CUDA_GRAPHS and device.type == "cuda"

    def __call__(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.positions.copy_(positions)
        self.slot.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.logits
