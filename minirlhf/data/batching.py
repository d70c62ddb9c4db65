"""Turning token lists into batches: deterministic example order, padding, packing.

Example order is a pure function of (seed, epoch), so the examples of any step can be recomputed after a
restart: that is what makes `--resume` exact without saving a data-loader state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


class ExampleOrder:
    """An endless stream of example indices: epoch e is a permutation of range(n) seeded by (seed, e)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError("no examples to train on")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            order = list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cache = {epoch: order}
            return order
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """Indices at stream positions start .. start + count - 1."""
        return [self._epoch(p // self.n)[p % self.n] for p in range(start, start + count)]


def pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def pack(token_lists: Sequence[Sequence[int]], block_len: int, separator: int) -> list[list[int]]:
    """Concatenate documents (each followed by `separator`) and cut into blocks of block_len tokens."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(separator)
    return [stream[i:i + block_len] for i in range(0, len(stream) - block_len + 1, block_len)]


class StepBatches:
    """Example indices for each optimizer step: `grad_accum` micro-batches of `batch_size` from the stream.

    Data parallel: a global micro-batch is `batch_size * world` consecutive stream positions and process
    `rank` takes the rank-th slice, so N processes read exactly what one process with N times the batch
    would."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.order = ExampleOrder(n, seed)
        self.batch_size, self.grad_accum, self.rank, self.world = batch_size, grad_accum, rank, world

    def indices(self, step: int) -> list[list[int]]:
        first, size = step * self.grad_accum, self.batch_size * self.world
        return [self.order.take((first + m) * size + self.rank * self.batch_size, self.batch_size)
                for m in range(self.grad_accum)]
