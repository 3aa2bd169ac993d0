"""Per-step grouping of the packed tokens by adapter slot, built once and read by every layer.

`Segments` is the host view (Python ints) that the torch reference walks. `SGMVMeta` is the
kernels' view: the adapter segments only, as one int32 device tensor of a fixed capacity.
Fixed shapes are what make a launch capturable in a CUDA graph: the kernels' grids depend on
the token count and the capacity, never on how the tokens happen to split, and a new step's
split is a copy into the same tensor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Runs of tokens that share one adapter slot, in packed token order."""

    starts: tuple[int, ...]  # [num_segments + 1] token offsets, starts[0] == 0
    slots: tuple[int, ...]  # [num_segments] adapter slot of each segment, -1 for none

    def __post_init__(self) -> None:
        assert len(self.starts) == len(self.slots) + 1
        assert not self.starts or self.starts[0] == 0
        assert all(a <= b for a, b in zip(self.starts, self.starts[1:]))

    @functools.cached_property  # read by every wrapped projection of the step
    def has_lora(self) -> bool:
        return any(s >= 0 for s in self.slots)

    @property
    def num_tokens(self) -> int:
        return self.starts[-1]

    @classmethod
    def from_token_slots(cls, token_slots: list[int]) -> Segments:
        """Runs of equal slots in token order: [3, 3, -1, 5, 5] -> starts (0, 2, 3, 5)."""
        starts, slots = [0], []
        for i, slot in enumerate(token_slots):
            if i and slot == token_slots[i - 1]:
                continue
            if i:
                starts.append(i)
            slots.append(slot)
        if token_slots:
            starts.append(len(token_slots))
        return cls(tuple(starts), tuple(slots))


@dataclass(frozen=True)
class SGMVMeta:
    """One step's adapter segments on the device, padded to `capacity` entries.

    Row 0 holds each segment's first token, row 1 its length, row 2 its slot. Segments of
    tokens without an adapter are left out, so the kernels never visit those tokens; unused
    entries have length 0 and slot -1 and own no work.
    """

    table: torch.Tensor  # [3, capacity] int32
    num_tokens: int  # all packed tokens of the step, with or without an adapter

    def __post_init__(self) -> None:
        assert self.table.dtype == torch.int32 and self.table.dim() == 2
        assert self.table.shape[0] == 3 and self.table.is_contiguous()

    @property
    def capacity(self) -> int:
        return self.table.shape[1]

    @property
    def seg_start(self) -> torch.Tensor:  # [capacity]
        return self.table[0]

    @property
    def seg_len(self) -> torch.Tensor:  # [capacity]
        return self.table[1]

    @property
    def seg_slot(self) -> torch.Tensor:  # [capacity]
        return self.table[2]

    @staticmethod
    def rows(segments: Segments, capacity: int) -> list[list[int]]:
        """The table's three rows as lists: the host half of `build`."""
        lora = [i for i, slot in enumerate(segments.slots) if slot >= 0]
        assert len(lora) <= capacity, (
            f"{len(lora)} adapter segments exceed the capacity {capacity}: group the tokens "
            "by slot so that each slot forms one segment")
        pad = capacity - len(lora)
        starts = [segments.starts[i] for i in lora] + [0] * pad
        lengths = [segments.starts[i + 1] - segments.starts[i] for i in lora] + [0] * pad
        slots = [segments.slots[i] for i in lora] + [-1] * pad
        return [starts, lengths, slots]

    @classmethod
    def build(cls, segments: Segments, capacity: int, device: torch.device | str) -> SGMVMeta:
        """One host-to-device copy per step; `capacity` bounds the adapter segments (the
        number of slots when tokens are grouped by slot)."""
        table = torch.tensor(cls.rows(segments, capacity), dtype=torch.int32, device=device)
        return cls(table, segments.num_tokens)
