"""Export a native model to Hugging Face Llama format, loadable by `transformers.AutoModelForCausalLM`.

The native parameter names already follow Llama's, so export is: prefix `model.`, write a Llama
`config.json`, copy the tokenizer files. Needs no `transformers` at export time. MoE models have no Llama
equivalent and are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .minimind import MiniMindLM


def llama_config(model: MiniMindLM, eos_id: int | None = None, pad_id: int | None = None) -> dict:
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def llama_state_dict(model: MiniMindLM, tied_head: bool = False) -> dict[str, torch.Tensor]:
    """The native weights under Hugging Face Llama names (`model.` prefix). A tied LM head is left out (it is
    the embedding) unless `tied_head`."""
    skip_head = model.config.tie_embeddings and not tied_head
    return {name if name == "lm_head.weight" else f"model.{name}": tensor
            for name, tensor in model.state_dict().items() if not (name == "lm_head.weight" and skip_head)}


def export_hf(model: MiniMindLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              eos_id: int | None = None, pad_id: int | None = None) -> Path:
    """Write `out_dir/{config.json, model.safetensors, tokenizer files}` in Llama layout."""
    if model.config.use_moe:
        raise ValueError("export-hf: mixture-of-experts models have no Llama equivalent; export a dense model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous().clone() for name, tensor in llama_state_dict(model).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(llama_config(model, eos_id, pad_id), indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id, "pad_token_id": pad_id}))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir
