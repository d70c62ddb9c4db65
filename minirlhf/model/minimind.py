"""The native MiniMind decoder, with a static KV cache for batched generation.

Parameter names match Hugging Face's Llama (`layers.0.self_attn.q_proj`, ...) so exporting is a rename.
RoPE uses the rotate-half convention (also Llama's). Attention masks are boolean (batch, 1, query, key):
causal, minus padded keys, plus the diagonal so a padded query row is never empty (no NaNs under left
padding). Position ids default to `cumsum(attention_mask) - 1`, which keeps positions right for left-
and right-padded batches alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import one_line
from .config import ModelConfig
from .linear import OneDNNLinear, in_float32, product_dtype

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The norm, written in `dtype` (default: x's). The decoder layers ask for the dtype of the products the
        norm feeds (bf16 under autocast), so the cast those would make is folded into the norm's last pass."""
        return _RMSNormFunction.apply(x, self.weight, self.eps, dtype or x.dtype)


def inverse_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """r = 1 / sqrt(mean(x²) + eps) over the last dimension of a float32 x, (..., 1); one pass over x
    (`vector_norm`, 3x faster than `x.pow(2).mean(-1)` on CPU at (4432, 512), no x² tensor)."""
    return torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x32.shape[-1]).add_(eps).rsqrt_()


def normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight: x / sqrt(mean(x²) + eps), computed in float32, returned in x's dtype (the
    sampler's decode step folds the weight into the matrix the norm feeds)."""
    x32 = x.float()
    return (x32 * inverse_rms(x32, eps)).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """y = w ⊙ x̂ with x̂ = r x, r = 1 / sqrt(mean(x²) + eps), all in float32, y written in `dtype`. The backward
    is written out, dw = Σ_rows dy ⊙ x̂ and dx = r (dy ⊙ w - x̂ mean(dy ⊙ w ⊙ x̂)): 7 passes over the activations
    where autograd's record of the same ops makes about 12, and the row means as one matrix-vector product.
    Forward + backward at (4432, 512), bf16 output, 2 CPU threads: 12-14 ms against 22-26 ms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        x32 = x.float()
        r = inverse_rms(x32, eps)
        x_hat = x32 * r
        ctx.save_for_backward(x_hat, r, weight)
        ctx.x_dtype = x.dtype
        return torch.mul(x_hat, weight, out=torch.empty(x_hat.shape, dtype=dtype, device=x.device))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_hat, r, weight = ctx.saved_tensors
        dy, w32 = dy.float(), weight.float()
        dy_x_hat = dy * x_hat
        dw = dy_x_hat.reshape(-1, x_hat.shape[-1]).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        minus_mean = (dy_x_hat @ w32).unsqueeze(-1).div_(-x_hat.shape[-1])  # -mean(dy ⊙ w ⊙ x̂)
        dx = (dy * w32).addcmul_(x_hat, minus_mean).mul_(r)
        return dx.to(ctx.x_dtype), dw, None, None


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) for rotary embeddings (Su et al., 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys/values for every layer: (batch, kv_heads, max_len, head_dim) each.

    All rows advance together, so one integer `length` says how many positions are filled.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.length = 0


@dataclass
class SharedPrompt:
    """Rows that continue shared prompts: row i of a (B, P + C) batch is prompt `rows[i]` (P left-padded columns,
    the same for every row of that prompt) followed by C tokens of its own; `first[u]` is a row holding prompt u.
    A forward given this runs each prompt's P positions once, lets every row attend to its prompt's keys and
    values, and sends every row's gradient back into that one computation: the same outputs and gradients as
    the plain batched forward, with the prompt's work done once per group instead of once per row."""

    width: int          # P
    rows: torch.Tensor  # (B,) index into the prompts
    first: torch.Tensor  # (U,) a row of each prompt

    @classmethod
    def of(cls, prompt_index: torch.Tensor, width: int) -> SharedPrompt:
        """From each row's prompt id (rows of one prompt must hold the same prompt tokens)."""
        unique, rows = torch.unique(prompt_index, return_inverse=True)
        order = torch.arange(len(rows), device=rows.device)
        first = torch.full((len(unique),), len(rows), device=rows.device).scatter_reduce(0, rows, order, "amin")
        return cls(width, rows, first)


@dataclass
class PackedLayout:
    """Where the real tokens of a shared-prompt batch sit: `real` indexes them in the flat padded layout (the U
    prompts' P columns, then the B rows' C own columns); their RoPE tables (n, 1, head_dim); the additive attention
    biases of the padded prompt and continuation layouts (`attention_bias`); the prompt of each row."""

    split: tuple[int, int, int, int]  # U, P, B, C
    real: torch.Tensor
    rows: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    prompt_bias: torch.Tensor
    own_bias: torch.Tensor


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = OneDNNLinear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = OneDNNLinear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = OneDNNLinear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = OneDNNLinear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                layer_cache: tuple[torch.Tensor, torch.Tensor, int] | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if layer_cache is not None:
            cache_k, cache_v, start = layer_cache
            cache_k[:, :, start:start + t] = k
            cache_v[:, :, start:start + t] = v
            k, v = cache_k[:, :, :start + t], cache_v[:, :, :start + t]
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":  # see `masked_attention`: SDPA's bf16 CPU kernel
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
            out = masked_attention(q, k, v, attention_bias(causal if mask is None else mask))
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_shared(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Attention for `MiniMindLM.forward_shared_prompt`: x holds only the real tokens (n, hidden), prompts
        first. Projections and RoPE run on those; for attention they are scattered into the padded prompt
        (U, P) and continuation (B, C) layouts, where each row's queries see its prompt's keys (gathered by
        `rows`, so the gradient sums over the rows) and then its own; the outputs are gathered back."""
        u, p, b, c = layout.split
        n = x.shape[0]

        def rotated(y: torch.Tensor, heads: int) -> torch.Tensor:
            y = y.view(n, heads, self.head_dim)
            return (y * layout.cos.to(y.dtype) + _rotate_half(y) * layout.sin.to(y.dtype)).view(n, -1)

        def padded(y: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
            # zeros on padding (masked keys must be finite: 0 x NaN would reach the outputs); written in place,
            # which saves the copy of the zeros that the out-of-place `index_copy` makes
            full = y.new_zeros(u * p + b * c, y.shape[1]).index_copy_(0, layout.real, y)
            y_p, y_c = full.split((u * p, b * c))
            return (y_p.view(u, p, heads, self.head_dim).transpose(1, 2),
                    y_c.view(b, c, heads, self.head_dim).transpose(1, 2))

        q_p, q_c = padded(rotated(self.q_proj(x), self.num_heads), self.num_heads)
        k_p, k_c = padded(rotated(self.k_proj(x), self.num_kv_heads), self.num_kv_heads)
        v_p, v_c = padded(self.v_proj(x), self.num_kv_heads)
        # index_select, not k_p[rows]: same values, but its backward is an index_add, where advanced indexing's
        # accumulating index_put is ~10x slower on CPU (as for `out` below)
        out_p = masked_attention(q_p, k_p, v_p, layout.prompt_bias)
        out_c = masked_attention(q_c, torch.cat([k_p.index_select(0, layout.rows), k_c], 2),
                                 torch.cat([v_p.index_select(0, layout.rows), v_c], 2), layout.own_bias)
        out = torch.cat([out_p.transpose(1, 2).reshape(u * p, -1), out_c.transpose(1, 2).reshape(b * c, -1)])
        return self.o_proj(out.index_select(0, layout.real))


# Up to this many attention scores (batch x heads x queries x keys) `masked_attention` multiplies them out: at
# the short, masked sequences of RL batches that is faster on CPU than the fused SDPA kernel (1.7 vs 3.0 ms
# forward + backward for 8 rows x 8 heads x 72 x 72; 27 vs 29 ms for 64 x 8 x 64 x 136), and the scores kept for
# backward stay below 32 MB a layer. Longer sequences take the fused kernel, which never materialises them.
# In bf16 on CPU (autocast training) this path is also what `Attention.forward` takes: the fused kernel's bf16
# backward there is 3-4x slower than its float32 one (forward + backward of the tiny demo model's pretraining
# attention, 16 x 6 heads x 128 x 128: 77 ms bf16 against 21 float32 and 19 for the bf16 product here), so longer
# bf16 sequences run the fused kernel in float32 (24 ms).
MATERIALISED_SCORES_MAX = 1 << 23


def attention_bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as the float32 bias added to the scores: 0 or -inf."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) + bias) v: q (B, H, Q, d); k, v (B, KV, K, d) with H a multiple of KV (query head i
    reads key/value head i // (H / KV), as SDPA's `enable_gqa`); bias (B, 1, Q, K) from `attention_bias`, 0 where
    a query may attend and -inf where not, at least one 0 per query. Equal to
    `F.scaled_dot_product_attention(q, k, v, attn_mask=mask)` for the boolean mask the bias came from."""
    b, h, q_len, d = q.shape
    kv, k_len = k.shape[1], k.shape[2]
    if b * h * q_len * k_len > MATERIALISED_SCORES_MAX:
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":  # the float32 kernel, with the float32 bias
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, enable_gqa=kv != h)
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), enable_gqa=kv != h)
    bias = bias.to(q.dtype)  # bf16 under autocast (q comes from a bf16 product): a bf16 add and softmax
    group = h // kv  # the query heads that share a key/value head ride in one product as extra query rows
    scores = torch.matmul(q.reshape(b, kv, group * q_len, d), k.transpose(-1, -2)).view(b, kv, group, q_len, k_len)
    # the mask as an added bias: masked_fill with a mask broadcast over the heads took 13x as long on CPU (2.7 vs
    # 0.2 ms at 64 rows x 8 heads x 64 queries x 104 keys); in float32 the same numbers (x + 0 = x, x - inf = -inf)
    scores = scores * d ** -0.5 + bias.unsqueeze(2)
    # softmax in the scores' dtype: in bf16 it still sums in float32 and rounds each probability once, as SDPA's
    # kernels feed bf16 probabilities to the product with v; a float32 copy of the scores (kept for backward) made
    # this function 10-40% slower in bf16 training (fwd + bwd at 64 rows x 8 heads x 64 queries x 104 keys)
    probs = scores.softmax(-1).view(b, kv, group * q_len, k_len)
    return torch.matmul(probs, v).view(b, h, q_len, d)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer, 2020)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = OneDNNLinear(hidden, intermediate, bias=False)
        self.up_proj = OneDNNLinear(hidden, intermediate, bias=False)
        self.down_proj = OneDNNLinear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts with the Switch load-balancing loss E * sum_e f_e * P_e
    (Fedus et al., 2021): f_e = share of routed slots given to expert e, P_e = its mean router probability."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        probs = self.router(flat).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):  # a loop over experts, never over tokens
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        n_experts = len(self.experts)
        share = F.one_hot(chosen, n_experts).float().sum((0, 1)) / chosen.numel()
        aux = n_experts * (share * probs.mean(0)).sum()
        return out.view_as(x), aux


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(
            config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, layer_cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = product_dtype(x)  # the norms write what the products they feed compute in
        x = x + self.self_attn(self.input_layernorm(x, dtype), cos, sin, mask, layer_cache)
        mlp_out = self.mlp(self.post_attention_layernorm(x, dtype))
        if isinstance(mlp_out, tuple):
            return x + mlp_out[0], mlp_out[1]
        return x + mlp_out, None

    def forward_shared(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """The layer on the packed real tokens of prompts + continuations (dense FFN only)."""
        dtype = product_dtype(x)
        x = x + self.self_attn.forward_shared(self.input_layernorm(x, dtype), layout)
        return x + self.mlp(self.post_attention_layernorm(x, dtype))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor | None = None  # final-norm hidden states, when asked for
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (already weighted), else None


def default_position_ids(attention_mask: torch.Tensor | None, past: int, batch: int, length: int,
                         device: torch.device) -> torch.Tensor:
    """Positions of the `length` new tokens after `past` cached ones: cumsum(mask) - 1, so left padding
    does not shift them; plain past..past+length-1 without a mask."""
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + length]
    return torch.arange(past, past + length, device=device).expand(batch, length)


def attention_mask_4d(attention_mask: torch.Tensor | None, query_len: int, past_len: int,
                      device: torch.device) -> torch.Tensor | None:
    """Boolean (batch, 1, query, key) mask: causal & key not padded, | the diagonal. None when plain causal."""
    if attention_mask is None and past_len == 0:
        return None
    key_len = past_len + query_len
    q_pos = torch.arange(past_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None]
    if attention_mask is not None:
        mask = (mask & attention_mask[:, None, :key_len].bool()) | (k_pos == q_pos)[None]
    return mask[:, None]


class MiniMindLM(nn.Module):
    """Decoder-only LM. `forward` returns logits for the last `logits_to_keep` positions (0 = all)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = OneDNNLinear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_to_keep: int = 0, return_hidden: bool = False, return_logits: bool = True,
                shared_prompt: SharedPrompt | None = None) -> ModelOutput:
        """attention_mask covers cache + new tokens (batch, past + T), 1 = real token. With `shared_prompt`
        (training on groups of completions, no cache) see `forward_shared_prompt`."""
        if shared_prompt is not None:
            return self.forward_shared_prompt(input_ids, attention_mask, shared_prompt)
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + t} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, b, t, input_ids.device)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        mask = attention_mask_4d(attention_mask, t, past, input_ids.device)
        x = self.embed_tokens(input_ids)
        aux_total = None
        for i, layer in enumerate(self.layers):
            layer_cache = (cache.keys[i], cache.values[i], past) if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, aux = checkpoint(layer, x, cos, sin, mask, layer_cache, use_reentrant=False)
            else:
                x, aux = layer(x, cos, sin, mask, layer_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.length = past + t
        hidden = self.norm(x)
        logits = None
        if return_logits:
            logits = in_float32(self.lm_head, hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if aux_total is not None:
            aux_total = self.config.aux_loss_coef * aux_total / len(self.layers)
        return ModelOutput(logits=logits, hidden=hidden if return_hidden else None, aux_loss=aux_total)

    def forward_shared_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                              shared: SharedPrompt) -> ModelOutput:
        """Logits (B, C, V) where logits[:, j] predicts input_ids[:, P + j], for rows that continue shared
        prompts (`SharedPrompt`): equal to the plain forward's logits[:, P - 1:-1], computed with each prompt's
        positions run once, no work on padding (linears and norms see only real tokens, packed) and no LM head
        on prompt positions. Dense models only (MoE's balancing loss would count a shared prompt once)."""
        if self.config.use_moe:
            raise ValueError("shared-prompt forward: MoE models are not supported (their balancing loss differs)")
        b, t = input_ids.shape
        p, u, c = shared.width, len(shared.first), t - shared.width
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = default_position_ids(attention_mask, 0, b, t, input_ids.device)

        def flat(x: torch.Tensor) -> torch.Tensor:  # the prompts' columns once, then every row's own columns
            return torch.cat([x[shared.first, :p].reshape(-1), x[:, p:].reshape(-1)])

        real = flat(attention_mask).nonzero().squeeze(1)
        real_positions = flat(positions)[real]
        layout = PackedLayout(
            split=(u, p, b, c), real=real, rows=shared.rows,
            cos=self.rope_cos[real_positions].unsqueeze(1), sin=self.rope_sin[real_positions].unsqueeze(1),
            prompt_bias=attention_bias(attention_mask_4d(attention_mask[shared.first, :p], p, 0, input_ids.device)),
            own_bias=attention_bias(attention_mask_4d(attention_mask, c, p, input_ids.device)))
        x = self.embed_tokens(flat(input_ids)[real])
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer.forward_shared, x, layout, use_reentrant=False)
            else:
                x = layer.forward_shared(x, layout)
        hidden = self.norm(x)
        full = hidden.new_zeros(u * p + b * c, hidden.shape[1]).index_copy_(0, real, hidden)  # padding: 0
        prompt_last = full[:u * p].view(u, p, -1)[:, -1]  # (a real token: prompts are left-padded)
        own = full[u * p:].view(b, c, -1)[:, :-1]  # the last position predicts nothing here
        prompt_last = prompt_last.index_select(0, shared.rows).unsqueeze(1)  # each row's copy
        return ModelOutput(logits=in_float32(self.lm_head, torch.cat([prompt_last, own], 1)))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward instead of storing them (saves memory, costs time)."""
        self.gradient_checkpointing = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors (tied weights stored once)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE)
        save_model(self, str(directory / WEIGHTS_FILE))

    def load_weights(self, directory: str | Path) -> None:
        """Load weights written by `save_pretrained` into this model, in place."""
        path = Path(directory) / WEIGHTS_FILE
        try:
            load_model(self, str(path), device=str(next(self.parameters()).device))
        except Exception as e:  # safetensors raises several types for truncated or foreign files
            raise ValueError(f"{path}: cannot load weights ({one_line(e, 300)})") from e

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> MiniMindLM:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{directory}: not a minirlhf model dir (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = ModelConfig.load(directory / CONFIG_FILE)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{directory / CONFIG_FILE}: invalid model config ({e})") from e
        model = cls(config).to(device)
        model.load_weights(directory)
        return model
