"""DPO training speed: our `DPO` algorithm in our training loop vs `trl.DPOTrainer`, same model, data and batch.

Both engines train the same randomly initialised weights: ours a native `MiniMindLM` (so a pair's prompt runs once
for both responses: `share_prompts`; `--no-share-prompts` turns that off), TRL the same weights exported with
`export_hf` and reloaded as a Hugging Face `LlamaForCausalLM`; in the same process with the same torch thread
count, on the same preference pairs
(`minirlhf.data.task.preference_records`) tokenized by the same BPE (trained here with `train_tokenizer`; TRL
gets it saved and reloaded as a `PreTrainedTokenizerFast`). TRL is fed the chat-rendered prompt text and the
response text, so its own tokenization gives exactly our token ids (checked: `same_tokens`); every sequence
is prompt + response + <|im_end|>, with the loss on the response and <|im_end|>.

Settings made equal: batch size (pairs per optimizer step, one micro-batch), max length, β, sigmoid loss,
learning rate, AdamW (`torch.optim.AdamW`, fused, betas 0.9/0.95, no weight decay: TRL's `optim` is set
to `adamw_torch_fused`), gradient clipping at 1.0, fp32 (ours `precision=fp32`, TRL `bf16=False`; `--bf16`:
both under bf16 autocast, ours `precision=bf16`, TRL `bf16=True`) and no gradient checkpointing
(TRL's default on, turned off). Reference log-probs are precomputed once before training by both (ours:
`precompute_ref`, TRL: `precompute_ref_log_probs`), so neither runs a reference model during training;
`--live-ref` turns precompute off for both, and each then runs a frozen copy of the initial model every step.

Ours runs through `minirlhf.train.loop.train`, the loop every stage uses (micro-batches, loss, backward,
clipping, AdamW, schedule, a metrics.jsonl row per step); TRL through `trainer.train()` with logging off.
Only the optimizer-step phase is timed: setup (TRL's dataset tokenization and reference precompute, our pair
tokenization and precompute) is excluded. Each engine's step-end times are recorded (ours: the `elapsed_s`
the loop logs after each optimizer step; TRL: a callback's `on_step_end`), the first `--warmup` steps are
dropped, and steps/s = (steps - warmup) / (time of the last step end - time of the warm-up's last step end).
With `--rounds` > 1 the engines alternate (ours, TRL, ours, ...) with fresh models and the median is taken.

    python bench/dpo.py [--rounds 3 --steps 12 --warmup 3 --batch 16 --max-len 256]        # 18M params, 2 threads
    python bench/dpo.py --tiny --steps 30 --warmup 5 --batch 8                          # overhead only

Prints one JSON object; `speedup` = our steps/s / TRL's steps/s; GFLOP/s of the nominal work against the fp32
matmul rates measured at the model's shape (stock `F.linear`, which TRL's model uses, and oneDNN, which ours uses
on non-Intel x86 CPUs: `minirlhf.model.linear`; `--aten-linears` runs ours on stock `F.linear` too).
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

from minirlhf.algorithms.dpo import DPO, DPOConfig
from minirlhf.data.formats import PreferencePair
from minirlhf.data.pairs import tokenize_pairs
from minirlhf.data.task import generate_problems, preference_records
from minirlhf.model import MiniMindLM, preset
from minirlhf.model.hf_export import export_hf
from minirlhf.tokenizer import Tokenizer
from minirlhf.train.loop import train


def steps_per_second(step_ends: list[float], warmup: int) -> float:
    """Steps after the first `warmup`, divided by the time from the end of step `warmup` to the last step's end."""
    return (len(step_ends) - warmup) / (step_ends[-1] - step_ends[warmup - 1])


def run_ours(model, tokenizer: Tokenizer, pairs: list[PreferencePair], args, out_dir: Path) -> dict:
    cfg = DPOConfig(out_dir=str(out_dir), steps=args.steps, batch_size=args.batch, grad_accum=1, lr=args.lr,
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, precision="bf16" if args.bf16 else "fp32",
                    seed=args.seed, device="cpu",
                    progress=False, max_len=args.max_len, beta=args.beta, loss_type="sigmoid",
                    precompute_ref=not args.live_ref, share_prompts=not args.no_share_prompts)
    tokenized = tokenize_pairs(tokenizer, pairs, cfg.max_len)
    # as `dpo.run` does: the reference is the starting policy (precomputed in __init__), or a frozen copy of it
    reference = copy.deepcopy(model) if args.live_ref else model
    algo = DPO(model, reference, tokenizer, tokenized, [], [], cfg)
    with contextlib.redirect_stdout(sys.stderr):
        train(algo, cfg, name="dpo")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    assert len(rows) == args.steps, len(rows)
    return {"steps_per_s": steps_per_second([r["elapsed_s"] for r in rows], args.warmup),
            "loss_mean": statistics.fmean(r["loss"] for r in rows), "first_loss": rows[0]["loss"],
            "ids": [(p.chosen_ids, p.rejected_ids, p.chosen_start, p.rejected_start) for p in tokenized]}


def run_trl(model, tokenizer: Tokenizer, pairs: list[PreferencePair], args, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    tokenizer.save(out_dir / "tokenizer")
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out_dir / "tokenizer"))

    def prompt_text(messages) -> str:  # the chat template as text: tokenizes to exactly `encode_prompt`'s ids
        return tokenizer.decode(tokenizer.encode_prompt(messages), skip_special_tokens=False)

    dataset = Dataset.from_dict({"prompt": [prompt_text(p.prompt) for p in pairs],
                                 "chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs]})
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    config = TRLDPOConfig(
        output_dir=str(out_dir / "trl"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        max_length=args.max_len, beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=not args.live_ref,
        precompute_ref_batch_size=32, bf16=args.bf16, gradient_checkpointing=False, use_cpu=True, seed=args.seed,
        report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    reference = copy.deepcopy(model).eval() if args.live_ref else None
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                         processing_class=hf_tokenizer, callbacks=[StepTimes()])
    ids = [(p + c, p + r, len(p), len(p)) for p, c, r in zip(trainer.train_dataset["prompt_ids"],
                                                           trainer.train_dataset["chosen_ids"],
                                                           trainer.train_dataset["rejected_ids"])]
    with contextlib.redirect_stdout(sys.stderr):
        output = trainer.train()
    assert len(step_ends) == args.steps, len(step_ends)
    return {"steps_per_s": steps_per_second(step_ends, args.warmup), "loss_mean": output.training_loss, "ids": ids,
            "optim": str(trainer.args.optim), "gradient_checkpointing": trainer.args.gradient_checkpointing}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per engine (warm-up included)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=16, help="preference pairs per optimizer step (both engines)")
    parser.add_argument("--pairs", type=int, default=256, help="training pairs (>= steps x batch: one epoch)")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per sequence (no pair is cut at 256)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--no-share-prompts", action="store_true",
                        help="ours without the shared-prompt forward (the concatenated forward, as TRL)")
    parser.add_argument("--live-ref", action="store_true",
                        help="no reference precompute: both engines run a frozen reference model every step")
    parser.add_argument("--bf16", action="store_true", help="both engines under bf16 autocast (fp32 weights)")
    add_shared_flags(parser)
    args = parser.parse_args(argv)
    resolve_size(args)
    if args.aten_linears:
        use_aten_linears()
    if not 0 < args.warmup < args.steps:
        parser.error("need 0 < --warmup < --steps")

    import transformers
    import trl
    from transformers import AutoModelForCausalLM

    quiet_hf(args.threads)

    tokenizer = task_tokenizer(args.vocab)
    records = preference_records(generate_problems(args.pairs, seed=args.seed), seed=args.seed)
    pairs = [PreferencePair([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in records]
    config = preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=2 * args.hidden,
                    max_seq_len=max(256, args.max_len))
    torch.manual_seed(args.seed)
    initial = MiniMindLM(config).float()
    params = initial.num_parameters()

    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer")
        model_dir = export_hf(initial, Path(tmp) / "hf", tokenizer_dir=Path(tmp) / "tokenizer",
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for r in range(args.rounds):
            torch.manual_seed(args.seed)
            results["ours"].append(run_ours(copy.deepcopy(initial).train(), tokenizer, pairs, args,
                                            Path(tmp) / f"ours{r}"))
            torch.manual_seed(args.seed)
            trl_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).train()
            results["trl"].append(run_trl(trl_model, tokenizer, pairs, args, Path(tmp) / f"trl{r}"))
    ours, theirs = results["ours"], results["trl"]
    ours_sps = statistics.median(x["steps_per_s"] for x in ours)
    trl_sps = statistics.median(x["steps_per_s"] for x in theirs)
    seq_lens = [len(c) for c, *_ in ours[0]["ids"]] + [len(r) for _, r, *_ in ours[0]["ids"]]
    # nominal work of a step, the same for both: forward + backward (6N FLOPs a token, N = parameters) over both
    # rows of every pair, at the mean length; ours does less (the prompt once per pair), so its rate is "effective"
    gflop = 6 * params * 2 * args.batch * statistics.fmean(seq_lens) / 1e9
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "model": f"MiniMindLM {args.layers}x{args.hidden} (ours) = exported LlamaForCausalLM (TRL), "
                 f"vocab {tokenizer.vocab_size}",
        "ours_share_prompts": not args.no_share_prompts,
        "bf16": args.bf16,
        "params": params,
        "batch_pairs": args.batch,
        "max_len": args.max_len,
        "mean_seq_len": round(statistics.fmean(seq_lens), 1),
        "same_tokens": ours[0]["ids"] == theirs[0]["ids"],
        "precompute_ref": not args.live_ref,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "ours_steps_per_s": round(ours_sps, 2),
        "trl_steps_per_s": round(trl_sps, 2),
        "speedup": round(ours_sps / trl_sps, 2),
        "nominal_gflop_per_step": round(gflop, 1),
        "ours_effective_gflops": round(gflop * ours_sps, 1),
        "trl_gflops": round(gflop * trl_sps, 1),
        "fp32_matmul_gflops": matmul_gflops(args.hidden),
        "ours_aten_linears": args.aten_linears,
        "ours_steps_per_s_runs": [round(x["steps_per_s"], 2) for x in ours],
        "trl_steps_per_s_runs": [round(x["steps_per_s"], 2) for x in theirs],
        "ours_first_loss": round(ours[0]["first_loss"], 5),
        "ours_loss_mean": round(ours[0]["loss_mean"], 4),
        "trl_loss_mean": round(theirs[0]["loss_mean"], 4),
        "trl_optim": theirs[0]["optim"],
        "trl_gradient_checkpointing": theirs[0]["gradient_checkpointing"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
