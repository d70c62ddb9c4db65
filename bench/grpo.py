"""GRPO training speed: our `GRPO` algorithm in our training loop vs `trl.GRPOTrainer`, seconds per optimizer step.

Our GRPO samples with our KV-cache sampler, which needs the native model (`model.new_cache`), so ours trains
a randomly initialised native `MiniMindLM`; it is exported with `export_hf` and reloaded with
`AutoModelForCausalLM.from_pretrained` for TRL, so both start from identical float32 weights (a Llama model
on TRL's side). Same process, same torch thread count, same tokenizer (BPE trained here on the embedded task;
TRL gets it saved and reloaded, its chat template renders the prompts to exactly our prompt ids: checked,
`same_prompt_tokens`), same prompts (`minirlhf.data.task.rl_records`, one user turn each).

One optimizer step = one rollout for both: `--prompts` prompts x `--group` completions, one micro-batch of all
of them (ours: prompts_per_rollout x group_size = batch_size, grad_accum 1, one epoch per rollout; TRL:
per_device_train_batch_size = prompts x group, num_generations = group, gradient_accumulation_steps 1,
num_iterations 1). A step therefore includes generation, reward scoring, the reference model's log-probs
(β > 0 for both, so each holds a frozen reference copy; neither computes old log-probs, since π_old = π with
one update per rollout), the policy forward/backward and the AdamW step. Equal settings: β, temperature
(no top-k / top-p), ε = 0.2 clipping, loss aggregation `grpo` (TRL's default is `dapo`), group-scaled
advantages, learning rate, AdamW (`torch.optim.AdamW`, fused, betas 0.9/0.95: TRL's `optim` set to `adamw_torch_fused`),
clipping at 1.0, fp32 (TRL `bf16=False`, ours `precision=fp32`; `--bf16` puts both in bf16: TRL `bf16=True`, ours
`precision=bf16` autocast plus `rollout_precision=bf16`), no gradient checkpointing (TRL's default on, turned off).

The reward is answer correctness: ours is `build_reward("answer:1")` (`AnswerReward`), TRL gets a Python
function that calls the same `AnswerReward.score` on the completion text. With random weights it is ~0.

Completion length is fixed at `--max-new-tokens` for both by default, so both do the same work:
- ours samples with `eos_id=-1` (an id the sampler never returns; the GRPO's tokenizer is a copy
  whose `eos_id` is -1, set after the prompts are encoded), so no row stops early;
- TRL gets `generation_kwargs={"min_new_tokens": max_new_tokens}`, so EOS cannot be sampled before the limit.
`--natural` keeps each engine's normal EOS stopping instead. Mean completion lengths are reported either way.

Timing: each engine's step-end times (ours: the `elapsed_s` our loop logs after each optimizer step; TRL: a
callback's `on_step_end`), the first `--warmup` steps dropped: seconds/step = (time of the last step end - time
of the warm-up's last step end) / (steps - warmup). Model building, TRL's trainer setup, and our prompt
encoding are outside the timed window. With `--rounds` > 1 the engines alternate and the median is taken.

    python bench/grpo.py [--rounds 3 --steps 4 --warmup 1 --prompts 8 --group 8 --max-new-tokens 64 --natural]
    python bench/grpo.py --tiny --steps 10 --warmup 2 --prompts 4 --group 4 --max-new-tokens 32   # overhead only

Prints one JSON object; `speedup` = TRL seconds/step / our seconds/step; GFLOP/s of the nominal work (see
`nominal_gflop_per_step`) against the fp32 matmul rates measured at the model's shape (stock `F.linear`, which
TRL's model uses, and oneDNN, which ours uses on non-Intel x86 CPUs: `minirlhf.model.linear`; `--aten-linears`
runs ours on stock `F.linear` too, to tell that apart from the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_shared_flags, matmul_gflops, quiet_hf, resolve_size, task_tokenizer, use_aten_linears

from minirlhf.algorithms.grpo import GRPO, GRPOConfig
from minirlhf.data.formats import PromptExample
from minirlhf.data.task import generate_problems, rl_records
from minirlhf.model import MiniMindLM, preset
from minirlhf.model.hf_export import export_hf
from minirlhf.rewards import AnswerReward, build_reward
from minirlhf.tokenizer import Tokenizer
from minirlhf.train.loop import train


def seconds_per_step(step_ends: list[float], warmup: int) -> float:
    """Time from the end of step `warmup` to the last step's end, per step after the first `warmup`."""
    return (step_ends[-1] - step_ends[warmup - 1]) / (len(step_ends) - warmup)


def run_ours(initial: MiniMindLM, tokenizer: Tokenizer, prompts: list[PromptExample], args, out_dir: Path) -> dict:
    cfg = GRPOConfig(out_dir=str(out_dir), steps=args.steps, batch_size=args.prompts * args.group, grad_accum=1,
                     lr=args.lr, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=args.seed,
                     precision="bf16" if args.bf16 else "fp32",
                     device="cpu", progress=False, reward="answer:1", prompts_per_rollout=args.prompts,
                     epochs_per_rollout=1, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=0, top_p=1.0, kl_coef=args.beta, clip_eps_low=0.2, clip_eps_high=0.2,
                     group_size=args.group, scale_rewards="group", loss_type="grpo", advantage="grpo",
                     share_prompts=not args.no_share_prompts, rollout_precision="bf16" if args.bf16 else "fp32")
    # as `load_online` does: the policy, and a frozen reference loaded from the same weights (β > 0)
    policy = copy.deepcopy(initial).train()
    reference = copy.deepcopy(initial).eval().requires_grad_(False) if args.beta > 0 else None
    algo = GRPO(policy, reference, tokenizer, prompts, build_reward(cfg.reward), [], cfg=cfg)
    if not args.natural:
        algo.tokenizer = copy.copy(tokenizer)
        algo.tokenizer.eos_id = -1  # prompts are already encoded; the sampler now never stops early
    with contextlib.redirect_stdout(sys.stderr):
        train(algo, cfg, name="grpo")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    assert len(rows) == args.steps, len(rows)
    return {"seconds_per_step": seconds_per_step([r["elapsed_s"] for r in rows], args.warmup),
            "completion_len": statistics.fmean(r["completion_len"] for r in rows),
            "reward": statistics.fmean(r["reward"] for r in rows)}


def run_trl(model_dir: Path, tokenizer: Tokenizer, prompts: list[PromptExample], args, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in prompts], "answer": [p.answer for p in prompts]})
    answer_reward = AnswerReward()
    lengths: list[int] = []
    rewards: list[float] = []

    def answer(prompts, completions, completion_ids, answer, **_) -> list[float]:
        """`AnswerReward` on the completion text (TRL passes a conversational completion as a message list)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lengths.extend(len(ids) for ids in completion_ids)
        scores = answer_reward.score(prompts, texts, [{"answer": a} for a in answer]).tolist()
        rewards.extend(scores)
        return scores

    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    config = TRLGRPOConfig(
        output_dir=str(out_dir / "trl"), max_steps=args.steps, per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1, num_generations=args.group, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=1.0,
        generation_kwargs=None if args.natural else {"min_new_tokens": args.max_new_tokens},
        beta=args.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group", learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused", adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, bf16=args.bf16, gradient_checkpointing=False, use_cpu=True, seed=args.seed,
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=answer, args=config, train_dataset=dataset,
                          processing_class=hf_tokenizer, callbacks=[StepTimes()])
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    assert len(step_ends) == args.steps, len(step_ends)
    return {"seconds_per_step": seconds_per_step(step_ends, args.warmup), "completion_len": statistics.fmean(lengths),
            "reward": statistics.fmean(rewards), "optim": str(trainer.args.optim),
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "has_ref_model": trainer.ref_model is not None,
            "prompt_ids": [hf_tokenizer.apply_chat_template(p.prompt, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True)["input_ids"] for p in prompts[:20]]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per engine (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G, num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="completion length (max_completion_length)")
    parser.add_argument("--natural", action="store_true", help="let EOS end completions (default: fixed length)")
    parser.add_argument("--n-prompts", type=int, default=200, help="prompt pool")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: both hold a reference)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-share-prompts", action="store_true",
                        help="ours without the shared-prompt forward (each row re-runs its prompt, as TRL does)")
    parser.add_argument("--bf16", action="store_true",
                        help="both in bf16: ours autocasts training and samples from bf16 weights (rollout_precision, "
                             "with its importance correction), TRL gets bf16=True")
    add_shared_flags(parser)
    args = parser.parse_args(argv)
    resolve_size(args)
    if args.aten_linears:
        use_aten_linears()
    if not 0 < args.warmup < args.steps:
        parser.error("need 0 < --warmup < --steps")

    import transformers
    import trl

    quiet_hf(args.threads)

    tokenizer = task_tokenizer(args.vocab)
    prompts = [PromptExample([{"role": "user", "content": r["prompt"]}], r["answer"])
               for r in rl_records(generate_problems(args.n_prompts, seed=args.seed))]
    config = preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=2 * args.hidden,
                    max_seq_len=256)
    torch.manual_seed(args.seed)
    initial = MiniMindLM(config).float().eval()

    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer")
        model_dir = export_hf(initial, Path(tmp) / "hf", tokenizer_dir=Path(tmp) / "tokenizer",
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for r in range(args.rounds):
            torch.manual_seed(args.seed)
            results["ours"].append(run_ours(initial, tokenizer, prompts, args, Path(tmp) / f"ours{r}"))
            torch.manual_seed(args.seed)
            results["trl"].append(run_trl(model_dir, tokenizer, prompts, args, Path(tmp) / f"trl{r}"))
    ours, theirs = results["ours"], results["trl"]
    ours_s = statistics.median(x["seconds_per_step"] for x in ours)
    trl_s = statistics.median(x["seconds_per_step"] for x in theirs)
    # Nominal work of a step, the same for both engines: every row's prompt + completion through the sampler (2N
    # FLOPs a token), the reference (2N) and the policy's forward + backward (6N), N = parameters; attention
    # scores left out. Ours does less than this (prompts once per group, no padding): its rate is "effective".
    prompt_len = statistics.fmean(len(tokenizer.encode_prompt(p.prompt)) for p in prompts)
    completion_len = statistics.fmean(x["completion_len"] for x in ours)
    gflop = 10 * initial.num_parameters() * args.prompts * args.group * (prompt_len + completion_len) / 1e9
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "model": f"MiniMindLM {args.layers}x{args.hidden} (ours) = exported LlamaForCausalLM (TRL), "
                 f"vocab {tokenizer.vocab_size}",
        "params": initial.num_parameters(),
        "prompts_per_step": args.prompts,
        "group": args.group,
        "max_new_tokens": args.max_new_tokens,
        "fixed_length": not args.natural,
        "ours_share_prompts": not args.no_share_prompts,
        "bf16": args.bf16,
        "beta": args.beta,
        "temperature": args.temperature,
        "same_prompt_tokens": theirs[0]["prompt_ids"] == [tokenizer.encode_prompt(p.prompt) for p in prompts[:20]],
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "ours_seconds_per_step": round(ours_s, 4),
        "trl_seconds_per_step": round(trl_s, 4),
        "speedup": round(trl_s / ours_s, 2),
        "nominal_gflop_per_step": round(gflop, 1),
        "ours_effective_gflops": round(gflop / ours_s, 1),
        "trl_gflops": round(gflop / trl_s, 1),
        "fp32_matmul_gflops": matmul_gflops(args.hidden),
        "ours_aten_linears": args.aten_linears,
        "ours_seconds_per_step_runs": [round(x["seconds_per_step"], 4) for x in ours],
        "trl_seconds_per_step_runs": [round(x["seconds_per_step"], 4) for x in theirs],
        "ours_mean_completion_len": round(statistics.fmean(x["completion_len"] for x in ours), 2),
        "trl_mean_completion_len": round(statistics.fmean(x["completion_len"] for x in theirs), 2),
        "ours_mean_reward": round(statistics.fmean(x["reward"] for x in ours), 4),
        "trl_mean_reward": round(statistics.fmean(x["reward"] for x in theirs), 4),
        "trl_optim": theirs[0]["optim"],
        "trl_gradient_checkpointing": theirs[0]["gradient_checkpointing"],
        "trl_has_ref_model": theirs[0]["has_ref_model"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
