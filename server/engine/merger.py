"""Merging an adapter into the base while the engine serves: when (MergePolicy), and how,
between steps, a few decoder layers at a time (engine thread).

States: unmerged -> merging -> merged -> unmerging -> unmerged. M's requests keep its slot
the whole time: a module already merged gets rank 0 in that slot, so at every step, mid-merge
included, each projection applies M exactly once (in the weights or through the slot). Once
every module is merged the slot is skipped altogether (`LoRAModel.silent_slot`). Unmerging
walks back the same way; the slot's weights were never touched, only its per-module ranks.

Everyone else, while M is merged or on its way (`MergeConfig.others`):
- "correct": admitted as usual. The shadow slot holds M's weights; a module merged gets M's
  rank and scale negated there, so the other tokens' correction pass (`LoRAModel.prepare`)
  takes M's delta back out of exactly the modules that carry it, at every step.
- "drain" (and any requantized bitsandbytes merge, which a correction cannot undo): not
  admitted; their arrival makes the policy unmerge first.

The adapter is read again, in fp32 as PEFT holds it, on a worker thread; nothing is read or
parsed on the engine thread.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from loraplex.adapters.merge import Merged, Workspace, merge_module
from loraplex.adapters.peft_format import LoRAAdapter

from ..config import MergeConfig
from ..runner.lora_layers import LoRAModel
from .adapter_manager import AdapterManager
from .merge_policy import MergePolicy
from .request import Request, RequestError

log = logging.getLogger("loraplex.merge")

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


class Merger:
    def __init__(self, config: MergeConfig, lora: LoRAModel, manager: AdapterManager,
                 read_fp32: Callable[[str, str], LoRAAdapter], dtype: torch.dtype,
                 pause_graphs: Callable[[bool], None] = lambda paused: None):
        self.config = config
        self.policy = MergePolicy(config)
        self._lora = lora
        self._manager = manager
        self._read = read_fp32
        self._dtype = dtype
        # Captured CUDA graphs hold the addresses of the weights they read: a merge that
        # swaps parameters or modules (bitsandbytes bases) decodes eagerly until undone.
        self._pause_graphs = pause_graphs
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="loraplex-merge-read")
        self._pending: tuple[str, Future[LoRAAdapter]] | None = None  # key being read
        self.state = "unmerged"
        self.key: str | None = None  # version merged, or on its way in or out
        self.slot: int | None = None
        self._adapter: LoRAAdapter | None = None
        self._chunks: list[list[str]] = []  # module names by decoder layer, in merge order
        self._done: list[tuple[str, Merged, int, float]] = []  # name, merged, rank, scale
        self._workspace = Workspace()
        # This merge's other requests run corrected (decided when it begins).
        self.correcting = False
        self.switches = {"merge": 0, "unmerge": 0}
        self._wanted: str | None = config.adapter  # what the policy wanted last step
        self.on_switch: Callable[[str, str], None] = lambda direction, name: None

    # ---- what the engine asks -----------------------------------------------------------

    @property
    def merged_name(self) -> str | None:
        """The adapter fully merged now (None during a switch)."""
        return self._manager.name_of(self.key) if self.state == "merged" else None

    @property
    def engaged(self) -> bool:
        """Whether `step` has anything to decide: merging is asked for (by the operator or
        auto-merge), or a switch or a read is under way. Off, it costs the engine nothing."""
        return (self.policy.pinned is not None or self.policy.auto
                or self.state != "unmerged" or self._pending is not None)

    @property
    def busy(self) -> bool:
        """Work to do even with no request in the engine (a switch under way or wanted)."""
        if self.state in ("merging", "unmerging"):
            return True
        merged = self._manager.name_of(self.key) if self.state == "merged" else None
        return self._wanted != merged

    def admits(self, request: Request) -> bool:
        """Whether the scheduler may admit `request` now (scheduler gate)."""
        return self.state == "unmerged" or self.correcting or (
            self.state in ("merging", "merged") and request.adapter == self.key)

    @functools.cached_property
    def _can_correct(self) -> bool:
        """Whether a merge would correct the other requests: not where a requantized merge
        cannot be (read off the base as loaded), nor with a single adapter slot, which the
        merged adapter holds: the others would never get one."""
        return self._lora.shadow_slot is not None and self._manager.slots.num_slots > 1 and (
            self.config.dense or not any(
                type(getattr(self._lora.base_of(n), "weight", None)).__name__
                in ("Params4bit", "Int8Params") for n in self._lora.modules))

    def request(self, name: str | None) -> None:
        """The operator's merge target (None: unmerge and stay so until asked again)."""
        if name is not None and name not in self._manager.current:
            raise RequestError(f"adapter {name!r} not found", param="name",
                               code="model_not_found")
        self.policy.pin(name)
        self._wanted = name

    def status(self) -> dict:
        name = self._manager.name_of(self.key) if self.key is not None else None
        total = sum(len(c) for c in self._chunks)
        kept = sum(m.kept_bytes for _, m, _, _ in self._done)
        extra = sum(m.extra_bytes for _, m, _, _ in self._done)
        return {"object": "merge", "adapter": name, "state": self.state,
                "modules_merged": len(self._done), "modules": total,
                "requested": self.policy.pinned, "auto": self.policy.auto,
                "dense": self.config.dense, "switches": dict(self.switches),
                # Reading the adapter's fp32 weights for a merge, before it begins.
                "reading": self._pending is not None,
                # Whether other requests run corrected during this merge (else drained).
                "correcting": self.correcting,
                "kept_aside_bytes": kept, "extra_device_bytes": extra}

    # ---- one step -----------------------------------------------------------------------

    def step(self, running_keys: Collection[str | None],
             waiting_keys: Collection[str | None]) -> None:
        """Advance towards what the policy wants, before the scheduler runs, given the
        adapter versions (None: the base model) of the running and the waiting requests.
        With nobody to serve meanwhile, a switch finishes at once instead of a few layers
        per step."""
        keys = {*running_keys, *waiting_keys}
        name_of = self._manager.name_of
        merging_name = name_of(self.key) if self.state in ("merging", "merged") else None
        correct = self.correcting if self.state != "unmerged" else self._can_correct
        want = self.policy.target({name_of(k) if k else None for k in keys}, merging_name,
                                  correct)
        want_key = self._manager.current_key(want) if want is not None else None
        if not correct and any(k != want_key for k in keys):
            # Names alike, versions not: a request still bound to a replaced version of
            # the adapter needs the base weights as much as any other request does (with a
            # correction it is one more other request).
            want_key = None
        self._wanted = want if want_key is not None else None
        if self._pending is not None and self._pending[0] != want_key:
            self._pending = None  # the target changed: forget that read
        if self.state == "unmerged" and (want_key is None or not self._begin(want_key)):
            return
        if self.state in ("merging", "merged") and want_key != self.key:
            log.info("unmerging %s (%s)", name_of(self.key),
                     "other requests waiting" if keys and not self.correcting
                     else "no longer wanted")
            self._lora.silent_slot = None
            self.state = "unmerging"
        # Merging: the merged adapter's waiting requests can run meanwhile (with a correction,
        # everyone's). Unmerging: only running requests can (with a correction, everyone);
        # the waiting ones wait for the unmerge itself.
        idle = not running_keys and (not waiting_keys or not self.correcting and (
            self.state == "unmerging" or self.key not in waiting_keys))
        layers = len(self._chunks) if idle else self.config.layers_per_step
        if self.state == "merging":
            try:
                self._merge_layers(layers)
            except Exception:  # noqa: BLE001 - e.g. out of memory: the base comes back whole
                log.exception("merging %s failed; restoring the base", name_of(self.key))
                self.policy.pin(None)
                self._wanted = None
                self.state = "unmerging"
                self._unmerge_layers(len(self._chunks))
        elif self.state == "unmerging":
            self._unmerge_layers(layers)

    def _begin(self, key: str) -> bool:
        """Start merging `key` once its fp32 weights are read and it holds a slot."""
        if self._pending is None or self._pending[0] != key:
            summary = self._manager.versions[key]
            self._pending = (key, self._reader.submit(self._read, summary.name, summary.path))
            return False
        future = self._pending[1]
        if not future.done():
            return False
        try:
            adapter = future.result()
        except Exception as e:  # noqa: BLE001 - the server goes on unmerged
            log.error("cannot merge %s: %s", self._manager.name_of(key), e)
            self._pending = None
            self.policy.pin(None)
            self._wanted = None
            return False
        slot = self._manager.slots.acquire(key)  # kept until the unmerge ends
        if slot is None:
            return False  # the slot's weights are still on their way from disk
        self._manager.hold(key)  # the version outlives a replace or delete until unmerged
        # A slot just loaded is written on the copy stream: the rank changes below must
        # come after it.
        self._lora.await_loads()
        self._pending = None
        if self._can_correct:
            shadow = self._lora.shadow_slot
            try:
                for name, weights in adapter.modules.items():
                    slots = self._lora.modules[name]
                    slots.write(shadow, weights)
                    slots.set(shadow, 0, 0.0)  # until the module is merged
            except Exception:  # noqa: BLE001 - e.g. out of memory: the server goes on unmerged
                log.exception("cannot merge %s: its correction slot", adapter.name)
                for slots in self._lora.modules.values():
                    slots.set(shadow, 0, 0.0)
                self._manager.slots.release(key)
                self._manager.unbind(key)
                self.policy.pin(None)
                self._wanted = None
                return False
            self.correcting = True
            self._lora.correcting_slot = slot
        # Captured CUDA graphs hold no swapped module (steps needing a correction pass decode
        # eagerly on their own: ModelRunner.execute).
        if any(type(getattr(self._lora.base_of(n), "weight", None)).__name__
               in ("Params4bit", "Int8Params") for n in adapter.modules):
            self._pause_graphs(True)
        self.state, self.key, self.slot, self._adapter = "merging", key, slot, adapter
        by_layer: dict[str, list[str]] = {}
        for name in self._lora.modules:
            if name in adapter.modules:
                match = _LAYER.match(name)
                by_layer.setdefault(match.group(1) if match else name, []).append(name)
        self._chunks = list(by_layer.values())
        log.info("merging %s into the base (%d modules)", adapter.name, len(adapter.modules))
        return True

    def _merge_layers(self, layers: int) -> None:
        assert self._adapter is not None and self.slot is not None
        for chunk in self._chunks[len(self._chunk_sizes_done()):][:layers]:
            for name in chunk:
                slots = self._lora.modules[name]
                rank, scale = slots.ranks[self.slot], slots.scales[self.slot]
                merged = merge_module(self._lora.base_of(name), self._adapter.modules[name],
                                      self.config.dense, self._dtype, self._workspace)
                self._lora.replace_base(name, merged.module)
                slots.set(self.slot, 0, 0.0)  # the weights carry it now
                if self.correcting:  # and the other tokens take it back out
                    slots.set(self._lora.shadow_slot, rank, -scale)
                self._done.append((name, merged, rank, scale))
        if len(self._done) == sum(len(c) for c in self._chunks):
            self._workspace = Workspace()  # its memory goes back
            self.state = "merged"
            self._lora.silent_slot = self.slot
            self._switched("merge")

    def _unmerge_layers(self, layers: int) -> None:
        """Restore the last `layers` chunks merged (the last one possibly in part, after a
        merge that failed midway)."""
        assert self.slot is not None
        sizes = self._chunk_sizes_done()
        for _ in range(sum(sizes[-layers:])):
            name, merged, rank, scale = self._done.pop()
            self._lora.replace_base(name, merged.undo())
            self._lora.modules[name].set(self.slot, rank, scale)
            if self.correcting:
                self._lora.modules[name].set(self._lora.shadow_slot, 0, 0.0)
        if not self._done:
            key, name = self.key, self._manager.name_of(self.key)
            self._manager.slots.release(key)
            self.state, self.key, self.slot, self._adapter = "unmerged", None, None, None
            self.correcting, self._lora.correcting_slot = False, None
            self._chunks = []
            self._pause_graphs(False)
            self._manager.unbind(key)  # a replaced or deleted version may go now
            self._switched("unmerge", name)

    def _chunk_sizes_done(self) -> list[int]:
        """How many modules of each chunk are merged, chunk by chunk, in merge order."""
        sizes, count = [], len(self._done)
        for chunk in self._chunks:
            if count <= 0:
                break
            sizes.append(min(count, len(chunk)))
            count -= len(chunk)
        return sizes

    def _switched(self, direction: str, name: str | None = None) -> None:
        name = name or self._manager.name_of(self.key)
        self.switches[direction] += 1
        self.policy.switched()
        log.info("%s %s: done (%s)", direction, name, self.status())
        self.on_switch(direction, name)

    def wait(self, timeout: float) -> None:
        """Block until the adapter being read for a merge is read (or `timeout`): an engine
        with nothing else to do waits here rather than spinning against the reader."""
        if self._pending is not None:
            wait([self._pending[1]], timeout)

    def shutdown(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
