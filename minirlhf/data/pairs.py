"""Preference pairs as token ids, and their batches.

A pair becomes two sequences `prompt + response + <|im_end|>`, each with a completion mask that is 1 on
the response tokens only. A batch puts the B chosen sequences first and the B rejected ones after, right-
padded to one width, so one forward pass serves both (the "concatenated forward" of DPO trainers).
Over-long pairs are cut from the left of the prompt first (the end of the prompt matters most), then from
the end of the response; the number cut is reported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tokenizer import Tokenizer
from .batching import pad_right
from .formats import PreferencePair, load_preferences


@dataclass(frozen=True)
class TokenizedPair:
    chosen_ids: list[int]
    chosen_start: int  # index of the first response token
    rejected_ids: list[int]
    rejected_start: int


def _fit(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], int, bool]:
    cut = len(prompt) + len(response) > max_len
    if cut:
        keep_prompt = max(1, min(len(prompt), max_len - len(response)))
        prompt = prompt[-keep_prompt:]
        response = response[: max_len - len(prompt)]
    return prompt + response, len(prompt), cut


def tokenize_pairs(tokenizer: Tokenizer, pairs: Sequence[PreferencePair], max_len: int) -> list[TokenizedPair]:
    out, cut = [], 0
    for pair in pairs:
        prompt = tokenizer.encode_prompt(pair.prompt)
        chosen, c_start, c_cut = _fit(prompt, tokenizer.encode_response(pair.chosen), max_len)
        rejected, r_start, r_cut = _fit(prompt, tokenizer.encode_response(pair.rejected), max_len)
        cut += c_cut or r_cut
        out.append(TokenizedPair(chosen, c_start, rejected, r_start))
    if cut:
        print(f"preferences: truncated {cut} of {len(pairs)} pairs to max_len={max_len}", file=sys.stderr)
    return out


def collate_pairs(rows: Sequence[TokenizedPair], pad_id: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask), each (2B, T): chosen rows, then rejected rows."""
    seqs = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
    starts = [r.chosen_start for r in rows] + [r.rejected_start for r in rows]
    ids = pad_right(seqs, pad_id)
    attention = pad_right([[1] * len(s) for s in seqs], 0)
    completion = pad_right([[0] * st + [1] * (len(s) - st) for s, st in zip(seqs, starts)], 0)
    return ids.to(device), attention.to(device), completion.to(device)


def collate_shared_prompts(rows: Sequence[TokenizedPair], pad_id: int, device: torch.device | str = "cpu"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(input_ids, attention_mask, completion_mask, P), each (2B, P + R), chosen rows then rejected rows, laid out
    as the prompt left-padded to P columns, then the response right-padded: the layout in which a pair's two
    rows continue one prompt, so a shared-prompt forward runs it once (`SharedPrompt`). None when a pair's two
    prompts differ (truncation cut them differently): then `collate_pairs`."""
    prompts = [r.chosen_ids[:r.chosen_start] for r in rows]
    if any(r.rejected_ids[:r.rejected_start] != p for r, p in zip(rows, prompts)):
        return None
    responses = [r.chosen_ids[r.chosen_start:] for r in rows] + [r.rejected_ids[r.rejected_start:] for r in rows]
    width = max(len(p) for p in prompts)
    prompt_ids = [[pad_id] * (width - len(p)) + p for p in prompts] * 2
    prompt_mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts] * 2
    ids = torch.cat([torch.tensor(prompt_ids), pad_right(responses, pad_id)], 1)
    response_mask = pad_right([[1] * len(r) for r in responses], 0)
    attention = torch.cat([torch.tensor(prompt_mask), response_mask], 1)
    completion = torch.cat([torch.zeros(len(responses), width, dtype=torch.long), response_mask], 1)
    return ids.to(device), attention.to(device), completion.to(device), width


def load_pairs(path: str) -> list[PreferencePair]:
    """`load_preferences`, telling the user how many pairs were skipped (chosen == rejected, empty) and why."""
    skipped: list[str] = []
    pairs = load_preferences(path, skipped=skipped)
    if skipped:
        print(f"{path}: skipped {len(skipped)} pairs, e.g. {skipped[0]}", file=sys.stderr)
    return pairs
