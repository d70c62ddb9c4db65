"""The log-prob helper against a hand computation: alignment (logits at t predict ids at t+1), masking of
prompt and padding on both sides, the EOS token counted, temperature, entropy, masked_mean."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minirlhf.logprobs import completion_logprobs, gather_logprobs, masked_mean


def hand_logprob(row: list[float], target: int, temperature: float = 1.0) -> float:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    return scaled[target] - (top + math.log(sum(math.exp(v - top) for v in scaled)))


class FixedLogits(nn.Module):
    """A model stub that returns preset logits (batch, T, V) and records what it was called with."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append((input_ids, attention_mask))
        return SimpleNamespace(logits=self.logits)


PAD, EOS = 0, 2
# Row 0: left-padded, prompt [5, 6, 7], completion [8, 9, EOS].
# Row 1: right-padded, prompt [5, 6], completion [10, 11, 12, EOS], then padding.
IDS = torch.tensor([[PAD, PAD, 5, 6, 7, 8, 9, EOS],
                    [5, 6, 10, 11, 12, EOS, PAD, PAD]])
ATTN = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 1, 0, 0]])
COMPLETION = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1],
                           [0, 0, 1, 1, 1, 1, 0, 0]])


def stub_logits(seed: int = 0, vocab: int = 13) -> torch.Tensor:
    return torch.randn(2, IDS.shape[1], vocab, generator=torch.Generator().manual_seed(seed))


def test_gather_logprobs_matches_hand_log_softmax():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1)) * 3
    targets = torch.randint(0, 6, (2, 4), generator=torch.Generator().manual_seed(2))
    for temperature in (1.0, 0.5, 2.0):
        got = gather_logprobs(logits, targets, temperature)
        assert got.shape == (2, 4) and got.dtype == torch.float32
        for b in range(2):
            for t in range(4):
                expected = hand_logprob(logits[b, t].tolist(), int(targets[b, t]), temperature)
                assert got[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_gather_logprobs_works_in_float32_for_bf16_logits():
    logits = (torch.randn(3, 50, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)
    targets = torch.tensor([0, 7, 49])
    got = gather_logprobs(logits, targets)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_matches_hand_computation_with_padding_on_both_sides(temperature):
    logits = stub_logits()
    model = FixedLogits(logits)
    logps, mask, entropy = completion_logprobs(model, IDS, ATTN, COMPLETION, temperature=temperature,
                                               return_entropy=True)
    assert model.calls[0][1] is ATTN  # the attention mask reaches the model
    assert logps.shape == mask.shape == entropy.shape == (2, IDS.shape[1] - 1)
    assert torch.equal(mask, COMPLETION[:, 1:].float())
    for b in range(2):
        for t in range(IDS.shape[1] - 1):
            if COMPLETION[b, t + 1]:
                # logits at position t predict the token at position t + 1
                expected = hand_logprob(logits[b, t].tolist(), int(IDS[b, t + 1]), temperature)
                assert logps[b, t].item() == pytest.approx(expected, abs=1e-5)
                probs = [math.exp(hand_logprob(logits[b, t].tolist(), v, temperature)) for v in range(13)]
                expected_entropy = -sum(p * math.log(p) for p in probs)
                assert entropy[b, t].item() == pytest.approx(expected_entropy, abs=1e-5)
            else:
                assert logps[b, t].item() == 0.0 and entropy[b, t].item() == 0.0


def test_mask_excludes_prompt_and_padding_and_includes_eos():
    logps, mask = completion_logprobs(FixedLogits(stub_logits(4)), IDS, ATTN, COMPLETION)
    targets = IDS[:, 1:]
    counted = [targets[b][mask[b].bool()].tolist() for b in range(2)]
    assert counted == [[8, 9, EOS], [10, 11, 12, EOS]]  # completion tokens, EOS included, nothing else
    # Every token that is not counted (prompt or padding) has a log-prob of exactly 0.
    assert torch.all(logps[mask == 0] == 0)
    assert torch.all(logps[mask == 1] < 0)
    # Sequence log-prob = sum over the completion only.
    seq = logps.sum(1)
    logits = stub_logits(4)
    for b in range(2):
        expected = sum(hand_logprob(logits[b, t].tolist(), int(IDS[b, t + 1]))
                       for t in range(IDS.shape[1] - 1) if COMPLETION[b, t + 1])
        assert seq[b].item() == pytest.approx(expected, abs=1e-5)


def test_alignment_logits_at_t_predict_token_at_t_plus_1():
    # Logits that put almost all mass on the NEXT token: an off-by-one gather would see ~log(1e-9).
    vocab = 13
    logits = torch.full((2, IDS.shape[1], vocab), -20.0)
    for b in range(2):
        for t in range(IDS.shape[1] - 1):
            logits[b, t, IDS[b, t + 1]] = 20.0
    logps, mask = completion_logprobs(FixedLogits(logits), IDS, ATTN, COMPLETION)
    assert logps[mask.bool()].min().item() > -1e-6
    shifted = logits.roll(1, dims=1)  # logits at t predicting the token at t: badly misaligned
    logps_bad, _ = completion_logprobs(FixedLogits(shifted), IDS, ATTN, COMPLETION)
    assert logps_bad[mask.bool()].max().item() < -30


def test_completion_logprobs_of_a_real_model_do_not_depend_on_padding(make_model):
    model = make_model(seed=5)
    prompt, completion = [5, 6, 7], [8, 9, EOS]
    alone_ids = torch.tensor([prompt + completion])
    alone_cmask = torch.tensor([[0] * 3 + [1] * 3])
    with torch.no_grad():
        alone, _ = completion_logprobs(model, alone_ids, torch.ones_like(alone_ids), alone_cmask, temperature=0.8)
        padded, mask = completion_logprobs(model, IDS, ATTN, COMPLETION, temperature=0.8)
    # Row 0 of IDS is the same sequence with two left pads.
    torch.testing.assert_close(padded[0, 2:], alone[0], atol=1e-5, rtol=0)
    assert torch.equal(mask[0, 2:], alone_cmask[0, 1:].float())


def test_masked_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 20 + 30 + 40) / 5)
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 30.0, 0.0]))
    torch.testing.assert_close(masked_mean(values, mask, dim=0),
                               torch.tensor([1.0, 11.0, 30.0, 40.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0  # nothing masked in: 0, not NaN
    # Masked-out values never leak in, however large.
    poisoned = values.clone()
    poisoned[mask == 0] = 1e30
    assert masked_mean(poisoned, mask).item() == pytest.approx((1 + 2 + 20 + 30 + 40) / 5)
