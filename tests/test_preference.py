"""Preference losses against hand computations, and the pair batches they are computed on.

- `dpo.preference_loss` for every loss_type (sigmoid / cDPO, robust, hinge, IPO with length normalisation,
  SimPO with γ) against scalar formulas; policy == reference gives exactly log 2; implicit rewards.
- `rm.bradley_terry_loss` with and without margin.
- `collate_pairs` layout and `tokenize_pairs` truncation (prompt cut from the left first).
- Gradients reach only the logits that predict completion tokens (never prompt or padding).
- Our DPO loss on a tiny HF Llama equals TRL's DPO loss on the same batch (skipped without trl).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minirlhf.algorithms.dpo import preference_loss
from minirlhf.algorithms.rm import bradley_terry_loss
from minirlhf.data.formats import PreferencePair
from minirlhf.data.pairs import TokenizedPair, collate_pairs, tokenize_pairs
from minirlhf.logprobs import sequence_logprobs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Two pairs of summed sequence log-probs, with different completion lengths.
CHOSEN, REJECTED = [-5.0, -12.0], [-7.0, -9.0]
REF_CHOSEN, REF_REJECTED = [-5.5, -11.0], [-6.0, -10.5]
CHOSEN_LEN, REJECTED_LEN = [4.0, 10.0], [6.0, 5.0]
BETA = 0.1


def losses(loss_type: str, **kwargs):
    return preference_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), t(CHOSEN_LEN), t(REJECTED_LEN),
                           BETA, loss_type, **kwargs)


def margin(i: int) -> float:
    """h = (log π_c - log π_ref,c) - (log π_r - log π_ref,r) for pair i."""
    return (CHOSEN[i] - REF_CHOSEN[i]) - (REJECTED[i] - REF_REJECTED[i])


def test_sigmoid_dpo_by_hand():
    got, r_chosen, r_rejected = losses("sigmoid")
    for i in range(2):
        assert got[i].item() == pytest.approx(-log_sigmoid(BETA * margin(i)), abs=1e-6)
        assert r_chosen[i].item() == pytest.approx(BETA * (CHOSEN[i] - REF_CHOSEN[i]), abs=1e-6)
        assert r_rejected[i].item() == pytest.approx(BETA * (REJECTED[i] - REF_REJECTED[i]), abs=1e-6)
    # pair 0: h = 0.5 - (-1.0) = 1.5; pair 1: h = -1.0 - 1.5 = -2.5
    assert [margin(0), margin(1)] == [1.5, -2.5]


def test_sigmoid_with_label_smoothing_is_cdpo():
    eps = 0.1
    got, _, _ = losses("sigmoid", label_smoothing=eps)
    for i in range(2):
        z = BETA * margin(i)
        expected = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
        assert got[i].item() == pytest.approx(expected, abs=1e-6)


def test_rpo_adds_the_chosen_mean_token_nll_by_hand():
    alpha = 0.7
    plain, _, _ = losses("sigmoid")
    got, _, _ = losses("sigmoid", rpo_alpha=alpha)
    for i in range(2):
        nll = -CHOSEN[i] / CHOSEN_LEN[i]
        assert got[i].item() == pytest.approx(plain[i].item() + alpha * nll, abs=1e-6)
    ipo, _, _ = losses("ipo", rpo_alpha=alpha)  # the NLL is of the raw (not length-normalised) sum, for every loss
    assert ipo[0].item() == pytest.approx(losses("ipo")[0][0].item() + alpha * -CHOSEN[0] / CHOSEN_LEN[0], abs=1e-6)


def test_robust_dpo_by_hand():
    eps = 0.2
    got, _, _ = losses("robust", label_smoothing=eps)
    for i in range(2):
        z = BETA * margin(i)
        expected = (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
        assert got[i].item() == pytest.approx(expected, abs=1e-6)
    # with ε = 0 it is plain DPO
    assert torch.allclose(losses("robust")[0], losses("sigmoid")[0])


def test_hinge_by_hand():
    got, _, _ = preference_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), t(CHOSEN_LEN),
                                t(REJECTED_LEN), 1.0, "hinge")
    # β = 1: pair 0 has h = 1.5 ≥ 1 → 0; pair 1 has h = -2.5 → 3.5
    assert got.tolist() == pytest.approx([max(0.0, 1 - margin(0)), max(0.0, 1 - margin(1))]) == [0.0, 3.5]


def test_ipo_normalises_by_length_by_hand():
    got, r_chosen, _ = losses("ipo")
    for i in range(2):
        h = ((CHOSEN[i] - REF_CHOSEN[i]) / CHOSEN_LEN[i]) - ((REJECTED[i] - REF_REJECTED[i]) / REJECTED_LEN[i])
        assert got[i].item() == pytest.approx((h - 1 / (2 * BETA)) ** 2, abs=1e-5)
        # implicit rewards for IPO use the per-token averages too
        assert r_chosen[i].item() == pytest.approx(BETA * (CHOSEN[i] - REF_CHOSEN[i]) / CHOSEN_LEN[i], abs=1e-6)


def test_simpo_needs_no_reference_and_uses_gamma_by_hand():
    beta, gamma = 2.0, 0.5
    got, r_chosen, r_rejected = preference_loss(t(CHOSEN), t(REJECTED), None, None, t(CHOSEN_LEN), t(REJECTED_LEN),
                                                beta, "simpo", simpo_gamma=gamma)
    for i in range(2):
        avg_c, avg_r = CHOSEN[i] / CHOSEN_LEN[i], REJECTED[i] / REJECTED_LEN[i]
        assert got[i].item() == pytest.approx(-log_sigmoid(beta * (avg_c - avg_r) - gamma), abs=1e-6)
        assert r_chosen[i].item() == pytest.approx(beta * avg_c, abs=1e-6)
        assert r_rejected[i].item() == pytest.approx(beta * avg_r, abs=1e-6)


def test_reference_is_required_except_for_simpo_and_unknown_types_fail():
    for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
        with pytest.raises(ValueError, match="reference"):
            preference_loss(t(CHOSEN), t(REJECTED), None, None, t(CHOSEN_LEN), t(REJECTED_LEN), BETA, loss_type)
    with pytest.raises(ValueError, match="unknown loss_type"):
        losses("kto")


def test_policy_equal_to_reference_gives_log_2():
    logps = t([-3.0, -20.0, -0.5])
    got, r_chosen, r_rejected = preference_loss(logps, logps - 1, logps, logps - 1, t([3, 4, 5]), t([3, 4, 5]),
                                                0.1, "sigmoid")
    assert got.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)
    assert r_chosen.tolist() == r_rejected.tolist() == [0.0, 0.0, 0.0]


def test_preference_loss_gradient_matches_the_dpo_formula():
    # d/dπ_c of -log σ(βh) = -β σ(-βh)
    chosen = t(CHOSEN).requires_grad_(True)
    loss, _, _ = preference_loss(chosen, t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), t(CHOSEN_LEN),
                                 t(REJECTED_LEN), BETA, "sigmoid")
    loss.sum().backward()
    for i in range(2):
        z = BETA * margin(i)
        assert chosen.grad[i].item() == pytest.approx(-BETA / (1 + math.exp(z)), abs=1e-6)


def test_bradley_terry_loss_by_hand():
    chosen, rejected = [1.0, -0.5, 2.0], [0.0, 0.5, 2.5]
    for m in (0.0, 0.7):
        expected = sum(-log_sigmoid(c - r - m) for c, r in zip(chosen, rejected)) / 3
        assert bradley_terry_loss(t(chosen), t(rejected), m).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(t([0.3]), t([0.3])).item() == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------------------------------
# Pair batches

PAD = 0


def test_collate_pairs_layout():
    rows = [TokenizedPair(chosen_ids=[5, 6, 7, 20, 21, 2], chosen_start=3, rejected_ids=[5, 6, 7, 30, 2],
                          rejected_start=3),
            TokenizedPair(chosen_ids=[8, 9, 22, 2], chosen_start=2, rejected_ids=[8, 9, 31, 32, 33, 34, 2],
                          rejected_start=2)]
    ids, attention, completion = collate_pairs(rows, PAD)
    assert ids.tolist() == [[5, 6, 7, 20, 21, 2, PAD],    # chosen 0
                            [8, 9, 22, 2, PAD, PAD, PAD],  # chosen 1
                            [5, 6, 7, 30, 2, PAD, PAD],    # rejected 0
                            [8, 9, 31, 32, 33, 34, 2]]     # rejected 1
    assert attention.tolist() == [[1, 1, 1, 1, 1, 1, 0],
                                  [1, 1, 1, 1, 0, 0, 0],
                                  [1, 1, 1, 1, 1, 0, 0],
                                  [1, 1, 1, 1, 1, 1, 1]]
    assert completion.tolist() == [[0, 0, 0, 1, 1, 1, 0],
                                   [0, 0, 1, 1, 0, 0, 0],
                                   [0, 0, 0, 1, 1, 0, 0],
                                   [0, 0, 1, 1, 1, 1, 1]]
    assert ids.dtype == attention.dtype == completion.dtype == torch.long


def _pairs() -> list[PreferencePair]:
    return [PreferencePair([{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"}],
                           "3 + 4 = 7. The answer is 7.", "I do not know."),
            PreferencePair([{"role": "user", "content": "What is 12 - 5?"}],
                           "12 - 5 = 7. The answer is 7.", "12 - 5 = 8. The answer is 8. Let me think about it.")]


def test_tokenize_pairs_masks_the_response_and_its_eos(tokenizer):
    pairs = tokenize_pairs(tokenizer, _pairs(), max_len=512)
    ids, attention, completion = collate_pairs(pairs, tokenizer.pad_id)
    texts = [p.chosen for p in _pairs()] + [p.rejected for p in _pairs()]
    for row, text in enumerate(texts):
        length = int(attention[row].sum())
        response = [int(i) for i, m in zip(ids[row], completion[row]) if m]
        assert response == tokenizer.encode(text) + [tokenizer.eos_id]  # response tokens + EOS, nothing else
        assert int(ids[row, length - 1]) == tokenizer.eos_id and int(completion[row, length - 1]) == 1
        assert (ids[row, length:] == tokenizer.pad_id).all() and (completion[row, length:] == 0).all()
        prompt_len = length - len(response)
        assert (completion[row, :prompt_len] == 0).all()
        assert tokenizer.decode(ids[row, :prompt_len].tolist(), skip_special_tokens=False).endswith("assistant\n")


def test_tokenize_pairs_cuts_the_prompt_from_the_left_first(tokenizer, capsys):
    pair = _pairs()[0]
    prompt = tokenizer.encode_prompt(pair.prompt)
    chosen = tokenizer.encode_response(pair.chosen)
    rejected = tokenizer.encode_response(pair.rejected)
    assert len(chosen) > len(rejected)
    max_len = len(prompt) + len(chosen) - 3
    (out,) = tokenize_pairs(tokenizer, [pair], max_len)
    # the chosen sequence loses the first 3 prompt tokens, the response is intact; the rejected one fits
    assert out.chosen_ids == prompt[3:] + chosen and out.chosen_start == len(prompt) - 3
    assert out.rejected_ids == prompt + rejected and out.rejected_start == len(prompt)
    assert "truncated 1 of 1" in capsys.readouterr().err
    # a response longer than max_len keeps one prompt token, then is cut from its end
    (out,) = tokenize_pairs(tokenizer, [pair], max_len=4)
    assert out.chosen_ids == prompt[-1:] + chosen[:3] and out.chosen_start == 1
    assert out.rejected_ids == prompt[-1:] + rejected[:3] and out.rejected_start == 1


class LogitSpy(nn.Module):
    """Wraps a model; keeps the logits of the last forward with `retain_grad` so the test can read their gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.logits: torch.Tensor | None = None

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids, attention_mask=attention_mask)
        out.logits.retain_grad()
        self.logits = out.logits
        return out


def test_gradients_reach_only_logits_that_predict_completion_tokens(make_model, tokenizer):
    model = make_model(seed=0, vocab_size=tokenizer.vocab_size)
    ids, attention, completion = collate_pairs(tokenize_pairs(tokenizer, _pairs(), 512), tokenizer.pad_id)
    assert (attention == 0).any()  # the batch has padding
    spy = LogitSpy(model)
    logps, lengths = sequence_logprobs(spy, ids, attention, completion)
    assert lengths.tolist() == completion[:, 1:].sum(1).float().tolist()
    chosen, rejected = logps.chunk(2)
    loss, _, _ = preference_loss(chosen, rejected, chosen.detach() - 1, rejected.detach() + 1, *lengths.chunk(2),
                                 0.1, "sigmoid")
    loss.mean().backward()
    grad_norm = spy.logits.grad.abs().sum(-1)  # (2B, T)
    for b in range(ids.shape[0]):
        for pos in range(ids.shape[1]):
            # logits at pos predict ids[pos + 1]: they matter only if that target is a completion token
            predicts_completion = pos + 1 < ids.shape[1] and bool(completion[b, pos + 1])
            if predicts_completion:
                assert grad_norm[b, pos] > 0, (b, pos)
            else:
                assert grad_norm[b, pos] == 0, (b, pos)
    # and the value: changing the ids under padding leaves every sequence log-prob bit-identical
    noisy = ids.masked_fill(attention == 0, 7)
    with torch.no_grad():
        again, _ = sequence_logprobs(model, noisy, attention, completion)
    assert torch.equal(again, logps.detach())


# ----------------------------------------------------------------------------------------------------
# Against TRL


def test_dpo_loss_matches_trl_on_a_tiny_llama(tokenizer, tmp_path):
    """Our `sequence_logprobs` + `preference_loss` vs TRL 1.16's own DPO code path, on the same batch.

    The TRL side is `trl.trainer.dpo_trainer.DPOTrainer._compute_loss(model, inputs)`: the method TRL's
    `compute_loss` calls at every training step. It runs the policy with TRL's fused LM head
    (`add_fused_lm_head`: per-token log-probs of the labels, prompt/padding labels set to -100), sums them
    per sequence, runs the live `ref_model` the same way, splits the [chosen; rejected] batch, and applies the
    `loss_type` branch (`sigmoid`, `hinge`, `ipo` with completion-length normalisation, `robust` with
    label_smoothing). We feed it the exact batch our `collate_pairs` builds (TRL's collator uses the same
    layout: chosen rows then rejected rows, right-padded, `completion_mask`). Our side calls the plain HF
    forward (`.logits`), so the two log-prob computations share nothing but the weights. The losses must agree
    to 1e-5 and the gradients on every policy parameter to 1e-5. `bf16=False` matters: TRL's DPOConfig
    defaults to bf16, and Accelerate then runs the reference forward under bf16 autocast (a ~1e-3 gap).
    """
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer.backend.to_str()),
                                           eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_id)
    ids, attention, completion = collate_pairs(tokenize_pairs(tokenizer, _pairs(), 512), tokenizer.pad_id)
    dataset = Dataset.from_dict({"prompt": ["1 + 1 ="], "chosen": [" 2"], "rejected": [" 3"]})  # TRL needs one

    for loss_type, label_smoothing in (("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)):
        torch.manual_seed(0)
        policy = LlamaForCausalLM(config).eval()
        torch.manual_seed(1)
        reference = LlamaForCausalLM(config).eval()
        beta = 0.5

        # ours
        logps, lengths = sequence_logprobs(policy, ids, attention, completion)
        with torch.no_grad():
            ref_logps, _ = sequence_logprobs(reference, ids, attention, completion)
        ours, _, _ = preference_loss(*logps.chunk(2), *ref_logps.chunk(2), *lengths.chunk(2), beta, loss_type,
                                     label_smoothing)
        ours = ours.mean()
        ours.backward()
        our_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
        policy.zero_grad(set_to_none=True)

        # TRL's
        args = DPOConfig(output_dir=str(tmp_path / loss_type), beta=beta, loss_type=[loss_type],
                         label_smoothing=label_smoothing, precompute_ref_log_probs=False, use_cpu=True,
                         bf16=False, report_to="none", save_strategy="no", logging_strategy="no",
                         per_device_train_batch_size=2)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=hf_tokenizer)
        trainer.model.train()  # dropout is 0 in this config; `train` only selects TRL's metric bucket
        theirs = trainer._compute_loss(trainer.model, {"input_ids": ids, "attention_mask": attention,
                                                       "completion_mask": completion}, return_outputs=False)
        theirs.backward()

        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5), loss_type
        assert ours.item() > 0
        for name, param in policy.named_parameters():
            assert torch.allclose(our_grads[name], param.grad, atol=1e-5), (loss_type, name)


def test_online_dpo_pairs_the_best_and_worst_of_n_samples():
    from minirlhf.algorithms.experience import Experience
    from minirlhf.algorithms.online_dpo import preference_pairs

    rewards = torch.tensor([0.0, 1.0, 0.5, 1.0,   # best = row 1 (first max), worst = row 0
                            1.0, 1.0, 1.0, 1.0,   # all equal: a tie, kept but invalid
                            0.2, 0.0, 0.9, 0.1])  # best = row 10, worst = row 9: kept in sampling order
    rows = torch.arange(12)
    ids = rows[:, None].repeat(1, 5)
    exp = Experience(ids, torch.ones_like(ids), torch.ones_like(ids), rewards, torch.ones(12), torch.zeros(12), rows)
    pairs = preference_pairs(exp, 4)
    assert pairs.prompt_index.tolist() == [0, 1, 4, 5, 9, 10] and pairs.input_ids[:, 0].tolist() == [0, 1, 4, 5, 9, 10]
    assert pairs.is_chosen.tolist() == [0, 1, 0, 1, 0, 1]  # (the tie's labels do not matter: it is invalid)
    assert pairs.pair_valid.tolist() == [1, 1, 0, 0, 1, 1]
    assert pairs.stats["valid_pairs"] == pytest.approx(2 / 3)
    assert preference_pairs(exp, 2).pair_valid.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]


def test_reference_sync_hard_copy_restarts_every_dpo_step_at_log2(tmp_path, task_data, start_model_dir):
    """TR-DPO with α = 1 and a sync after every step: each step starts with π_ref = π, so every step's DPO loss is
    exactly log 2 (with no sync, only the first is). Precomputed reference log-probs cannot follow a moving
    reference, so syncing them is refused."""
    import json

    from minirlhf.config import ConfigError, build_config
    from minirlhf.stages import STAGES

    cls, run = STAGES["dpo"]

    def dpo(out: str, **values):
        run(build_config(cls, {"model": str(start_model_dir), "data": str(task_data["pref"]),
                               "out_dir": str(tmp_path / out), "steps": 3, "batch_size": 4, "lr": 1e-2,
                               "warmup_steps": 0, "device": "cpu", "progress": False, **values}, where="dpo"))
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    synced = dpo("synced", precompute_ref=False, ref_sync_every=1, ref_mixup_alpha=1.0)
    assert [r["loss"] for r in synced] == pytest.approx([math.log(2)] * 3, abs=1e-6)
    assert all(r["ref_synced"] == 1.0 for r in synced)
    fixed = dpo("fixed", precompute_ref=False)
    assert fixed[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and fixed[2]["loss"] != pytest.approx(math.log(2))
    with pytest.raises(ConfigError, match="ref_sync_every needs a reference policy"):
        dpo("precomputed", ref_sync_every=2)


def test_mix_into_reference_by_hand(make_model):
    from minirlhf.model import mix_into_reference

    reference, policy = make_model(seed=0), make_model(seed=1)
    before = {n: p.clone() for n, p in reference.named_parameters()}
    mix_into_reference(reference, policy, 0.25)
    for name, param in reference.named_parameters():
        expected = 0.25 * dict(policy.named_parameters())[name] + 0.75 * before[name]
        torch.testing.assert_close(param, expected)


def test_precomputed_reference_log_probs_are_taken_in_the_training_precision(task_data, start_model_dir):
    """With `precision=bf16` the policy's log-probs in the loss come from a bf16 autocast forward; the reference's,
    computed once up front, do too (else the implicit rewards would start off zero by bf16 rounding)."""
    import json

    from minirlhf.algorithms.dpo import DPO, DPOConfig, pair_sequence_logprobs
    from minirlhf.model import load_policy
    from minirlhf.tokenizer import Tokenizer

    policy = load_policy(start_model_dir)
    tokenizer = Tokenizer.load(start_model_dir)
    records = [json.loads(line) for line in task_data["pref"].read_text().splitlines()[:4]]
    pairs = tokenize_pairs(tokenizer, [PreferencePair([{"role": "user", "content": r["prompt"]}], r["chosen"],
                                                      r["rejected"]) for r in records], 128)
    by_precision = {}
    for precision in ("bf16", "fp32"):
        cfg = DPOConfig(steps=1, batch_size=4, precision=precision)
        by_precision[precision] = DPO(policy, policy, tokenizer, pairs, [], [], cfg).ref_logps[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = pair_sequence_logprobs(policy, pairs, tokenizer.pad_id)[0]
    assert torch.equal(by_precision["bf16"], in_bf16)
    assert torch.equal(by_precision["fp32"], pair_sequence_logprobs(policy, pairs, tokenizer.pad_id)[0])
    assert not torch.equal(by_precision["bf16"], by_precision["fp32"])


def test_precomputed_reference_covers_the_visited_pairs_and_trains_as_a_live_reference(tmp_path, task_data,
                                                                                          start_model_dir):
    """Reference log-probs are precomputed only for the pairs the run's steps visit (NaN elsewhere, so reading one
    it never computed would fail loudly as a non-finite loss), equal a live frozen reference's on those pairs, and
    a run with them trains exactly as one holding the live reference (the same losses step by step)."""
    import json

    from minirlhf.algorithms.dpo import DPO, DPOConfig, pair_sequence_logprobs
    from minirlhf.config import build_config
    from minirlhf.model import load_policy
    from minirlhf.stages import STAGES
    from minirlhf.tokenizer import Tokenizer

    policy = load_policy(start_model_dir)
    tokenizer = Tokenizer.load(start_model_dir)
    records = [json.loads(line) for line in task_data["pref"].read_text().splitlines()[:12]]
    pairs = tokenize_pairs(tokenizer, [PreferencePair([{"role": "user", "content": r["prompt"]}], r["chosen"],
                                                      r["rejected"]) for r in records], 128)
    # float32: in bf16 a product's rounding depends on how many rows ride with it (the precomputation batches 32)
    cfg = DPOConfig(steps=2, batch_size=2, grad_accum=2, seed=3, precision="fp32")
    algo = DPO(policy, policy, tokenizer, pairs, [], [], cfg)
    visited = sorted({i for step in range(2) for idx in algo.batches.indices(step) for i in idx})
    assert len(visited) == 8
    chosen, rejected = algo.ref_logps
    assert torch.isnan(chosen).tolist() == torch.isnan(rejected).tolist() == [i not in visited for i in range(12)]
    expected = pair_sequence_logprobs(policy, [pairs[i] for i in visited], tokenizer.pad_id)
    torch.testing.assert_close(chosen[visited], expected[0])
    torch.testing.assert_close(rejected[visited], expected[1])

    cls, run = STAGES["dpo"]

    def losses(out: str, precompute: bool) -> list[float]:
        run(build_config(cls, {"model": str(start_model_dir), "data": str(task_data["pref"]),
                               "out_dir": str(tmp_path / out), "steps": 3, "batch_size": 4, "lr": 1e-2,
                               "warmup_steps": 0, "device": "cpu", "progress": False, "precompute_ref": precompute,
                               "precision": "fp32"},
                         where="dpo"))
        return [json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    assert losses("precomputed", True) == pytest.approx(losses("live", False), abs=1e-6)
