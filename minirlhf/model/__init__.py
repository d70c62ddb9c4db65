"""Models: the native MiniMind decoder, scalar heads for reward/value models, Hugging Face export."""

from .config import PRESETS, ModelConfig, preset
from .loading import check_vocab, load_policy
from .minimind import KVCache, MiniMindLM, ModelOutput

__all__ = ["PRESETS", "check_vocab", "KVCache", "MiniMindLM", "ModelConfig", "ModelOutput", "load_policy", "preset"]
