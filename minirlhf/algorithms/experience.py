"""One rollout of online RL as a typed record: what was sampled, how it scored, and what the method made of it.

Row i is prompt `prompt_index[i]` followed by one sampled completion. Per-token tensors come in two widths:
the sequence's T positions (`input_ids`, `attention_mask`, `completion_mask`) and the T - 1 predicted positions
(`old_logps`, `ref_logps`, `advantages`; position t is about token t + 1, as in logprobs.py), whose mask is
`loss_mask` = completion_mask[:, 1:]. Methods add their own targets by subclassing (PPO's returns and values,
online DPO's pair labels); every transformation returns a new record instead of mutating one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..model.minimind import SharedPrompt

E = TypeVar("E", bound="Experience")


@dataclass
class Experience:
    input_ids: Tensor        # (rows, T) prompt + completion, padded
    attention_mask: Tensor   # (rows, T) 1 on real tokens
    completion_mask: Tensor  # (rows, T) 1 on completion tokens that train (incl. EOS); 0 = no loss for the row
    rewards: Tensor          # (rows,) clipped and shaped: what advantages are computed from
    lengths: Tensor          # (rows,) completion tokens sampled
    truncated: Tensor        # (rows,) 1 where the completion hit max_new_tokens without EOS
    prompt_index: Tensor     # (rows,) index of the row's prompt in the dataset
    old_logps: Tensor | None = None     # (rows, T-1) log π_old; None when π_old = π (one update per rollout)
    ref_logps: Tensor | None = None     # (rows, T-1) log π_ref; None without a KL term
    reward_parts: Tensor | None = None  # (rows, reward functions) unweighted scores, for multi-reward advantages
    advantages: Tensor | None = None    # (rows, T-1) the method's per-token advantage
    sampler_logps: Tensor | None = None  # (rows, T-1) log π_sampler of the sampled tokens (a bf16 sampler's); None:
    #                                      the sampler was the fp32 policy itself
    prompt_width: int = 0  # P: the prompt columns every row has (left-padded); 0 = not known
    stats: dict[str, float] = dataclasses.field(default_factory=dict)  # the rollout's metrics

    @property
    def loss_mask(self) -> Tensor:
        """(rows, T-1) float: 1 where a predicted token is a completion token that trains."""
        return self.completion_mask[:, 1:].float()

    def __len__(self) -> int:
        return self.rewards.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor field that is set, by name (what gathering, slicing and checkpoints handle)."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)}

    def replace(self: E, **changes: Any) -> E:
        return dataclasses.replace(self, **changes)

    def select(self: E, rows: Tensor) -> E:
        """The given rows (an index tensor), with the rollout's stats."""
        return self.replace(**{name: value[rows] for name, value in self.tensors().items()})

    def to(self: E, device: torch.device) -> E:
        return self.replace(**{name: value.to(device) for name, value in self.tensors().items()})

    @classmethod
    def concat(cls, parts: list[E]) -> E:
        """Rows of several records (the same fields set) in one: per-token tensors are right-padded with 0 to the
        widest (masks are 0 there, as in distributed.gather_rows); the stats are the first record's."""
        merged = {}
        for name, first in parts[0].tensors().items():
            tensors = [getattr(p, name) for p in parts]
            if first.dim() > 1:
                width = max(t.shape[1] for t in tensors)
                tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors]
            merged[name] = torch.cat(tensors)
        return parts[0].replace(**merged)

    @classmethod
    def extend(cls: type[E], exp: Experience, **fields: Any) -> E:
        """A record of this subclass holding `exp`'s fields plus the subclass's own."""
        return cls(**{f.name: getattr(exp, f.name) for f in dataclasses.fields(exp)}, **fields)

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors(), "stats": self.stats, "prompt_width": self.prompt_width}

    @classmethod
    def from_state_dict(cls: type[E], state: dict[str, Any], device: torch.device) -> E:
        return cls(**{k: v.to(device) for k, v in state["tensors"].items()}, stats=state["stats"],
                   prompt_width=state.get("prompt_width", 0))

    def shared_prompt(self) -> SharedPrompt | None:
        """Which rows continue the same prompt (for the shared-prompt forward), when the prompt width is known."""
        return SharedPrompt.of(self.prompt_index, self.prompt_width) if self.prompt_width else None
