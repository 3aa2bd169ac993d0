"""SGMV shrink: each adapter token's input times its slot's LoRA A, for every output slice.

Semantics, for every token t of an adapter segment with slot s, slice p and r < ranks[p, s]:

    h[t, p * max_rank + r] = sum_k x[t, k] * lora_a[p, s, r, k]        (fp32)

Grid: (token tiles, slices x rank blocks, split-K). Token tiles follow the segments (see
`sgmv_common`), so a tile never mixes adapters and reads its slot's A once for up to BLOCK_M
tokens. A program whose rank block starts at or past the slot's rank exits, and A is loaded
under a mask of the slot's rank, so a rank-4 adapter beside a rank-64 one costs rank-4 bytes.
The slices of one launch share x (q/k/v, gate/up) and each has its own rank per slot
(rank_pattern). When tiles x slices x rank blocks is too few programs to keep the GPU busy
(decode of a few adapters of low rank), the reduction over `in` is split SPLIT_K ways and the
partial sums meet by fp32 atomic adds in a zeroed h; the order of those adds is not fixed, so
with SPLIT_K > 1 the last bits of h may differ between runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .segments import Segments, SGMVMeta
from .sgmv_common import capacity_p2, dot_args, num_tiles_bound, segment_tile, tile_rows

# Enough programs to fill an H100 (132 SMs) several times over; a first guess, not a measurement.
TARGET_PROGRAMS = 512


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_r: int
    block_k: int
    split_k: int
    num_warps: int = 4


def shrink_config(num_tokens: int, capacity: int, num_slices: int, max_rank: int,
                  in_features: int) -> ShrinkConfig:
    """Block sizes from the launch's fixed shapes only (so a captured graph stays valid).
    Untuned: chosen by reasoning about decode, to be replaced by measured values."""
    block_m, block_r, block_k = 16, 16, 128
    programs = (num_tiles_bound(num_tokens, capacity, block_m) * num_slices
                * triton.cdiv(max_rank, block_r))
    split_k = 1
    while (programs * split_k * 2 <= TARGET_PROGRAMS
           and split_k * 2 * block_k <= in_features):
        split_k *= 2
    return ShrinkConfig(block_m, block_r, block_k, split_k)


@triton.jit
def _shrink_kernel(
    x_ptr,  # [num_tokens, in]
    a_ptr,  # [num_slices, num_slots, max_rank, in]
    h_ptr,  # [num_tokens, num_slices * max_rank] fp32
    seg_start_ptr,  # [capacity] int32
    seg_len_ptr,  # [capacity] int32
    seg_slot_ptr,  # [capacity] int32
    ranks_ptr,  # [num_slices, num_slots] int32
    capacity,
    in_features,
    num_slots,
    max_rank,
    stride_x,
    stride_a_slice,
    stride_a_slot,
    stride_a_rank,
    stride_h,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    CAPACITY_P2: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """h[t, p*R + r] = sum_k x[t, k] * A[p, slot(t), r, k] for r < ranks[p, slot(t)].

    x: [T, in] fp16/bf16/fp32; A: [S, slots, R, in] same dtype; h: [T, S*R] fp32, written
    (SPLIT_K == 1) or atomically added to (SPLIT_K > 1, h zeroed by the caller) only where
    r < rank; seg_*: [capacity] int32 adapter segments; ranks: [S, slots] int32.
    """
    seg, m0 = segment_tile(seg_len_ptr, capacity, tl.program_id(0), BLOCK_M, CAPACITY_P2)
    if seg >= capacity:
        return
    num_rank_blocks = tl.cdiv(max_rank, BLOCK_R)
    slice_id = tl.program_id(1) // num_rank_blocks
    r0 = (tl.program_id(1) % num_rank_blocks) * BLOCK_R
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    if r0 >= rank:
        return
    rows, m_mask = tile_rows(seg_start_ptr, seg_len_ptr, seg, m0, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_base = a_ptr + slice_id.to(tl.int64) * stride_a_slice + slot.to(tl.int64) * stride_a_slot

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, in_features, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a_t = tl.load(a_base + offs_r[None, :] * stride_a_rank + offs_k[:, None],
                      mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
        acc += tl.dot(x.to(DOT_DTYPE), a_t.to(DOT_DTYPE), input_precision=DOT_PRECISION)

    h = h_ptr + rows[:, None] * stride_h + slice_id * max_rank + offs_r[None, :]
    mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(h, acc, mask=mask)
    else:
        tl.atomic_add(h, acc, mask=mask, sem="relaxed")


def sgmv_shrink(
    h: torch.Tensor,  # [num_tokens, num_slices * max_rank] fp32, output
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    meta: SGMVMeta,
    ranks: torch.Tensor,  # [num_slices, num_slots] int32
    split_k: int | None = None,  # override of the heuristic, for tests and tuning
) -> torch.Tensor:
    """Launches `_shrink_kernel`; h's entries at r >= a slot's rank, and at tokens without an
    adapter, are left as they were. No host synchronization; nothing launches for T == 0."""
    num_tokens, in_features = x.shape
    num_slices, num_slots, max_rank, _ = lora_a.shape
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert lora_a.dtype == x.dtype, (lora_a.dtype, x.dtype)
    assert lora_a.shape[3] == in_features, (lora_a.shape, x.shape)
    assert h.dtype == torch.float32 and h.shape == (num_tokens, num_slices * max_rank), h.shape
    assert ranks.dtype == torch.int32 and ranks.shape == (num_slices, num_slots), ranks.shape
    assert x.is_contiguous() and lora_a.is_contiguous() and h.is_contiguous()
    assert ranks.is_contiguous() and meta.num_tokens == num_tokens
    assert len({t.device for t in (x, lora_a, h, ranks, meta.table)}) == 1
    if num_tokens == 0:
        return h
    cfg = shrink_config(num_tokens, meta.capacity, num_slices, max_rank, in_features)
    if split_k is not None:
        cfg = replace(cfg, split_k=split_k)
    if cfg.split_k > 1:
        h.zero_()
    grid = (num_tiles_bound(num_tokens, meta.capacity, cfg.block_m),
            num_slices * triton.cdiv(max_rank, cfg.block_r), cfg.split_k)
    _shrink_kernel[grid](
        x, lora_a, h, meta.seg_start, meta.seg_len, meta.seg_slot, ranks,
        meta.capacity, in_features, num_slots, max_rank,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), h.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        CAPACITY_P2=capacity_p2(meta.capacity),
        **dot_args(x.dtype, x.device),
        num_warps=cfg.num_warps,
    )
    return h


def sgmv_shrink_ref(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    segments: Segments,
    ranks: list[list[int]],  # [num_slices][num_slots]
) -> torch.Tensor:  # [num_tokens, num_slices * max_rank] fp32, zero where not written
    """Plain fp32 loop over segments and slices with the semantics of `_shrink_kernel`."""
    num_slices, _, max_rank, _ = lora_a.shape
    h = torch.zeros(x.shape[0], num_slices * max_rank, dtype=torch.float32, device=x.device)
    for i, slot in enumerate(segments.slots):
        a, b = segments.starts[i], segments.starts[i + 1]
        for p in range(num_slices):
            r = ranks[p][slot] if slot >= 0 else 0
            h[a:b, p * max_rank:p * max_rank + r] = x[a:b].float() @ lora_a[p, slot, :r].float().T
    return h
