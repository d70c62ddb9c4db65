"""SFT: `lm_loss` against a hand computation, only assistant tokens are learned, and a short run on the
generated task lowers the loss and writes a loadable model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.algorithms import sft
from minirlhf.algorithms.sft import LanguageModeling, LMConfig, lm_loss, tokenize_conversations
from minirlhf.config import build_config
from minirlhf.model import MiniMindLM
from minirlhf.stages import STAGES
from minirlhf.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Tom has 3 pens. He buys 4 more. How many pens does Tom have now?"},
     {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 6 * 7?"},
     {"role": "assistant", "content": "6 * 7 = 42. The answer is 42."}],
]


def test_lm_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 2
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t + 1]:
                row = logits[b, t].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                total += -(row[int(ids[b, t + 1])] - log_z)
                count += 1
    assert count == 6
    assert lm_loss(logits, ids, mask).item() == pytest.approx(total / count, abs=1e-5)
    # No tokens to learn: 0, not NaN.
    assert lm_loss(logits, ids, torch.zeros_like(mask)).item() == 0.0


def test_sft_gradient_reaches_only_assistant_positions(tokenizer):
    examples = tokenize_conversations(tokenizer, CONVERSATIONS, max_len=128)
    width = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([ids + [tokenizer.pad_id] * (width - len(ids)) for ids, _ in examples])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in examples])
    logits = torch.randn(2, width, tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))
    logits.requires_grad_(True)
    lm_loss(logits, ids, mask).backward()
    has_grad = logits.grad.abs().sum(-1) > 0  # (B, T): position t gets gradient iff it predicts a learned token
    expected = torch.zeros_like(has_grad)
    expected[:, :-1] = mask[:, 1:].bool()
    assert torch.equal(has_grad, expected)
    # The learned targets are exactly the assistant content + <|im_end|>.
    for b, (row_ids, row_mask) in enumerate(examples):
        learned = [t for t, m in zip(row_ids, row_mask) if m]
        assistant = CONVERSATIONS[b][-1]["content"]
        assert learned == tokenizer.encode_response(assistant)


def test_sft_loss_ignores_changes_to_prompt_logits(tokenizer, make_model):
    model = make_model(seed=2, vocab_size=tokenizer.vocab_size)
    cfg = build_config(LMConfig, {"batch_size": 2, "device": "cpu", "progress": False})
    algo = LanguageModeling(model, tokenizer, tokenize_conversations(tokenizer, CONVERSATIONS, 128), cfg)
    ids, attention, loss_mask = algo.micro_batches(0)[0]
    with torch.no_grad():
        loss, metrics = algo.loss((ids, attention, loss_mask))
        logits = model(ids, attention_mask=attention).logits
    assert metrics["tokens"] == float(loss_mask[:, 1:].sum())
    assert loss.item() == pytest.approx(lm_loss(logits, ids, loss_mask).item(), abs=1e-6)
    # Scramble the logits at every position that does not predict an assistant token: loss unchanged.
    predicts_learned = torch.zeros_like(loss_mask, dtype=torch.bool)
    predicts_learned[:, :-1] = loss_mask[:, 1:].bool()
    scrambled = torch.where(predicts_learned[..., None], logits, torch.randn_like(logits) * 10)
    assert lm_loss(scrambled, ids, loss_mask).item() == pytest.approx(loss.item(), abs=1e-6)
    perturbed_learned = torch.where(predicts_learned[..., None], torch.randn_like(logits) * 10, logits)
    assert abs(lm_loss(perturbed_learned, ids, loss_mask).item() - loss.item()) > 0.1


def test_tokenize_conversations_truncates_and_drops(tokenizer, capsys):
    fits = len(tokenizer.encode_chat(CONVERSATIONS[0])[0])
    long = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    cut = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 100}]
    examples = tokenize_conversations(tokenizer, [CONVERSATIONS[0], long, cut], max_len=fits)
    # `long` lost its whole response: dropped. `cut` keeps a truncated response, mask cut to match.
    assert [len(ids) for ids, _ in examples] == [fits, fits]
    assert examples[0] == tuple(tokenizer.encode_chat(CONVERSATIONS[0]))
    assert examples[1] == tuple(x[:fits] for x in tokenizer.encode_chat(cut))
    err = capsys.readouterr().err
    assert "truncated 2 conversations" in err and "dropped 1" in err


def sft_config(out_dir, task_data, start_model_dir, **overrides) -> LMConfig:
    values = dict(mode="sft", model=str(start_model_dir), data=str(task_data["sft"]), out_dir=str(out_dir),
                  max_len=128, steps=30, batch_size=8, lr=3e-3, warmup_steps=3, seed=0, device="cpu",
                  progress=False)
    return build_config(LMConfig, {**values, **overrides}, where="sft")


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_short_sft_run_lowers_the_loss(tmp_path, task_data, start_model_dir):
    cls, run = STAGES["sft"]
    assert cls is LMConfig and run is sft.run
    cfg = sft_config(tmp_path / "sft", task_data, start_model_dir,
                     eval_data=str(task_data["heldout_rl"]), eval_samples=4, max_new_tokens=8)
    result = run(cfg)
    assert 0.0 <= result["accuracy"] <= 1.0
    rows = [r for r in read_metrics(tmp_path / "sft") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert math.isfinite(first) and first > 4.0  # ~ln(320) = 5.8 at the start
    assert last < 0.6 * first, (first, last)
    assert all(r["tokens"] > 0 for r in rows)
    # The final model loads and still knows the tokenizer it was trained with.
    final = tmp_path / "sft" / "final"
    model = MiniMindLM.from_pretrained(final)
    assert model.config.vocab_size == Tokenizer.load(final).vocab_size == 320


def test_interim_evaluations_use_the_first_prompts_and_leave_training_unchanged(tmp_path, task_data,
                                                                                 start_model_dir, monkeypatch):
    """`interim_eval_samples`: the evaluations every `eval_every` steps generate for the first N held-out prompts,
    the final one for all `eval_samples`; the trained weights and losses are those of a run evaluating all."""
    seen = []

    def recording_metrics(model, tokenizer, examples, max_new_tokens, sampled):
        seen.append(([e.prompt for e in examples], sampled))
        return {"accuracy": 0.0}

    monkeypatch.setattr(sft, "task_metrics", recording_metrics)
    common = dict(eval_data=str(task_data["heldout_rl"]), eval_samples=5, eval_every=4, steps=8)
    sft.run(sft_config(tmp_path / "all", task_data, start_model_dir, **common))
    everything = [prompts for prompts, _ in seen]
    seen.clear()
    sft.run(sft_config(tmp_path / "interim", task_data, start_model_dir, interim_eval_samples=2, **common))
    assert len(everything[0]) == 5 and everything[1] == everything[0]
    assert seen == [(everything[0][:2], False), (everything[0], True)]
    assert [r.get("loss") for r in read_metrics(tmp_path / "all")] == \
        [r.get("loss") for r in read_metrics(tmp_path / "interim")]
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("all", "interim")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
