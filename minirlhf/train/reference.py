"""A reference policy that follows the policy on long runs: TR-DPO's soft (or hard) reference updates
(Gorbatovski et al., 2024), for DPO, online DPO and the policy-gradient methods' KL term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import ConfigError, field
from ..model import mix_into_reference
from ..model.lora import AdaptersDisabled


@dataclass
class ReferenceSyncConfig:
    ref_sync_every: int = field(0, "every N optimizer steps move the reference toward the policy (TR-DPO; 0 = never)",
                                min=0)
    ref_mixup_alpha: float = field(0.6, "α of that update, π_ref ← α·π + (1 - α)·π_ref (1 = copy the policy)",
                                   gt=0, max=1)


def check_reference_sync(cfg: Any, reference: nn.Module | None, where: str) -> None:
    """Refuse syncing where there is no separate reference to move."""
    if not cfg.ref_sync_every:
        return
    if reference is None:
        raise ConfigError(f"{where}: ref_sync_every needs a reference policy (this run loads none: kl_coef=0, "
                          "precomputed reference log-probs, or SimPO)")
    if isinstance(reference, AdaptersDisabled):
        raise ConfigError(f"{where}: ref_sync_every with LoRA is not supported (the reference is the policy's own "
                          "base weights)")


def sync_reference(cfg: Any, reference: nn.Module | None, policy: nn.Module, step: int) -> dict[str, float]:
    """After optimizer step `step`: every `ref_sync_every` steps, mix the policy into the reference."""
    if not cfg.ref_sync_every or reference is None or step % cfg.ref_sync_every:
        return {}
    mix_into_reference(reference, policy, cfg.ref_mixup_alpha)
    return {"ref_synced": 1.0}
