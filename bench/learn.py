"""Learning per minute: our GRPO vs `trl.GRPOTrainer` from the same SFT weights for the same wall-clock budget,
scored by held-out accuracy reached. Speed that does not turn into learning per minute does not count.

Start: the demo's SFT model and task data (`make demo` writes runs/demo/sft/final and runs/demo/data). Ours trains
it natively; TRL trains the same weights exported with `export_hf` (a LlamaForCausalLM whose chat template renders
our exact prompt ids). Same process, same torch threads, same prompts (rl.jsonl, conversational), same reward
(the demo's answer:1,working:0.2: TRL gets a function calling the same `WeightedSum.score`), and the demo's GRPO
settings for both: 16 prompts x 8 completions per optimizer step in one micro-batch, T = 0.7, 48 new tokens with EOS
stopping, lr 1e-4 constant, β = 0.04 (both hold a reference), ε = 0.2, `grpo` aggregation, group-scaled advantages,
AdamW (fused, betas 0.9/0.95), clipping at 1.0, fp32 training (ours `precision=fp32`), no gradient checkpointing, one
update per rollout. Ours samples with its default `rollout_precision=auto` (bf16 weights where the CPU multiplies
bf16 natively, with the truncated importance-sampling correction; `--rollout-precision fp32` for fp32 rollouts), TRL
with HF `generate` in fp32, its default.
Each engine trains until its first optimizer step that ends past `--minutes` of training (ours:
`max_minutes`; TRL: a callback that stops training), setup excluded. Then the SFT start and both results are
scored on the same held-out problems by the same `task_metrics` (greedy accuracy ± s.e.; TRL's result loaded
through our Hugging Face wrapper).

    make demo   # once, for the SFT model and the data
    python bench/learn.py [--minutes 2 --eval 500 --threads 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import quiet_hf

from minirlhf.algorithms.grpo import GRPO, GRPOConfig
from minirlhf.data.formats import load_prompts
from minirlhf.eval import task_metrics
from minirlhf.model import load_policy
from minirlhf.model.hf_export import export_hf
from minirlhf.rewards import build_reward
from minirlhf.tokenizer import Tokenizer
from minirlhf.train.loop import train

GROUP, PROMPTS, TEMPERATURE, NEW_TOKENS, LR, BETA, REWARD = 8, 16, 0.7, 48, 1e-4, 0.04, "answer:1,working:0.2"


def run_ours(sft: Path, tokenizer: Tokenizer, prompts, args, out_dir: Path) -> dict:
    cfg = GRPOConfig(out_dir=str(out_dir), steps=100_000, max_minutes=args.minutes, batch_size=PROMPTS * GROUP,
                     grad_accum=1, lr=LR, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     precision="fp32", seed=args.seed, device="cpu", progress=False, reward=REWARD,
                     prompts_per_rollout=PROMPTS, group_size=GROUP, max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE,
                     kl_coef=BETA, clip_eps_low=0.2, clip_eps_high=0.2, loss_type="grpo", scale_rewards="group",
                     rollout_precision=args.rollout_precision)
    policy = load_policy(sft).train()
    reference = load_policy(sft).eval().requires_grad_(False)
    algo = GRPO(policy, reference, tokenizer, prompts, build_reward(REWARD), [], cfg=cfg)
    with contextlib.redirect_stdout(sys.stderr):
        train(algo, cfg, name="grpo")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    return {"steps": len(rows), "train_seconds": rows[-1]["elapsed_s"], "model": load_policy(out_dir / "final")}


def run_trl(hf_dir: Path, prompts, args, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    reward = build_reward(REWARD)

    def answer_and_working(prompts, completions, answer, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward.score(prompts, texts, [{"answer": a} for a in answer]).tolist()

    times: dict[str, float] = {}

    class Budget(TrainerCallback):
        def on_train_begin(self, *_, **__):
            times["start"] = time.perf_counter()

        def on_step_end(self, args_, state, control, **__):
            times["end"], times["steps"] = time.perf_counter(), state.global_step
            if times["end"] - times["start"] > 60 * args.minutes:
                control.should_training_stop = True

    config = TRLGRPOConfig(
        output_dir=str(out_dir), max_steps=100_000, per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP, num_iterations=1, max_completion_length=NEW_TOKENS,
        temperature=TEMPERATURE, top_k=0, top_p=1.0, beta=BETA, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused",
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, use_cpu=True,
        seed=args.seed, report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in prompts], "answer": [p.answer for p in prompts]})
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32),
                          reward_funcs=answer_and_working, args=config, train_dataset=dataset,
                          processing_class=PreTrainedTokenizerFast.from_pretrained(str(hf_dir)), callbacks=[Budget()])
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    trainer.save_model(str(out_dir / "final"))
    return {"steps": times["steps"], "train_seconds": times["end"] - times["start"],
            "model": load_policy(out_dir / "final")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="runs/demo/sft/final", help="SFT model dir (written by `make demo`)")
    parser.add_argument("--data", default="runs/demo/data", help="task data dir (rl.jsonl, heldout_rl.jsonl)")
    parser.add_argument("--minutes", type=float, default=2.0, help="training wall-clock budget per engine")
    parser.add_argument("--eval", type=int, default=500, help="held-out problems scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rollout-precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="our sampler's weights (TRL generates in fp32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sft, data = Path(args.sft), Path(args.data)
    if not (sft / "config.json").is_file() or not (data / "rl.jsonl").is_file():
        parser.error(f"no SFT model in {sft} or no task data in {data}: run `make demo` first")

    import transformers
    import trl

    quiet_hf(args.threads)
    tokenizer = Tokenizer.load(sft)
    prompts = load_prompts(str(data / "rl.jsonl"), numeric_answers=True)
    heldout = load_prompts(str(data / "heldout_rl.jsonl"))[: args.eval]

    def score(model) -> dict:
        metrics = task_metrics(model, tokenizer, heldout, NEW_TOKENS, sampled=False)
        return {"accuracy": round(metrics["accuracy"], 4), "accuracy_se": round(metrics["accuracy_se"], 4)}

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(load_policy(sft), Path(tmp) / "hf", tokenizer_dir=sft, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id)
        torch.manual_seed(args.seed)
        ours = run_ours(sft, tokenizer, prompts, args, Path(tmp) / "ours")
        torch.manual_seed(args.seed)
        theirs = run_trl(hf_dir, prompts, args, Path(tmp) / "trl")
        result = {
            "device": "cpu", "threads": torch.get_num_threads(), "sft": str(sft),
            "params": sum(p.numel() for p in ours["model"].parameters()),
            "budget_minutes": args.minutes, "heldout_problems": len(heldout),
            "settings": {"prompts_per_step": PROMPTS, "group": GROUP, "temperature": TEMPERATURE,
                         "max_new_tokens": NEW_TOKENS, "lr": LR, "beta": BETA, "reward": REWARD,
                         "ours_rollout_precision": args.rollout_precision},
            "sft_start": score(load_policy(sft)),
            "ours": {"steps": ours["steps"], "train_seconds": round(ours["train_seconds"], 1), **score(ours["model"])},
            "trl": {"steps": theirs["steps"], "train_seconds": round(theirs["train_seconds"], 1),
                    **score(theirs["model"])},
            "torch": torch.__version__, "transformers": transformers.__version__, "trl_version": trl.__version__,
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
