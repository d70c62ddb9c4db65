"""Data parallelism on `torch.distributed`: `torchrun --nproc_per_node=N minirlhf <stage> ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup()` joins the process group (nccl on GPU, gloo on CPU)
and the loop wraps each trainable module in DistributedDataParallel. The split of work:

* `batch_size` is per process; a micro-batch of the global batch (batch_size x world) is a contiguous
  block of the same seeded example stream a single process would read, and rank r takes the r-th slice.
* A loss that is a mean over units (tokens, sequences) says how many (`Algorithm.loss_weight`); the loop
  scales each micro-batch by its share of the units of the whole step on all ranks, so the gradient DDP
  averages is that of the global batch's mean, not a mean of means.
* Online RL: each rank samples and scores its slice of the rollout (whole GRPO groups), then the rollout
  is gathered so advantages, whitening and value trackers see the global batch and every rank holds the
  same buffer (rank 0 checkpoints it, so a run resumes under any world size).
* Rank 0 alone writes checkpoints, metrics and the progress bar; metrics are averaged over ranks.

With one process every function here is the identity, and nothing is initialised.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model.heads import ScalarHeadModel


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (it sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the torchrun process group if launched by torchrun; returns the device this rank uses."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    """Leave the process group, if this process joined one: without it gloo's threads can outlive the interpreter
    and abort the process at exit (seen as "terminate called without an active exception", exit -6)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list, what: str = "items") -> list:
    """This rank's contiguous slice of `items` (whose length must divide by the world size)."""
    n, w = len(items), world_size()
    if n % w:
        raise ValueError(f"{n} {what} do not split evenly over {w} processes")
    size = n // w
    return items[rank() * size:(rank() + 1) * size]


def all_sum(value: float) -> float:
    """The sum of `value` over ranks (float64, so integer counts stay exact)."""
    if world_size() == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return float(total)


def average_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that report it."""
    if world_size() == 1:
        return metrics
    rows: list[Any] = [None] * world_size()
    dist.all_gather_object(rows, metrics)
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def gather_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate every rank's rows in rank order; per-token tensors are right-padded with 0 to a common
    width first (their masks are 0 there). The identity for one process."""
    if world_size() == 1:
        return tensors
    out = {}
    for name in sorted(tensors):
        local = tensors[name]
        width = torch.tensor([local.shape[-1] if local.dim() > 1 else 0], device=local.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if local.dim() > 1 and local.shape[-1] < int(width):
            local = nn.functional.pad(local, (0, int(width) - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(world_size())]
        dist.all_gather(parts, local.contiguous())
        out[name] = torch.cat(parts)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class DataParallel(nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attributes (`new_cache`, `save_pretrained`, `config` ...) to the wrapped
    model, so algorithms, the sampler and checkpointing use it exactly like the bare model."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(module: nn.Module, device: torch.device, how: str = "ddp") -> nn.Module:
    """DDP around a trainable module (gradients all-reduced and averaged in backward), or FSDP2 sharding
    (`how="fsdp"`). A scalar-head model never uses its backbone's LM head, and MoE layers skip unrouted
    experts: those need DDP's unused-parameter scan."""
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    if how == "fsdp":
        return _fully_shard(module, device)
    unused = isinstance(module, ScalarHeadModel) or getattr(module.config, "use_moe", False)
    # Buffers (RoPE tables) are equal on every rank: no need to re-send them each forward.
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False}
    return DataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=bool(unused), **sync)


# --- FSDP2 -------------------------------------------------------------------------------------------
# Each decoder block, then the whole model, is sharded with `fully_shard`: parameters, gradients and
# optimizer state live 1/N on each rank and blocks are all-gathered just in time for forward and backward.
# Rank 0 keeps a CPU copy of the unsharded module to write checkpoints in the usual formats (the full
# weights are gathered into it at save time), and optimizer state is saved unsharded, so an FSDP
# checkpoint is an ordinary checkpoint: it resumes under FSDP, DDP or a single process alike.

_FULL_COPIES: dict[int, nn.Module | None] = {}


def _fully_shard(module: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    full_copy = copy.deepcopy(module).cpu() if is_main() else None
    blocks = next((m for n, m in module.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList)), [])
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    _FULL_COPIES[id(module)] = full_copy
    return module


def is_sharded(module: nn.Module) -> bool:
    return id(module) in _FULL_COPIES


@contextmanager
def full_modules(algo: Any) -> Iterator[None]:
    """Inside the block, the sharded modules of `algo.modules` are replaced by rank 0's full CPU copies holding
    the current weights (a collective: every rank must enter). A no-op without FSDP."""
    if not any(is_sharded(m) for m in algo.modules.values()):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    saved = algo.modules
    full = {}
    for name, module in saved.items():
        if is_sharded(module):
            state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            copy_ = _FULL_COPIES[id(module)]
            if copy_ is not None:
                copy_.load_state_dict(state)
            full[name] = copy_
        else:
            full[name] = module
    algo.modules = full
    try:
        yield
    finally:
        algo.modules = saved


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with sharded (DTensor) state gathered into full tensors (collective)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: build new dicts
    state["state"] = {index: {key: value.full_tensor().cpu() if hasattr(value, "full_tensor") else value
                              for key, value in entry.items()} for index, entry in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state; state of sharded parameters is re-sharded like its parameter."""
    optimizer.load_state_dict(state)
    for param, entry in optimizer.state.items():
        if not hasattr(param, "device_mesh"):
            continue
        from torch.distributed.tensor import distribute_tensor

        for key, value in list(entry.items()):
            if torch.is_tensor(value) and value.shape == param.shape and not hasattr(value, "device_mesh"):
                entry[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                               src_data_rank=None)
