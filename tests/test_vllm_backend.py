"""The optional vLLM rollout backend: the pure parts everywhere, a real engine only where vLLM and a GPU are."""

from __future__ import annotations

import pytest
import torch

from minirlhf.config import build_config
from minirlhf.generation.vllm_backend import hf_state_dict, rollout_from_token_lists
from minirlhf.stages import STAGES


def test_rollout_from_token_lists_pads_and_masks_like_the_sampler():
    out = rollout_from_token_lists([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], [[-0.5, -0.1], [-1.0, -2.0, -3.0]],
                                   eos_id=2, pad_id=0, prompt_width=4)
    assert out.prompt_ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert out.prompt_mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert out.completion_ids.tolist() == [[9, 2, 0], [10, 11, 12]]
    assert out.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out.completions() == [[9, 2], [10, 11, 12]]
    torch.testing.assert_close(out.logprobs[0], torch.tensor([-0.5, -0.1, 0.0]))


def test_native_weights_get_hugging_face_names(make_model):
    model = make_model()
    names = set(hf_state_dict(model))
    assert "model.embed_tokens.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    assert "lm_head.weight" in names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM rollouts need a CUDA GPU")
def test_grpo_with_vllm_rollouts(tmp_path, start_model_dir, task_data):
    pytest.importorskip("vllm")
    cls, run = STAGES["grpo"]
    run(build_config(cls, {"model": str(start_model_dir), "data": str(task_data["rl"]), "out_dir": str(tmp_path),
                           "steps": 2, "prompts_per_rollout": 4, "group_size": 2, "batch_size": 8,
                           "max_new_tokens": 8, "generation_backend": "vllm", "progress": False}, where="grpo"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
