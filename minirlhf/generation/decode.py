"""The sampler's decode step for native dense MiniMind models: one token per row through fused, packed weights.

A decode step multiplies a few rows by every weight matrix, so its cost is reading the weights plus the fixed
cost of each op. `DecodeWeights` lays the weights out for that once per `generate` call:
- q/k/v are one matrix and gate/up another (2 products per layer instead of 5 for those, the same math:
  [q; k; v] x = (q x, k x, v x)); RoPE rotates q and k in one op since they sit side by side;
- on CPU each matrix is packed once for oneDNN (`torch.ops.mkldnn`), 2-3x faster than stock fp32 `F.linear`
  (MKL sgemm) per matrix at 16 rows on the AMD EPYC we measure on; elsewhere a plain `F.linear`;
- attention of one query against the cache is two batched products and a softmax, with the left padding as an
  additive -inf bias per row (cheaper than `scaled_dot_product_attention`'s general kernel at one query).
The step equals `MiniMindLM.forward` with the same cache to float32 rounding (a different summation order), which
tests/test_sampler.py checks. The packed copies do not follow weight updates: build them per call, as `generate`
does. The checkpoint format and the model's own modules are untouched (the HF export keeps q/k/v apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model.minimind import KVCache, MiniMindLM, _rotate_half

PACK_CPU_LINEARS = True  # False: plain F.linear on CPU too (the benchmark's `ours_plain` setting)


def can_pack_cpu_linears(weight: torch.Tensor) -> bool:
    """oneDNN packing applies: an fp32 or bf16 CPU weight, a torch build with the ops, and the switch on."""
    return (PACK_CPU_LINEARS and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@cache
def has_native_bf16(device_type: str) -> bool:
    """Whether the device multiplies bf16 in hardware: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX (read
    from /proc/cpuinfo; elsewhere assumed not, since emulated bf16 is slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class FrozenLinear:
    """y = x W^T for inference, W stored in `dtype` (x is rounded to it; y comes back in float32), packed once for
    oneDNN on CPU (or kept for `F.linear`)."""

    def __init__(self, weight: torch.Tensor, batch_size: int, dtype: torch.dtype) -> None:
        weight = weight.detach().to(dtype)
        self.dtype = dtype
        self.packed = can_pack_cpu_linears(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [None], "")
        else:
            y = F.linear(x, self.weight)
        return y.float()


@dataclass
class DecodeLayer:
    attn_norm: torch.Tensor
    qkv: FrozenLinear
    o: FrozenLinear
    mlp_norm: torch.Tensor
    gate_up: FrozenLinear
    down: FrozenLinear


class DecodeWeights:
    """A native dense `MiniMindLM`'s weights laid out for `decode_step` (see the module docstring); the matrices in
    `dtype` (bfloat16 halves the bytes every step reads); the residual stream, norms, RoPE, attention and the KV
    cache stay float32 (bf16 batched products of one query are slower on CPU, not faster)."""

    def __init__(self, model: MiniMindLM, batch_size: int, dtype: torch.dtype = torch.float32) -> None:
        config = model.config
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.eps = config.rms_norm_eps
        self.intermediate = config.intermediate_size
        self.embed = model.embed_tokens.weight.detach()
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.layers.append(DecodeLayer(
                attn_norm=layer.input_layernorm.weight.detach(),
                qkv=FrozenLinear(qkv, batch_size, dtype),
                o=FrozenLinear(attn.o_proj.weight, batch_size, dtype),
                mlp_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=FrozenLinear(gate_up, batch_size, dtype),
                down=FrozenLinear(mlp.down_proj.weight, batch_size, dtype)))
        self.norm = model.norm.weight.detach()
        self.lm_head = FrozenLinear(model.lm_head.weight, batch_size, dtype)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """A plain native dense model in float32 (HF, LoRA-wrapped, MoE and FSDP-sharded models decode through
        their own forward)."""
        if type(model) is not MiniMindLM or model.config.use_moe:
            return False
        weight = model.lm_head.weight
        return weight.dtype == torch.float32 and not hasattr(weight, "device_mesh")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@torch.no_grad()
def decode_step(weights: DecodeWeights, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                key_bias: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,) at `positions` (B,) after the cache's `length` positions; next-token logits
    (B, V). `key_bias` (B, >= length + 1) is 0 on keys a row may attend to and -inf on its left padding."""
    w = weights
    b, h, kv, d = token.shape[0], w.num_heads, w.num_kv_heads, w.head_dim
    start = cache.length
    keys_bias = key_bias[:, None, None, :start + 1]  # (B, 1, 1, L) against scores (B, kv, h / kv, L)
    cos, sin = w.rope_cos[positions][:, None], w.rope_sin[positions][:, None]
    x = w.embed[token]
    for i, layer in enumerate(w.layers):
        qkv = layer.qkv(w.rms_norm(x, layer.attn_norm))
        qk = qkv[:, :(h + kv) * d].view(b, h + kv, d)
        qk = qk * cos + _rotate_half(qk) * sin
        cache.keys[i][:, :, start] = qk[:, h:]
        cache.values[i][:, :, start] = qkv[:, (h + kv) * d:].view(b, kv, d)
        q = qk[:, :h].reshape(b, kv, h // kv, d)  # query heads grouped by the key/value head they share
        scores = torch.matmul(q, cache.keys[i][:, :, :start + 1].transpose(-1, -2)) * d ** -0.5 + keys_bias
        out = torch.matmul(scores.softmax(-1), cache.values[i][:, :, :start + 1])
        x = x + layer.o(out.reshape(b, h * d))
        gate, up = layer.gate_up(w.rms_norm(x, layer.mlp_norm)).split(w.intermediate, -1)
        x = x + layer.down(F.silu(gate) * up)
    cache.length = start + 1
    return w.lm_head(w.rms_norm(x, w.norm))
