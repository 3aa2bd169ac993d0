"""The Triton program of `paged_attention.paged_decode` (kept apart so that importing the
torch reference never imports Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, block_size, KVH, D]
    v_ptr,  # [num_blocks, block_size, KVH, D]
    block_tables_ptr,  # [B, max_blocks] int
    context_lens_ptr,  # [B] int
    o_ptr,  # [B, H, D]
    part_m_ptr,  # [B, H, SPLITS] fp32 (SPLITS > 1 only)
    part_l_ptr,  # [B, H, SPLITS] fp32
    part_acc_ptr,  # [B, H, SPLITS, D] fp32
    scale,
    window,  # 0: none
    stride_q_b,
    stride_q_h,
    stride_kv_block,
    stride_kv_tok,
    stride_kv_head,
    stride_bt,
    stride_o_b,
    stride_o_h,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block (a power of two)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,  # programs per (sequence, KV head), each over its share of pages
):
    """o[b, g*GROUP + i] for the GROUP query heads of KV head g = program_id(1): an online
    softmax over the sequence's pages, page by page, in fp32. With SPLITS > 1, program
    program_id(2) takes one contiguous share of the pages (a share fixed by the length read
    here, so the grid never depends on it) and writes its partial max, sum and weighted
    values for `_merge_kernel`."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(context_lens_ptr + seq).to(tl.int32)
    first = 0
    if window > 0:
        first = tl.maximum(length - window, 0)
    offs_g = tl.arange(0, GROUP_P2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_SIZE)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h
                + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)  # [G, D]

    m = tl.full((GROUP_P2,), -1e30, dtype=tl.float32)
    l_sum = tl.zeros((GROUP_P2,), dtype=tl.float32)
    acc = tl.zeros((GROUP_P2, BLOCK_D), dtype=tl.float32)
    first_page = first // BLOCK_SIZE
    end_page = tl.cdiv(length, BLOCK_SIZE)
    per_split = tl.cdiv(end_page - first_page, SPLITS)
    lo = first_page + split * per_split
    hi = tl.minimum(lo + per_split, end_page)
    for page in range(lo, hi):
        block = tl.load(block_tables_ptr + seq.to(tl.int64) * stride_bt + page).to(tl.int64)
        pos = page * BLOCK_SIZE + offs_t
        valid = (pos < length) & (pos >= first)
        kv_off = (block * stride_kv_block + offs_t[:, None] * stride_kv_tok
                  + kv_head * stride_kv_head + offs_d[None, :])
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, T]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(o_ptr + seq.to(tl.int64) * stride_o_b + heads[:, None] * stride_o_h
                 + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=gd_mask)
    else:
        # An empty share (more splits than pages) leaves m at -1e30 and l at 0: it weighs
        # nothing in the merge.
        part = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + heads) * SPLITS + split  # [G]
        tl.store(part_m_ptr + part, m, mask=g_mask)
        tl.store(part_l_ptr + part, l_sum, mask=g_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)


@triton.jit
def _merge_kernel(
    part_m_ptr,  # [B, H, SPLITS] fp32
    part_l_ptr,  # [B, H, SPLITS] fp32
    part_acc_ptr,  # [B, H, SPLITS, D] fp32
    o_ptr,  # [B, H, D]
    stride_o_b,
    stride_o_h,
    SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """o[b, h] from the SPLITS partial softmaxes of (b, h): rescaled to their common max."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < SPLITS
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * SPLITS + offs_s  # [S]
    m = tl.load(part_m_ptr + base, mask=s_mask, other=-1e30)
    l_sum = tl.load(part_l_ptr + base, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [S, D]
    weight = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l_sum * weight, axis=0)
    tl.store(o_ptr + seq.to(tl.int64) * stride_o_b + head * stride_o_h + offs_d,
             out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
