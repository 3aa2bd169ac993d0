"""Adapters as the engine sees them: named versions, the host-memory tier, device slots, pins.

Every install of a name is a new version with its own key (`name@N`). A request is bound to
the version current when it arrives, and slots and the host cache hold versions, so replacing
an adapter never changes the weights under a running request, and nothing cached for old
content is reused. A replaced or removed version lives until its last request ends.

Reading an adapter from disk happens on a loader thread, never on the engine thread: a slot
is only taken once the weights are in host memory (the scheduler's head request waits, the
running batch goes on decoding), and adapters of waiting requests are fetched ahead.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from loraplex.adapters.peft_format import LoRAAdapter
from loraplex.adapters.registry import AdapterSummary, HostCache
from loraplex.adapters.slot_table import SlotTable

from ..config import LoRAConfig
from ..runner.lora_layers import LoRAModel
from .request import RequestError
from .stats import StepStats


class AdapterLoadError(RuntimeError):
    def __init__(self, key: str, name: str, cause: Exception):
        super().__init__(f"adapter {name!r} could not be loaded: {cause}")
        self.key = key


def _not_found(name: str) -> RequestError:
    return RequestError(f"adapter {name!r} not found", param="name", code="model_not_found")


class AdapterManager:
    def __init__(self, config: LoRAConfig, lora: LoRAModel,
                 parse: Callable[[str, str], LoRAAdapter], stats: Callable[[], StepStats]):
        self._lora = lora
        self._parse = parse
        self._stats = stats  # the engine's accumulator for the current step
        self.current: dict[str, AdapterSummary] = {}  # name -> serving version
        self._versions: dict[str, AdapterSummary] = {}  # key -> every live version
        self._keys: dict[str, str] = {}  # name -> key of the serving version
        self._requests: Counter[str] = Counter()  # key -> unfinished requests bound to it
        self._retired: set[str] = set()  # keys no longer serving, awaiting their last request
        self._pinned: dict[str, str] = {}  # name -> pinned key
        self._counter = itertools.count(1)
        self.host: HostCache[LoRAAdapter] = HostCache(config.cpu_capacity)
        self.slots = SlotTable(config.max_loras, self._load_slot, self._unloaded_slot,
                               self._ready)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="loraplex-adapter-load")
        self._fetching: set[str] = set()
        # key, what the read gave, its seconds
        self._fetched: queue.SimpleQueue[tuple[str, LoRAAdapter | Exception, float]] = (
            queue.SimpleQueue())
        self.on_fetched: Callable[[], None] = lambda: None  # wakes an idle engine loop
        # A replaced or removed version ended: its files may now be collected (engine thread).
        self.on_dropped: Callable[[], None] = lambda: None
        self._fetch_done = threading.Event()

    # ---- what callers see -------------------------------------------------------------

    def name_of(self, key: str) -> str:
        return self._versions[key].name

    def current_key(self, name: str) -> str | None:
        """The version key serving `name` now."""
        return self._keys.get(name)

    @property
    def versions(self) -> dict[str, AdapterSummary]:
        """Every live version by key, replaced ones still in use included."""
        return self._versions

    def slot_of(self, name: str) -> int | None:
        key = self._keys.get(name)
        return None if key is None else self.slots.slot_of(key)

    def in_host(self, name: str) -> bool:
        key = self._keys.get(name)
        return key is not None and key in self.host

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def paths_in_use(self) -> set[str]:
        """Directories of every live version, old ones with requests still running included:
        their files may be read again (an evicted version is re-read from disk)."""
        return {summary.path for summary in self._versions.values()}

    # ---- changes ----------------------------------------------------------------------

    def install(self, adapter: LoRAAdapter) -> str:
        """Serve `adapter` under its name from now on; returns its version key."""
        name = adapter.name
        key = f"{name}@{next(self._counter)}"
        old = self._keys.get(name)
        self._versions[key] = AdapterSummary.of(adapter)
        self._keys[name] = key
        self.current[name] = self._versions[key]
        self._keep_in_host(key, adapter)
        if old is not None:
            repin = self._pinned.pop(name, None) is not None
            if repin:
                self.slots.release(old)
            self._retire(old)
            if repin:
                self.pin(name)
        return key

    def remove(self, name: str) -> None:
        """Stop serving `name`; requests already bound to it finish on its weights."""
        key = self._keys.pop(name, None)
        if key is None:
            raise _not_found(name)
        del self.current[name]
        if self._pinned.pop(name, None) is not None:
            self.slots.release(key)
        self._retire(key)

    def pin(self, name: str) -> None:
        """Keep the serving version of `name` in a device slot until unpinned."""
        key = self._keys.get(name)
        if key is None:
            raise _not_found(name)
        if name in self._pinned:
            return
        if self.slots.acquire(key) is None:
            raise RequestError("every adapter slot is in use; try again later", param="name",
                               code="adapter_busy")
        self._pinned[name] = key

    def unpin(self, name: str) -> None:
        key = self._pinned.pop(name, None)
        if key is not None:
            self.slots.release(key)

    # ---- requests ---------------------------------------------------------------------

    def bind(self, name: str) -> str | None:
        """The version key a new request for `name` uses; None if `name` is not served."""
        key = self._keys.get(name)
        if key is not None:
            self._requests[key] += 1
        return key

    def hold(self, key: str) -> None:
        """Keep version `key` alive as a request would (a merge holds the version it
        merged); `unbind` lets it go."""
        self._requests[key] += 1

    def unbind(self, key: str) -> None:
        self._requests[key] -= 1
        if not self._requests[key]:
            del self._requests[key]
            if key in self._retired:
                self._drop(key)

    # ---- reading from disk, off the engine thread -------------------------------------

    def prefetch(self, keys: list[str]) -> None:
        """Start reading these versions into host memory, at most as many as it holds."""
        for key in keys[: self.host.capacity]:
            if key in self._versions and key not in self.host and key not in self._fetching:
                self._fetching.add(key)
                summary = self._versions[key]
                self._loader.submit(self._fetch, key, summary.name, summary.path)

    def _fetch(self, key: str, name: str, path: str) -> None:  # on the loader thread
        t0 = time.perf_counter()
        try:
            result: LoRAAdapter | Exception = self._parse(name, path)
        except Exception as e:  # noqa: BLE001 - handed to the engine thread
            result = AdapterLoadError(key, name, e)
        self._fetched.put((key, result, time.perf_counter() - t0))
        self._fetch_done.set()
        self.on_fetched()

    def wait_for_fetch(self, timeout: float) -> None:
        """Block until a read in flight finishes (or `timeout`): an engine with nothing to
        run waits here rather than spinning, which would starve the loader of the GIL."""
        if self._fetching:
            self._fetch_done.wait(timeout)
            self._fetch_done.clear()

    def collect(self) -> list[AdapterLoadError]:
        """Take in what the loader finished (engine thread); the failures, whose requests
        the engine ends."""
        failures = []
        while True:
            try:
                key, result, seconds = self._fetched.get_nowait()
            except queue.Empty:
                return failures
            self._fetching.discard(key)
            stats = self._stats()
            stats.adapter_read_seconds.append(seconds)
            if isinstance(result, Exception):
                stats.adapter_load_failures += 1
                failures.append(result)
            elif key in self._versions:  # not dropped meanwhile
                self._keep_in_host(key, result)

    def _ready(self, key: str) -> bool:
        if key in self.host:
            return True
        self.prefetch([key])
        return False

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ---- internals --------------------------------------------------------------------

    def _retire(self, key: str) -> None:
        if self._requests[key]:
            self._retired.add(key)
        else:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self.slots.evict(key)
        self.host.drop(key)
        name = self._versions.pop(key).name
        self._retired.discard(key)
        self._requests.pop(key, None)
        if name not in self._keys:
            self._stats().residency.setdefault(name, {})["host"] = 0
        self.on_dropped()

    def _keep_in_host(self, key: str, adapter: LoRAAdapter) -> None:
        self._stats().residency.setdefault(adapter.name, {})["host"] = 1
        for evicted in self.host.put(key, adapter):
            if evicted in self._versions and self._keys.get(self.name_of(evicted)) == evicted:
                self._stats().residency.setdefault(self.name_of(evicted), {})["host"] = 0

    def _load_slot(self, key: str, slot: int) -> None:
        t0 = time.perf_counter()
        adapter = self.host.get(key)
        assert adapter is not None, "SlotTable asked _ready first"
        self._lora.load(slot, adapter)
        stats = self._stats()
        stats.adapter_load_seconds.append(time.perf_counter() - t0)
        stats.residency.setdefault(self.name_of(key), {})["device"] = 1

    def _unloaded_slot(self, key: str, slot: int) -> None:
        name = self._versions[key].name
        if self._keys.get(name, key) == key:  # not when an old version leaves for a new one
            self._stats().residency.setdefault(name, {})["device"] = 0
