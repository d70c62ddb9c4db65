"""Models: the native MiniMind decoder, any Hugging Face causal LM behind the same interface, LoRA, scalar heads
for reward/value models, Hugging Face export."""

from .config import PRESETS, ModelConfig, preset
from .loading import check_vocab, frozen_reference, load_policy, load_scalar_model, mix_into_reference
from .lora import LoRAConfig, save_final
from .minimind import KVCache, MiniMindLM, ModelOutput

__all__ = ["PRESETS", "check_vocab", "frozen_reference", "KVCache", "LoRAConfig", "MiniMindLM", "ModelConfig",
           "ModelOutput", "load_policy", "load_scalar_model", "mix_into_reference", "preset", "save_final"]
