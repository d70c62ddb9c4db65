"""The shared-prompt forward is exact: rows that continue the same prompt (a GRPO group, a DPO pair) give the same
log-probs, entropies and gradients as the plain batched forward over whole rows, to float32 rounding. Prompts are
left-padded to a common width with different real lengths, completions right-padded with different lengths, and
the rows of one prompt are not adjacent."""

from __future__ import annotations

import pytest
import torch

from minirlhf.logprobs import completion_logprobs, shares_prompts
from minirlhf.model.minimind import SharedPrompt

WIDTH, OWN = 5, 6


def batch(vocab: int, seed: int = 0):
    """7 rows over 3 prompts (real lengths 5, 3, 1), completions of 1..6 tokens; rows of a prompt interleaved."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths, prompt_of_row = [5, 3, 1], [0, 1, 0, 2, 1, 0, 2]
    own_lengths = [6, 1, 4, 3, 6, 2, 5]
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in prompt_lengths]
    rows = len(prompt_of_row)
    ids = torch.zeros(rows, WIDTH + OWN, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (p, n) in enumerate(zip(prompt_of_row, own_lengths)):
        ids[i, WIDTH - len(prompts[p]):WIDTH] = prompts[p]
        attention[i, WIDTH - len(prompts[p]):WIDTH + n] = 1
        completion[i, WIDTH:WIDTH + n] = 1
        ids[i, WIDTH:WIDTH + n] = torch.randint(3, vocab, (n,), generator=g)
    return ids, attention, completion, torch.tensor(prompt_of_row)


def logprobs_and_grads(model, ids, attention, completion, shared, temperature=0.7):
    model.zero_grad(set_to_none=True)
    logps, mask, entropy = completion_logprobs(model, ids, attention, completion, temperature, return_entropy=True,
                                               entropy_grad=True, shared_prompt=shared)
    weights = torch.linspace(-1.0, 2.0, logps.numel()).view_as(logps)  # every position matters differently
    ((logps * weights).sum() + 0.3 * entropy.sum()).backward()
    return logps.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_logprobs_and_gradients_equal_the_plain_forward(make_model, checkpointing):
    model = make_model(seed=0).train()
    assert shares_prompts(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, attention, completion, prompt_index = batch(model.config.vocab_size)
    plain = logprobs_and_grads(model, ids, attention, completion, None)
    shared_prompt = SharedPrompt.of(prompt_index, WIDTH)
    assert shared_prompt.rows.tolist() == [0, 1, 0, 2, 1, 0, 2] and shared_prompt.first.tolist() == [0, 1, 3]
    shared = logprobs_and_grads(model, ids, attention, completion, shared_prompt)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=1e-5)
    assert plain[0][:, WIDTH - 1:].abs().sum() > 0 and plain[0][:, :WIDTH - 1].abs().sum() == 0
    for name, grad in plain[2].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(shared[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grpo_loss_and_gradients_are_the_same_with_shared_prompts(make_model, tokenizer):
    """The whole GRPO loss (log-probs at the sampling temperature, KL to a reference, entropy bonus) through the
    algorithm's own path, with share_prompts on and off."""
    from minirlhf.algorithms.experience import Experience
    from minirlhf.algorithms.grpo import GRPO, GRPOConfig
    from minirlhf.data.formats import PromptExample

    policy = make_model(seed=0, vocab_size=tokenizer.vocab_size).train()
    ids, attention, completion, prompt_index = batch(policy.config.vocab_size, seed=1)
    order = torch.argsort(prompt_index, stable=True)[:6]  # 3 groups of 2
    ids, attention, completion, prompt_index = ids[order], attention[order], completion[order], prompt_index[order]
    g = torch.Generator().manual_seed(2)
    exp = Experience(ids, attention, completion, torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.2]),
                     completion.sum(1).float(), torch.zeros(6), prompt_index, prompt_width=WIDTH,
                     ref_logps=-torch.rand(6, ids.shape[1] - 1, generator=g) * completion[:, 1:])
    prompts = [PromptExample([{"role": "user", "content": "1+1"}], "2")] * 3
    results = {}
    for share in (False, True):
        cfg = GRPOConfig(group_size=2, prompts_per_rollout=3, batch_size=6, kl_coef=0.1, temperature=0.7,
                         entropy_coef=0.05, share_prompts=share)
        algo = GRPO(policy, None, tokenizer, prompts, None, [], cfg=cfg)
        policy.zero_grad(set_to_none=True)
        loss, metrics = algo.loss(algo.advantages(exp))
        loss.backward()
        results[share] = loss.item(), metrics["entropy"], [p.grad.clone() for p in policy.parameters()]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6) and abs(results[False][0]) > 1e-4
    assert results[True][1] == pytest.approx(results[False][1], abs=1e-5)
    for shared, plain in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)


def test_models_without_the_shared_forward_take_the_plain_path(make_model):
    moe = make_model(seed=0, use_moe=True, num_experts=2, experts_per_token=1)
    assert not shares_prompts(moe) and not shares_prompts(torch.nn.Linear(2, 2))
    ids, attention, completion, prompt_index = batch(moe.config.vocab_size)
    shared = completion_logprobs(moe, ids, attention, completion, shared_prompt=SharedPrompt.of(prompt_index, WIDTH))
    torch.testing.assert_close(shared[0], completion_logprobs(moe, ids, attention, completion)[0])


def test_sampler_prefills_each_distinct_prompt_once_and_samples_the_same(make_model, monkeypatch):
    """A GRPO rollout repeats each prompt G times: the sampler runs each distinct prompt once and copies its
    keys/values into every row's cache slot; the samples and their log-probs are those of the plain prefill."""
    from minirlhf.generation import SamplingConfig, generate, sampler

    model = make_model(seed=0)
    prompts = [[5, 6, 7], [9, 3], [5, 6, 7], [5, 6, 7], [9, 3], [11]]
    calls = []
    real_forward = model.forward

    def counting_forward(input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return real_forward(input_ids, *args, **kwargs)

    def run() -> sampler.Rollout:
        return generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0), eos_id=2, pad_id=0,
                        generator=torch.Generator().manual_seed(3))

    monkeypatch.setattr(model, "forward", counting_forward)
    shared = run()
    assert calls[0] == (3, 3)  # 3 distinct prompts, width 3
    monkeypatch.setattr(sampler, "prefill", lambda model, ids, mask, cache, keys: model(
        ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1])
    calls.clear()
    plain = run()
    assert calls[0] == (6, 3)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)


def test_dpo_pairs_share_their_prompt_with_the_same_loss_and_gradients(make_model, tokenizer):
    """A DPO pair's chosen and rejected rows continue one prompt: laid out as a left-padded prompt plus right-padded
    responses it runs once, with the loss, gradients and reference log-probs of the concatenated forward. A pair
    whose two prompts were cut differently (truncation) sends its batch down the plain path."""
    from minirlhf.algorithms.dpo import DPO, DPOConfig, pair_batch, pair_sequence_logprobs
    from minirlhf.data.pairs import TokenizedPair, collate_pairs, collate_shared_prompts
    from minirlhf.logprobs import sequence_logprobs

    g = torch.Generator().manual_seed(4)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 60, (n,), generator=g).tolist()

    prompts = [ids(6), ids(2), ids(4)]
    pairs = [TokenizedPair(p + ids(c), len(p), p + ids(r), len(p)) for p, c, r in zip(prompts, (3, 5, 1), (4, 2, 6))]
    policy = make_model(seed=0).train()
    with torch.no_grad():
        plain = sequence_logprobs(policy, *collate_pairs(pairs, 0))  # the concatenated forward: (2B,) each
    shared = pair_sequence_logprobs(policy, pairs, pad_id=0)  # the default: shared prompts on a native model
    assert pair_batch(policy, pairs, 0, torch.device("cpu"))[3] is not None
    results = {}
    for share in (False, True):
        cfg = DPOConfig(batch_size=3, beta=0.1, precompute_ref=True, share_prompts=share, precision="fp32")
        algo = DPO(policy, make_model(seed=1), tokenizer, pairs, [], [], cfg)
        batch = algo.micro_batches(0)[0]
        assert (batch[1][3] is not None) == share
        policy.zero_grad(set_to_none=True)
        loss, _ = algo.loss(batch)
        loss.backward()
        results[share] = loss.item(), [p.grad.clone() for p in policy.parameters()], algo.ref_logps
    with torch.no_grad():
        plain_ref = sequence_logprobs(make_model(seed=1), *collate_pairs(pairs, 0))[0].chunk(2)
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-6)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(shared[:2]), plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(shared[2:]), plain[1])
    assert plain[0].abs().min() > 0
    torch.testing.assert_close(results[True][2][0], plain_ref[0], atol=1e-5, rtol=1e-5)
    cut = TokenizedPair(prompts[0][1:] + ids(3), 5, prompts[0] + ids(2), 6)  # the chosen row lost a prompt token
    assert collate_shared_prompts([pairs[0], cut], 0) is None
    assert pair_batch(policy, [pairs[0], cut], 0, torch.device("cpu"))[3] is None


def test_shared_prompt_forward_under_bf16_autocast_stays_close(make_model):
    """Under bf16 autocast (the loop's `precision=bf16`) the packed path runs and agrees with the plain one to bf16
    precision; log-probs stay float32."""
    model = make_model(seed=0)
    ids, attention, completion, prompt_index = batch(model.config.vocab_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = completion_logprobs(model, ids, attention, completion)[0]
        shared = completion_logprobs(model, ids, attention, completion,
                                     shared_prompt=SharedPrompt.of(prompt_index, WIDTH))[0]
    assert shared.dtype == torch.float32
    torch.testing.assert_close(shared, plain, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("materialise", [True, False])
def test_masked_attention_equals_sdpa(monkeypatch, materialise):
    """The shared forward's attention (scores multiplied out below a size, the fused kernel above it) equals SDPA
    with grouped-query heads and a boolean mask that blanks a different set of keys per row, values and gradients."""
    from minirlhf.model import minimind

    monkeypatch.setattr(minimind, "MATERIALISED_SCORES_MAX", 1 << 30 if materialise else 0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(3, 2, 7, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.rand(3, 1, 5, 7, generator=g) > 0.5
    mask[:, :, torch.arange(5), torch.arange(5) + 2] = True  # every query may attend somewhere
    bias = minimind.attention_bias(mask)
    assert torch.equal(bias == 0, mask) and bool(torch.isneginf(bias[~mask]).all())
    out = minimind.masked_attention(q, k, v, bias)
    grads = torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    expected_grads = torch.autograd.grad((expected * expected.detach().sin()).sum(), (q, k, v))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # and against the formula: query head h reads key/value head h // 2
    h = 3
    scores = (q[1, h] @ k[1, h // 2].T) / 8 ** 0.5
    by_hand = scores.masked_fill(~mask[1, 0], float("-inf")).softmax(-1) @ v[1, h // 2]
    torch.testing.assert_close(out[1, h], by_hand, atol=1e-6, rtol=1e-5)
    if materialise:  # the added bias gives the very numbers of masking the scaled scores (x + 0 = x, x - inf = -inf)
        scores = (q.reshape(3, 2, 10, 8) @ k.transpose(-1, -2)).view(3, 2, 2, 5, 7) * 8 ** -0.5
        masked = scores.masked_fill(~mask.unsqueeze(2), float("-inf")).softmax(-1).view(3, 2, 10, 7) @ v
        assert torch.equal(out, masked.view(3, 4, 5, 8))


def test_masked_attention_in_bf16_is_the_formula_to_bf16_rounding():
    """Under bf16 autocast the scores and probabilities stay bf16 (no float32 copy): output and gradients still
    match the float64 formula to bf16 precision, the masked keys get no weight, and the output is bf16."""
    from minirlhf.model.minimind import attention_bias, masked_attention

    g = torch.Generator().manual_seed(1)
    q64 = torch.randn(4, 4, 6, 16, generator=g, dtype=torch.float64)
    k64, v64 = (torch.randn(4, 2, 9, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(4, 1, 6, 9, generator=g) > 0.4
    mask[..., 0] = True
    weights = torch.randn(4, 4, 6, 16, generator=g, dtype=torch.float64)

    def formula(q, k, v):  # query head h reads key/value head h // 2
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        scores = (q @ k.transpose(-1, -2) / 16 ** 0.5).masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ v

    leaves = [t.float().requires_grad_() for t in (q64, k64, v64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_attention(*leaves, attention_bias(mask))
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad((out.double() * weights).sum(), leaves)
    exact = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    want = formula(*exact)
    want_grads = torch.autograd.grad((want * weights).sum(), exact)
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=2e-2)
    for got, expected in zip(grads, want_grads):
        assert ((got.double() - expected).norm() / expected.norm()) < 2e-2
    # a masked key's value cannot leak: changing it leaves the output unchanged
    hidden = (~mask[0, 0, 0]).nonzero()[0, 0]
    v_changed = leaves[2].detach().clone()
    v_changed[0, :, hidden] += 100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = masked_attention(leaves[0].detach(), leaves[1].detach(), v_changed, attention_bias(mask))
    assert torch.equal(again[0, :, 0], out.detach()[0, :, 0])
