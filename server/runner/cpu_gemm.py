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

Steps of at most DENSE_ROWS rows (decode) in fp32 go instead to loraplex's C kernel on a
second copy of the weight in its own panel layout (`DenseWeights`, kernels/sgmv_cpu.c): such
a step mostly reads the weights, and oneDNN read them at about half the memory's bandwidth.
Over SmolLM2's 211 projections, one decode step's worth, the C kernel ran 1.31-1.74x as fast
as oneDNN at 1-4 rows, 1.00-1.40x at 8-24 and 1.11-1.30x at 32-64 (`_bench`, two runs) with
AVX-512; with AVX2 only it wins up to 16 rows (DENSE_ROWS).

The packed weights are copies derived from `weight`, which stays the source of truth: the
embedding tied to `lm_head`, merges (adapters/merge.py) and state dicts read and write
`weight`; whoever changes it in place calls `repack()`. Each copy costs the linear weights'
bytes once more in host memory (`--cpu-gemm onednn` keeps only oneDNN's).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels import cpu_build, sgmv_cpu
from loraplex.kernels.sgmv_cpu import DenseWeights, SlotArena, dense_cpu

from ..config import ConfigError

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# The most rows a call sends to the C kernel (read at each call: tests pin it). With AVX-512 (a
# Zen 5 VM), over one decode step's projections, it was never slower at any row count measured
# up to 64 (`_bench`), and the engine's base-only run of 32 requests sped up by 5-8% more with
# 32 than with 16 (its steps of 17-32 rows: 54-66 ms against 63-85). With AVX2 only (a Zen 3
# VM, 2026-12-02, `_bench`) it ran 1.04-1.12x oneDNN's speed at 1-8 rows, 1.00x at 16 and
# 0.95-0.99x at 24-64; up to 16 rows its call also takes the step's adapters along
# (lora_layers.KernelLoRALinear). In the engine 4, 16 and 64 came out within that VM's noise.
DENSE_ROWS = 64 if cpu_build.avx512() else 16


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
    """An nn.Linear whose forward multiplies by a oneDNN-packed copy of its weight, or by
    `dense` (a DenseWeights copy) at steps of few rows. It holds the very Parameters of the
    layer it replaces, so ties and names are unchanged."""

    @classmethod
    def of(cls, linear: nn.Linear, dense_lib=None, arena: SlotArena | None = None
           ) -> PackedLinear:
        """`dense_lib`: the C kernel library, to keep a DenseWeights copy too (fp32 only),
        taken from `arena` when given."""
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.register_parameter("weight", linear.weight)
        packed.register_parameter("bias", linear.bias)
        packed.dense = None
        if dense_lib is not None:
            bias = None if linear.bias is None else linear.bias.detach()
            packed.dense = DenseWeights(dense_lib, linear.weight.detach(), bias, arena)
        packed.repack()
        return packed

    def repack(self) -> None:
        """Pack `weight` again, after it changed in place. Where that fails (out of memory),
        the layer multiplies by `weight` itself with F.linear: never by a stale copy."""
        self.packed = None
        if self.dense is not None:
            self.dense.pack(self.weight)
        try:
            self.packed = _pack(self.weight)
        except RuntimeError:
            log.warning("packing a %dx%d weight for oneDNN failed: F.linear for this layer",
                        self.out_features, self.in_features, exc_info=True)

    def dense_for(self, x: torch.Tensor) -> DenseWeights | None:
        """The C kernel's copy, where it takes x (few contiguous rows); else None."""
        if self.dense is not None and x.numel() <= DENSE_ROWS * self.in_features \
                and x.is_contiguous():
            return self.dense
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        dense = self.dense_for(x)
        if dense is not None:
            return dense_cpu(x, dense)
        rows = x.numel() // self.in_features
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
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
    """"onednn+c" (oneDNN, and the C kernel at steps of few rows), "onednn" or "torch" for
    the base's linear layers, or a ConfigError saying why the requested one cannot run here."""
    if requested == "torch":
        return requested
    assert requested in ("auto", "onednn"), requested
    if device.type == "cpu" and not quantized and dtype in PACKABLE_DTYPES \
            and torch.backends.mkldnn.is_available() and _works(dtype):
        # The C kernel is built at start-up; where it cannot be, oneDNN alone.
        if requested == "auto" and dtype == torch.float32 and sgmv_cpu.load(dtype) is not None:
            return "onednn+c"
        return "onednn"
    if requested == "onednn":
        raise ConfigError("--cpu-gemm onednn needs a dense float32 or bfloat16 model on the "
                          "CPU and a torch built with oneDNN (torch.backends.mkldnn)")
    return "torch"


def pack_linears(model: nn.Module, dense: bool = False) -> int:
    """Replace every plain nn.Linear of `model` by a PackedLinear sharing its Parameters, with
    a DenseWeights copy too if `dense` (fp32; all of them in one arena of huge pages, which
    the C kernel streams as it does adapter slots). Returns the bytes of the copies."""
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    lib = arena = None
    if dense:
        lib = sgmv_cpu.load(torch.float32)
        linears = [model.get_submodule(name) for name in names]
        arena = SlotArena(SlotArena.size([(DenseWeights.numel(m.in_features, m.out_features),
                                           torch.float32) for m in linears]))
    total = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        packed = PackedLinear.of(getattr(parent, child), lib, arena)
        setattr(parent, child, packed)
        total += packed.weight.numel() * packed.weight.element_size()
        if packed.dense is not None:
            total += packed.dense.data.nbytes
    log.info("CPU linear layers: %d packed for oneDNN%s (%.0f MB more host memory)",
             len(names), " and the C kernel" if dense else "", total / 2**20)
    return total


def _bench() -> None:
    """Median time of F.linear against the packed oneDNN call at SmolLM2's shapes, and in fp32
    at up to DENSE_ROWS rows the C kernel's (on its own copy), side by side."""
    def median_us(fn, repeats: int = 30) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[repeats // 2] * 1e6

    lib = sgmv_cpu.load(torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | rows | out x in | F.linear (us) | oneDNN packed (us) | speed-up "
          "| C kernel (us) | C / oneDNN |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in filter(_works, PACKABLE_DTYPES):  # oneDNN's bf16 needs AVX-512 (or AMX)
        for rows in (1, 4, 16, 32, 256):
            for out_f, in_f in ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)):
                w = torch.randn(out_f, in_f).to(dtype)
                x = torch.randn(rows, in_f).to(dtype)
                packed = _pack(w)
                plain = median_us(lambda: F.linear(x, w))
                fast = median_us(lambda: _matmul(x, packed, None))
                c = "- | -"
                if dtype == torch.float32 and rows <= DENSE_ROWS and lib is not None:
                    dense = DenseWeights(lib, w, None)
                    us = median_us(lambda: dense_cpu(x, dense))
                    c = f"{us:.0f} | {fast / us:.2f}x"
                print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {out_f}x{in_f} | "
                      f"{plain:.0f} | {fast:.0f} | {plain / fast:.2f}x | {c} |", flush=True)


    if lib is None:
        return
    # One decode step's worth: the shapes above alone stay in cache from call to call, while a
    # step reads every layer's distinct weights from memory once.
    layers = [[torch.randn(o, i) for o, i in ((576, 576), (192, 576), (192, 576), (576, 576),
                                              (1536, 576), (1536, 576), (576, 1536))]
              for _ in range(30)] + [[torch.randn(49152, 576)]]
    onednn = [[_pack(w) for w in ws] for ws in layers]
    dense = [[DenseWeights(lib, w, None) for w in ws] for ws in layers]
    print("\nSmolLM2's 211 fp32 projections, distinct weights (one decode step's reads):")
    print("| rows | oneDNN packed (ms) | C kernel (ms) | C / oneDNN |")
    print("|---|---|---|---|")
    for rows in (1, 2, 4, 8, 16, 24, 32, 48, 64):
        xs = {i: torch.randn(rows, i) for i in (576, 1536)}
        one = median_us(lambda: [_matmul(xs[w.shape[1]], p, None)
                                 for ws, ps in zip(layers, onednn) for w, p in zip(ws, ps)],
                        repeats=15) / 1e3
        c = median_us(lambda: [dense_cpu(xs[d.in_features], d) for ds in dense for d in ds],
                      repeats=15) / 1e3
        print(f"| {rows} | {one:.1f} | {c:.1f} | {one / c:.2f}x |", flush=True)


if __name__ == "__main__":
    _bench()
