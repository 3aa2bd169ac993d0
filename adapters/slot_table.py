"""Which adapter sits in which device slot. Plain Python: no torch here.

A slot holds one adapter's weights next to the model. Requests pin their adapter's slot
while admitted (`acquire`/`release`); an idle slot is reused least-recently-used first.
Copying weights into a slot is the injected `load(name, slot)` callback's business;
`unload(name, slot)` hears of every eviction, and `ready(name)` may say an adapter cannot be
loaded yet (its weights are still on their way), in which case no slot is taken.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class SlotTable:
    def __init__(self, num_slots: int, load: Callable[[str, int], None],
                 unload: Callable[[str, int], None] | None = None,
                 ready: Callable[[str], bool] | None = None):
        assert num_slots > 0
        self.num_slots = num_slots
        self._load = load
        self._unload = unload
        self._ready = ready
        self.hits = 0  # acquisitions that found the adapter resident
        self.misses = 0
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self._refs: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    def slot_of(self, name: str) -> int | None:
        return self._slots.get(name)

    def refs(self, name: str) -> int:
        return self._refs.get(name, 0)

    @property
    def loaded(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._slots)

    def acquire(self, name: str) -> int | None:
        """Pin `name` in a slot, loading it if needed; None when every slot is in use or the
        adapter is not ready to load."""
        slot = self._slots.get(name)
        if slot is None:
            if self._ready is not None and not self._ready(name):
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            self.misses += 1
            try:
                self._load(name, slot)
            except BaseException:
                self._free.append(slot)  # the slot stays usable; its old occupant is gone
                raise
            self._slots[name] = slot
        else:
            self.hits += 1
        self._slots.move_to_end(name)
        self._refs[name] = self._refs.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        refs = self._refs[name] - 1
        assert refs >= 0
        if refs:
            self._refs[name] = refs
        else:
            del self._refs[name]

    def evict(self, name: str) -> bool:
        """Drop an idle adapter from its slot (e.g. unregistered); False if in use or absent."""
        if name not in self._slots or self._refs.get(name):
            return False
        slot = self._slots.pop(name)
        self._free.append(slot)
        if self._unload is not None:
            self._unload(name, slot)
        return True

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for victim in self._slots:  # least recently used first
            if not self._refs.get(victim):
                slot = self._slots.pop(victim)
                if self._unload is not None:
                    self._unload(victim, slot)
                return slot
        return None
