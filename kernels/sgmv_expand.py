"""SGMV expand: each adapter token's shrunk activations times its slot's LoRA B, scaled and
added into the output, for every output slice.

Semantics, for every token t of an adapter segment with slot s and slice p of width w_p at
column offset o_p, with r_p = ranks[p, s]:

    y[t, o_p + n] += scales[p, s] * sum_{r < r_p} h[t, p * max_rank + r] * lora_b[s, o_p + n, r]

Grid: (token tiles, slices x column blocks). The slices' B matrices are stacked along the
output dimension (`[slots, sum(w_p), max_rank]`, the layout of a fused qkv or gate/up
projection), so unequal widths (GQA's q/k/v) need only the column offsets; column blocks past
a slice's width exit. The loop over the rank stops at the slot's rank and B is loaded under
its mask, so padding costs nothing. h is rounded to B's dtype for the tensor-core product
(PEFT rounds at the same point); the scale and the add into y are done in fp32 and y is
rounded once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .segments import Segments, SGMVMeta
from .sgmv_common import capacity_p2, dot_args, num_tiles_bound, segment_tile, tile_rows


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int = 4


def expand_config(max_rank: int) -> ExpandConfig:
    """Untuned first guess. One rank block covers ranks up to 64 in a single pass, so B's
    rows are read whole; masked lanes of a smaller rank read nothing."""
    return ExpandConfig(block_m=16, block_n=64, block_r=max(16, min(64, triton.next_power_of_2(
        max_rank))))


@triton.jit
def _expand_kernel(
    y_ptr,  # [num_tokens, sum(widths)]
    h_ptr,  # [num_tokens, num_slices * max_rank] fp32
    b_ptr,  # [num_slots, sum(widths), max_rank]
    seg_start_ptr,  # [capacity] int32
    seg_len_ptr,  # [capacity] int32
    seg_slot_ptr,  # [capacity] int32
    ranks_ptr,  # [num_slices, num_slots] int32
    scales_ptr,  # [num_slices, num_slots] fp32
    col_offsets_ptr,  # [num_slices + 1] int32
    capacity,
    num_slots,
    max_rank,
    num_col_blocks,
    stride_y,
    stride_h,
    stride_b_slot,
    stride_b_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CAPACITY_P2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[t, o_p + n] += scale[p, s] * h[t, p*R : p*R + r_p] @ B[s, o_p + n, :r_p], s = slot(t).

    y: [T, sum(w)] fp16/bf16/fp32; h: [T, S*R] fp32, read only where r < rank; B:
    [slots, sum(w), R] fp16/bf16/fp32; seg_*: [capacity] int32 adapter segments; ranks:
    [S, slots] int32; scales: [S, slots] fp32; col_offsets: [S + 1] int32 (o_p, cumulative).
    """
    seg, m0 = segment_tile(seg_len_ptr, capacity, tl.program_id(0), BLOCK_M, CAPACITY_P2)
    if seg >= capacity:
        return
    slice_id = tl.program_id(1) // num_col_blocks
    n0 = (tl.program_id(1) % num_col_blocks) * BLOCK_N
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    if rank == 0:
        return
    col0 = tl.load(col_offsets_ptr + slice_id)
    width = tl.load(col_offsets_ptr + slice_id + 1) - col0
    if n0 >= width:
        return
    rows, m_mask = tile_rows(seg_start_ptr, seg_len_ptr, seg, m0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    cols = col0 + offs_n
    b_base = b_ptr + slot.to(tl.int64) * stride_b_slot

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        h = tl.load(h_ptr + rows[:, None] * stride_h + slice_id * max_rank + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b_t = tl.load(b_base + cols[None, :].to(tl.int64) * stride_b_out + offs_r[:, None],
                      mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        acc += tl.dot(h.to(b_t.dtype).to(DOT_DTYPE), b_t.to(DOT_DTYPE),
                      input_precision=DOT_PRECISION)

    scale = tl.load(scales_ptr + slice_id * num_slots + slot)
    y = y_ptr + rows[:, None] * stride_y + cols[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    out = tl.load(y, mask=mask, other=0.0).to(tl.float32) + acc * scale
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def column_offsets(widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[len(widths) + 1] int32 on `device`. Cached so that a launch makes no host-to-device
    copy after the first one per layout: call once before capturing a CUDA graph."""
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def sgmv_expand(
    y: torch.Tensor,  # [num_tokens, sum(widths)], updated in place
    h: torch.Tensor,  # [num_tokens, num_slices * max_rank] fp32
    lora_b: torch.Tensor,  # [num_slots, sum(widths), max_rank]
    meta: SGMVMeta,
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    scales: torch.Tensor,  # [num_slices, num_slots] fp32
    widths: tuple[int, ...] | None = None,  # each slice's output width; one slice if None
) -> torch.Tensor:
    """Launches `_expand_kernel`. No host synchronization; nothing launches for T == 0."""
    num_tokens, total_width = y.shape
    num_slots, _, max_rank = lora_b.shape
    num_slices = ranks.shape[0]
    widths = widths or (total_width,)
    assert len(widths) == num_slices and sum(widths) == total_width, (widths, y.shape)
    assert y.dtype in (torch.float16, torch.bfloat16, torch.float32), y.dtype
    assert lora_b.dtype in (torch.float16, torch.bfloat16, torch.float32), lora_b.dtype
    assert lora_b.shape[1] == total_width, (lora_b.shape, y.shape)
    assert h.dtype == torch.float32 and h.shape == (num_tokens, num_slices * max_rank), h.shape
    assert ranks.dtype == torch.int32 and ranks.shape == (num_slices, num_slots), ranks.shape
    assert scales.dtype == torch.float32 and scales.shape == ranks.shape, scales.shape
    assert all(t.is_contiguous() for t in (y, h, lora_b, ranks, scales))
    assert meta.num_tokens == num_tokens
    assert len({t.device for t in (y, h, lora_b, ranks, scales, meta.table)}) == 1
    if num_tokens == 0:
        return y
    cfg = expand_config(max_rank)
    num_col_blocks = triton.cdiv(max(widths), cfg.block_n)
    grid = (num_tiles_bound(num_tokens, meta.capacity, cfg.block_m), num_slices * num_col_blocks)
    _expand_kernel[grid](
        y, h, lora_b, meta.seg_start, meta.seg_len, meta.seg_slot, ranks, scales,
        column_offsets(tuple(widths), y.device),
        meta.capacity, num_slots, max_rank, num_col_blocks,
        y.stride(0), h.stride(0), lora_b.stride(0), lora_b.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        CAPACITY_P2=capacity_p2(meta.capacity),
        **dot_args(lora_b.dtype, y.device),
        num_warps=cfg.num_warps,
    )
    return y


def sgmv_expand_ref(
    y: torch.Tensor,  # [num_tokens, sum(widths)], updated in place
    h: torch.Tensor,  # [num_tokens, num_slices * max_rank] fp32
    lora_b: torch.Tensor,  # [num_slots, sum(widths), max_rank]
    segments: Segments,
    ranks: list[list[int]],  # [num_slices][num_slots]
    scales: list[list[float]],  # [num_slices][num_slots]
    widths: tuple[int, ...],
) -> torch.Tensor:
    """Plain fp32 loop over segments and slices with the semantics of `_expand_kernel`."""
    max_rank = lora_b.shape[2]
    for i, slot in enumerate(segments.slots):
        a, b = segments.starts[i], segments.starts[i + 1]
        col = 0
        for p, width in enumerate(widths):
            r = ranks[p][slot] if slot >= 0 else 0
            if r:
                delta = h[a:b, p * max_rank:p * max_rank + r] @ lora_b[slot, col:col + width, :r].float().T
                y[a:b, col:col + width] = (y[a:b, col:col + width].float()
                                           + scales[p][slot] * delta).to(y.dtype)
            col += width
    return y
