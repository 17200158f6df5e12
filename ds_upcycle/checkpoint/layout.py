"""How DeepSpeed ZeRO-1/2 lays a parameter group out in flat fp32 partitions.

Mirrors deepspeed/runtime/zero/stage_1_and_2.py (0.19.8), DeepSpeedZeroOptimizer.__init__:

- the group's parameters are concatenated in order; with `zero_optimization.parameter_alignment`
  each parameter but the last is followed by zeros up to a multiple of 16 bytes;
- the whole is zero-padded at the end to a multiple of 2 * dp (nccl_start_alignment_factor times
  the group's data-parallel size) and cut into dp equal partitions, one per rank of the group;
- a rank saves its fp32 partition without the trailing padding (`group_paddings`) and its Adam
  moments with it;
- expert parameters are grouped separately (moe/utils.py,
  split_params_into_different_moe_groups_for_optimizer): cut greedily into groups of at most
  178,956,971 elements and partitioned over the expert-data-parallel group only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

NCCL_START_ALIGNMENT_FACTOR = 2
MAX_MOE_GROUP_NUMEL = 178956971


@dataclass(frozen=True)
class Fragment:
    """The part of one parameter held by one rank's partition."""

    name: str
    partition: int        # index of the rank within the group's data-parallel group
    param_start: int      # offset of the fragment within the flattened parameter
    partition_start: int  # offset of the fragment within the rank's partition
    numel: int


@dataclass(frozen=True)
class FlatGroup:
    """One optimizer parameter group, flattened and partitioned over `dp_size` ranks."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    paddings: tuple[int, ...]  # zeros after each parameter (parameter_alignment)
    dp_size: int

    @cached_property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @cached_property
    def offsets(self) -> dict[str, int]:
        offsets, current = {}, 0
        for name, numel, padding in zip(self.names, self.numels, self.paddings):
            offsets[name] = current
            current += numel + padding
        return offsets

    @property
    def used_numel(self) -> int:
        return sum(self.numels) + sum(self.paddings)

    @property
    def flat_numel(self) -> int:
        alignment = NCCL_START_ALIGNMENT_FACTOR * self.dp_size
        return math.ceil(self.used_numel / alignment) * alignment

    @property
    def partition_size(self) -> int:
        return self.flat_numel // self.dp_size

    def group_padding(self, partition: int) -> int:
        """Trailing zeros of a partition that DeepSpeed strips from the saved fp32 weights."""
        start, size = partition * self.partition_size, self.partition_size
        return min(size, max(0, start + size - self.used_numel))

    def locate(self, name: str, start: int = 0, numel: int | None = None) -> list[Fragment]:
        """The fragments of a parameter, in partition order; together they are the whole parameter.

        With `start` and `numel`: of those elements only (one expert of a fused parameter), and
        each fragment's param_start counts from `start`.
        """
        whole = self.numels[self.index[name]]
        numel = whole - start if numel is None else numel
        if not (0 <= start and numel >= 0 and start + numel <= whole):
            raise ValueError(f"{name}: elements [{start}, {start + numel}) are outside its {whole}")
        return self._fragments(name, self.offsets[name] + start, numel)

    def fragments(self, partition: int) -> list[Fragment]:
        """Every parameter fragment held by one partition, in flat order."""
        lo, hi = partition * self.partition_size, (partition + 1) * self.partition_size
        result = []
        for name, numel in zip(self.names, self.numels):
            start = self.offsets[name]
            if start < hi and start + numel > lo:
                result += [f for f in self._fragments(name, start, numel) if f.partition == partition]
        return result

    def _fragments(self, name: str, start: int, numel: int) -> list[Fragment]:
        size, end, result = self.partition_size, start + numel, []
        for partition in range(start // size, (end - 1) // size + 1):
            lo = max(start, partition * size)
            hi = min(end, (partition + 1) * size)
            result.append(Fragment(name, partition, lo - start, lo - partition * size, hi - lo))
        return result


def alignment_paddings(numels: list[int], element_size: int, enabled: bool) -> list[int]:
    """Per-parameter padding of `zero_optimization.parameter_alignment` (none after the last one)."""
    alignment = 16 // math.gcd(16, element_size) if enabled else 1
    paddings, offset = [], 0
    for index, numel in enumerate(numels):
        offset += numel
        padding = 0 if index == len(numels) - 1 else (-offset) % alignment
        paddings.append(padding)
        offset += padding
    return paddings


def flat_group(names: list[str], numels: list[int], dp_size: int, element_size: int,
               parameter_alignment: bool) -> FlatGroup:
    paddings = alignment_paddings(numels, element_size, parameter_alignment)
    return FlatGroup(tuple(names), tuple(numels), tuple(paddings), dp_size)


def split_moe_group(numels: list[int], max_numel: int = MAX_MOE_GROUP_NUMEL) -> list[range]:
    """Index ranges of the optimizer groups DeepSpeed cuts an expert parameter group into."""
    chunks, start, size = [], 0, 0
    for index, numel in enumerate(numels):
        if size + numel > max_numel and index > start:
            chunks.append(range(start, index))
            start, size = index, 0
        size += numel
    if start < len(numels):
        chunks.append(range(start, len(numels)))
    return chunks
