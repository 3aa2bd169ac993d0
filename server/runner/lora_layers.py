"""Multi-LoRA linear layers: every targeted projection adds each token's own adapter.

Each wrapped projection owns a stacked slot store (`A [slots, max_rank, in]`,
`B [slots, out, max_rank]`, per-slot rank and scale). The model runner sets one `LoRAContext`
per step; every layer reads the same segments from it (and, for the Triton backend, the same
device copy of them, `SGMVMeta`).

Which implementation runs is decided once, at start-up (`resolve_backend`), never per call:
the Triton kernels, the CPU C kernel, or the torch reference. The Triton backend also runs on
CPU tensors in Triton's interpreter, which is how tests take the engine's CUDA path on a
machine without a GPU. With it, projections that share their input (a layer's q/k/v, its
gate/up) keep their slots stacked (`FusedSlots`) and take one shrink and one expand launch
for the whole group (`LoRAGroup`), as the kernels' output slices allow.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, replace

import torch
from loraplex.adapters.peft_format import LoRAAdapter, LoRAWeights
from loraplex.kernels import sgmv_cpu
from loraplex.kernels.segments import Segments, SGMVMeta
from loraplex.kernels.sgmv import sgmv, sgmv_triton
from loraplex.kernels.sgmv_cpu import PackedSlots, SegmentTable, SlotArena, slot_stride
from torch import nn

from ..config import ConfigError
from . import cpu_gemm
from .cpu_gemm import PackedLinear

# The projections of Llama, Mistral and Qwen2 decoder layers that take LoRA.
TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections of one parent module that read the same input, in the order the model calls
# them: with the Triton backend each group is one launch pair.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def check_triton(what: str, device: torch.device) -> None:
    """A ConfigError unless Triton can run `what` here: on CUDA, or in its interpreter."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
    if device.type != "cuda" and not interpreted:
        raise ConfigError(f"{what} runs on CUDA, or on the CPU in Triton's interpreter: set "
                          "TRITON_INTERPRET=1 before starting")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs the triton package") from None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype,
                    quantized: bool) -> str:
    """The LoRA backend the engine will use ("triton", "cpu-kernel" or "torch"), or a
    ConfigError that says why the requested one cannot run here."""
    if requested == "auto":
        if device.type == "cuda":
            return "triton"
        # bitsandbytes' CPU kernels round activations to bf16, which turns any difference in
        # the LoRA delta's last bit into logit differences of tenths; on such bases the CPU
        # keeps PEFT's own calls, so that outputs stay comparable with PEFT's token for token.
        # Dense bf16/fp16 bases use the kernel in fp32, as PEFT computes adapters in fp32.
        if device.type == "cpu" and not quantized and sgmv_cpu.load() is not None:
            return "cpu-kernel"
        return "torch"
    if requested == "triton":
        check_triton("--lora-backend triton", device)
    elif requested == "cpu-kernel":
        if device.type != "cpu":
            raise ConfigError("--lora-backend cpu-kernel runs models on the CPU only")
        if sgmv_cpu.load() is None:
            raise ConfigError("--lora-backend cpu-kernel needs a C compiler (cc or gcc) to "
                             "build kernels/sgmv_cpu.c; see the log")
    elif requested != "torch":
        raise ConfigError(f"unknown LoRA backend {requested!r}")
    return requested


def lora_weight_dtype(requested: str, backend: str, model_dtype: torch.dtype) -> torch.dtype:
    """What the slots store adapters in (--lora-dtype): auto is fp32 for the C kernel (PEFT
    computes adapters in fp32) and the model's dtype for the others; only the C kernel stores
    them in another dtype than that."""
    if requested == "auto":
        return torch.float32 if backend == "cpu-kernel" else model_dtype
    dtype = getattr(torch, requested)
    if backend == "cpu-kernel" or dtype == model_dtype:
        return dtype
    raise ConfigError(f"--lora-dtype {requested} needs the C kernel (--lora-backend cpu-kernel, "
                      f"the CPU's default for a dense model); the {backend} backend keeps "
                      f"adapters in the model's dtype ({str(model_dtype).removeprefix('torch.')})")


@dataclass
class LoRAContext:
    """Per-step LoRA metadata, written by the model runner before each forward."""

    segments: Segments = Segments((0,), ())
    meta: SGMVMeta | None = None  # set for the Triton backend only
    table: SegmentTable | None = None  # set for the CPU kernel only
    # A second pass, while an adapter is merged: the other tokens take its delta negated
    # from the shadow slot (engine/merger.py). None: no such pass this step.
    correction: Segments | None = None
    correction_meta: SGMVMeta | None = None
    correction_table: SegmentTable | None = None
    # The C kernel's passes, in `passes` order: its wrappers read only this (`prepare`).
    tables: tuple[SegmentTable, ...] = ()

    def passes(self) -> list[tuple[Segments, SGMVMeta | None, SegmentTable | None]]:
        """This step's SGMV passes, each with the backends' views: the adapters' (when a
        token has one), then the correction's (when there is one)."""
        passes = [(self.segments, self.meta, self.table)] if self.segments.has_lora else []
        if self.correction is not None:
            passes.append((self.correction, self.correction_meta, self.correction_table))
        return passes


class ModuleSlots:
    """One projection's adapter weights for every slot: PEFT's layout padded to the largest
    rank (`lora_a`/`lora_b`, possibly views into a group's `FusedSlots`), or packed for the CPU
    kernel (`packed`)."""

    def __init__(self, in_features: int, out_features: int, ranks_dev: torch.Tensor,
                 scales_dev: torch.Tensor, lora_a: torch.Tensor | None = None,
                 lora_b: torch.Tensor | None = None, packed: PackedSlots | None = None):
        num_slots = ranks_dev.shape[0]
        self.in_features, self.out_features = in_features, out_features
        self.ranks = [0] * num_slots  # 0: the adapter in this slot does not target this module
        self.scales = [0.0] * num_slots
        # The kernels read ranks and scales on the device: a launch never waits on the host.
        self.ranks_dev = ranks_dev  # [num_slots] int32
        self.scales_dev = scales_dev  # [num_slots] fp32
        self.lora_a = lora_a  # [num_slots, max_rank, in]
        self.lora_b = lora_b  # [num_slots, out, max_rank]
        self.packed = packed

    @classmethod
    def create(cls, num_slots: int, max_rank: int, in_features: int, out_features: int,
               dtype: torch.dtype, device: torch.device, cpu_kernel: ctypes.CDLL | None,
               arena: SlotArena | None = None) -> ModuleSlots:
        """Zeroed slots of one projection; packed for the CPU kernel when it is given (in
        `arena`, when given)."""
        ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        if cpu_kernel is not None:
            return cls(in_features, out_features, ranks, scales, packed=PackedSlots(
                cpu_kernel, num_slots, max_rank, in_features, out_features, ranks, scales,
                arena))
        return cls(in_features, out_features, ranks, scales,
                   torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device),
                   torch.zeros(num_slots, out_features, max_rank, dtype=dtype, device=device))

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


class FusedSlots:
    """The slots of projections that share their input, stacked as one Triton launch pair
    takes them: A per slice, B along the output. Each member's `ModuleSlots` is a set of views
    into these tensors, so loading a slot writes the stacked layout directly."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int,
                 widths: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        n = len(widths)
        self.widths = widths
        self.lora_a = torch.zeros(n, num_slots, max_rank, in_features, dtype=dtype,
                                  device=device)  # [slices, slots, max_rank, in]
        self.lora_b = torch.zeros(num_slots, sum(widths), max_rank, dtype=dtype,
                                  device=device)  # [slots, sum(widths), max_rank]
        self.ranks_dev = torch.zeros(n, num_slots, dtype=torch.int32, device=device)
        self.scales_dev = torch.zeros(n, num_slots, dtype=torch.float32, device=device)
        self.members: list[ModuleSlots] = []
        col = 0
        for p, width in enumerate(widths):
            self.members.append(ModuleSlots(
                in_features, width, self.ranks_dev[p], self.scales_dev[p], self.lora_a[p],
                self.lora_b[:, col:col + width]))
            col += width


class LoRAGroup:
    """A layer's q/k/v (or gate/up), whose LoRA runs as one shrink and one expand launch.

    The model calls the members one after another on the same input. The first call computes
    every member's base output into one buffer `[T, sum(widths)]`, adds the group's LoRA to it
    in one launch pair, and hands each member its column slice; the other members take
    theirs. A call with another input computes the group again for that input, so a model
    that calls its projections in another order, or on different inputs, stays correct."""

    def __init__(self, bases: list[nn.Module], slots: FusedSlots, context: LoRAContext):
        self.bases = bases
        self.slots = slots
        self.context = context
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget pending outputs (after a forward that did not finish)."""
        self._x, self._pending = None, {}

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:  # x [1, T, in]
        if self._x is x and member in self._pending:
            out = self._pending.pop(member)
            if not self._pending:
                self._x = None
            return out
        outs = self._compute(x)
        self._x = x
        self._pending = {p: out for p, out in enumerate(outs) if p != member}
        return outs[member]

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        widths = self.slots.widths
        y = torch.cat([base(x) for base in self.bases], dim=-1)  # [1, T, sum(widths)]
        passes = self.context.passes()
        if passes:
            x2 = x.reshape(-1, x.shape[-1])  # [T, in]
            if x2.dtype != self.slots.lora_a.dtype:
                x2 = x2.to(self.slots.lora_a.dtype)
            x2 = x2.contiguous()
            for _, meta, _ in passes:
                sgmv_triton(y.view(-1, y.shape[-1]), x2, self.slots.lora_a, self.slots.lora_b,
                            meta, self.slots.ranks_dev, self.slots.scales_dev, widths)
        return list(y.split(widths, dim=-1))  # views [1, T, w]


class LoRALinear(nn.Module):
    """`y = base(x)`, then `y += sgmv(x)` with this step's segments."""

    def __init__(self, base: nn.Module, slots: ModuleSlots, context: LoRAContext):
        super().__init__()
        self.base_layer = base
        self.slots = slots
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [1, T, in]
        y = self.base_layer(x)  # [1, T, out]
        for segments, meta, table in self.context.passes():
            sgmv(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), self.slots, segments, meta,
                 table)
        return y


class KernelLoRALinear(LoRALinear):
    """`LoRALinear` for the C kernel: `prepare` has the step's tables ready, and the call goes
    straight to the kernel, on the [1, T, width] tensors as they are. This runs for all 210
    projections of every step (32,760 calls in `bench engine-overhead`'s run): a one-token
    rank-4 call cost 12.7 us through the general path before this class and the kernel's
    lighter calling convention, 6.3 us now, 2.8 of them a stand-in base layer's.

    Where the base is the C kernel's dense copy too (fp32 steps of few rows), the base and the
    step's adapters run as one call (`linear_lora_cpu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [1, T, in]
        tables = self.context.tables
        base = self.base_layer
        # a table without scratch (--no-lora-fuse, or a step of many rows) never fuses
        dense = (base.dense_for(x) if tables and tables[0].ldh and isinstance(base, PackedLinear)
                 else None)
        y = None if dense is None else sgmv_cpu.linear_lora_cpu(x, dense, self.slots.packed,
                                                                tables[0])
        if y is None:
            y = base(x)  # [1, T, out]
        else:
            tables = tables[1:]
        for table in tables:
            sgmv_cpu.sgmv_cpu(y, x, self.slots.packed, table)
        return y


class GroupedLoRALinear(nn.Module):
    """A member of a `LoRAGroup`: its output is the group's column slice for this member."""

    def __init__(self, base: nn.Module, group: LoRAGroup, member: int):
        super().__init__()
        self.base_layer = base
        self.group = group
        self.member = member

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [1, T, in]
        return self.group.output(self.member, x)


class LoRAModel:
    """Wraps a model's projections in place and moves adapters in and out of slots."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, backend: str = "torch", fuse: bool = True,
                 shadow: bool = False, cpu_weight_dtype: torch.dtype = torch.float32):
        """`backend` is resolved already (`resolve_backend`); `fuse` groups the projections
        of FUSED_GROUPS when the backend is Triton, and with the C kernel runs each
        projection's base and adapters as one call at steps of few rows. `cpu_weight_dtype`:
        what the C kernel's slots store adapters in (`lora_weight_dtype`). `shadow`: one more
        slot, past the adapter manager's `num_slots`, where the merger keeps a merged adapter's
        weights with its scale negated, for the other tokens' correction."""
        assert backend in ("triton", "cpu-kernel", "torch"), backend
        self.context = LoRAContext()
        self.shadow_slot = num_slots if shadow else None
        num_slots += shadow
        self.num_slots = num_slots
        self.max_rank = max_rank
        # Tokens up to which a step's C kernel table has scratch for the fused call.
        self.fused_rows = cpu_gemm.DENSE_ROWS if fuse else 0
        # The merged (or merging) adapter's slot while the other tokens are corrected.
        self.correcting_slot: int | None = None
        self.device = device
        self.backend = backend
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._loads_pending = False
        self.modules: dict[str, ModuleSlots] = {}
        self.wrappers: dict[str, LoRALinear | GroupedLoRALinear] = {}
        self.groups: list[LoRAGroup] = []
        # The slot of a fully merged adapter (adapters/merge.py): its tokens run as base
        # tokens, the adapter being in the weights already.
        self.silent_slot: int | None = None
        targets = {name: module for name, module in model.named_modules()
                   if name.rsplit(".", 1)[-1] in TARGET_NAMES}
        # Building the C kernel (first use on a machine) happens in resolve_backend, at
        # start-up; here it is already cached.
        lib = sgmv_cpu.load(cpu_weight_dtype) if backend == "cpu-kernel" else None
        if backend == "cpu-kernel" and lib is None:
            raise ConfigError(f"the CPU kernel for {cpu_weight_dtype} adapters did not build; "
                              "see the log")
        if backend == "triton" and fuse:
            for parent_name in sorted({name.rsplit(".", 1)[0] for name in targets}):
                for group in FUSED_GROUPS:
                    names = [f"{parent_name}.{child}" for child in group]
                    bases = [targets.get(name) for name in names]
                    if None in bases or len({b.in_features for b in bases}) != 1:
                        continue
                    fused = FusedSlots(num_slots, max_rank, bases[0].in_features,
                                       tuple(b.out_features for b in bases), dtype, device)
                    lora_group = LoRAGroup(bases, fused, self.context)
                    self.groups.append(lora_group)
                    for member, (name, base) in enumerate(zip(names, bases)):
                        self._wrap(model, name, GroupedLoRALinear(base, lora_group, member))
                        self.modules[name] = fused.members[member]
                        del targets[name]
        # The C kernel's slots of every projection in one allocation (huge pages: see
        # SlotArena), laid out in the order a forward reads them.
        arena = None if lib is None else SlotArena(SlotArena.size([
            (num_slots * slot_stride(max_rank, m.in_features, m.out_features), lib.weight_dtype)
            for m in targets.values()]))
        for name, module in targets.items():
            slots = ModuleSlots.create(num_slots, max_rank, module.in_features,
                                       module.out_features, dtype, device, lib, arena)
            wrapper = KernelLoRALinear if backend == "cpu-kernel" else LoRALinear
            self._wrap(model, name, wrapper(module, slots, self.context))
            self.modules[name] = slots

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        """The dtype adapters are read in: fp32 for the C kernel, which computes in fp32
        whatever the model's dtype (as PEFT does by default); None: the model's."""
        return torch.float32 if self.backend == "cpu-kernel" else None

    def _wrap(self, model: nn.Module, name: str,
              wrapper: LoRALinear | GroupedLoRALinear) -> None:
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, wrapper)
        self.wrappers[name] = wrapper

    def base_of(self, name: str) -> nn.Module:
        return self.wrappers[name].base_layer

    def replace_base(self, name: str, module: nn.Module) -> None:
        """Serve projection `name` with `module` from the next forward on (a merged layer
        that is not the base module itself, or the base module back)."""
        wrapper = self.wrappers[name]
        wrapper.base_layer = module
        if isinstance(wrapper, GroupedLoRALinear):
            wrapper.group.bases[wrapper.member] = module

    def effective_slot(self, slot: int) -> int:
        """The slot a request's tokens use this step: none for the merged adapter's."""
        return -1 if slot == self.silent_slot else slot

    def prepare(self, segments: Segments, correction: Segments | None = None) -> None:
        """Set this step's segments (and the correction pass's), and the backend's own view
        of them, for every layer."""
        context = self.context
        context.segments, context.correction = segments, correction
        if self.backend == "triton":
            # The runner groups tokens by slot, so a slot is at most one segment.
            context.meta = SGMVMeta.build(segments, self.num_slots, self.device)
            context.correction_meta = (SGMVMeta.build(correction, self.num_slots, self.device)
                                       if correction is not None else None)
        elif self.backend == "cpu-kernel":
            context.table = (SegmentTable(segments, self.max_rank, self.fused_rows)
                             if segments.has_lora else None)
            context.correction_table = (SegmentTable(correction) if correction is not None
                                        else None)
            context.tables = tuple(t for _, _, t in context.passes())

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
