"""The base model's linear layers on the CPU through oneDNN, with weights packed once.

On the CPU, `F.linear` in fp32 goes to MKL's sgemm. oneDNN's matmul with the weight
reordered once at start-up (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's
freezing pass does) measured 1.3-4.7x faster in fp32 on the 2-core AVX-512 VM at SmolLM2's
shapes from 8 to 256 rows (slower only for the smallest projections at one row, 6 against 15
us), and 1.2-4x in bf16 (`python -m loraplex.server.runner.cpu_gemm` prints the table).
vLLM's CPU build packs its linear weights for oneDNN likewise.

oneDNN builds a primitive for each input shape: about 0.5 ms the first time and about 0.6 MB
of memory that stays (measured: 1 GB after 400 row counts x 4 weight shapes, half of that
even with its primitive cache off). A step's row count changes from step to step, so rows
are padded up to one of `bucket`'s 72 sizes up to 2048 (exact to 16, then 8 per octave: at
most 12.4% more rows): every size is built once and the memory stays bounded (301 MB for
SmolLM2's five weight shapes at all 72 sizes).

The packed weight is a copy derived from `weight`, which stays the source of truth: the
embedding tied to `lm_head`, merges (adapters/merge.py) and state dicts read and write
`weight`; whoever changes it in place calls `repack()`. The copy costs the linear weights'
bytes once more in host memory.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def bucket(rows: int) -> int:
    """The row count a call with `rows` rows runs at: `rows` up to 16, then rounded up to an
    eighth of its power-of-two octave (18, 20, ..., 32, 36, ..., 64, 72, ...)."""
    if rows <= 16:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)
    return -(-rows // step) * step


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias with W packed by `_pack`: x [..., in] -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward multiplies by a oneDNN-packed copy of its weight. It holds
    the very Parameters of the layer it replaces, so ties and names are unchanged."""

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.register_parameter("weight", linear.weight)
        packed.register_parameter("bias", linear.bias)
        packed.repack()
        return packed

    def repack(self) -> None:
        """Pack `weight` again, after it changed in place. Where that fails (out of memory),
        the layer multiplies by `weight` itself with F.linear: never by a stale copy."""
        self.packed = None
        try:
            self.packed = _pack(self.weight)
        except RuntimeError:
            log.warning("packing a %dx%d weight for oneDNN failed: F.linear for this layer",
                        self.out_features, self.in_features, exc_info=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        padded = bucket(rows)
        if padded == rows:
            return _matmul(x, self.packed, self.bias)
        xp = x.new_empty(padded, self.in_features)  # [padded, in]; rows past `rows` zero
        xp[:rows].copy_(x.reshape(rows, self.in_features))
        xp[rows:].zero_()
        y = _matmul(xp, self.packed, self.bias)
        return y[:rows].view(*x.shape[:-1], self.out_features)


def _works(dtype: torch.dtype) -> bool:
    """Whether this torch build packs and multiplies at `dtype`, agreeing with F.linear."""
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=gen).to(dtype)
        x = torch.randn(3, 32, generator=gen).to(dtype)
        got = _matmul(x, _pack(w), None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    tol = 1e-4 if dtype == torch.float32 else 1e-1
    return got.shape == (3, 48) and torch.allclose(got.float(), F.linear(x, w).float(),
                                                    atol=tol, rtol=tol)


def resolve_cpu_gemm(requested: str, device: torch.device, dtype: torch.dtype,
                     quantized: bool) -> str:
    """"onednn" or "torch" for the base's linear layers, or a ConfigError saying why the
    requested one cannot run here."""
    if requested == "torch":
        return requested
    assert requested in ("auto", "onednn"), requested
    if device.type == "cpu" and not quantized and dtype in PACKABLE_DTYPES \
            and torch.backends.mkldnn.is_available() and _works(dtype):
        return "onednn"
    if requested == "onednn":
        raise ConfigError("--cpu-gemm onednn needs a dense float32 or bfloat16 model on the "
                          "CPU and a torch built with oneDNN (torch.backends.mkldnn)")
    return "torch"


def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear of `model` by a PackedLinear sharing its Parameters.
    Returns the bytes of the packed copies."""
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    total = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        packed = PackedLinear.of(getattr(parent, child))
        setattr(parent, child, packed)
        total += packed.weight.numel() * packed.weight.element_size()
    log.info("CPU linear layers: %d packed for oneDNN (%.0f MB more host memory)",
             len(names), total / 2**20)
    return total


def _bench() -> None:
    """Median time of F.linear against the packed oneDNN call at SmolLM2's shapes."""
    def median_us(fn, repeats: int = 30) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[repeats // 2] * 1e6

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | rows | out x in | F.linear (us) | oneDNN packed (us) | speed-up |")
    print("|---|---|---|---|---|---|")
    for dtype in PACKABLE_DTYPES:
        for rows in (1, 8, 32, 256):
            for out_f, in_f in ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)):
                w = torch.randn(out_f, in_f).to(dtype)
                x = torch.randn(rows, in_f).to(dtype)
                packed = _pack(w)
                plain = median_us(lambda: F.linear(x, w))
                fast = median_us(lambda: _matmul(x, packed, None))
                print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {out_f}x{in_f} | "
                      f"{plain:.0f} | {fast:.0f} | {plain / fast:.2f}x |", flush=True)


if __name__ == "__main__":
    _bench()
