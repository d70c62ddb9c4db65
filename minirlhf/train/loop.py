"""The one training loop every stage uses.

An `Algorithm` says how a step's micro-batches are made (from a dataset, or from fresh rollouts) and
how a micro-batch becomes a loss; this loop owns everything else: AdamW, linear warmup + cosine decay,
gradient accumulation, clipping, bf16 autocast where the hardware has it (`precision`), non-finite-step guard,
periodic evaluation, atomic checkpoints, exact `resume`, `metrics.jsonl`, a progress bar, optional TensorBoard.

Exact resume works because batches are a pure function of (seed, step): data order comes from a seeded
permutation per epoch, rollouts from a generator seeded by the step; RNG states, the optimizer and any
algorithm state (e.g. a rollout buffer or a value tracker) are checkpointed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors.torch import load_model
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, field
from ..errors import SetupError
from ..generation import decode
from ..model.lora import LoRAConfig, save_final
from . import checkpoint as ckpt
from . import distributed

T = TypeVar("T")


@dataclass
class TrainConfig:
    """Options of the shared loop; every stage config extends this."""

    out_dir: str = field("runs/stage", "checkpoints, metrics.jsonl, curves.png and final/ go here")
    steps: int = field(100, "optimizer steps", min=1)
    epochs: float = field(0.0, "if > 0: passes over the training data, overriding `steps`", min=0)
    max_minutes: float = field(0.0, "if > 0: stop after the first step that ends this many minutes into training "
                                    "(then evaluate and save as at the last step); the schedule still spans `steps`",
                               min=0)
    batch_size: int = field(16, "examples per micro-batch", min=1)
    grad_accum: int = field(1, "micro-batches per optimizer step", min=1)
    lr: float = field(1e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = field(0.1, "cosine schedule decays to lr * min_lr_ratio", min=0)
    warmup_steps: int = field(0, "linear warmup steps", min=0)
    weight_decay: float = field(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = field(1.0, "clip the global gradient norm (0 = off)", min=0)
    precision: Literal["auto", "fp32", "bf16"] = field(
        "auto", "training's forward passes: bf16 autocast (float32 master weights; log-probs, ratios, KL and losses "
                "in float32) or plain float32; auto = bf16 where the hardware multiplies bf16 natively (AVX512-BF16 / "
                "AMX CPUs, bf16 GPUs), else fp32")
    seed: int = field(0, "seed for init, data order and sampling")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")
    eval_every: int = field(0, "evaluate every N steps (0 = only at the end)", min=0)
    interim_eval_samples: int = field(0, "held-out prompts the generating evaluations every `eval_every` steps use "
                                         "(the first N; 0 = all): cheaper curves; the final evaluation uses all", min=0)
    save_every: int = field(0, "checkpoint every N steps (0 = only the final model)", min=0)
    keep_checkpoints: int = field(2, "how many step checkpoints to keep", min=1)
    resume: bool = field(False, "continue from the latest checkpoint in out_dir")
    allow_config_change: bool = field(False, "let `resume` continue a run whose options changed (listed on stderr); "
                                             "a changed lr then takes effect")
    overwrite: bool = field(False, "start afresh in an out_dir that holds another run's checkpoints (deleting them)")
    max_bad_steps: int = field(5, "abort after this many non-finite steps in a row", min=1)
    report_to: str = field("none", "none | tensorboard | wandb (when installed)")
    lora: LoRAConfig = field(LoRAConfig(), "LoRA adapters (peft) on the trained policy; lora.r=0 trains all weights")
    gradient_checkpointing: bool = field(False, "recompute activations in backward to save memory")
    parallel: Literal["ddp", "fsdp"] = field("ddp", "under torchrun: ddp replicates the model, fsdp (FSDP2) shards it")
    progress: bool = field(True, "show a progress bar")


class Algorithm:
    """What a training method provides to the loop. Subclasses set `modules` and implement two methods."""

    modules: dict[str, nn.Module]  # trainable modules, checkpointed by name; the first is the result
    num_examples: int | None = None  # dataset size, for `epochs`
    lr_scales: dict[str, float] = {}  # per-module learning-rate multipliers (e.g. PPO's critic)

    def micro_batches(self, step: int) -> list[Any]:
        """The micro-batches of optimizer step `step` (a pure function of step and saved state)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to minimise, metrics) for one micro-batch."""
        raise NotImplementedError

    def loss_weight(self, batch: Any) -> float:
        """How many units (tokens, sequences, pairs) `loss(batch)` is a mean over. The loop weights micro-batch i
        of a step by w_i / sum_j w_j over all micro-batches and ranks, so the accumulated gradient is the
        gradient of the whole batch's mean. Computed before any forward pass, from the batch alone."""
        return 1.0

    def evaluate(self, final: bool = True) -> dict[str, float]:
        """Held-out metrics. The loop calls it every `eval_every` steps with final=False (a cheaper evaluation is
        fine there: it draws the curves) and once at the end with final=True (the stage's result)."""
        return {}

    def save(self, name: str, directory: Path, final: bool = False) -> None:
        """Write module `name` as a loadable model dir (weights, config, tokenizer); `final`: the result a user
        loads (LoRA merged), else a checkpoint that `load_weights` reads back."""
        module = self.modules[name]
        save_final(module, directory) if final else module.save_pretrained(directory)
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(directory)

    def replace_module(self, name: str, module: nn.Module) -> None:
        """Swap module `name` (e.g. for its DDP wrapper) here and in every attribute that holds it."""
        old = self.modules[name]
        self.modules = {**self.modules, name: module}
        for attr, value in list(vars(self).items()):
            if value is old:
                setattr(self, attr, module)

    def after_step(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Called after optimizer step `step` (1-based) was applied, with its metrics (averaged over micro-batches
        and ranks, so every rank sees the same); returns further metrics to log with it."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    """The device to train on; under torchrun this also joins the process group (cuda:LOCAL_RANK on GPU)."""
    if name == "auto":
        return distributed.setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SetupError(f"device={name}: {why} (torch {torch.__version__}); use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SetupError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SetupError(f"device={name}: MPS is not available on this machine; use device=auto or device=cpu")
    return distributed.setup(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr: linear warmup to 1, then cosine down to min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; mirrors scalars to TensorBoard/W&B if asked."""

    def __init__(self, out_dir: Path, report_to: str, resume_step: int | None, config: dict) -> None:
        self.path = out_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop rows written after the checkpoint we resume from
            rows, torn = [], 0
            for line in filter(str.strip, self.path.read_text().splitlines()):
                try:
                    rows.append((line, json.loads(line)))
                except ValueError:  # a line cut short by a crash mid-write
                    torn += 1
            if torn:
                print(f"{self.path}: dropped {torn} unreadable line(s) (a crash cut them short)", file=sys.stderr)
            kept = [line for line, row in rows if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in kept))
        self.writer = self.wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
        elif report_to == "wandb":
            try:
                import wandb

                self.wandb = wandb.init(project="minirlhf", dir=str(out_dir), config=config)
            except ImportError:
                print("wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


STATE_KEYS = {"step", "bad_steps", "optimizer", "scheduler", "rng_torch", "rng_python", "algorithm"}
# Options that do not change what a run computes: a resumed run may change them freely.
RESUME_SAFE_OPTIONS = {"steps", "epochs", "resume", "allow_config_change", "overwrite", "progress", "report_to",
                       "eval_every", "interim_eval_samples", "save_every", "keep_checkpoints", "device",
                       "max_bad_steps", "eval_data", "eval_samples", "eval_prompts", "eval_pref_data",
                       "max_new_tokens_eval", "out_dir", "batch_size", "grad_accum", "parallel",
                       "gradient_checkpointing", "vllm_gpu_memory", "max_minutes", "share_prompts"}


def run_identity(name: str, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it: the stage and every option that changes what the
    run computes. batch_size and grad_accum enter as the global batch, which may be split anew on resume (e.g.
    under another number of processes)."""
    options = {k: v for k, v in asdict(cfg).items() if k not in RESUME_SAFE_OPTIONS}
    options["global_batch"] = cfg.batch_size * cfg.grad_accum * distributed.world_size()
    return {"stage": name, "options": options}


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: Path, allow_change: bool) -> None:
    """Refuse (ConfigError) to resume another stage's checkpoint, or one whose options changed unless allowed."""
    if saved is None:  # written before checkpoints recorded their run
        return
    if saved["stage"] != current["stage"]:
        raise ConfigError(f"{checkpoint} was written by stage {saved['stage']!r}, not {current['stage']!r}; "
                          "resume it with that stage, or choose another out_dir")
    old, new = saved["options"], current["options"]
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed and not allow_change:
        raise ConfigError(f"{checkpoint} belongs to a run with other options ({'; '.join(changed)}); "
                          "restore them, or pass allow_config_change=true to continue with the new ones")
    if changed:
        print(f"resuming {checkpoint} with changed options: {'; '.join(changed)}", file=sys.stderr)


def uses_bf16(cfg: TrainConfig, device_type: str) -> bool:
    """Whether training's forward passes (the loss's, and the no-grad ones whose outputs it compares with: old,
    reference and value estimates) run under bf16 autocast, by `cfg.precision`."""
    return decode.bf16_chosen(cfg.precision, device_type)


def training_autocast(cfg: TrainConfig, device_type: str) -> torch.autocast:
    """The context those forward passes run in: bf16 autocast when `uses_bf16`, else a disabled one."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device_type))


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


def accumulate_gradients(algo: Algorithm, batches: list[Any], ddp_modules: list[nn.Module] = (),
                         precision: AbstractContextManager | None = None) -> dict[str, float]:
    """Backpropagate one optimizer step's micro-batches so the summed gradient is that of the whole step's loss.

    Each micro-batch's loss is a mean over w_i units (`algo.loss_weight`); the whole batch's loss is
    sum_i w_i L_i / W with W = sum of w over every micro-batch of every rank. DDP averages gradients over the
    world, so micro-batch i is scaled by world * w_i / W. Returns the metrics averaged over micro-batches and
    ranks, with `loss` the whole-batch loss. Each loss's forward runs inside `precision` (`training_autocast`; None:
    as it is)."""
    precision = nullcontext() if precision is None else precision
    weights = [float(algo.loss_weight(b)) for b in batches]
    total = distributed.all_sum(sum(weights))
    scales = [w * distributed.world_size() / total if total > 0 else 0.0 for w in weights]
    rows, step_loss = [], 0.0
    for i, (batch, scale) in enumerate(zip(batches, scales)):
        with ExitStack() as stack:
            if i + 1 < len(batches):  # all-reduce gradients once, after the last micro-batch
                for m in ddp_modules:
                    stack.enter_context(m.no_sync())
            with precision:
                loss, metrics = algo.loss(batch)
            (loss * scale).backward()
        step_loss += float(loss.detach()) * scale
        rows.append(metrics)
    return distributed.average_metrics({**_mean_metrics(rows), "loss": step_loss})


def train(algo: Algorithm, cfg: TrainConfig, name: str = "train") -> dict[str, float]:
    """Run `cfg.steps` optimizer steps of `algo`; returns the final evaluation metrics."""
    world, main = distributed.world_size(), distributed.is_main()
    if cfg.epochs > 0 and algo.num_examples:
        per_step = cfg.batch_size * cfg.grad_accum * world
        cfg = replace(cfg, steps=max(1, math.ceil(cfg.epochs * algo.num_examples / per_step)))
    out_dir = Path(cfg.out_dir)
    ckpt.check_writable_dir(out_dir, "out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(next(iter(algo.modules.values())).parameters()).device
    device_type = device.type
    fsdp = cfg.parallel == "fsdp" and world > 1

    start, bad_steps, skipped, state = 0, 0, 0, None
    identity = run_identity(name, cfg)
    existing = ckpt.checkpoint_dirs(out_dir)
    if existing and not cfg.resume:
        if not cfg.overwrite:
            raise ConfigError(f"{out_dir} holds the checkpoints of an earlier run (latest {existing[-1].name}); pass "
                              "resume=true to continue it, overwrite=true to replace it, or choose another out_dir")
        if main:
            shutil.rmtree(out_dir / "checkpoints")
        distributed.barrier()
    latest = existing[-1:] if cfg.resume else []
    if cfg.resume and not latest:
        print(f"{name}: no checkpoint in {out_dir}/checkpoints; starting from scratch", file=sys.stderr)
    if latest:  # weights go into the bare modules, before they are wrapped or sharded
        state = ckpt.load_state(latest[0])
        missing = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else sorted(STATE_KEYS)
        if missing:
            raise ValueError(f"{latest[0] / ckpt.STATE_FILE}: damaged trainer state, missing {missing}; delete "
                             f"{latest[0]} to resume from the checkpoint before it")
        check_resume(state.get("run"), identity, latest[0], cfg.allow_config_change)
        for module_name, module in algo.modules.items():
            _load_weights(module, latest[0] / module_name)
    for module_name, module in list(algo.modules.items()):
        wrapped = distributed.wrap(module, device, cfg.parallel)
        if wrapped is not module:
            algo.replace_module(module_name, wrapped)
    ddp_modules = [m for m in algo.modules.values() if isinstance(m, distributed.DataParallel)]

    params, groups = [], []
    for module_name, module in algo.modules.items():
        trainable = [p for p in module.parameters() if p.requires_grad]
        params += trainable
        lr = cfg.lr * algo.lr_scales.get(module_name, 1.0)
        groups += [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
    # fused: one kernel updates every parameter (CPU and CUDA), the same numbers to float32 rounding; an 18M model's
    # step took 19 ms against 60-100 for the default per-tensor loop on 2 Intel Xeon threads; FSDP's sharded
    # parameters keep the default loop
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=device_type in ("cpu", "cuda") and not fsdp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
    if state is not None:
        distributed.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if cfg.allow_config_change:  # the options given now win over the saved ones: a new lr takes effect
            scheduler.base_lrs = [g["lr"] for g in groups if g["params"]]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["initial_lr"], group["lr"] = base, base * lr_lambda(scheduler.last_epoch, cfg)
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        algo.load_state_dict(state["algorithm"])
        start, bad_steps, skipped = state["step"], state["bad_steps"], state.get("skipped_steps", 0)
        print(f"{name}: resumed from {latest[0]} at step {start}", file=sys.stderr)
    log = MetricsLog(out_dir, cfg.report_to, start if latest else None, asdict(cfg)) if main else None

    def save_checkpoint(step: int) -> None:
        optimizer_state = distributed.full_optimizer_state(optimizer)  # collective under FSDP

        def write(tmp: Path) -> None:
            for module_name in algo.modules:
                algo.save(module_name, tmp / module_name)
            ckpt.save_state(tmp, {
                "run": identity, "step": step, "bad_steps": bad_steps, "skipped_steps": skipped,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), "rng_torch": torch.get_rng_state(),
                "rng_python": random.getstate(), "algorithm": algo.state_dict(),
            })

        with distributed.full_modules(algo):  # FSDP: rank 0 holds full copies of the sharded modules
            if main:
                ckpt.atomic_write_dir(ckpt.checkpoint_path(out_dir, step), write)
                ckpt.prune(out_dir, cfg.keep_checkpoints)
        distributed.barrier()

    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, disable=not (cfg.progress and main),
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15.0, file=sys.stderr)
    eval_metrics: dict[str, float] = {}
    done = start
    for step in bar:
        done = step + 1
        batches = algo.micro_batches(step)
        for m in algo.modules.values():  # after micro_batches: a rollout leaves the policy in eval mode
            m.train()
        optimizer.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(algo, batches, ddp_modules, training_autocast(cfg, device_type))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else 1e30)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        if not (math.isfinite(metrics["loss"]) and math.isfinite(float(grad_norm))):
            bad_steps, skipped = bad_steps + 1, skipped + 1
            optimizer.zero_grad(set_to_none=True)
            if log:
                log.log(step + 1, {"skipped_nonfinite": 1.0, "bad_steps": float(bad_steps)})
            if bad_steps >= cfg.max_bad_steps:
                raise NonFiniteError(
                    f"{name}: {bad_steps} steps in a row had a non-finite loss or gradient (last at step "
                    f"{step + 1}); stopping. The last good checkpoint is in {out_dir / 'checkpoints'}; "
                    "try a lower lr or enable max_grad_norm."
                )
            scheduler.step()
            continue
        bad_steps = 0
        optimizer.step()
        scheduler.step()
        metrics.update(algo.after_step(step + 1, metrics))
        metrics.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), elapsed_s=time.time() - t0)
        if log:
            log.log(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps and (log or fsdp):
            eval_metrics = _evaluate(algo, final=False)  # FSDP: every rank runs the same evaluation in lockstep
            if log:
                log.log(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
        if cfg.save_every and done % cfg.save_every == 0:
            save_checkpoint(done)
        out_of_time = cfg.max_minutes > 0 and time.time() - t0 > 60 * cfg.max_minutes
        if cfg.max_minutes > 0 and distributed.all_sum(float(out_of_time)) > 0:  # every rank stops at one step
            print(f"{name}: stopping after step {done}: max_minutes={cfg.max_minutes:g} reached", file=sys.stderr)
            break
    bar.close()
    if skipped:
        if skipped >= cfg.steps:
            raise NonFiniteError(f"{name}: all {skipped} steps had a non-finite loss or gradient and were skipped, so "
                                 "the model never changed; no final model written. Try a lower lr.")
        print(f"{name}: {skipped} of {cfg.steps} steps were skipped (non-finite loss or gradient); see "
              f"`skipped_nonfinite` in {out_dir / 'metrics.jsonl'}", file=sys.stderr)
    if log or fsdp:  # rank 0 evaluates and writes the result while the others wait (FSDP: all evaluate)
        eval_metrics = _evaluate(algo, final=True)
    if log:
        log.log(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
    with distributed.full_modules(algo):
        if main:
            first = next(iter(algo.modules))
            if not all(torch.isfinite(p).all() for p in algo.modules[first].parameters()):
                raise NonFiniteError(f"{name}: the trained weights hold NaN or inf; no final model written. "
                                     f"The last good checkpoint (if any) is in {out_dir / 'checkpoints'}.")
            ckpt.atomic_write_dir(out_dir / "final", lambda tmp: algo.save(first, tmp, final=True))
    distributed.barrier()
    return eval_metrics


def _load_weights(module: nn.Module, directory: Path) -> None:
    """Restore a checkpointed module in place: its own `load_weights`, else plain safetensors."""
    if hasattr(module, "load_weights"):
        module.load_weights(directory)
    else:
        load_model(module, str(directory / "model.safetensors"), strict=True)


def evaluated(items: Sequence[T], cfg: TrainConfig, final: bool) -> Sequence[T]:
    """The held-out items an evaluation generates for: all at the end, the first `interim_eval_samples` (when set)
    during training. Evaluation draws from its own seeded generator, so a smaller interim set leaves training
    exactly as it was."""
    return items if final or not cfg.interim_eval_samples else items[:cfg.interim_eval_samples]


def _evaluate(algo: Algorithm, final: bool) -> dict[str, float]:
    for m in algo.modules.values():
        m.eval()
    with torch.no_grad():
        return algo.evaluate(final)
