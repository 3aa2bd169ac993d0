"""The CPU SGMV kernel (`sgmv_cpu.c`): built on first use with the machine's C compiler, called
through ctypes.

The C file is compiled once per source, compiler flags and CPU capability into
`$LORAPLEX_CACHE/kernels` (default `~/.cache/loraplex/kernels`). Without a working compiler
`load()` returns None and the engine keeps the torch reference; nothing else changes.

Its storage contract differs from the reference's only in memory layout: A and B are kept
transposed (`at [slots, in, lda]`, `bt [slots, rank_cap, out]`), so that both products stream
contiguous weight rows. `SlotLayout` makes such tensors and hands out the usual
`lora_a [slots, rank_cap, in]` / `lora_b [slots, out, rank_cap]` as views of them, which is
all the reference and the slot copies ever touch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

from .segments import Segments

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("sgmv_cpu.c")
LANES = 16  # floats per vector in the kernel; `at`'s rows are padded to a multiple of it


def row_width(rank_cap: int) -> int:
    return -(-rank_cap // LANES) * LANES


def transposed_slots(num_slots: int, rank_cap: int, in_features: int, out_features: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed slot storage in the kernel's layout, returned as the views the reference reads:
    `lora_a [slots, rank_cap, in]` and `lora_b [slots, out, rank_cap]`."""
    at = torch.zeros(num_slots, in_features, row_width(rank_cap), dtype=dtype)
    bt = torch.zeros(num_slots, rank_cap, out_features, dtype=dtype)
    return at[:, :, :rank_cap].transpose(1, 2), bt.transpose(1, 2)


def has_kernel_layout(lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """True for views made by `transposed_slots` (fp32, on the CPU)."""
    _, rank_cap, in_features = lora_a.shape
    out_features = lora_b.shape[1]
    return (lora_a.dtype == lora_b.dtype == torch.float32
            and lora_a.device.type == lora_b.device.type == "cpu"
            and lora_b.shape == (lora_a.shape[0], out_features, rank_cap)
            and lora_a.stride(1) == 1 and lora_a.stride(2) % LANES == 0
            and lora_a.stride(2) >= row_width(rank_cap)
            and lora_a.stride(0) == in_features * lora_a.stride(2)
            # the kernel reads row_width(rank_cap) floats of A^T's last row
            and lora_a.storage_offset() + lora_a.stride(0) * lora_a.shape[0]
            <= lora_a.untyped_storage().nbytes() // 4
            and lora_b.stride() == (rank_cap * out_features, 1, out_features))


def _flags() -> list[str]:
    # Only instruction sets this CPU has (torch has already asked it); no -march=native, so
    # a cache directory shared by two CPUs of the same capability stays valid.
    simd = {
        "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl"],
        "AVX2": ["-mavx2", "-mfma"],
    }.get(torch.backends.cpu.get_cpu_capability(), [])
    return ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp", *simd]


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("LORAPLEX_CACHE") or pathlib.Path.home() / ".cache/loraplex"
    return pathlib.Path(root) / "kernels"


def _build(compiler: str, flags: list[str], fresh: bool = False) -> pathlib.Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(
        [platform.machine(), compiler, *flags]).encode())
    target = _cache_dir() / f"sgmv_cpu-{key.hexdigest()[:16]}.so"
    if target.exists() and not fresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling the CPU SGMV kernel into %s", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders never load a partial file
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) where it cannot be built."""
    if os.environ.get("LORAPLEX_CPU_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: LoRA on the CPU uses the slower torch reference")
        return None
    try:
        try:
            lib = ctypes.CDLL(str(_build(compiler, _flags())))
        except OSError:  # a damaged file in the cache: build it again, once
            lib = ctypes.CDLL(str(_build(compiler, _flags(), fresh=True)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        # RuntimeError: no home directory to cache in
        detail = getattr(err, "stderr", "") or err
        log.warning("the CPU SGMV kernel did not build (%s); using the torch reference", detail)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.lp_sgmv_f32.argtypes = [p, i, p, i, p, i, p, i, i, i, p, p, i, p, p, p]
    lib.lp_sgmv_f32.restype = None
    return lib


class SegmentTable:
    """A step's segments as the int64 arrays the kernel reads, built once per step."""

    def __init__(self, segments: Segments):
        self.num_tokens = segments.num_tokens
        self.max_slot = max(segments.slots, default=-1)
        self.starts = torch.tensor(segments.starts, dtype=torch.int64)  # [num_segments + 1]
        self.slots = torch.tensor(segments.slots, dtype=torch.int64)  # [num_segments]
        # The kernel's list of (segment, first row) tiles: at most T / 4 + num_segments.
        num_tiles = segments.num_tokens // 4 + len(segments.slots)
        self.tiles = torch.empty(2 * num_tiles, dtype=torch.int64)


def sgmv_cpu(
    lib: ctypes.CDLL,
    y: torch.Tensor,  # [T, out] fp32, rows contiguous, updated in place
    x: torch.Tensor,  # [T, in] fp32, rows contiguous
    lora_a: torch.Tensor,  # [num_slots, rank_cap, in], a `transposed_slots` view
    lora_b: torch.Tensor,  # [num_slots, out, rank_cap], a `transposed_slots` view
    table: SegmentTable,
    ranks_dev: torch.Tensor,  # [num_slots] int32
    scales_dev: torch.Tensor,  # [num_slots] fp32
) -> torch.Tensor:
    # C reads whatever pointers it is given: every shape it relies on is checked here, with
    # errors that survive `python -O`.
    if not (y.dtype == x.dtype == torch.float32 and y.stride(1) == x.stride(1) == 1
            and has_kernel_layout(lora_a, lora_b)):
        raise ValueError("sgmv_cpu needs fp32 rows and weights from transposed_slots")
    if not (x.shape[0] == y.shape[0] == table.num_tokens and x.shape[1] == lora_a.shape[2]
            and y.shape[1] == lora_b.shape[1]
            and table.max_slot < lora_a.shape[0] == ranks_dev.numel() == scales_dev.numel()):
        raise ValueError(f"sgmv_cpu: shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, "
                         f"{table.num_tokens} tokens up to slot {table.max_slot}")
    lib.lp_sgmv_f32(
        y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0),
        lora_a.data_ptr(), lora_a.stride(2), lora_b.data_ptr(), lora_a.shape[1],
        x.shape[1], y.shape[1], table.starts.data_ptr(), table.slots.data_ptr(),
        table.slots.numel(), ranks_dev.data_ptr(), scales_dev.data_ptr(),
        table.tiles.data_ptr())
    return y
