"""Packed fixed-length sequences and a resumable, rank-aware batch order.

A split's token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and
shifted targets). Training visits windows in a seeded random order, a fresh permutation each epoch.
Global sample g is the g-th window visited; a step consumes global_batch consecutive samples, so
the data position is one integer (samples consumed) that a checkpoint stores.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..errors import UserError


class PackedSequences:
    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "split") -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.num_samples = (len(tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise UserError(f"{name} split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        rows_BT = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]).astype(np.int64))
        return rows_BT[:, :-1], rows_BT[:, 1:]


class BatchOrder:
    """Which windows each data-parallel rank reads for each micro-batch of each step."""

    def __init__(self, data: PackedSequences, micro_batch: int, grad_accum: int, dp_size: int,
                 dp_rank: int, seed: int) -> None:
        self.data, self.micro_batch, self.grad_accum = data, micro_batch, grad_accum
        self.dp_size, self.dp_rank, self.seed = dp_size, dp_rank, seed

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.data.num_samples)

    def sample_ids(self, position: int, micro_step: int) -> list[int]:
        """Window ids of this rank's `micro_step`-th micro-batch of the step starting at `position`."""
        first = position + (micro_step * self.dp_size + self.dp_rank) * self.micro_batch
        ids = []
        for g in range(first, first + self.micro_batch):
            epoch, offset = divmod(g, self.data.num_samples)
            ids.append(int(self._permutation(epoch)[offset]))
        return ids

    def micro_batches(self, position: int):
        for micro_step in range(self.grad_accum):
            yield self.data.batch(self.sample_ids(position, micro_step))


def validation_batches(data: PackedSequences, num_samples: int, batch_size: int, dp_size: int, dp_rank: int):
    """The first num_samples windows of the split, in order, shared round-robin across ranks.

    Every rank gets the same number of windows (expert-parallel all-to-alls need equal work), so
    the count is rounded down to a multiple of dp_size.
    """
    count = min(num_samples, data.num_samples)
    count -= count % dp_size
    if count == 0:
        raise UserError(f"validation needs at least {dp_size} sequences; the split has {data.num_samples}")
    ids = list(range(count))[dp_rank::dp_size]
    for start in range(0, len(ids), batch_size):
        yield data.batch(ids[start:start + batch_size])
