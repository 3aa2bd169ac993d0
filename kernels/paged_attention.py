"""Paged decode attention: each decoding sequence's query against its own cached keys and
values, read in place through its block table, with no padded copy of the context.

Semantics, for sequence b with context length L_b, query head h and its KV head
g = h // (H / KVH), over cached positions p < L_b (and p >= L_b - window with a window):

    o[b, h] = softmax_p(scale * q[b, h] . K[b, p, g]) @ V[b, p, g]

where position p lives in slot p % block_size of block block_tables[b, p // block_size].

`paged_decode_ref` is the torch path the engine had: gather each sequence's blocks into a
padded copy, mask, and call SDPA. `paged_decode_cpu` is the same walk as the Triton kernel's,
in C (`paged_attention_cpu.c`), for the CPU: no padded copy. `paged_decode` is one Triton
program per (sequence, KV head) that walks the sequence's pages with an online softmax (fp32),
and serves the KV head's whole query group at once, so each cached key and value is read once
per step. At small batches that is too few programs for the GPU, so each sequence's pages are
split over several programs whose partial softmaxes a second kernel merges (flash-decoding).
Decode is memory-bound: the floor is reading the context's K and V once. Everything a launch
reads per step is a device tensor of fixed shape, as a CUDA graph would need.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import torch
import torch.nn.functional as F

from .cpu_build import build_and_load

CPU_SOURCE = pathlib.Path(__file__).with_name("paged_attention_cpu.c")
CPU_MAX_HEAD_DIM, CPU_MAX_GROUP, CPU_MAX_BLOCK = 256, 16, 256  # MAXD, MAXG, MAXBS in C


def decode_mask(context_lens: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """[B, width] bool: the positions each sequence attends to."""
    pos = torch.arange(width, device=context_lens.device)
    mask = pos[None, :] < context_lens[:, None]
    if window is not None:
        mask &= pos[None, :] > (context_lens[:, None] - 1 - window)
    return mask


def paged_decode_ref(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int, padded with any valid block
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    window: int | None = None,
    mask: torch.Tensor | None = None,  # [B, max_blocks * block_size] bool, if made already
) -> torch.Tensor:  # [B, H, D], q's dtype
    b = q.shape[0]
    _, block_size, kvh, d = k_cache.shape
    # index_select copies whole blocks; advanced indexing with the 2-D table goes element
    # by element, several times slower on the CPU.
    blocks = block_tables.flatten()  # [B * max_blocks]
    k = k_cache.index_select(0, blocks).view(b, -1, kvh, d)
    v = v_cache.index_select(0, blocks).view(b, -1, kvh, d)
    if mask is None:
        mask = decode_mask(context_lens, k.shape[1], window)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return o.squeeze(2)


def paged_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    window: int | None = None,
    splits: int | None = None,  # override of `num_splits`, for tests and tuning
) -> torch.Tensor:  # [B, H, D], q's dtype
    """Launches `_decode_kernel`, one program per (sequence, KV head, split), and, when
    the pages are split, `_merge_kernel`, one program per (sequence, head)."""
    import triton

    from .paged_attention_kernel import _decode_kernel, _merge_kernel

    b, h, d = q.shape
    _, block_size, kvh, _ = k_cache.shape
    assert h % kvh == 0 and k_cache.shape == v_cache.shape and k_cache.shape[3] == d
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.is_contiguous()
    assert q.stride(2) == 1
    o = torch.empty_like(q)
    if b == 0:
        return o
    group = h // kvh
    # Off the GPU (the interpreter runs programs one by one) splitting buys nothing.
    n = splits or (num_splits(b, kvh) if q.is_cuda else 1)
    part_m = part_l = part_acc = o  # unused when n == 1
    if n > 1:
        part_m = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(b, h, n, d, dtype=torch.float32, device=q.device)
    _decode_kernel[(b, kvh, n)](
        q, k_cache, v_cache, block_tables, context_lens, o, part_m, part_l, part_acc,
        float(scale), window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), o.stride(0), o.stride(1),
        GROUP=group, GROUP_P2=max(triton.next_power_of_2(group), 1),
        BLOCK_SIZE=block_size, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), SPLITS=n,
    )
    if n > 1:
        _merge_kernel[(b, h)](part_m, part_l, part_acc, o, o.stride(0), o.stride(1),
                              SPLITS=n, SPLITS_P2=triton.next_power_of_2(n), HEAD_DIM=d,
                              BLOCK_D=triton.next_power_of_2(d))
    return o


@functools.cache
def load_cpu() -> ctypes.CDLL | None:
    """The compiled CPU kernel, or None (logged once) where it cannot be built."""
    args = "piipppippiiiiiiifii"
    return build_and_load(CPU_SOURCE, "the torch reference for decode attention",
                          {"lp_paged_decode_f32": args, "lp_paged_decode_bf16": args})


def cpu_kernel_fits(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype) -> bool:
    """Whether `paged_decode_cpu` takes this geometry (its C arrays have fixed bounds)."""
    return (dtype in (torch.float32, torch.bfloat16) and head_dim % 16 == 0
            and head_dim <= CPU_MAX_HEAD_DIM and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= CPU_MAX_GROUP and block_size <= CPU_MAX_BLOCK)


def tables_fit(block_tables: torch.Tensor,  # [B, max_blocks] int64
               context_lens: torch.Tensor,  # [B] int64
               num_blocks: int, block_size: int) -> bool:
    """Whether every sequence's length fits its table and every block id is in the cache:
    three reductions, so a step checks once for all its layers (AttentionMetadata)."""
    return (block_tables.shape[0] == context_lens.shape[0]
            and (block_tables.shape[0] == 0
                 or (int(context_lens.max()) <= block_tables.shape[1] * block_size
                     and 0 <= int(block_tables.min())
                     and int(block_tables.max()) < num_blocks)))


def paged_decode_cpu(
    q: torch.Tensor,  # [B, H, D] fp32 or bf16
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] q's dtype, contiguous
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int64, contiguous
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
    window: int | None = None,
    tables_checked: bool = False,  # `tables_fit` is known true for these tables and this cache
) -> torch.Tensor:  # [B, H, D], q's dtype
    lib = load_cpu()
    b, h, d = q.shape
    _, block_size, kvh, _ = k_cache.shape
    # C reads whatever it is given: every shape and layout it relies on is checked here,
    # with errors that survive `python -O`.
    if not (lib is not None and cpu_kernel_fits(h, kvh, d, block_size, q.dtype)
            and q.device.type == k_cache.device.type == "cpu"
            and k_cache.dtype == v_cache.dtype == q.dtype and k_cache.shape == v_cache.shape
            and k_cache.shape[3] == d and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.stride(2) == 1
            and block_tables.dtype == context_lens.dtype == torch.int64
            and block_tables.is_contiguous() and context_lens.is_contiguous()
            and block_tables.shape[0] == context_lens.shape[0] == b
            and (tables_checked or tables_fit(block_tables, context_lens, k_cache.shape[0],
                                              block_size))):
        raise ValueError("paged_decode_cpu: unbuilt kernel, or shapes, dtypes or layouts "
                         "it does not take")
    o = torch.empty_like(q)
    fn = lib.lp_paged_decode_f32 if q.dtype == torch.float32 else lib.lp_paged_decode_bf16
    fn(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
       block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(),
       o.data_ptr(), o.stride(0), o.stride(1), b, h, kvh, d, block_size, float(scale),
       window or 0, torch.get_num_threads())
    return o


# Enough programs to keep an H100/H200 (132 SMs) busy about twice over; a first guess from
# the SM count, not a measurement: bench_paged_attention.py measures it.
TARGET_PROGRAMS = 264
MAX_SPLITS = 16


def num_splits(batch: int, kv_heads: int) -> int:
    """Splits of each sequence's pages, from the grid's fixed shape only (so a captured graph
    stays valid whatever the lengths): more when few (sequence, KV head) pairs would leave
    most of the GPU idle, as at batch 1 (8 programs for Llama-3-8B's 8 KV heads)."""
    n = 1
    while n < MAX_SPLITS and batch * kv_heads * n * 2 <= TARGET_PROGRAMS:
        n *= 2
    return n
