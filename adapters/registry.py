"""What the server knows of each adapter without holding its weights, and the host-memory
tier that holds a bounded number of parsed adapters. Plain Python: no torch here."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True)
class AdapterSummary:
    """A registered adapter: enough to list, describe and reload it."""

    name: str
    path: str  # a PEFT adapter directory; the weights are re-read from here when evicted
    max_rank: int
    ranks: tuple[int, ...]
    targets: tuple[str, ...]  # projection names, e.g. ("q_proj", "v_proj")
    num_modules: int

    @classmethod
    def of(cls, adapter) -> AdapterSummary:  # adapter: peft_format.LoRAAdapter
        modules = adapter.modules
        return cls(adapter.name, adapter.path, adapter.max_rank,
                   tuple(sorted({w.rank for w in modules.values()})),
                   tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})), len(modules))


class HostCache(Generic[V]):
    """At most `capacity` values, the least recently used evicted first."""

    def __init__(self, capacity: int):
        assert capacity > 0
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> V | None:
        value = self._items.get(name)
        if value is not None:
            self._items.move_to_end(name)
        return value

    def put(self, name: str, value: V) -> list[str]:
        """Insert or refresh `name`; returns the names evicted to make room."""
        self._items[name] = value
        self._items.move_to_end(name)
        evicted = []
        while len(self._items) > self.capacity:
            evicted.append(self._items.popitem(last=False)[0])
        return evicted

    def drop(self, name: str) -> None:
        self._items.pop(name, None)
