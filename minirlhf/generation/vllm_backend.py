"""Optional rollout backend: vLLM (Kwon et al., 2023) in the training process, on the same GPU.

`generation_backend: vllm` in an online-RL config. The engine is started once from a Hugging Face copy of
the starting policy (native models are exported to Llama format first); before each rollout the current
policy weights (LoRA merged in) are pushed into the engine with the model's `load_weights`, so rollouts
always come from the policy being trained. Each row gets its own sampling seed derived from
(seed, rollout, row), so rollouts do not depend on how rows are split over processes.

The trainer recomputes every log-prob it uses (old, reference, current) with its own model, so vLLM's
numerics never enter the loss; `Rollout.logprobs` carries vLLM's values for logging only.
vLLM is not a dependency: this module imports it on use and says how to install it if it is missing.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .sampler import Rollout, SamplingConfig, left_pad


def rollout_from_token_lists(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                             logprobs: Sequence[Sequence[float]], eos_id: int, pad_id: int,
                             device: torch.device | str = "cpu", prompt_width: int | None = None) -> Rollout:
    """A `Rollout` (left-padded prompts, right-padded completions, masks) from per-row token lists."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device, prompt_width)
    width = max((len(c) for c in completions), default=0)
    completion = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    values = torch.zeros((len(prompts), width), dtype=torch.float32)
    for i, (tokens, lps) in enumerate(zip(completions, logprobs)):
        completion[i, :len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
        mask[i, :len(tokens)] = 1
        values[i, :len(lps)] = torch.as_tensor(list(lps), dtype=torch.float32)
    return Rollout(prompt_ids, prompt_mask, completion.to(device), mask.to(device), values.to(device))


def hf_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under Hugging Face names, LoRA merged in (what vLLM's `load_weights` expects)."""
    from ..model.hf import HFCausalLM
    from ..model.hf_export import llama_state_dict
    from ..model.lora import LoRAModel

    if isinstance(policy, LoRAModel):
        policy = copy.deepcopy(policy.peft).merge_and_unload()
    policy = getattr(policy, "module", policy)  # DDP
    if isinstance(policy, HFCausalLM):
        return policy.hf.state_dict()
    return llama_state_dict(policy, tied_head=True)


class VLLMGenerator:
    """Rollouts from an in-process vLLM engine whose weights follow the policy."""

    def __init__(self, model_dir: str | Path, policy: nn.Module, tokenizer_dir: str | Path,
                 gpu_memory_utilization: float = 0.3, seed: int = 0) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("generation_backend=vllm needs vLLM on a CUDA machine: pip install vllm") from e
        from ..model.hf import is_hf_model_dir

        model_dir = Path(model_dir)
        if not is_hf_model_dir(model_dir):  # a native model: give vLLM its Llama export
            from ..model.hf_export import export_hf

            self._export = tempfile.TemporaryDirectory(prefix="minirlhf-vllm-")
            export_hf(getattr(policy, "base", policy), self._export.name, tokenizer_dir)
            model_dir = Path(self._export.name)
        self.llm = LLM(model=str(model_dir), gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       dtype="bfloat16" if torch.cuda.is_bf16_supported() else "float16", enable_prefix_caching=True)

    def sync_weights(self, policy: nn.Module) -> None:
        weights = list(hf_state_dict(policy).items())
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, eos_id: int, pad_id: int,
                 seeds: Sequence[int], device: torch.device, prompt_width: int | None = None) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k or -1, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, stop_token_ids=[eos_id], seed=seed, logprobs=0,
                                 detokenize=False) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            if sample.finish_reason == "stop" and (not tokens or tokens[-1] != eos_id):
                tokens.append(eos_id)  # the end-of-turn token ends the response and is learned
            completions.append(tokens)
            logprobs.append([next(iter(d.values())).logprob for d in (sample.logprobs or [])][:len(tokens)])
        return rollout_from_token_lists(prompts, completions, logprobs, eos_id, pad_id, device, prompt_width)
