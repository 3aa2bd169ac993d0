"""Segmented-gather matrix-vector products (SGMV): the LoRA math of a mixed-adapter batch.

Tokens are grouped into contiguous segments that share one adapter slot. For each segment
with slot s >= 0 and rank r = ranks[s] > 0:

    y[seg] += scales[s] * (x[seg] @ A[s, :r].T) @ B[s, :, :r].T

Storage is PEFT's layout per slot, padded to the largest rank: `lora_a [slots, max_rank, in]`,
`lora_b [slots, out, max_rank]`. Only a slot's first r rows of A and columns of B are read, so
a rank-4 adapter costs rank-4 work next to a rank-64 one. The torch reference makes PEFT's own
calls on those slices (`F.linear`, then scale, then add), so on the CPU its arithmetic is
PEFT's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segments:
    """Per-step grouping of the packed tokens by adapter slot, shared by every layer."""

    starts: tuple[int, ...]  # [num_segments + 1] token offsets, starts[0] == 0
    slots: tuple[int, ...]  # [num_segments] adapter slot of each segment, -1 for none

    def __post_init__(self) -> None:
        assert len(self.starts) == len(self.slots) + 1
        assert not self.starts or self.starts[0] == 0
        assert all(a <= b for a, b in zip(self.starts, self.starts[1:]))

    @property
    def has_lora(self) -> bool:
        return any(s >= 0 for s in self.slots)

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


def sgmv_ref(
    y: torch.Tensor,  # [T, out], updated in place
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, in]
    lora_b: torch.Tensor,  # [num_slots, out, max_rank]
    segments: Segments,
    ranks: list[int],  # [num_slots] rank of each slot for this module, 0 if untargeted
    scales: list[float],  # [num_slots]
) -> torch.Tensor:
    """Plain torch reference: one shrink and one expand per segment, scaled and added in
    PEFT's order (expand, scale, add) so that rounding matches PEFT's too."""
    if x.dtype != lora_a.dtype:
        x = x.to(lora_a.dtype)
    for i, slot in enumerate(segments.slots):
        r = ranks[slot] if slot >= 0 else 0
        if r == 0:
            continue
        a, b = segments.starts[i], segments.starts[i + 1]
        shrunk = F.linear(x[a:b], lora_a[slot, :r])  # [n, r]
        delta = F.linear(shrunk, lora_b[slot, :, :r]).mul_(scales[slot])  # [n, out]
        y[a:b] += delta if delta.dtype == y.dtype else delta.to(y.dtype)
    return y


def sgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    ranks: list[int],
    scales: list[float],
) -> torch.Tensor:
    """Dispatcher with the SGMV contract above. Today every device takes the torch
    reference; the Triton kernel plugs in here for CUDA."""
    return sgmv_ref(y, x, lora_a, lora_b, segments, ranks, scales)
