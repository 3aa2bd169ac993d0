"""Segmented-gather matrix-vector products (SGMV): the LoRA math of a mixed-adapter batch.

Tokens are grouped into contiguous segments that share one adapter slot. For each segment
with slot s >= 0 and rank r = ranks[s] > 0:

    y[seg] += scales[s] * (x[seg] @ A[s, :r].T) @ B[s, :, :r].T

Storage is PEFT's layout per slot, padded to the largest rank: `lora_a [slots, max_rank, in]`,
`lora_b [slots, out, max_rank]`. Only a slot's first r rows of A and columns of B are read, so
a rank-4 adapter costs rank-4 work next to a rank-64 one. The CPU kernel keeps its own layout
(`sgmv_cpu.PackedSlots`), which holds the same weights.

Three implementations of that contract:

* `sgmv_ref`, plain torch, makes PEFT's own calls on those slices (`F.linear`, then scale,
  then add), so on the CPU, on weights in PEFT's memory layout, its arithmetic is PEFT's bit
  for bit. The oracle of the other two, and the engine's CPU path for dtypes other than fp32,
  for bitsandbytes bases (see `resolve_backend`) and where no C compiler is.
* `sgmv_cpu` (`sgmv_cpu.c`), one C call per projection per step with register-tiled loops
  over weights packed for them, for fp32 on the CPU. It rounds differently from MKL's GEMMs
  (about 1e-6 relative), and is several times faster than the reference at decode shapes,
  where the reference's cost is two small-GEMM calls per segment (see docs/benchmarks.md).
  The engine's CPU path.
* `sgmv_triton`, two Triton kernels (`sgmv_shrink`: x -> fp32 h = x A^T; `sgmv_expand`:
  y += scale * h B^T) that take several output slices sharing x in one launch each, with
  per-slice ranks and scales. All per-step inputs are device tensors of fixed shape
  (`SGMVMeta`), and no launch reads a device value on the host, so both launches can be
  captured in a CUDA graph. The engine's CUDA path (`sgmv_triton` takes several output
  slices at once: the engine's fused q/k/v and gate/up groups call it directly).

`sgmv` follows the backend the engine chose once, at start-up (`--lora-backend`, see
`server/runner/lora_layers.py`): weights packed for the C kernel go to it, a step with an
`SGMVMeta` goes to Triton, the rest to the reference. Triton is imported only on its path:
the server runs on machines without it. The Triton backend runs on CPU tensors too, in
Triton's interpreter, which must be selected before Triton's first import (TRITON_INTERPRET
is read whenever `@triton.jit` decorates a function, Triton's own library included; see
tests/conftest.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from . import sgmv_cpu
from .segments import Segments, SGMVMeta


class SlotWeights(Protocol):
    """One projection's adapter weights for every slot, with each slot's rank and scale kept
    twice: as Python lists for the reference and as device tensors for the kernels. The
    weights are either `packed` for the CPU kernel or `lora_a` / `lora_b`, never both."""

    lora_a: torch.Tensor | None  # [num_slots, max_rank, in]
    lora_b: torch.Tensor | None  # [num_slots, out, max_rank]
    packed: sgmv_cpu.PackedSlots | None
    ranks: list[int]  # [num_slots], 0 where the slot's adapter does not target the module
    scales: list[float]  # [num_slots]
    ranks_dev: torch.Tensor  # [num_slots] int32, on the weights' device
    scales_dev: torch.Tensor  # [num_slots] fp32, on the weights' device


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


def sgmv_triton(
    y: torch.Tensor,  # [T, sum(widths)], updated in place
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    lora_b: torch.Tensor,  # [num_slots, sum(widths), max_rank]
    meta: SGMVMeta,
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    scales: torch.Tensor,  # [num_slices, num_slots] fp32
    widths: tuple[int, ...] | None = None,  # each slice's output width; one slice if None
) -> torch.Tensor:
    """y[t, slice p] += scales[p, s] * (x[t] @ A[p, s, :r].T) @ B[s, slice p, :r].T with
    s = slot(t), r = ranks[p, s]: shrink into an fp32 scratch, then expand into y."""
    from .sgmv_expand import sgmv_expand
    from .sgmv_shrink import sgmv_shrink

    num_slices, _, max_rank, _ = lora_a.shape
    h = torch.empty(x.shape[0], num_slices * max_rank, dtype=torch.float32, device=x.device)
    sgmv_shrink(h, x, lora_a, meta, ranks)
    return sgmv_expand(y, h, lora_b, meta, ranks, scales, widths)


def sgmv(
    y: torch.Tensor,  # [T, out], updated in place
    x: torch.Tensor,  # [T, in]
    weights: SlotWeights,
    segments: Segments,
    meta: SGMVMeta | None,  # the Triton kernels' view of `segments`; None for the others
    table: sgmv_cpu.SegmentTable | None = None,  # the CPU kernel's view of `segments`
) -> torch.Tensor:
    """The SGMV contract above, by the backend the engine chose at start-up: the C kernel
    where the weights are packed for it, the Triton kernels where the step has an SGMVMeta
    (on CUDA, or on CPU tensors in Triton's interpreter), the torch reference otherwise."""
    if weights.packed is not None:
        if table is None:
            raise ValueError("weights packed for the CPU kernel need the step's SegmentTable")
        return sgmv_cpu.sgmv_cpu(y, x if x.stride(-1) == 1 else x.contiguous(),
                                 weights.packed, table)
    if meta is None:
        return sgmv_ref(y, x, weights.lora_a, weights.lora_b, segments, weights.ranks,
                        weights.scales)
    if x.dtype != weights.lora_a.dtype:
        x = x.to(weights.lora_a.dtype)
    return sgmv_triton(y, x, weights.lora_a[None], weights.lora_b, meta,
                       weights.ranks_dev[None], weights.scales_dev[None])
