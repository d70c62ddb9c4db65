"""The shared machinery of online RL: prompts -> rollouts -> rewards -> a buffer of experience that the
method turns into advantages and then into several optimizer steps.

One rollout serves `updates_per_rollout = epochs x mini-batches` optimizer steps, so optimizer step s
belongs to rollout s // updates_per_rollout. Generation uses the KV-cache sampler with a generator seeded
by (seed, rollout), old and reference log-probs come from batched no-grad passes (old log-probs are
skipped when each rollout gets a single update: then π_old = π exactly), and the buffer is part of the
checkpoint, so `resume` continues exactly even mid-rollout.

One GRPO step reads top to bottom: `make_experience` = `sample_rows` (sample, score, log-probs: an
`Experience`) -> `complete_rollout` (GRPO's dynamic sampling draws more) -> `advantages` (the method's
targets) ; then `micro_batches` slices it and `loss` turns a slice into a loss. Each hook returns a new
`Experience` (its metrics in `stats`, logged with every step the rollout serves) rather than mutating one.
A method subclasses `OnlineRL` and implements `advantages(exp)` and `loss(batch)`; it may override
`select_prompts` (SPO's prioritised sampling), `complete_rollout` and `score`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..config import field
from ..data.batching import ExampleOrder
from ..data.formats import PromptExample, load_prompts
from ..errors import SetupError
from ..eval import task_metrics
from ..generation import SamplingConfig, decode, generate
from ..logprobs import completion_logprobs, masked_mean
from ..model import frozen_reference, load_policy, load_scalar_model
from ..rewards import RewardModelReward, WeightedSum, build_reward
from ..rewards.base import overlong_penalty
from ..rewards.judge import HTTPJudgeBackend, JudgeBackend, LocalJudgeBackend, PointwiseJudge
from ..tokenizer import Tokenizer
from ..train import distributed
from ..train.loop import Algorithm, TrainConfig, evaluated, training_autocast
from ..train.reference import ReferenceSyncConfig, check_reference_sync, sync_reference
from ..train.start import load_start
from .experience import Experience
from .policy_gradient import adaptive_entropy_coef, kl_estimate, rollout_correction_weights


@dataclass
class OnlineConfig(ReferenceSyncConfig, TrainConfig):
    """Options shared by every online method. `batch_size` x `grad_accum` sequences make one optimizer step."""

    model: str = field("", "policy dir to start from (usually the SFT model)")
    ref_model: str = field("", "reference policy dir for the KL term; empty = the starting policy")
    tokenizer: str = field("", "tokenizer dir; empty = the one saved with `model`")
    data: str = field("", "prompt JSONL: {prompt, answer?}")
    prompt_field: str = field("prompt", "field holding the prompt (e.g. `question` for GSM8K)")
    answer_field: str = field("answer", "field holding the reference answer, if any")
    eval_data: str = field("", "held-out prompt JSONL with answers (greedy task accuracy)")
    eval_samples: int = field(200, "held-out prompts to evaluate", min=1)
    reward: str = field("answer:1,format:0.1", "weighted rewards: answer, format, working, rm, judge (name:weight,...)")
    reward_model: str = field("", "reward model dir, for the `rm` reward")
    judge_model: str = field("", "judge model dir (local backend), for the `judge` reward")
    judge_url: str = field("", "OpenAI-compatible judge URL, e.g. http://127.0.0.1:8000/v1 (wins over judge_model)")
    judge_name: str = field("judge", "model name sent to the judge endpoint")
    judge_api_key_env: str = field("OPENAI_API_KEY", "environment variable holding the judge endpoint's API key")
    judge_fallback: float = field(0.0, "reward when the judge's reply is unparsable or the call fails (counted)")
    judge_reference: bool = field(False, "quote each prompt's reference answer in the judge prompt "
                                         "(reference-guided grading)")
    reward_clip: float = field(10.0, "rewards are clipped to [-reward_clip, reward_clip]", gt=0)
    unusable_reward_warning: float = field(0.2, "warn when more than this share of a rollout's samples get no usable "
                                                "reward (judge failures, non-finite scores); none usable is an error",
                                           min=0, max=1)
    prompts_per_rollout: int = field(16, "prompts sampled per rollout", min=1)
    epochs_per_rollout: int = field(1, "passes over each rollout's experience (μ in GRPO, PPO epochs)", min=1)
    max_prompt_len: int = field(192, "longer prompts keep their last max_prompt_len tokens (counted)", min=1)
    max_new_tokens: int = field(48, "completion budget", min=1)
    temperature: float = field(1.0, "sampling temperature (also used when recomputing log-probs)", gt=0)
    top_k: int = field(0, "top-k sampling (0 = off)", min=0)
    top_p: float = field(1.0, "nucleus sampling (1 = off)", gt=0)
    mask_truncated_completions: bool = field(False, "completions that hit max_new_tokens without EOS get no loss "
                                                    "(DAPO); their rewards still count in group baselines")
    overlong_buffer: int = field(0, "DAPO soft overlong punishment: the reward falls linearly over the last N tokens "
                                    "of max_new_tokens (0 = off)", min=0)
    overlong_penalty: float = field(1.0, "the reward lost by a completion of max_new_tokens tokens", min=0)
    share_prompts: bool = field(True, "train on each prompt once per group: completions of one prompt attend to its "
                                      "keys/values, computed once (native dense models; exact, only faster)")
    max_new_tokens_eval: int = field(48, "generation budget for held-out accuracy", min=1)
    rollout_precision: Literal["auto", "fp32", "bf16"] = field(
        "auto", "the native sampler's weight matrices: bf16 reads half the bytes per token and samples from a "
                "slightly different distribution than the fp32 trainer's (policy-gradient methods correct for it: "
                "rollout_correction; `sampler_kl` logs the gap); auto = bf16 where the hardware has it (AVX512-BF16 "
                "/ AMX CPUs, bf16 GPUs), else fp32")
    generation_backend: Literal["native", "vllm"] = field(
        "native", "rollouts from our KV-cache sampler, or from vLLM (CUDA + `pip install vllm`), weights synced")
    vllm_gpu_memory: float = field(0.3, "share of GPU memory vLLM may take for weights and KV cache", gt=0)


    def needs_reference(self) -> bool:
        """Whether the method uses the reference policy (a frozen copy is loaded only if so)."""
        return True


@dataclass
class PolicyGradientConfig(OnlineConfig):
    """Options of the policy-gradient methods (PPO, GRPO and its variants, SPO, RLAIF)."""

    kl_coef: float = field(0.04, "weight of the KL to the reference (0 = no reference model is loaded)", min=0,
                           alias="beta")
    clip_eps_low: float = field(0.2, "ε_low: ratio clipped below at 1 - ε_low", gt=0)
    clip_eps_high: float = field(0.2, "ε_high: ratio clipped above at 1 + ε_high (DAPO clip-higher: 0.28)", gt=0)
    clip_delta: float | None = field(None, "two-sided clipping: the unclipped ratio is capped at δ too (INTELLECT-2; "
                                           "use > 1 + clip_eps_high)", gt=1)
    entropy_coef: float = field(0.0, "entropy bonus: subtract this x the completion tokens' entropy (averaged like "
                                     "the policy loss) from the loss, to keep exploring", min=0)
    entropy_target: float | None = field(None, "adaptive entropy control (Skywork-OR1): the bonus applies only after "
                                               "a step whose mean entropy is at or below this, and entropy_coef "
                                               "moves by entropy_coef_delta each step; empty = a fixed bonus", min=0)
    entropy_coef_delta: float = field(0.005, "adaptive entropy control: the coefficient's step", min=0)
    entropy_coef_min: float = field(0.0, "adaptive entropy control: the coefficient's floor", min=0)
    entropy_coef_max: float = field(1.0, "adaptive entropy control: the coefficient's ceiling", min=0)
    rollout_correction: Literal["token", "sequence", "off"] = field(
        "token", "with rollout_precision=bf16: truncated importance sampling, each token's policy loss weighted by "
                 "min(π_train / π_sampler, cap) per token or with its sequence's product (TRL's "
                 "vllm_importance_sampling_correction, *_truncate)")
    rollout_correction_cap: float = field(3.0, "the truncation cap of rollout_correction's weight", gt=0)

    def needs_reference(self) -> bool:
        return self.kl_coef > 0


class EntropyBonus:
    """The entropy bonus of a policy-gradient run: a fixed `entropy_coef`, or with `entropy_target` a coefficient
    adapted after every optimizer step (applied only while the entropy is at or below the target)."""

    def __init__(self, cfg: PolicyGradientConfig) -> None:
        self.cfg, self.coef, self.applied = cfg, cfg.entropy_coef, cfg.entropy_coef

    @property
    def trains_entropy(self) -> bool:
        """Whether the loss needs the entropy's gradient (a bonus now, or one that may start)."""
        return self.applied > 0 or self.cfg.entropy_target is not None

    def after_step(self, entropy: float) -> dict[str, float]:
        cfg = self.cfg
        if cfg.entropy_target is None:
            return {}
        self.coef = adaptive_entropy_coef(self.coef, entropy, cfg.entropy_target, cfg.entropy_coef_delta,
                                          cfg.entropy_coef_min, cfg.entropy_coef_max)
        self.applied = self.coef if entropy <= cfg.entropy_target else 0.0
        return {"entropy_coef": self.applied}

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef, "applied": self.applied}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.applied = state["coef"], state["applied"]


class RewardSignalError(SetupError):
    """A whole rollout without one usable reward: training on it would teach nothing (e.g. the judge is down)."""


def check_reward_signal(reports: list[dict[str, float]], rows: int, nonfinite: float, rollout: int,
                        warn_share: float) -> None:
    """Count the samples of a rollout that got no usable reward (a non-finite score, or a judge request that
    failed or replied unparsably and so got `judge_fallback`) from the reward functions' `reports` (one per
    function, WeightedSum.reports); warn on stderr above `warn_share` and raise RewardSignalError when none is
    usable. Judge failures spoil the whole reward only when judges are all it has."""
    judges = [r for r in reports if "judge/backend_errors" in r]
    errors = sum(r["judge/backend_errors"] for r in judges)
    unparsable = sum(r["judge/parse_failures"] for r in judges)
    judge_failed = min(float(rows), errors + unparsable)
    unusable = max(nonfinite, judge_failed if judges and len(judges) == len(reports) else 0.0)
    if rows and unusable >= rows:
        raise RewardSignalError(f"rollout {rollout}: none of its {rows} samples got a usable reward ({errors:.0f} "
                                f"judge requests failed, {unparsable:.0f} judge replies unparsable, {nonfinite:.0f} "
                                "non-finite scores); check judge_url / judge_model and the reward")
    share = max(nonfinite, judge_failed) / rows if rows else 0.0
    if share > warn_share:
        print(f"warning: rollout {rollout}: {share:.0%} of the samples got no usable "
              f"reward ({errors:.0f} judge requests failed, {unparsable:.0f} replies unparsable, {nonfinite:.0f} "
              "non-finite scores)", file=sys.stderr)


class OnlineRL(Algorithm):
    samples_per_prompt = 1
    rows_per_prompt: int | None = None  # rows kept for training per prompt (None: all samples; online DPO: 2)
    shuffle_rows = True  # False keeps consecutive rows together in mini-batches (online DPO's pairs)
    needs_old_logps = False  # True: old log-probs even with one update per rollout (PPO's KL penalty)
    # Policy-gradient ratios compare the sampling distribution, so log-probs use the sampling temperature
    # (as TRL's GRPOTrainer); a method whose loss is about the model itself (DPO) sets this to False: T = 1.
    logprobs_at_sampling_temperature = True
    experience_type: type[Experience] = Experience  # what `advantages` returns (PPO and online DPO extend it)

    def __init__(self, policy, reference, tokenizer: Tokenizer, prompts: list[PromptExample], reward,
                 eval_prompts: list[PromptExample], cfg: OnlineConfig) -> None:
        self.policy, self.reference, self.tokenizer, self.cfg = policy, reference, tokenizer, cfg
        check_reference_sync(cfg, reference, type(self).__name__.lower())
        self.prompts, self.reward, self.eval_prompts = prompts, reward, eval_prompts
        self.modules = {"policy": policy}
        self.device = next(policy.parameters()).device
        self.prompt_ids = [self._encode(p) for p in prompts]
        self.prompt_order = ExampleOrder(len(prompts), cfg.seed)
        self.sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
        self.rollout_dtype = torch.bfloat16 if decode.bf16_chosen(cfg.rollout_precision, self.device.type) \
            else torch.float32
        rollout_size = cfg.prompts_per_rollout * (self.rows_per_prompt or self.samples_per_prompt)
        world = distributed.world_size()
        mini_batch = cfg.batch_size * cfg.grad_accum * world
        if rollout_size % mini_batch:
            raise ValueError(f"prompts_per_rollout x rows per prompt ({rollout_size}) must be a multiple of "
                             f"batch_size x grad_accum x processes ({mini_batch})")
        if cfg.parallel == "fsdp" and world > 1:
            raise ValueError("online RL samples different rows on each rank, which FSDP's per-layer gathers cannot "
                             "follow yet; use parallel=ddp (optionally with LoRA or gradient_checkpointing)")
        if cfg.prompts_per_rollout % world:
            raise ValueError(f"prompts_per_rollout ({cfg.prompts_per_rollout}) must divide by the {world} processes")
        self.minibatches_per_epoch = rollout_size // mini_batch
        self.updates_per_rollout = self.minibatches_per_epoch * cfg.epochs_per_rollout
        self.experience: Experience | None = None  # the current rollout's
        self.vllm = None  # started on the first rollout when generation_backend is vllm
        self.rollout_index = -1
        self.recent: list[dict[str, float]] = []  # reward and KL of the last steps, for `evaluate`
        self.prompt_width: int | None = None  # None: each rollout's own longest prompt
        self.entropy_bonus = EntropyBonus(cfg) if isinstance(cfg, PolicyGradientConfig) else None

    def _encode(self, example: PromptExample) -> list[int]:
        ids = self.tokenizer.encode_prompt(example.prompt)
        return ids[-self.cfg.max_prompt_len:]

    # --- rollouts --------------------------------------------------------------------------------------
    def select_prompts(self, rollout: int) -> list[int]:
        n = self.cfg.prompts_per_rollout
        return self.prompt_order.take(rollout * n, n)

    def _logprobs(self, model, exp: Experience, with_entropy: bool = False, entropy_grad: bool = False):
        temperature = self.cfg.temperature if self.logprobs_at_sampling_temperature else 1.0
        return completion_logprobs(model, exp.input_ids, exp.attention_mask, exp.completion_mask, temperature,
                                   return_entropy=with_entropy, entropy_grad=entropy_grad,
                                   shared_prompt=exp.shared_prompt() if self.cfg.share_prompts else None)

    @torch.no_grad()
    def make_experience(self, rollout: int) -> Experience:
        """Sample and score the rollout's prompts (`sample_rows`), let the method complete the rollout (GRPO's
        dynamic sampling draws more prompts), then the method's advantages; stats ride along in `exp.stats`."""
        exp = self.sample_rows(self.select_prompts(rollout), rollout)
        exp = self.complete_rollout(exp, rollout)
        exp = exp.replace(stats={**self.reward_stats(exp.rewards), **exp.stats,  # every sample, before the
                                 "completion_len": float(exp.lengths.mean()),     # method keeps some rows
                                 "truncated": float(exp.truncated.mean())})
        # value estimates (PPO) and log-probs (SPO) in the precision the loss's forward computes them in
        with training_autocast(self.cfg, self.device.type):
            return self.advantages(exp)

    @torch.no_grad()
    def sample_rows(self, prompt_indices: list[int], rollout: int, attempt: int = 0) -> Experience:
        """`samples_per_prompt` completions of each prompt, scored, with their masks and old/reference log-probs
        from batched no-grad passes, and the reward stats. Attempt a > 0 of a rollout draws other noise.

        Data parallel: each process samples and scores its contiguous slice of the rows (whole prompts, so
        whole GRPO groups) with the global batch's noise and prompt width, then the rows are gathered: every
        process holds the same global buffer and computes the same advantages, as one process would."""
        all_rows = [i for i in prompt_indices for _ in range(self.samples_per_prompt)]
        rows = distributed.shard(all_rows, "rollout rows")
        self.policy.eval()
        offset = distributed.rank() * len(rows)
        width = self.prompt_width or max(len(self.prompt_ids[i]) for i in all_rows)
        noise_seed = self.cfg.seed * 1_000_003 + rollout + attempt * 7_919_031_103
        if self.cfg.generation_backend == "vllm":
            out = self._vllm_rollout(noise_seed, rows, offset, width)
        else:
            generator = torch.Generator(device=self.device).manual_seed(noise_seed)
            out = generate(self.policy, [self.prompt_ids[i] for i in rows], self.sampling, self.tokenizer.eos_id,
                           self.tokenizer.pad_id, generator, rows=(offset, len(all_rows)), prompt_width=width,
                           dtype=self.rollout_dtype)
        texts = self.tokenizer.batch_decode(out.completions())
        rewards, parts, reports = self.score([self.prompts[i] for i in rows], texts)
        rewards = rewards.float().to(self.device)
        nonfinite = float((~torch.isfinite(rewards)).sum())  # NaN counts as 0, ±inf as ±reward_clip
        check_reward_signal(reports, len(rows), nonfinite, rollout, self.cfg.unusable_reward_warning)
        rewards = rewards.nan_to_num(0.0).clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        lengths = out.completion_mask.sum(1)
        if self.cfg.overlong_buffer:
            rewards = rewards + overlong_penalty(lengths, self.cfg.max_new_tokens, self.cfg.overlong_buffer,
                                                 self.cfg.overlong_penalty)
        truncated = ~((out.completion_ids == self.tokenizer.eos_id) & out.completion_mask.bool()).any(1)
        completion_mask = out.full_completion_mask
        if self.cfg.mask_truncated_completions:
            completion_mask = completion_mask * ~truncated[:, None]
        exp = Experience(out.input_ids, out.attention_mask, completion_mask, rewards, lengths.float(),
                         truncated.float(), torch.as_tensor(rows, device=self.device),
                         prompt_width=out.prompt_ids.shape[1])
        # the bf16 sampler's own log-probs, aligned with the trainer's; comparable with those only when the trainer
        # scores the sampling distribution too (online DPO's log-probs are at T = 1: it records none)
        if self.rollout_dtype != torch.float32 and self.logprobs_at_sampling_temperature:
            exp.sampler_logps = torch.zeros(completion_mask[:, 1:].shape, device=self.device)
            exp.sampler_logps[:, exp.prompt_width - 1:] = out.logprobs
        if parts:  # (rows, rewards): what a multi-reward advantage (GDPO) normalises one by one
            exp.reward_parts = torch.stack(list(parts.values()), 1).nan_to_num(0.0).to(self.device)
        with training_autocast(self.cfg, self.device.type):
            if self.updates_per_rollout > 1 or self.needs_old_logps:
                exp.old_logps = self._logprobs(self.policy, exp)[0]
            if self.reference is not None:
                exp.ref_logps = self._logprobs(self.reference, exp)[0]
        stats = {"reward/nonfinite": nonfinite}
        for name, part in parts.items():
            stats[f"reward/{name}"] = float(part.mean())
        for report in reports:
            stats.update(report)
        gathered = distributed.gather_rows(exp.tensors())
        return Experience(**gathered, prompt_width=exp.prompt_width, stats=stats)

    def complete_rollout(self, exp: Experience, rollout: int) -> Experience:
        """The rollout's final rows from its first sample (identity here; GRPO's dynamic sampling adds more)."""
        return exp

    def _vllm_rollout(self, noise_seed: int, rows: list[int], offset: int, width: int):
        if self.vllm is None:
            from ..generation.vllm_backend import VLLMGenerator

            self.vllm = VLLMGenerator(self.cfg.model, self.policy, self.cfg.tokenizer or self.cfg.model,
                                      self.cfg.vllm_gpu_memory, self.cfg.seed)
        self.vllm.sync_weights(self.policy)
        seeds = [noise_seed * 65_537 + offset + r for r in range(len(rows))]
        return self.vllm.generate([self.prompt_ids[i] for i in rows], self.sampling, self.tokenizer.eos_id,
                                  self.tokenizer.pad_id, seeds, self.device, width)

    def score(self, examples: list[PromptExample], texts: list[str]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[dict[str, float]]]:
        """(reward per row, each reward function's unweighted scores by name, each function's report on this
        call) for one rollout's completions; a single reward function (not a `build_reward` sum) has no parts."""
        args = ([e.prompt for e in examples], texts, [{"answer": e.answer} for e in examples])
        if not isinstance(self.reward, WeightedSum):
            return self.reward.score(*args), {}, []
        parts = self.reward.score_parts(*args)
        return self.reward.combine(parts), parts, self.reward.reports()

    def reward_stats(self, rewards: torch.Tensor) -> dict[str, float]:
        """The rollout's reward metrics (the mean is also what `evaluate` reports as `reward`)."""
        return {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0}

    def advantages(self, exp: Experience) -> Experience:
        """The rollout with the method's training targets (`advantages`, per token, or a subclass's own) and
        their stats added to exp.stats."""
        raise NotImplementedError

    # --- the loop's interface --------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[Experience]:
        rollout, update = divmod(step, self.updates_per_rollout)
        if rollout != self.rollout_index:
            self.experience = self.make_experience(rollout)
            self.rollout_index = rollout
        epoch, minibatch = divmod(update, self.minibatches_per_epoch)
        size = self.cfg.batch_size * self.cfg.grad_accum * distributed.world_size()  # global; we take a slice
        generator = torch.Generator().manual_seed(self.cfg.seed * 7_919 + rollout * 101 + epoch)
        shuffle = self.minibatches_per_epoch > 1 and self.shuffle_rows
        n = len(self.experience)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        rows = torch.as_tensor(distributed.shard(order[minibatch * size:(minibatch + 1) * size].tolist(), "rows"),
                               device=self.device)
        micro = self.cfg.batch_size
        return [self.experience.select(rows[i:i + micro]) for i in range(0, len(rows), micro)]

    def policy_terms(self, batch: Experience, entropy_grad: bool = False) -> dict[str, torch.Tensor]:
        """Current log-probs, old log-probs (detached current ones when π_old = π), mask, entropy (with its
        gradient if `entropy_grad`), KL; for a bf16 sampler's rollout, `sampler_kl` per token and (policy-gradient
        methods, rollout_correction on) the truncated importance weights `rollout_weights`."""
        logps, mask, entropy = self._logprobs(self.policy, batch, with_entropy=True, entropy_grad=entropy_grad)
        old_logps = batch.old_logps if batch.old_logps is not None else logps.detach()
        terms = {"logps": logps, "mask": mask, "entropy": entropy, "old_logps": old_logps}
        if batch.ref_logps is not None:
            terms["kl"] = kl_estimate(logps, batch.ref_logps, "k3")
        if batch.sampler_logps is not None:
            # KL(π_sampler || π_old) per sampled token (k3 with lr = log π_old - log π_sampler): the mismatch
            terms["sampler_kl"] = kl_estimate(batch.sampler_logps, old_logps, "k3")
            correction = getattr(self.cfg, "rollout_correction", "off")  # policy-gradient configs have it
            if correction != "off":
                terms["rollout_weights"] = rollout_correction_weights(old_logps, batch.sampler_logps, mask,
                                                                      correction, self.cfg.rollout_correction_cap)
        return terms

    def common_metrics(self, batch: Experience, terms: dict[str, torch.Tensor], clipped: torch.Tensor | None
                       ) -> dict[str, float]:
        """The rollout's stats plus this mini-batch's entropy, approx. KL to π_old, KL to the reference and (for a
        clipped or capped surrogate) the share of clipped tokens."""
        mask = terms["mask"]
        log_ratio = (terms["logps"] - terms["old_logps"]).detach()
        metrics = {**batch.stats,
                   "entropy": float(masked_mean(terms["entropy"].detach(), mask)),
                   "approx_kl": float(masked_mean(0.5 * log_ratio**2, mask))}
        if clipped is not None:
            metrics["clip_ratio"] = float(masked_mean(clipped, mask))
        if "kl" in terms:
            metrics["kl"] = float(masked_mean(terms["kl"].detach(), mask))
        if "sampler_kl" in terms:
            metrics["sampler_kl"] = float(masked_mean(terms["sampler_kl"], mask))
        if "rollout_weights" in terms:
            metrics["rollout_weight"] = float(masked_mean(terms["rollout_weights"], mask))
        return metrics

    def evaluate(self, final: bool = True) -> dict[str, float]:
        metrics: dict[str, float] = {}
        recent = self.recent[-5 * self.updates_per_rollout:]
        for key in ("reward", "kl"):
            values = [h[key] for h in recent if key in h]
            if values:
                metrics[key] = sum(values) / len(values)
        if self.eval_prompts:
            metrics.update(task_metrics(self.policy, self.tokenizer, evaluated(self.eval_prompts, self.cfg, final),
                                        self.cfg.max_new_tokens_eval, sampled=final))
        return metrics

    def after_step(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        self.recent = self.recent[-255:] + [{k: metrics[k] for k in ("reward", "kl") if k in metrics}]
        out = sync_reference(self.cfg, self.reference, self.policy, step)
        if self.entropy_bonus is not None and "entropy" in metrics:
            out.update(self.entropy_bonus.after_step(metrics["entropy"]))
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"rollout_index": self.rollout_index, "recent": self.recent,
                 "experience": self.experience.state_dict() if self.experience is not None else None}
        if self.entropy_bonus is not None:
            state["entropy_bonus"] = self.entropy_bonus.state_dict()
        if self.cfg.ref_sync_every:  # the reference has moved: resume needs it as it is now
            state["reference"] = self.reference.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollout_index, self.recent = state["rollout_index"], state["recent"]
        self.experience = None if state["experience"] is None else \
            self.experience_type.from_state_dict(state["experience"], self.device)
        if self.entropy_bonus is not None:
            self.entropy_bonus.load_state_dict(state["entropy_bonus"])
        if self.cfg.ref_sync_every:
            self.reference.load_state_dict(state["reference"])


def judge_backend(cfg: OnlineConfig, device: torch.device) -> JudgeBackend:
    """The judge the config names: an HTTP endpoint if judge_url is set, else a local model dir."""
    if cfg.judge_url:
        return HTTPJudgeBackend(cfg.judge_url, cfg.judge_name, api_key_env=cfg.judge_api_key_env)
    if not cfg.judge_model:
        raise ValueError("the judge needs `judge_model` (a local model dir) or `judge_url` (an OpenAI-compatible API)")
    return LocalJudgeBackend(load_policy(cfg.judge_model, device).eval(), Tokenizer.load(cfg.judge_model))


def load_online(cfg: OnlineConfig):
    """Tokenizer, policy, reference (None when the method needs none, e.g. kl_coef = 0), reward, prompts and
    held-out prompts for a run."""
    if not cfg.model or not cfg.data:
        raise ValueError("set `model` (the starting policy dir) and `data` (prompt JSONL)")
    tokenizer, policy, device = load_start(cfg)
    reference = frozen_reference(policy, cfg.ref_model, cfg.model, device) if cfg.needs_reference() else None

    def reward_model():
        if not cfg.reward_model:
            raise ValueError("the `rm` reward needs `reward_model` (a dir written by `minirlhf rm`)")
        return RewardModelReward(load_scalar_model(cfg.reward_model, device).eval(), tokenizer)

    def judge():
        return PointwiseJudge(judge_backend(cfg, device), fallback=cfg.judge_fallback, reference=cfg.judge_reference)

    reward = build_reward(cfg.reward, {"rm": reward_model, "judge": judge})
    checks_answers = any(fn.name == "answer" for fn, _ in reward.parts)
    prompts = load_prompts(cfg.data, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                           numeric_answers=checks_answers)
    eval_prompts = load_prompts(cfg.eval_data, prompt_field=cfg.prompt_field,
                                answer_field=cfg.answer_field)[: cfg.eval_samples] if cfg.eval_data else []
    long = sum(len(tokenizer.encode_prompt(p.prompt)) > cfg.max_prompt_len for p in prompts)
    if long:
        print(f"{cfg.data}: {long} prompts exceed max_prompt_len={cfg.max_prompt_len}; keeping their last tokens",
              file=sys.stderr)
    return tokenizer, policy, reference, reward, prompts, eval_prompts

