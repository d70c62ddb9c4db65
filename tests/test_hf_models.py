"""Bring your own Hugging Face model: a tiny randomly initialised Llama with its own tokenizer and its own
(non-ChatML) chat template, built here, no downloads. Every stage runs a few steps on it, with and without
LoRA, and the results load with `transformers.AutoModelForCausalLM`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.config import build_config
from minirlhf.generation import SamplingConfig, generate
from minirlhf.model import frozen_reference, load_policy
from minirlhf.model.hf import HFCausalLM
from minirlhf.model.lora import ADAPTER_FILE, AdaptersDisabled, LoRAConfig, LoRAModel
from minirlhf.stages import STAGES
from minirlhf.tokenizer import ChatTemplateTokenizer, Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

# Not ChatML: role names upper-cased after the turn marker, no newlines.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A saved 2-layer Llama (untied embeddings) + a fast tokenizer with its own chat template."""
    directory = tmp_path_factory.mktemp("hf_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|im_end|>",
                                         pad_token="<|endoftext|>", chat_template=TEMPLATE).save_pretrained(directory)
    return directory


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def test_chat_template_tokenizer_masks_assistant_content_and_end_of_turn(hf_dir):
    tok = Tokenizer.load(hf_dir)
    assert isinstance(tok, ChatTemplateTokenizer) and tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "8"}]
    ids, mask = tok.encode_chat(messages)
    assert tok.decode(ids, skip_special_tokens=False) == tok.hf.apply_chat_template(messages, tokenize=False)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode_response("5") + tok.encode_response("8")
    prompt = tok.encode_prompt(messages[:1])  # a prompt's ids are a prefix of prompt + response
    assert ids[:len(prompt)] == prompt and ids[len(prompt):len(prompt) + 2] == tok.encode_response("5")
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>ASSISTANT: ")


def test_hf_adapter_matches_transformers_with_padding_and_its_cache_samples_like_a_full_forward(hf_dir):
    from minirlhf.model.linear import OneDNNLinear

    ours, theirs = load_policy(hf_dir).eval(), load_hf(hf_dir)
    assert isinstance(ours, HFCausalLM)
    assert any(isinstance(m, OneDNNLinear) for m in ours.modules())  # fp32 CPU products: oneDNN where it beats MKL
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[1:, 3:]).logits[0], theirs(ids[1:, 3:]).logits[0], atol=1e-5, rtol=0)
        padded = ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(padded[1, 3:], theirs(ids[1:, 3:]).logits[0], atol=1e-5, rtol=0)
    tok = Tokenizer.load(hf_dir)
    prompts = [tok.encode_prompt([{"role": "user", "content": "What is 12+7?"}]), tok.encode_prompt(
        [{"role": "user", "content": "3*4?"}])]
    out = generate(ours, prompts, SamplingConfig(max_new_tokens=6, temperature=0), tok.eos_id, tok.pad_id)
    for prompt, completion in zip(prompts, out.completions()):
        seq = list(prompt)
        with torch.no_grad():
            for _ in completion:
                seq.append(int(ours(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(prompt):] == completion


def test_lora_trains_only_adapters_and_disabled_adapters_are_the_base_model(hf_dir):
    torch.manual_seed(0)
    model = load_policy(hf_dir, lora=LoRAConfig(r=4, alpha=8))
    assert isinstance(model, LoRAModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(3, 300, (2, 9))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids).logits.logsumexp(-1).mean().backward()
        optimizer.step()
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    reference = frozen_reference(model, "", str(hf_dir), "cpu")
    assert isinstance(reference, AdaptersDisabled)
    with torch.no_grad():
        base_logits = load_hf(hf_dir)(ids).logits
        torch.testing.assert_close(reference(ids).logits, base_logits, atol=1e-5, rtol=0)
        assert (model(ids).logits - base_logits).abs().max() > 1e-3  # the adapters did learn something
        assert model.peft.active_adapters  # switched back on after the reference pass


def stage_values(stage: str, hf_dir, task_data, out_dir, lora: int) -> dict:
    common = {"model": str(hf_dir), "out_dir": str(out_dir), "steps": 2, "batch_size": 4, "lr": 1e-3,
              "device": "cpu", "progress": False, "lora": {"r": lora}, "save_every": 1, "keep_checkpoints": 5}
    online = {"data": str(task_data["rl"]), "eval_data": str(task_data["heldout_rl"]), "eval_samples": 2,
              "prompts_per_rollout": 4, "max_new_tokens": 6, "max_new_tokens_eval": 4}
    return {**common, **{
        "sft": {"data": str(task_data["sft"]), "max_len": 96},
        "rm": {"data": str(task_data["pref"]), "max_len": 96},
        "dpo": {"data": str(task_data["pref"]), "max_len": 96},
        "grpo": {"group_size": 2, **online},
        "ppo": online,
        "spo": online,
        # a random judge never answers "Better: N" or "Score: N"; with judges alone a rollout would be an error (no
        # usable reward), so online DPO prefers by the reward here and the rule reward rides along with RLAIF's judge
        "online-dpo": {"preference": "reward", **online},
        "rlaif": {"group_size": 2, "reward": "judge:1,answer:1", "judge_model": str(hf_dir), **online},
    }[stage]}


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "grpo", "ppo", "spo", "online-dpo", "rlaif"])
def test_every_stage_trains_a_hf_model_and_saves_hf_format(stage, lora, hf_dir, task_data, tmp_path):
    cls, run = STAGES[stage]
    run(build_config(cls, stage_values(stage, hf_dir, task_data, tmp_path, lora), where=stage))
    final = tmp_path / "final"
    loaded = load_hf(final)  # plain transformers loads the result (LoRA merged in)
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    if stage in ("sft", "rm", "dpo"):  # (a random policy's rollouts all score 0 on the task: no signal yet)
        start = load_hf(hf_dir).state_dict()
        assert any(not torch.equal(p, start[n]) for n, p in loaded.state_dict().items()), "no weight changed"
    checkpoint = tmp_path / "checkpoints" / "step_000002" / ("reward_model" if stage == "rm" else "policy")
    if lora:  # checkpoints keep only the adapters; the base weights are never written twice
        assert (checkpoint / ADAPTER_FILE).is_file() and not (checkpoint / "model.safetensors").exists()
        assert all("lora_" in k for k in load_file(checkpoint / ADAPTER_FILE))
    assert Tokenizer.load(final).encode_prompt([{"role": "user", "content": "hi"}]) == \
        Tokenizer.load(hf_dir).encode_prompt([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_hf_run_resumes_exactly(lora, hf_dir, task_data, tmp_path):
    cls, run = STAGES["grpo"]
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    run(build_config(cls, {**stage_values("grpo", hf_dir, task_data, straight, lora), "steps": 3}, where="grpo"))
    values = {**stage_values("grpo", hf_dir, task_data, interrupted, lora), "steps": 3}
    run(build_config(cls, values, where="grpo"))
    for later in ("step_000002", "step_000003", "final"):  # as if killed after the first checkpoint
        shutil.rmtree(interrupted / ("" if later == "final" else "checkpoints") / later)
    run(build_config(cls, {**values, "resume": True}, where="grpo"))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(interrupted / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_the_native_model_saves_merged_native_weights(start_model_dir, task_data, tmp_path):
    cls, run = STAGES["sft"]
    run(build_config(cls, {"model": str(start_model_dir), "data": str(task_data["sft"]), "out_dir": str(tmp_path),
                           "steps": 2, "batch_size": 4, "lr": 1e-2, "max_len": 96, "progress": False,
                           "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}, where="sft"))
    merged, start = load_policy(tmp_path / "final"), load_policy(start_model_dir)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, start.state_dict()[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, start_model_dir, hf_dir):
    path = start_model_dir if kind == "native" else hf_dir
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = load_policy(path, gradient_checkpointing=checkpointing).train()
        model(ids).logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)
