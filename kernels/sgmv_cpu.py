"""The CPU SGMV kernel (`sgmv_cpu.c`), built and loaded by cpu_build.py; without it the engine
keeps the torch reference.

The kernel reads adapter weights in its own layout, `PackedSlots` (described in the C file):
each slot packed to its adapter's rank and ordered as the loops stream it. Weights enter it
through `PackedSlots.write` only, so the layout is this module's business alone.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import pathlib
import threading

import torch

from .cpu_build import build_and_load
from .segments import Segments

SOURCE = pathlib.Path(__file__).with_name("sgmv_cpu.c")
LANES = 16  # floats per vector in the kernel: A's chunks along `in`
RANK_BLOCK = 4  # ranks per block of A (JB in the C file)
TILE_ROWS = 4  # token rows per tile (MB in the C file)
PANEL = 64  # output columns per panel of B^T


def a_region(rank: int, in_features: int) -> int:
    """Floats of A's blocks for `rank` ranks: [ceil(rank / 4), ceil(in / 16), 4, 16]."""
    return -(-rank // RANK_BLOCK) * RANK_BLOCK * -(-in_features // LANES) * LANES


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def load(weight_dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The compiled kernel for adapter weights stored in `weight_dtype` (fp32, or bf16: half
    the bytes to stream, widened to fp32 as read), or None (logged once) where it cannot be
    built. `lib.weight_dtype` says which."""
    return load_source(SOURCE, weight_dtype)


def load_source(source: pathlib.Path,
                weight_dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """`load` from another version of sgmv_cpu.c (the benchmark's `--against`), uncached."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"the CPU kernel stores adapters in fp32 or bf16, not {weight_dtype}")
    bf16 = weight_dtype == torch.bfloat16
    lib = build_and_load(source, "the torch reference for LoRA",
                         ("LP_WEIGHTS_BF16",) if bf16 else ())
    if lib is None:
        return None
    lib.weight_dtype = weight_dtype
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.lp_sgmv_f32.argtypes = [p, i, p, i, p, i, i, i, i, i, p, p, p, p, i, p]
    lib.lp_sgmv_f32.restype = None
    lib.lp_sgmv_bf16.argtypes = [p, i, p, i, p, i, i, i, i, i, p, p, p, p, i, p, p, i]
    lib.lp_sgmv_bf16.restype = None
    return lib


class PackedSlots:
    """One projection's adapter weights for every slot, in the kernel's layout: slot s is row s
    of `data [num_slots, slot_stride]`, A first in blocks of 4 ranks `[ceil(r / 4),
    ceil(in / 16), 4, 16]` (zero-padded; the region sized for `rank_cap`), then from
    `b_offset` B^T in `[ceil(out / 64), r, 64]` panels, r being the adapter's own rank."""

    def __init__(self, lib: ctypes.CDLL, num_slots: int, rank_cap: int, in_features: int,
                 out_features: int, ranks: torch.Tensor, scales: torch.Tensor):
        # The kernel reads each slot's rank and scale from `ranks` [num_slots] int32 and
        # `scales` [num_slots] fp32, which the caller keeps up to date in place.
        if not (ranks.dtype == torch.int32 and scales.dtype == torch.float32
                and ranks.device.type == scales.device.type == "cpu"
                and ranks.is_contiguous() and scales.is_contiguous()
                and ranks.numel() == scales.numel() == num_slots):
            raise ValueError("PackedSlots needs contiguous int32 ranks and fp32 scales, "
                             "one per slot, on the CPU")
        self.lib = lib
        self.num_slots, self.rank_cap = num_slots, rank_cap
        self.in_features, self.out_features = in_features, out_features
        self.num_panels = -(-out_features // PANEL)
        self.b_offset = a_region(rank_cap, in_features)
        slot_stride = self.b_offset + self.num_panels * rank_cap * PANEL
        # [num_slots, slot_stride]; dtype and device explicit: C assumes them, whatever the
        # caller's torch defaults
        self.data = torch.zeros(num_slots, slot_stride, dtype=lib.weight_dtype, device="cpu")
        self._ranks, self._scales = ranks, scales  # kept alive: C holds their addresses
        # Everything the kernel needs from this projection, fixed for its lifetime.
        self.args = (self.data.data_ptr(), slot_stride, self.b_offset, rank_cap, in_features,
                     out_features, ranks.data_ptr(), scales.data_ptr())

    def ranks(self) -> list[int]:
        """Each slot's rank as the kernel reads it (0: empty, or not targeting this module)."""
        return self._ranks.tolist()

    def slot_bytes(self, rank: int) -> int:
        """Bytes the kernel reads of a slot holding a rank-`rank` adapter: A's blocks and B^T's
        panels at that rank."""
        return (a_region(rank, self.in_features)
                + self.num_panels * rank * PANEL) * self.data.element_size()

    def write(self, slot: int,
              lora_a: torch.Tensor,  # [r, in]
              lora_b: torch.Tensor,  # [out, r]
              ) -> None:
        """Pack one adapter's weights into `slot` and record its rank, which says how the
        kernel reads the slot (the scale is the caller's to set). What the slot held past the
        new rank's extent is left as it was: it only ever reaches lanes never stored."""
        r = lora_a.shape[0]
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range for {self.num_slots} slots")
        if not (0 < r <= self.rank_cap and lora_a.shape == (r, self.in_features)
                and lora_b.shape == (self.out_features, r)):
            raise ValueError(f"weights {tuple(lora_a.shape)} / {tuple(lora_b.shape)} do not fit "
                             f"a slot of rank {self.rank_cap}, {self.in_features} -> "
                             f"{self.out_features}")
        region = self.data[slot]
        rb, chunks = -(-r // RANK_BLOCK), -(-self.in_features // LANES)
        padded = torch.zeros(rb * RANK_BLOCK, chunks * LANES, dtype=self.data.dtype)
        padded[:r, : self.in_features] = lora_a
        region[: a_region(r, self.in_features)].view(rb, chunks, RANK_BLOCK, LANES).copy_(
            padded.view(rb, RANK_BLOCK, chunks, LANES).transpose(1, 2))
        panels = region[self.b_offset: self.b_offset + self.num_panels * r * PANEL]
        panels = panels.view(self.num_panels, r, PANEL)  # panel p row j: B[64p:64p+64, j]
        full = self.out_features // PANEL
        panels[:full].copy_(lora_b[: full * PANEL].reshape(full, PANEL, r).transpose(1, 2))
        if full < self.num_panels:
            panels[full, :, : self.out_features - full * PANEL].copy_(lora_b[full * PANEL:].T)
        self._ranks[slot] = r


_scratch_lock = threading.Lock()
_scratch = torch.empty(0, dtype=torch.float32)


def _bf16_scratch(numel: int) -> torch.Tensor:
    """Where a bf16 call widens its tiles' rows: [threads, TILE_ROWS * (in + out)] fp32,
    grown to the largest projection seen (projections run one after another)."""
    global _scratch
    if _scratch.numel() < numel:
        _scratch = torch.empty(numel, dtype=torch.float32, device="cpu")
    return _scratch


class SegmentTable:
    """A step's segments as the int64 arrays the kernel reads, built once per step."""

    def __init__(self, segments: Segments):
        # C trusts these; `Segments` checks them with asserts only, which `python -O` drops.
        starts, slots = segments.starts, segments.slots
        if not (len(starts) == len(slots) + 1 and starts[0] == 0
                and all(a <= b for a, b in itertools.pairwise(starts))
                and all(s >= -1 for s in slots)):
            raise ValueError(f"malformed segments: starts {starts}, slots {slots}")
        self.num_tokens = segments.num_tokens
        self.max_slot = max(slots, default=-1)
        self.starts = torch.tensor(starts, dtype=torch.int64, device="cpu")  # [segments + 1]
        self.slots = torch.tensor(slots, dtype=torch.int64, device="cpu")  # [num_segments]
        # The kernel's list of (segment, first row) tiles: at most T / 4 + num_segments.
        num_tiles = segments.num_tokens // 4 + len(slots)
        self.tiles = torch.empty(2 * num_tiles, dtype=torch.int64, device="cpu")
        self.args = (self.starts.data_ptr(), self.slots.data_ptr(), len(slots),
                     self.tiles.data_ptr())


def sgmv_cpu(
    y: torch.Tensor,  # [T, out] fp32 or bf16, rows contiguous, updated in place
    x: torch.Tensor,  # [T, in] y's dtype, rows contiguous
    weights: PackedSlots,
    table: SegmentTable,
) -> torch.Tensor:
    # C reads whatever pointers it is given: every shape it relies on is checked here, with
    # errors that survive `python -O`. This runs once per projection per step, so it is
    # kept to what changes between calls.
    if not (x.device.type == y.device.type == "cpu"
            and y.dtype == x.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and y.stride(1) == x.stride(1) == 1
            # threads update y's rows at once: they must not overlap
            and (y.stride(0) >= y.shape[1] or y.shape[0] <= 1)):
        raise ValueError("sgmv_cpu needs fp32 or bf16 rows (both alike), contiguous within each "
                         "row and apart from each other, on the CPU")
    if not (x.shape == (table.num_tokens, weights.in_features)
            and y.shape == (table.num_tokens, weights.out_features)
            and table.max_slot < weights.num_slots):
        raise ValueError(f"sgmv_cpu: shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"weights {weights.in_features} -> {weights.out_features} in "
                         f"{weights.num_slots} slots, {table.num_tokens} tokens up to slot "
                         f"{table.max_slot}")
    if y.dtype == torch.bfloat16:
        threads = torch.get_num_threads()
        with _scratch_lock:  # one step's regions per thread, shared by every projection
            scratch = _bf16_scratch(threads * TILE_ROWS * (weights.in_features
                                                           + weights.out_features))
            weights.lib.lp_sgmv_bf16(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0),
                                     *weights.args, *table.args, scratch.data_ptr(), threads)
        return y
    weights.lib.lp_sgmv_f32(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0),
                            *weights.args, *table.args)
    return y
