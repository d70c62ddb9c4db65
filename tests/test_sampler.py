"""The KV-cache sampler: seeding, greedy == step-by-step argmax, per-row EOS handling, log-probs equal to a
recomputation by `completion_logprobs`, top-k / top-p filtering, and prompts of different lengths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minirlhf.generation import Rollout, SamplingConfig, filter_logits, generate, left_pad
from minirlhf.logprobs import completion_logprobs

PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


def sample(model, prompts=PROMPTS, seed=0, **sampling) -> Rollout:
    generator = torch.Generator().manual_seed(seed)
    return generate(model, prompts, SamplingConfig(**sampling), eos_id=EOS, pad_id=PAD, generator=generator)


class EosBias(nn.Module):
    """Adds `bias` to the EOS logit everywhere: a pure function of the input, so a full forward agrees."""

    def __init__(self, inner: nn.Module, bias: float) -> None:
        super().__init__()
        self.inner, self.bias = inner, bias

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids, **kwargs)
        out.logits = out.logits.clone()
        out.logits[..., EOS] += self.bias
        return out

    def new_cache(self, batch_size, max_len):
        return self.inner.new_cache(batch_size, max_len)


class ForceEos(nn.Module):
    """Row i emits EOS at completion index `eos_at[i]` (None: never); other tokens are sampled as usual."""

    def __init__(self, inner: nn.Module, eos_at: list[int | None]) -> None:
        super().__init__()
        self.inner, self.eos_at, self.calls = inner, eos_at, 0

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids, **kwargs)
        logits = out.logits.clone()
        step = self.calls  # call 0 is the prefill, whose last logits pick completion token 0
        self.calls += 1
        for row, at in enumerate(self.eos_at):
            if at is not None and step >= at:
                logits[row, -1] = -1e4
                logits[row, -1, EOS] = 0.0
            else:
                logits[row, -1, EOS] = -1e4
        out.logits = logits
        return out

    def new_cache(self, batch_size, max_len):
        return self.inner.new_cache(batch_size, max_len)


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_same_seed_same_samples_and_different_seed_different(make_model):
    model = make_model(seed=1)
    a = sample(model, seed=3, max_new_tokens=12, temperature=1.0)
    b = sample(model, seed=3, max_new_tokens=12, temperature=1.0)
    c = sample(model, seed=4, max_new_tokens=12, temperature=1.0)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert a.completions() != c.completions()


def test_temperature_zero_is_greedy_step_by_step_argmax(make_model):
    model = make_model(seed=2)
    rollout = sample(model, max_new_tokens=8, temperature=0.0)
    for row, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        expected_tokens, expected_logps = [], []
        for _ in range(8):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1]
            token = int(logits.argmax())
            expected_tokens.append(token)
            expected_logps.append(float(torch.log_softmax(logits, -1)[token]))
            seq.append(token)
            if token == EOS:
                break
        assert rollout.completions()[row] == expected_tokens
        n = len(expected_tokens)
        torch.testing.assert_close(rollout.logprobs[row, :n], torch.tensor(expected_logps), atol=1e-5, rtol=0)


def test_eos_ends_each_row_independently(make_model):
    model = ForceEos(make_model(seed=3), eos_at=[3, 5, None])
    rollout = sample(model, max_new_tokens=10, temperature=1.0)
    assert rollout.completion_mask.tolist() == [[1] * 4 + [0] * 6, [1] * 6 + [0] * 4, [1] * 10]
    ids = rollout.completion_ids
    assert ids[0, 3] == EOS and ids[1, 5] == EOS  # EOS itself is kept, with mask 1
    assert torch.all(ids[0, 4:] == PAD) and torch.all(ids[1, 6:] == PAD)  # after EOS: padding
    assert EOS not in ids[2].tolist() and EOS not in ids[0, :3].tolist()
    assert torch.all(rollout.logprobs[rollout.completion_mask == 0] == 0)
    assert torch.all(rollout.logprobs[rollout.completion_mask == 1] <= 0)
    assert rollout.logprobs[0, 3].item() == pytest.approx(0.0, abs=1e-6)  # forced EOS had probability 1
    assert [len(c) for c in rollout.completions()] == [4, 6, 10]
    assert rollout.completions()[0][-1] == EOS


def test_completions_are_trimmed_when_every_row_stops_early(make_model):
    model = ForceEos(make_model(seed=3), eos_at=[1, 2, 0])
    rollout = sample(model, max_new_tokens=64, temperature=1.0)
    assert rollout.completion_ids.shape == (3, 3)  # width = longest completion, not max_new_tokens
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert model.calls <= 9  # stops feeding the batch soon after every row has finished


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7),
                                      dict(temperature=1.3, top_k=10, top_p=0.9)],
                         ids=["t1", "t0.7", "t1.3-topk-topp"])
def test_sampler_logprobs_equal_recomputed_logprobs(make_model, sampling):
    # An EOS bias makes rows stop at different lengths, so padding after EOS is exercised too.
    model = EosBias(make_model(seed=4), bias=3.0)
    rollout = sample(model, seed=5, max_new_tokens=12, **sampling)
    lengths = rollout.completion_mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and min(lengths) < 12, lengths
    with torch.no_grad():
        logps, mask = completion_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                          rollout.full_completion_mask, temperature=sampling["temperature"])
    p = rollout.prompt_ids.shape[1]
    assert torch.equal(mask[:, p - 1:], rollout.completion_mask.float())
    torch.testing.assert_close(logps[:, p - 1:], rollout.logprobs, atol=1e-5, rtol=0)
    assert torch.all(logps[:, :p - 1] == 0)


def test_prompts_of_different_lengths_generate_as_if_alone(make_model):
    model = make_model(seed=6)
    batch = sample(model, max_new_tokens=10, temperature=0.0)
    assert batch.prompt_ids.shape == (3, 7)
    assert batch.prompt_mask.tolist() == [[1] * 7, [0] * 4 + [1] * 3, [0] * 2 + [1] * 5]
    for row, prompt in enumerate(PROMPTS):
        alone = sample(model, prompts=[prompt], max_new_tokens=10, temperature=0.0)
        assert batch.completions()[row] == alone.completions()[0]
        n = len(alone.completions()[0])
        torch.testing.assert_close(batch.logprobs[row, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)


def test_filter_logits_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, -1.0, 4.0, 6.0]])
    inf = float("-inf")
    assert filter_logits(logits, top_k=2).tolist() == [[inf, 3.0, 2.0, inf], [5.0, inf, inf, 6.0]]
    assert filter_logits(logits, top_k=1).tolist() == [[inf, 3.0, inf, inf], [inf, inf, inf, 6.0]]
    assert torch.equal(filter_logits(logits, top_k=0), logits)  # off
    assert torch.equal(filter_logits(logits, top_k=4), logits)  # k = vocab: nothing to drop


def test_filter_logits_top_p_by_hand():
    probs = torch.tensor([[0.10, 0.50, 0.15, 0.25]])
    logits = probs.log()
    inf = float("-inf")
    # Sorted: 0.50 (cum before 0), 0.25 (0.50), 0.15 (0.75), 0.10 (0.90). Keep while cum-before < p.
    kept = {p: [i for i, v in enumerate(filter_logits(logits, top_p=p)[0].tolist()) if v != inf]
            for p in (0.3, 0.7, 0.8, 0.95)}
    assert kept == {0.3: [1], 0.7: [1, 3], 0.8: [1, 2, 3], 0.95: [0, 1, 2, 3]}
    out = filter_logits(logits, top_p=0.7)[0]
    assert out[1].item() == pytest.approx(math.log(0.5)) and out[3].item() == pytest.approx(math.log(0.25))
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)  # off
    # Rows are filtered independently.
    two = torch.stack([logits[0], logits[0].flip(0)])
    out2 = filter_logits(two, top_p=0.7)
    assert [(r != inf).nonzero().flatten().tolist() for r in out2] == [[1, 3], [0, 2]]
    # top-k then top-p: top_k=3 keeps 0.50/0.25/0.15; renormalised 0.5/0.9 = 0.56 > 0.5, so top_p=0.5 keeps one.
    both = filter_logits(logits, top_k=3, top_p=0.5)[0]
    assert [i for i, v in enumerate(both.tolist()) if v != inf] == [1]


def test_top_k_sampling_only_emits_top_k_tokens(make_model):
    model = make_model(seed=7)
    prompt = [[5, 6, 7]]
    with torch.no_grad():
        first_logits = model(torch.tensor(prompt)).logits[0, -1]
    allowed = set(first_logits.topk(3).indices.tolist())
    firsts = {sample(model, prompts=prompt, seed=s, max_new_tokens=1, temperature=1.5, top_k=3).completions()[0][0]
              for s in range(30)}
    assert firsts <= allowed and len(firsts) >= 2


def test_greedy_logprobs_recompute_with_temperature_zero(make_model):
    model = make_model(seed=8)
    rollout = sample(model, max_new_tokens=6, temperature=0.0)
    with torch.no_grad():
        logps, _ = completion_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                       rollout.full_completion_mask, temperature=0.0)
    p = rollout.prompt_ids.shape[1]
    torch.testing.assert_close(logps[:, p - 1:], rollout.logprobs, atol=1e-5, rtol=0)


def test_inverse_cdf_samples_the_categorical_and_ignores_how_rows_are_split():
    from minirlhf.generation.sampler import sample_tokens

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(20_000, 4)
    counts = torch.bincount(sample_tokens(probs, torch.Generator().manual_seed(0)), minlength=4).float() / 20_000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015, rtol=0)  # ~3 sigma
    batch = torch.rand(6, 9, generator=torch.Generator().manual_seed(1)).softmax(-1)
    whole = sample_tokens(batch, torch.Generator().manual_seed(2))
    halves = [sample_tokens(batch[i:i + 3], torch.Generator().manual_seed(2), rows=(i, 6)) for i in (0, 3)]
    assert torch.equal(torch.cat(halves), whole)


def test_inverse_cdf_never_returns_a_token_without_mass_when_u_times_mass_rounds_up(monkeypatch):
    from minirlhf.generation import sampler

    monkeypatch.setattr(sampler.torch, "rand", lambda shape, **kw: torch.ones(shape))  # u = 1: past the mass
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0, 0.8]])
    assert sampler.sample_tokens(probs, None).tolist() == [2, 4]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_decode_step_equals_the_model_forward_with_the_same_cache(make_model, padded, fixed_shapes):
    """The sampler's fused, packed decode step (q/k/v and gate/up as one matrix each with the norms' weights folded
    in, RoPE as a complex product, attention as two products) gives the model's own next-token logits and fills
    the cache with the same keys (in pair order) and values; so does its fixed-shape form (what a CUDA graph
    captures: every cache slot attended, the unwritten ones masked)."""
    from minirlhf.generation import decode
    from minirlhf.model.minimind import RMSNorm

    model = make_model(seed=3)
    with torch.no_grad():  # norm weights other than 1, so that folding them into the matrices is checked
        for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
            norm.weight.uniform_(0.5, 1.5)
    prompts = PROMPTS if padded else [p[:3] for p in PROMPTS]
    ids, mask = left_pad(prompts, PAD)
    batch, width = ids.shape
    caches = [model.new_cache(batch, width + 4) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    weights = decode.DecodeWeights(model, batch)
    weights.to_pair_order(caches[1])
    full_mask = torch.cat([mask, torch.ones(batch, 4, dtype=mask.dtype)], 1)
    key_bias = torch.zeros(full_mask.shape).masked_fill(full_mask == 0, float("-inf"))
    positions = mask.sum(1) - 1
    token = torch.tensor([21, 22, 23])
    for t in range(3):
        positions = positions + 1
        with torch.no_grad():
            expected = model(token[:, None], attention_mask=full_mask[:, :width + t + 1],
                             position_ids=positions[:, None], cache=caches[0], logits_to_keep=1).logits[:, -1]
        slot = torch.tensor([caches[1].length]) if fixed_shapes else None
        got = decode.decode_step(weights, token, positions, caches[1], key_bias, slot)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        token = got.argmax(-1)
    assert caches[1].length == caches[0].length
    for a, b in zip(caches[0].keys, caches[1].keys):  # the decode step's keys are in pair order
        torch.testing.assert_close(a[..., weights.key_order], b, atol=1e-5, rtol=1e-5)
    for a, b in zip(caches[0].values, caches[1].values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_native_models_decode_through_the_fused_step_and_others_through_their_forward(make_model, monkeypatch):
    from minirlhf.generation import decode

    model = make_model(seed=4)
    calls = []
    real_step = decode.decode_step
    monkeypatch.setattr(decode, "decode_step", lambda *a: calls.append(1) or real_step(*a))
    fused = sample(model, max_new_tokens=5, temperature=0.0)
    assert len(calls) == 4  # every step after the prefill
    plain = sample(EosBias(model, 0.0), max_new_tokens=5, temperature=0.0)  # a wrapper: its own forward
    assert len(calls) == 4
    assert torch.equal(fused.completion_ids, plain.completion_ids)
    torch.testing.assert_close(fused.logprobs, plain.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wrapped", [False, True], ids=["fused-step", "model-forward"])
def test_bf16_sampler_logprobs_are_its_own_and_close_to_the_fp32_trainers(make_model, wrapped):
    """The fused decode step (native model) multiplies by bf16 copies of the weights; a wrapped model decodes
    through its forward under autocast. Either way the returned log-probs are not the fp32 ones, but close."""
    model = make_model(seed=5)
    sampler = EosBias(model, 0.0) if wrapped else model
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    rollout = generate(sampler, PROMPTS + [[20, 21]], sampling, EOS, PAD, torch.Generator().manual_seed(0),
                       dtype=torch.bfloat16)
    with torch.no_grad():
        trainer, _ = completion_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                            rollout.full_completion_mask)
    p = rollout.prompt_ids.shape[1]
    gap = (trainer[:, p - 1:] - rollout.logprobs)[rollout.completion_mask.bool()]
    assert gap.abs().max() > 0  # bf16 numerics, not the trainer's
    assert gap.abs().mean() < 0.02 and gap.abs().max() < 0.2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched
