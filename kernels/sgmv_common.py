"""What the SGMV shrink and expand kernels share: the token-tile schedule and the dot dtype.

Each adapter segment is cut into tiles of BLOCK_M tokens, and program `pid` along grid axis 0
takes the pid-th tile of the step. Every tile has at least one token and at most `capacity`
tiles are partial, so `num_tiles_bound` programs always suffice, a number that depends on the
token count and the capacity only. Programs past the last tile exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def num_tiles_bound(num_tokens: int, capacity: int, block_m: int) -> int:
    """Upper bound on sum(ceil(len / block_m)) over segments of `num_tokens` tokens in all."""
    return min(num_tokens, num_tokens // block_m + capacity)


def capacity_p2(capacity: int) -> int:
    return triton.next_power_of_2(max(capacity, 1))


def dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_DTYPE and DOT_PRECISION for operands of `dtype`. fp32 products use full fp32
    ("ieee"; tf32 would round the inputs to 10 bits). Triton 3.9's interpreter multiplies
    bf16 operands as their raw 16-bit integers, so off the GPU every product is done in fp32,
    on operands already rounded as the GPU would round them: the same sums."""
    if dtype == torch.float32 or device.type != "cuda":
        return {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee"}
    return {"DOT_DTYPE": tl.float16 if dtype == torch.float16 else tl.bfloat16,
            "DOT_PRECISION": None}  # 16-bit operands have one precision


@triton.jit
def segment_tile(
    seg_len_ptr,  # [capacity] int32
    capacity,
    pid,
    BLOCK_M: tl.constexpr,
    CAPACITY_P2: tl.constexpr,  # capacity rounded up to a power of two
):
    """(segment index, first token of the tile within the segment) of tile `pid`; the
    index is `capacity` or more when `pid` is past the last tile."""
    idx = tl.arange(0, CAPACITY_P2)
    lengths = tl.load(seg_len_ptr + idx, mask=idx < capacity, other=0)
    tiles = (lengths + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    # Length-0 segments own no tile: their end equals their start, so they are skipped here.
    seg = tl.sum((ends <= pid).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(idx == seg, ends - tiles, 0), 0)
    return seg, (pid - first_tile) * BLOCK_M


@triton.jit
def tile_rows(seg_start_ptr, seg_len_ptr, seg, m0, BLOCK_M: tl.constexpr):
    """Packed row indices (int64, for the pointer arithmetic of wide tensors) of the tile's
    BLOCK_M tokens from `m0` within segment `seg`, and the mask of those inside it."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows = (tl.load(seg_start_ptr + seg) + offs_m).to(tl.int64)
    return rows, offs_m < tl.load(seg_len_ptr + seg)
