"""Model configuration and size presets.

The native model is MiniMind's decoder (itself Llama-shaped): RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, tied embeddings, optional mixture-of-experts MLP. Presets follow MiniMind's sizes; `tiny`
is ours, small enough for tests and the 12-minute CPU demo.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int | None = None  # None: 8/3 * hidden rounded up to a multiple of 64 (MiniMind)
    max_seq_len: int = 512
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    use_moe: bool = False
    num_experts: int = 4
    experts_per_token: int = 2
    aux_loss_coef: float = 0.01  # weight of the Switch-style load-balancing loss

    def __post_init__(self) -> None:
        for f in fields(self):  # a hand-edited config.json: wrong types ("256") and impossible sizes (0, -1)
            value, kind = getattr(self, f.name), _KINDS[f.name]
            if value is None and f.name == "intermediate_size":
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{f.name}: expected {kind.__name__}, got {value!r}")
            if kind in (int, float) and not (value > 0 if f.name != "aux_loss_coef" else value >= 0):
                raise ValueError(f"{f.name}: must be {'>= 0' if f.name == 'aux_loss_coef' else 'positive'}, "
                                 f"got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.intermediate_size is None:
            self.intermediate_size = 64 * ((int(self.hidden_size * 8 / 3) + 63) // 64)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object of model options")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown model config keys {sorted(unknown)}")
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


_KINDS = {"vocab_size": int, "hidden_size": int, "num_layers": int, "num_heads": int, "num_kv_heads": int,
          "intermediate_size": int, "max_seq_len": int, "rope_theta": float, "rms_norm_eps": float,
          "tie_embeddings": bool, "use_moe": bool, "num_experts": int, "experts_per_token": int,
          "aux_loss_coef": float}

PRESETS: dict[str, dict] = {
    # ~1.7M parameters: unit tests and the CPU demo.
    "tiny": dict(vocab_size=512, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
                 intermediate_size=512, max_seq_len=256),
    # ~26M: MiniMind2-small.
    "mini": dict(vocab_size=6400, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, max_seq_len=512),
    # ~100M: MiniMind2.
    "base": dict(vocab_size=6400, hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2, max_seq_len=512),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset's config with `overrides` applied (e.g. `preset("tiny", vocab_size=1024)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
