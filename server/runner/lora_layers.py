"""Multi-LoRA linear layers: every targeted projection adds each token's own adapter.

Each wrapped projection owns a stacked slot store (`A [slots, max_rank, in]`,
`B [slots, out, max_rank]`, per-slot rank and scale). The model runner sets one `LoRAContext`
per step; every layer reads the same segments from it (and, on CUDA, the same device copy of
them for the Triton kernels).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import torch
from loraplex.adapters.peft_format import LoRAAdapter, LoRAWeights
from loraplex.kernels import sgmv_cpu
from loraplex.kernels.segments import Segments, SGMVMeta
from loraplex.kernels.sgmv import sgmv
from loraplex.kernels.sgmv_cpu import PackedSlots, SegmentTable
from torch import nn

# The projections of Llama, Mistral and Qwen2 decoder layers that take LoRA.
TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAContext:
    """Per-step LoRA metadata, written by the model runner before each forward."""

    segments: Segments = Segments((0,), ())
    meta: SGMVMeta | None = None  # set on CUDA only
    table: SegmentTable | None = None  # set where the CPU kernel runs


class ModuleSlots:
    """One projection's adapter weights for every slot: PEFT's layout padded to the largest
    rank, or packed for the CPU kernel when `cpu_kernel` is given."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device, cpu_kernel: ctypes.CDLL | None):
        self.in_features, self.out_features = in_features, out_features
        self.ranks = [0] * num_slots  # 0: the adapter in this slot does not target this module
        self.scales = [0.0] * num_slots
        # The kernels read ranks and scales on the device: a launch never waits on the host.
        self.ranks_dev = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.scales_dev = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.lora_a: torch.Tensor | None = None  # [num_slots, max_rank, in]
        self.lora_b: torch.Tensor | None = None  # [num_slots, out, max_rank]
        self.packed: PackedSlots | None = None
        if cpu_kernel is not None:
            self.packed = PackedSlots(cpu_kernel, num_slots, max_rank, in_features,
                                      out_features, self.ranks_dev, self.scales_dev)
        else:
            self.lora_a = torch.zeros(num_slots, max_rank, in_features, dtype=dtype,
                                      device=device)
            self.lora_b = torch.zeros(num_slots, out_features, max_rank, dtype=dtype,
                                      device=device)

    def write(self, slot: int, weights: LoRAWeights) -> None:
        r = weights.rank
        if self.packed is not None:
            self.packed.write(slot, weights.lora_a, weights.lora_b)
        else:
            self.lora_a[slot, :r].copy_(weights.lora_a, non_blocking=True)
            self.lora_b[slot, :, :r].copy_(weights.lora_b, non_blocking=True)
        self.set(slot, r, weights.scale)

    def set(self, slot: int, rank: int, scale: float) -> None:
        self.ranks[slot] = rank
        self.scales[slot] = scale
        self.ranks_dev[slot] = rank
        self.scales_dev[slot] = scale

    def clear(self, slot: int) -> None:
        # The padding beyond a slot's rank is never read, so only the bookkeeping changes.
        self.set(slot, 0, 0.0)


class LoRALinear(nn.Module):
    """`y = base(x)`, then `y += sgmv(x)` with this step's segments."""

    def __init__(self, base: nn.Module, slots: ModuleSlots, context: LoRAContext):
        super().__init__()
        self.base_layer = base
        self.slots = slots
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [1, T, in]
        y = self.base_layer(x)  # [1, T, out]
        segments = self.context.segments
        if segments.has_lora:
            sgmv(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), self.slots, segments,
                 self.context.meta, self.context.table)
        return y


class LoRAModel:
    """Wraps a model's projections in place and moves adapters in and out of slots."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, peft_rounding: bool = False):
        """`peft_rounding` keeps PEFT's own GEMM calls on the CPU rather than the C kernel,
        so that the LoRA delta rounds exactly as PEFT's does."""
        self.context = LoRAContext()
        self.num_slots = num_slots
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._loads_pending = False
        self.modules: dict[str, ModuleSlots] = {}
        targets = [(name, module) for name, module in model.named_modules()
                   if name.rsplit(".", 1)[-1] in TARGET_NAMES]
        # Building the C kernel (first use on a machine) happens here, at start-up, rather
        # than in the first request's forward.
        lib = (sgmv_cpu.load() if device.type == "cpu" and dtype == torch.float32
               and not peft_rounding else None)
        self.cpu_kernel = lib is not None
        for name, module in targets:
            slots = ModuleSlots(num_slots, max_rank, module.in_features, module.out_features,
                                dtype, device, lib)
            parent_name, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child,
                    LoRALinear(module, slots, self.context))
            self.modules[name] = slots

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features): all an adapter parser needs to know."""
        return {name: (s.in_features, s.out_features) for name, s in self.modules.items()}

    def stage(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Host copies ready for an asynchronous device copy. Called where the adapter is
        parsed (the loader thread), never on the engine thread. On CUDA the weights move into
        page-locked memory, which the GPU reads by DMA while the host goes on; elsewhere
        they are returned as they are."""
        if self.device.type != "cuda":
            return adapter
        return replace(adapter, modules={
            name: replace(w, lora_a=w.lora_a.pin_memory(), lora_b=w.lora_b.pin_memory())
            for name, w in adapter.modules.items()})

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy `adapter` into `slot`. On CUDA the copy runs on a side stream: it first waits
        for work already queued on the compute stream (a forward may still read the slot's
        previous occupant), and the next forward waits for it on the GPU (`await_loads`),
        so the host never blocks on a transfer."""
        if self.copy_stream is None:
            self._copy(slot, adapter)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self._copy(slot, adapter)
        self._loads_pending = True

    def await_loads(self) -> None:
        """Make the compute stream wait (on the GPU) for slot copies issued so far."""
        if self._loads_pending:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._loads_pending = False

    def _copy(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, slots in self.modules.items():
            weights = adapter.modules.get(name)
            if weights is None:
                slots.clear(slot)
                continue
            slots.write(slot, weights)
