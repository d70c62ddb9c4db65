"""The models' linear layer: `nn.Linear` whose large float32 CPU products run on oneDNN where that is faster.

PyTorch's CPU `F.linear` / `mm` in float32 calls MKL's sgemm, which picks its code path by CPU vendor: on AMD CPUs
it takes a path far below the hardware's AVX-512 rate, and oneDNN (bundled with PyTorch, `torch.ops.mkldnn`)
reaches it. Measured on a 2-core AMD EPYC (Zen 5), 2 threads, at training shapes (1800-4600 rows, 512 <-> 1024
features): MKL 200-230 GFLOP/s for every product; oneDNN 450-530 for y = x Wᵀ and dx = dy W, 320-430 for dW = dyᵀ x.
On Intel CPUs MKL is at home and oneDNN is not faster (a 2-core Xeon with AMX, same shapes: MKL 150-230, oneDNN
120-205; dW = dyᵀ x: MKL 131-183, oneDNN 93-120), so there the layer stays on MKL (`onednn_beats_blas`).
`OneDNNLinear` sends the three products of a float32 CPU layer to oneDNN where it is faster and once a product is
large enough to pay for oneDNN's per-call cost (below `ONEDNN_MIN_MACS`, e.g. one decode row, MKL is faster), and
is `nn.Linear` everywhere else: on Intel and ARM CPUs, on CUDA, in bf16 or under autocast (bf16 `mm` already runs
on oneDNN), or when the build lacks the ops. The native model is built with it; Hugging Face models get it by
`use_onednn_linears` when loaded. Same parameters, state dict, HF export and LoRA targets as `nn.Linear`; same
math in float32 (another summation order: results differ from MKL's by float32 rounding, ~1e-6 relative).
"""

from __future__ import annotations

import platform
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_CPU_LINEARS = True  # False: every product through F.linear (the benchmarks' `--aten-linears`)
ONEDNN_MIN_MACS = 1 << 23  # rows x in x out below which MKL is faster (64 x 192 x 64: MKL 150, oneDNN 100 GFLOP/s)


@cache
def has_onednn_linear() -> bool:
    """Whether oneDNN's linear ops are used here: an x86-64 CPU (where they were measured; ARM CPUs keep PyTorch's
    own BLAS, e.g. Accelerate on Apple silicon) and a torch build that has them."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@cache
def cpuinfo(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("vendor_id": "GenuineIntel", "AuthenticAMD", ...; "flags": the
    instruction-set flags), "" where there is no such file or field (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


@cache
def onednn_beats_blas() -> bool:
    """Whether the fp32 training products go to oneDNN rather than MKL: oneDNN's ops are here and the CPU is not an
    Intel one (where MKL takes its fast path; see the module docstring for the rates on both)."""
    return has_onednn_linear() and cpuinfo("vendor_id") != "GenuineIntel"


def in_float32(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) in float32, also under bf16 autocast: for the output heads (LM head, scalar reward/value head),
    whose outputs go straight into log-softmax and the losses. A bf16 output keeps 8 significant bits, so a logit
    of 10 moves in steps of 1/16. The demo's tiny model pretrained with bf16 logits reached a lower training loss,
    yet its SFT model sampled the held-out answers right 0.08 / 0.21 of the time (seeds 0 / 1) against 0.26 / 0.37
    in float32; with these heads in float32 and everything else in bf16, 0.29 / 0.35. The cost: one float32 product
    (vocab x hidden weights) per forward, +1% of a bf16 forward + backward of the 18M benchmark model (vocab 320),
    +12% at `mini` (vocab 6400). Without autocast: head(hidden), as it is."""
    if not torch.is_autocast_enabled(hidden.device.type):
        return head(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float())


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes x in: autocast's where it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def cpu_autocast_on() -> bool:
    """Whether CPU autocast is active (its products then run in bf16, already on oneDNN)."""
    return torch.is_autocast_enabled("cpu")  # the device argument exists from torch 2.4; we require >= 2.6


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ (+ b) by oneDNN: x (..., in), weight (out, in) or any strided view of that shape -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b; backward dx = dy W, dW = dyᵀ x (each one oneDNN product; the transposes are views, not
    copies) and db = the sum of dy over rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy_rows = dy.reshape(-1, dy.shape[-1])
        dx = onednn_linear(dy, weight.t()) if ctx.needs_input_grad[0] else None
        dw = onednn_linear(dy_rows.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        db = dy_rows.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose float32 CPU products (forward and backward) run on oneDNN where it beats MKL and the product
    is large enough."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ONEDNN_CPU_LINEARS and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not cpu_autocast_on() and x.numel() * self.weight.shape[0] >= ONEDNN_MIN_MACS
                and onednn_beats_blas()):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Make every plain `nn.Linear` in `model` (a Hugging Face model, say) a `OneDNNLinear`, in place: the same
    module with the same parameters, only its forward changes; subclasses (LoRA layers, quantised linears) are
    left alone."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model
