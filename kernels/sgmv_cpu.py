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
import logging
import mmap
import pathlib
import threading

import torch

from .cpu_build import build_and_load
from .segments import Segments

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("sgmv_cpu.c")
LANES = 16  # floats per vector in the kernel: A's chunks along `in`
RANK_BLOCK = 4  # ranks per block of A (JB in the C file)
TILE_ROWS = 4  # token rows per tile (MB in the C file)
PANEL = 64  # output columns per panel of B^T


def a_region(rank: int, in_features: int) -> int:
    """Floats of A's blocks for `rank` ranks: [ceil(rank / 4), ceil(in / 16), 4, 16]."""
    return -(-rank // RANK_BLOCK) * RANK_BLOCK * -(-in_features // LANES) * LANES


def slot_stride(rank_cap: int, in_features: int, out_features: int) -> int:
    """Weights per slot: A's blocks at `rank_cap`, then B^T's panels at `rank_cap`."""
    return a_region(rank_cap, in_features) + -(-out_features // PANEL) * rank_cap * PANEL


HUGE_PAGE = 2 << 20
LINE = 64


class SlotArena:
    """One zeroed allocation for a model's packed slots, in transparent huge pages where Linux
    gives them on request (`madvise`, its default mode), in ordinary memory elsewhere.

    The kernel streams the slots of every projection once per step. In 4 KB pages the stream
    crosses a page every 4 KB: a TLB miss each time, and a stop for the hardware prefetcher,
    which does not cross pages. Measured on the 2-core EPYC VM, the kernel alone over
    SmolLM2's 210 projections, 8 adapters of ranks 4-64, huge pages against 4 KB ones in turn:
    6-9% faster with 15 decode tokens, 4-6% with 32, even with 2-3 tokens.

    The cost is resident memory: a huge page is faulted in whole, so loading low-rank
    adapters makes nearly all of the slots' capacity resident (which `loraplex plan` counts
    in full), where 4 KB pages kept it near the loaded ranks' bytes. So the whole allocation
    is faulted in here, at start-up: Linux may compact memory to find each huge page, and the
    first touch of the 625 MB that 8 slots of rank 64 take for SmolLM2 took 2.2 s on the
    2-core VM (0.07 s once compacted). Left to the first writes, that time fell on the first
    request of each adapter, as its slot was loaded."""

    def __init__(self, nbytes: int):
        self.buf = None
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # Private and anonymous: shared anonymous memory is shmem, which has its own
            # huge page setting (off by default).
            area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                area.madvise(mmap.MADV_HUGEPAGE)
            except OSError as err:  # a kernel without transparent huge pages
                log.info("slots in 4 KB pages: madvise(MADV_HUGEPAGE) failed: %s", err)
            raw = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` mapped
            start = -raw.data_ptr() % HUGE_PAGE
            self.buf = raw[start:start + nbytes]
        if self.buf is None:
            self.buf = torch.zeros(nbytes, dtype=torch.uint8)
        else:
            self.buf[::4096].zero_()  # a write to every 4 KB page faults them all in now
        self.used = 0

    @staticmethod
    def size(regions: list[tuple[int, torch.dtype]]) -> int:
        """Bytes for `take`s of these (numel, dtype), each starting on a cache line."""
        return sum(-(-numel * dtype.itemsize // LINE) * LINE for numel, dtype in regions)

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The next `numel` zeros of `dtype`, on a cache line of their own."""
        nbytes = numel * dtype.itemsize
        if self.used + nbytes > self.buf.numel():
            raise ValueError(f"slot arena full: {self.used} of {self.buf.numel()} bytes used, "
                             f"{nbytes} asked")
        region = self.buf[self.used:self.used + nbytes].view(dtype)
        self.used += -(-nbytes // LINE) * LINE
        return region


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
                         # older sources (bench_sgmv_cpu --against) lack lp_dense_f32
                         {"lp_sgmv_f32": "pipipp", "lp_sgmv_bf16": "pipipppi",
                          "lp_dense_f32?": "ppip", "lp_linear_lora_f32?": "ppippp"},
                         ("LP_WEIGHTS_BF16",) if bf16 else ())
    if lib is not None:
        lib.weight_dtype = weight_dtype
    return lib


class _Slots(ctypes.Structure):  # lp_slots in the C file
    _fields_ = [("w", ctypes.c_void_p), ("slot_stride", ctypes.c_int64),
                ("b_offset", ctypes.c_int64), ("rank_cap", ctypes.c_int64),
                ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64),
                ("ranks", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class _Step(ctypes.Structure):  # lp_step in the C file
    _fields_ = [("starts", ctypes.c_void_p), ("slots", ctypes.c_void_p),
                ("num_segments", ctypes.c_int64), ("items", ctypes.c_void_p),
                ("h", ctypes.c_void_p), ("ldh", ctypes.c_int64)]


class _Dense(ctypes.Structure):  # lp_dense in the C file
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64)]


class PackedSlots:
    """One projection's adapter weights for every slot, in the kernel's layout: slot s is row s
    of `data [num_slots, slot_stride]`, A first in blocks of 4 ranks `[ceil(r / 4),
    ceil(in / 16), 4, 16]` (zero-padded; the region sized for `rank_cap`), then from
    `b_offset` B^T in `[ceil(out / 64), r, 64]` panels, r being the adapter's own rank."""

    def __init__(self, lib: ctypes.CDLL, num_slots: int, rank_cap: int, in_features: int,
                 out_features: int, ranks: torch.Tensor, scales: torch.Tensor,
                 arena: SlotArena | None = None):
        # The kernel reads each slot's rank and scale from `ranks` [num_slots] int32 and
        # `scales` [num_slots] fp32, which the caller keeps up to date in place. The weights
        # are taken from `arena` when one is given: `num_slots * slot_stride(...)` of them.
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
        stride = slot_stride(rank_cap, in_features, out_features)
        # [num_slots, slot_stride]; dtype and device explicit: C assumes them, whatever the
        # caller's torch defaults
        self.data = (arena.take(num_slots * stride, lib.weight_dtype).view(num_slots, stride)
                     if arena is not None else
                     torch.zeros(num_slots, stride, dtype=lib.weight_dtype, device="cpu"))
        self._ranks, self._scales = ranks, scales  # kept alive: C holds their addresses
        # Everything the kernel needs from this projection, fixed for its lifetime; each call
        # passes the address.
        self._desc = _Slots(self.data.data_ptr(), stride, self.b_offset, rank_cap,
                            in_features, out_features, ranks.data_ptr(), scales.data_ptr())
        self.desc = ctypes.addressof(self._desc)

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
    """A step's segments as the int64 arrays the kernel reads, built once per step. With
    `rank_cap` (the slots' capacity), also the scratch `linear_lora_cpu` keeps each token's
    shrink in, for steps of at most `fused_rows` tokens."""

    def __init__(self, segments: Segments, rank_cap: int = 0, fused_rows: int = 0):
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
        # The kernel's list of (segment, first row) work items, one per ITEM_ROWS rows of a
        # segment: fewer than T / 4 + num_segments.
        num_items = segments.num_tokens // 4 + len(slots)
        self.items = torch.empty(2 * num_items, dtype=torch.int64, device="cpu")
        # [T, ldh]: a row per token, whole vectors per row
        self.ldh = -(-rank_cap // LANES) * LANES if 0 < segments.num_tokens <= fused_rows else 0
        self.h = (torch.empty(segments.num_tokens * self.ldh, dtype=torch.float32, device="cpu")
                  if self.ldh else None)
        self._desc = _Step(self.starts.data_ptr(), self.slots.data_ptr(), len(slots),
                           self.items.data_ptr(), None if self.h is None else self.h.data_ptr(),
                           self.ldh)
        self.desc = ctypes.addressof(self._desc)


def sgmv_cpu(
    y: torch.Tensor,  # [..., T, out] fp32, bf16 or fp16, updated in place
    x: torch.Tensor,  # [..., T, in] y's dtype
    weights: PackedSlots,
    table: SegmentTable,
) -> torch.Tensor:
    """y += each token's adapter delta, computed in fp32 whatever y's dtype (PEFT computes
    with its adapters kept in fp32). Runs for every projection of every step (210 calls per
    decode step for SmolLM2), so the common case, contiguous fp32 or bf16 rows, costs about
    1 us of Python here; anything else takes `_checked`, which validates and adapts it.
    C reads whatever it is given: a contiguous tensor of T * in elements whose rows are `in`
    wide is T rows, and that is all it relies on."""
    if (x.is_cpu and y.is_cpu and x.dtype is y.dtype and x.is_contiguous()
            and y.is_contiguous() and _shapes_agree(y, x, weights, table)):
        if y.dtype is torch.float32:
            weights.lib.lp_sgmv_f32(y.data_ptr(), weights.out_features, x.data_ptr(),
                                    weights.in_features, weights.desc, table.desc)
            return y
        if y.dtype is torch.bfloat16:
            _sgmv_bf16(y, weights.out_features, x, weights.in_features, weights, table)
            return y
    return _checked(y, x, weights, table)


def _shapes_agree(y: torch.Tensor, x: torch.Tensor, weights: PackedSlots,
                  table: SegmentTable) -> bool:
    """x and y hold the table's tokens as rows of this projection's widths, and the weights
    hold every slot the table names."""
    return (_x_fits(x, weights, table) and y.shape[-1] == weights.out_features
            and y.numel() == table.num_tokens * weights.out_features)


def _x_fits(x: torch.Tensor, weights: PackedSlots, table: SegmentTable) -> bool:
    """x holds the table's tokens as rows of the weights' input width, and the weights hold
    every slot the table names."""
    return (x.shape[-1] == weights.in_features
            and x.numel() == table.num_tokens * weights.in_features
            and table.max_slot < weights.num_slots)


def _checked(y: torch.Tensor, x: torch.Tensor, weights: PackedSlots,
             table: SegmentTable) -> torch.Tensor:
    """`sgmv_cpu` for what its fast path does not take: rows apart from each other, fp16, or
    shapes that disagree (a ValueError before C sees them; these survive `python -O`)."""
    if not (x.device.type == y.device.type == "cpu" and y.dtype == x.dtype
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        raise ValueError("sgmv_cpu needs fp32, bf16 or fp16 rows (both alike) on the CPU")
    if not _shapes_agree(y, x, weights, table):
        raise ValueError(f"sgmv_cpu: shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"weights {weights.in_features} -> {weights.out_features} in "
                         f"{weights.num_slots} slots, {table.num_tokens} tokens up to slot "
                         f"{table.max_slot}")
    if y.dtype == torch.float16:
        # The delta in fp32 and one rounding of base + delta, as PEFT computes with its
        # adapters kept in fp32 (autocast_adapter_dtype, its default).
        y32 = y.float()
        sgmv_cpu(y32, x.float(), weights, table)
        return y.copy_(y32)
    try:
        y2 = y.view(-1, y.shape[-1])  # [T, out], the same memory: updated in place
    except RuntimeError:
        raise ValueError("sgmv_cpu updates y in place: its leading dimensions must merge into "
                         "one without a copy") from None
    x2 = x.reshape(-1, x.shape[-1])  # [T, in]
    if not (y2.stride(1) == x2.stride(1) == 1
            # threads update y's rows at once: they must not overlap
            and (y2.stride(0) >= y2.shape[1] or y2.shape[0] <= 1)):
        raise ValueError("sgmv_cpu needs rows contiguous within each row and apart from each "
                         "other")
    if y.dtype == torch.bfloat16:
        _sgmv_bf16(y2, y2.stride(0), x2, x2.stride(0), weights, table)
    else:
        weights.lib.lp_sgmv_f32(y2.data_ptr(), y2.stride(0), x2.data_ptr(), x2.stride(0),
                                weights.desc, table.desc)
    return y


def _sgmv_bf16(y: torch.Tensor, ldy: int, x: torch.Tensor, ldx: int, weights: PackedSlots,
               table: SegmentTable) -> None:
    threads = torch.get_num_threads()
    with _scratch_lock:  # one step's regions per thread, shared by every projection
        scratch = _bf16_scratch(threads * TILE_ROWS * (weights.in_features
                                                       + weights.out_features))
        weights.lib.lp_sgmv_bf16(y.data_ptr(), ldy, x.data_ptr(), ldx, weights.desc,
                                 table.desc, scratch.data_ptr(), threads)


class DenseWeights:
    """A base linear layer's weight as B^T's panels, `[ceil(out / 64), in, 64]` (zeros past
    `out`), for `dense_cpu`: steps of few rows, where the time is mostly that of reading the
    weight (server/runner/cpu_gemm.py has the figures against oneDNN). Only fp32 weights (the
    kernel library built for fp32)."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor,  # [out, in] fp32
                 bias: torch.Tensor | None,  # [out] fp32
                 arena: SlotArena | None = None):
        if lib.weight_dtype != torch.float32 or weight.dtype != torch.float32 or (
                bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())):
            raise ValueError("DenseWeights holds fp32 weights, with a contiguous fp32 bias")
        self.lib = lib
        self.out_features, self.in_features = weight.shape
        numel = self.numel(self.in_features, self.out_features)
        self.data = (arena.take(numel, torch.float32) if arena is not None
                     else torch.zeros(numel, dtype=torch.float32))
        self.bias = bias  # kept alive: C holds its address
        self.pack(weight)
        self._desc = _Dense(self.data.data_ptr(), 0 if bias is None else bias.data_ptr(),
                            self.in_features, self.out_features)
        self.desc = ctypes.addressof(self._desc)

    @staticmethod
    def numel(in_features: int, out_features: int) -> int:
        return -(-out_features // PANEL) * in_features * PANEL

    def pack(self, weight: torch.Tensor) -> None:  # [out, in]
        """Copy `weight` in again (after it changed in place)."""
        out, full = self.out_features, self.out_features // PANEL
        panels = self.data.view(-1, self.in_features, PANEL)  # panel p, row k: W[64p:64p+64, k]
        panels[:full].copy_(weight.detach()[: full * PANEL].reshape(full, PANEL, self.in_features)
                            .transpose(1, 2))
        if full < panels.shape[0]:
            panels[full, :, : out - full * PANEL].copy_(weight.detach()[full * PANEL:].T)


def dense_cpu(x: torch.Tensor,  # [..., in] fp32, contiguous
              weights: DenseWeights) -> torch.Tensor:  # [..., out]
    """x @ W^T + bias, W held by `weights`."""
    if not (x.dtype == torch.float32 and x.is_cpu and x.is_contiguous()
            and x.shape[-1] == weights.in_features):
        raise ValueError(f"dense_cpu needs contiguous fp32 rows of {weights.in_features} on "
                         f"the CPU, not {x.dtype} {tuple(x.shape)}")
    y = torch.empty(*x.shape[:-1], weights.out_features, dtype=torch.float32)
    weights.lib.lp_dense_f32(y.data_ptr(), x.data_ptr(), x.numel() // weights.in_features,
                             weights.desc)
    return y


def linear_lora_cpu(x: torch.Tensor,  # [..., T, in] fp32, contiguous
                    dense: DenseWeights, weights: PackedSlots,
                    table: SegmentTable) -> torch.Tensor | None:  # [..., T, out]
    """x @ W^T + bias + each token's adapter delta: `dense_cpu` then `sgmv_cpu` in one C call,
    with the same result to the bit. None where it does not take these, and the caller makes
    the two calls: it takes contiguous fp32 rows on the CPU, the table's tokens, a base and
    slots of one shape (the slots in fp32 or bf16: `--lora-dtype`), and a table with scratch
    for the slots' rank (`SegmentTable`'s `rank_cap` and `fused_rows`). Checked here, each
    call: C trusts them."""
    if not (x.dtype is torch.float32 and x.is_cpu and x.is_contiguous()
            and table.ldh >= weights.rank_cap and _x_fits(x, weights, table)
            and dense.in_features == weights.in_features
            and dense.out_features == weights.out_features):
        return None
    y = torch.empty(*x.shape[:-1], dense.out_features, dtype=torch.float32)
    weights.lib.lp_linear_lora_f32(y.data_ptr(), x.data_ptr(), table.num_tokens, dense.desc,
                                   weights.desc, table.desc)
    return y
