"""Any Hugging Face causal LM behind the native model's interface, so every stage, the sampler and the
log-prob helpers work on it unchanged.

The adapter owns a `transformers` model and exposes what the rest of minirlhf calls: `forward(input_ids,
attention_mask, position_ids, cache, logits_to_keep, return_hidden, return_logits) -> ModelOutput`,
`new_cache`, `save_pretrained` (plain HF format, so `AutoModelForCausalLM.from_pretrained` loads the result)
and `load_weights`. Position ids are derived from the attention mask exactly as in the native model
(`cumsum - 1`), which keeps left-padded rows right; the KV cache is the model's own (`DynamicCache`).
`transformers` is imported only when a HF model is actually used.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import blocked_pickle_reason
from .linear import use_onednn_linears
from .minimind import ModelOutput, default_position_ids


@dataclass
class HFModelInfo:
    """The few config numbers minirlhf reads from any policy (same names as the native ModelConfig)."""

    vocab_size: int
    hidden_size: int
    max_seq_len: int


class HFCache:
    """The model's own cache object plus the number of positions filled (the native KVCache's `length`)."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.length = 0


def is_hf_model_dir(path: Path) -> bool:
    """A transformers checkpoint: config.json with a `model_type` (native configs have none)."""
    import json

    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


class HFCausalLM(nn.Module):
    """A `transformers` causal LM (`AutoModelForCausalLM`) with the native model's interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        config = model.config
        self.config = HFModelInfo(
            vocab_size=model.get_input_embeddings().num_embeddings,
            hidden_size=config.hidden_size,
            max_seq_len=getattr(config, "max_position_embeddings", None) or 2048,
        )
        decoder = model.get_decoder()
        params = inspect.signature(decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> HFCausalLM:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
        except Exception as e:  # missing or corrupt files surface as several exception types
            problem = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in problem or "Unpickl" in type(e).__name__:
                problem = ("refusing to load a weights file that holds objects other than tensors; nothing was "
                           f"unpickled ({blocked_pickle_reason(e)})")
            raise ValueError(f"{directory}: cannot load the Hugging Face model ({problem})") from e
        return cls(use_onednn_linears(model)).to(device)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()

    def gradient_checkpointing_enable(self) -> None:
        if hasattr(self.hf, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.hf.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: HFCache | None = None,
                logits_to_keep: int = 0, return_hidden: bool = False, return_logits: bool = True
                ) -> ModelOutput:
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, b, t, input_ids.device)
        kwargs = {self._cache_arg: cache.cache, "use_cache": True} if cache is not None else {"use_cache": False}
        hidden = self.hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       **kwargs).last_hidden_state
        if cache is not None:
            cache.length = past + t
        logits = None
        if return_logits:
            logits = self.hf.get_output_embeddings()(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return ModelOutput(logits=logits, hidden=hidden if return_hidden else None)

    def new_cache(self, batch_size: int, max_len: int) -> HFCache:
        from transformers import DynamicCache

        return HFCache(DynamicCache(config=self.hf.config))

    def save_pretrained(self, directory: str | Path) -> None:
        """Plain Hugging Face format (config.json, model.safetensors), loadable by `transformers`."""
        self.hf.save_pretrained(str(directory))

    def load_weights(self, directory: str | Path) -> None:
        """Load weights written by `save_pretrained` into this model, in place (tied weights stored once)."""
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no .safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = self.hf.load_state_dict(state, strict=False)
        tied = {k for k in missing if "lm_head" in k and getattr(self.hf.config, "tie_word_embeddings", False)}
        if set(missing) - tied or unexpected:
            raise ValueError(f"{directory}: weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
