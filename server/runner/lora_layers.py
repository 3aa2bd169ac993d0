"""Multi-LoRA linear layers: every targeted projection adds each token's own adapter.

Each wrapped projection owns a stacked slot store (`A [slots, max_rank, in]`,
`B [slots, out, max_rank]`, per-slot rank and scale). The model runner sets one `LoRAContext`
per step; every layer reads the same segments from it (and, on CUDA, the same device copy of
them for the Triton kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loraplex.adapters.peft_format import LoRAAdapter
from loraplex.kernels.segments import Segments, SGMVMeta
from loraplex.kernels.sgmv import sgmv
from torch import nn

# The projections of Llama, Mistral and Qwen2 decoder layers that take LoRA.
TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAContext:
    """Per-step LoRA metadata, written by the model runner before each forward."""

    segments: Segments = Segments((0,), ())
    meta: SGMVMeta | None = None  # set on CUDA only


class ModuleSlots:
    """One projection's adapter weights for every slot."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device):
        self.lora_a = torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, out_features, max_rank, dtype=dtype, device=device)
        self.ranks = [0] * num_slots  # 0: the adapter in this slot does not target this module
        self.scales = [0.0] * num_slots
        # The kernels read ranks and scales on the device: a launch never waits on the host.
        self.ranks_dev = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.scales_dev = torch.zeros(num_slots, dtype=torch.float32, device=device)

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
                 self.context.meta)
        return y


class LoRAModel:
    """Wraps a model's projections in place and moves adapters in and out of slots."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.context = LoRAContext()
        self.num_slots = num_slots
        self.modules: dict[str, ModuleSlots] = {}
        targets = [(name, module) for name, module in model.named_modules()
                   if name.rsplit(".", 1)[-1] in TARGET_NAMES]
        for name, module in targets:
            slots = ModuleSlots(num_slots, max_rank, module.in_features, module.out_features,
                                dtype, device)
            parent_name, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child,
                    LoRALinear(module, slots, self.context))
            self.modules[name] = slots

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (in_features, out_features): all an adapter parser needs to know."""
        return {name: (s.lora_a.shape[2], s.lora_b.shape[1]) for name, s in self.modules.items()}

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, slots in self.modules.items():
            weights = adapter.modules.get(name)
            if weights is None:
                slots.clear(slot)
                continue
            r = weights.rank
            slots.lora_a[slot, :r].copy_(weights.lora_a, non_blocking=True)
            slots.lora_b[slot, :, :r].copy_(weights.lora_b, non_blocking=True)
            slots.set(slot, r, weights.scale)
