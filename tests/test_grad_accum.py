"""Gradient accumulation gives the gradient of one whole-batch step, for every loss and aggregation.

A step's micro-batches carry different weights (tokens for dapo/PPO/SFT, non-empty rows for grpo/dr_grpo,
usable pairs for online DPO); `accumulate_gradients` scales micro-batch i by w_i / sum_j w_j. The rollouts
here have uneven completion lengths, a group whose rewards are all equal (emptied by skip_zero_variance)
and a tied online-DPO pair, which is where a plain `loss / len(batches)` goes wrong.
"""

from __future__ import annotations

import pytest
import torch

from minirlhf.algorithms.experience import Experience
from minirlhf.algorithms.grpo import GRPO, GRPOConfig
from minirlhf.algorithms.online_dpo import OnlineDPO, OnlineDPOConfig
from minirlhf.algorithms.sft import LanguageModeling, LMConfig
from minirlhf.algorithms.spo import SPO, SPOConfig
from minirlhf.data.formats import PromptExample
from minirlhf.train.loop import accumulate_gradients

ROWS, WIDTH, PROMPT = 8, 14, 3
PROMPTS = [PromptExample([{"role": "user", "content": "1+1"}], "2")]


def rollout(vocab: int, seed: int = 0) -> Experience:
    """8 rows (2 groups of 4): prompt of 3 tokens, completions of 1..10 tokens, right padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 10, 4, 7, 2, 9, 5, 3]
    ids = torch.randint(1, vocab, (ROWS, WIDTH), generator=g)
    attention = torch.zeros(ROWS, WIDTH, dtype=torch.long)
    completion = torch.zeros(ROWS, WIDTH, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, :PROMPT + n] = 1
        completion[i, PROMPT:PROMPT + n] = 1
    ids = ids * attention
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0])  # group 0 has no variance
    lengths = torch.tensor(lengths, dtype=torch.float)
    return Experience(ids, attention, completion, rewards, lengths, torch.zeros(ROWS), torch.tensor([0] * 4 + [1] * 4),
                      ref_logps=-torch.rand(ROWS, WIDTH - 1, generator=g) * completion[:, 1:],
                      old_logps=-torch.rand(ROWS, WIDTH - 1, generator=g) * completion[:, 1:])


def with_advantages(algo, rewards: torch.Tensor | None = None) -> Experience:
    """The test rollout (optionally with other rewards) after the method's own advantage step."""
    exp = rollout(algo.policy.config.vocab_size)
    if rewards is not None:
        exp = exp.replace(rewards=rewards)
    return algo.advantages(exp)


def gradients(algo, policy, batches) -> torch.Tensor:
    policy.zero_grad(set_to_none=True)
    accumulate_gradients(algo, batches)
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


def split(exp: Experience, size: int) -> list[Experience]:
    return [exp.select(torch.arange(i, i + size)) for i in range(0, ROWS, size)]


def assert_accumulation_exact(algo, policy, exp, sizes=(1, 2, 4)) -> None:
    whole = gradients(algo, policy, [exp])
    assert whole.abs().max() > 0
    for size in sizes:
        accumulated = gradients(algo, policy, split(exp, size))
        torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=1e-5, msg=f"micro-batches of {size}")


GRPO_CASES = [
    {"loss_type": loss_type, "advantage": advantage, "skip_zero_variance": skip}
    for loss_type in ("grpo", "dapo", "dr_grpo") for advantage in ("grpo", "rloo", "reinforce_pp")
    for skip in (False, True)
] + [  # every other preset that averages over the whole batch (not bnpo: it weighs micro-batches alike by design)
    {"loss_type": loss_type, "advantage": "grpo", "skip_zero_variance": False}
    for loss_type in ("cispo", "sapo", "gspo", "luspo", "vespo")
] + [  # an entropy bonus is averaged like the policy loss, so it accumulates exactly too
    {"loss_type": loss_type, "advantage": "grpo", "skip_zero_variance": False, "entropy_coef": 0.05}
    for loss_type in ("grpo", "dapo")
]


@pytest.mark.parametrize("options", GRPO_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_grpo_accumulated_gradient_equals_the_whole_batch_gradient(options, make_model, tokenizer):
    policy = make_model().train()
    cfg = GRPOConfig(group_size=4, prompts_per_rollout=2, batch_size=ROWS, kl_coef=0.1, max_new_tokens=WIDTH,
                     **options)
    algo = GRPO(policy, None, tokenizer, PROMPTS, None, [], cfg=cfg)
    assert_accumulation_exact(algo, policy, with_advantages(algo))


@pytest.mark.parametrize("correction", ["token", "sequence"])
def test_rollout_correction_keeps_gradient_accumulation_exact(correction, make_model, tokenizer):
    policy = make_model().train()
    cfg = GRPOConfig(group_size=4, prompts_per_rollout=2, batch_size=ROWS, kl_coef=0.1, max_new_tokens=WIDTH,
                     loss_type="dapo", rollout_precision="bf16", rollout_correction=correction,
                     rollout_correction_cap=1.2)
    algo = GRPO(policy, None, tokenizer, PROMPTS, None, [], cfg=cfg)
    exp = with_advantages(algo)
    noise = torch.rand(exp.old_logps.shape, generator=torch.Generator().manual_seed(5)) - 0.5
    exp = exp.replace(sampler_logps=(exp.old_logps + noise) * exp.loss_mask)
    assert_accumulation_exact(algo, policy, exp)
    corrected, _ = algo.loss(exp)
    uncorrected, _ = algo.loss(exp.replace(sampler_logps=None))
    assert corrected.item() != pytest.approx(uncorrected.item(), abs=1e-4)  # the weights are applied


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_spo_accumulated_gradient_equals_the_whole_batch_gradient(entropy_coef, make_model, tokenizer):
    policy = make_model().train()
    cfg = SPOConfig(prompts_per_rollout=8, batch_size=ROWS, kl_coef=0.1, tracker="global", entropy_coef=entropy_coef)
    algo = SPO(policy, None, tokenizer, PROMPTS, None, [], cfg=cfg)
    assert_accumulation_exact(algo, policy, with_advantages(algo))


def test_online_dpo_accumulated_gradient_weights_usable_pairs(make_model, tokenizer):
    policy = make_model().train()
    cfg = OnlineDPOConfig(prompts_per_rollout=4, batch_size=ROWS, beta=0.1, preference="reward")
    algo = OnlineDPO(policy, None, tokenizer, PROMPTS, None, [], pairwise=None, eval_pairs=[], cfg=cfg)
    exp = with_advantages(algo, torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0]))  # the second pair ties
    assert_accumulation_exact(algo, policy, exp, sizes=(2, 4))  # pairs stay together


def test_sft_accumulated_gradient_is_the_token_mean_of_the_whole_batch(make_model):
    policy = make_model().train()
    exp = rollout(policy.config.vocab_size)
    algo = LanguageModeling(policy, None, [([1, 2], [0, 1])], LMConfig(batch_size=ROWS))
    batch = (exp.input_ids, exp.attention_mask, exp.completion_mask)
    whole = gradients(algo, policy, [batch])
    for size in (1, 2, 4):
        parts = [tuple(t[i:i + size] for t in batch) for i in range(0, ROWS, size)]
        torch.testing.assert_close(gradients(algo, policy, parts), whole, atol=1e-6, rtol=1e-5)


def test_the_logged_loss_is_the_whole_batch_loss(make_model, tokenizer):
    policy = make_model().train()
    cfg = GRPOConfig(group_size=4, prompts_per_rollout=2, batch_size=ROWS, loss_type="dapo", max_new_tokens=WIDTH)
    algo = GRPO(policy, None, tokenizer, PROMPTS, None, [], cfg=cfg)
    exp = with_advantages(algo)
    whole = accumulate_gradients(algo, [exp])["loss"]
    assert accumulate_gradients(algo, split(exp, 2))["loss"] == pytest.approx(whole, abs=1e-6)


def test_updates_run_in_train_mode_and_rollouts_in_eval_mode(tmp_path, task_data, start_model_dir, monkeypatch):
    """A rollout puts the policy in eval mode; every update after it must see train mode (dropout on)."""
    from minirlhf.algorithms import online
    from minirlhf.config import build_config
    from minirlhf.stages import STAGES

    modes = {"sample": [], "update": []}
    real_generate, real_loss = online.generate, GRPO.loss

    def spy_generate(policy, *args, **kwargs):
        modes["sample"].append(policy.training)
        return real_generate(policy, *args, **kwargs)

    def spy_loss(self, batch):
        modes["update"].append(self.policy.training)
        return real_loss(self, batch)

    monkeypatch.setattr(online, "generate", spy_generate)
    monkeypatch.setattr(GRPO, "loss", spy_loss)
    cls, run = STAGES["grpo"]
    run(build_config(cls, {"model": str(start_model_dir), "data": str(task_data["rl"]), "out_dir": str(tmp_path),
                           "steps": 3, "prompts_per_rollout": 2, "group_size": 2, "batch_size": 4,
                           "max_new_tokens": 4, "device": "cpu", "progress": False, "beta": 0.0}, where="grpo"))
    assert modes == {"sample": [False] * 3, "update": [True] * 3}


def test_online_dpo_log_probs_are_at_temperature_one(make_model, tokenizer):
    """DPO's implicit reward is about the model itself: sampling at T=0.7 must not rescale its log-probs."""
    from minirlhf.logprobs import completion_logprobs

    policy = make_model()
    cfg = OnlineDPOConfig(prompts_per_rollout=4, batch_size=ROWS, beta=0.1, preference="reward", temperature=0.7)
    algo = OnlineDPO(policy, None, tokenizer, PROMPTS, None, [], pairwise=None, eval_pairs=[], cfg=cfg)
    exp = rollout(policy.config.vocab_size)
    expected, _ = completion_logprobs(policy, exp.input_ids, exp.attention_mask, exp.completion_mask, 1.0)
    torch.testing.assert_close(algo.policy_terms(exp)["logps"], expected)


def test_entropy_bonus_subtracts_the_averaged_entropy_and_trains_on_it(make_model, tokenizer):
    """loss(entropy_coef = c) = loss(0) - c x the entropy averaged like the policy loss, and the bonus has a
    gradient (the entropy is not detached when it is trained on)."""
    from minirlhf.algorithms.policy_gradient import aggregate

    policy = make_model().train()
    losses = {}
    for coef in (0.0, 0.5):
        cfg = GRPOConfig(group_size=4, prompts_per_rollout=2, batch_size=ROWS, kl_coef=0.0, max_new_tokens=WIDTH,
                         entropy_coef=coef)
        algo = GRPO(policy, None, tokenizer, PROMPTS, None, [], cfg=cfg)
        exp = with_advantages(algo)
        losses[coef] = algo.loss(exp)[0]
    terms = algo.policy_terms(exp, entropy_grad=True)
    entropy = aggregate(terms["entropy"], terms["mask"], "sequence_mean")
    assert entropy.requires_grad and entropy.item() > 0
    assert losses[0.5].item() == pytest.approx(losses[0.0].item() - 0.5 * entropy.item(), abs=1e-5)
