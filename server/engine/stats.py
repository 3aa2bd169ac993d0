"""What one engine step reports to metrics. Plain Python: no torch, no Prometheus here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class FinishedStats:
    reason: str  # "stop" | "length" | "abort" | "error"
    adapter: str | None
    prompt_tokens: int
    generation_tokens: int
    e2e_seconds: float
    queue_seconds: float | None  # None if it never got admitted


@dataclass
class StepStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    max_loras: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    prompt_tokens: int = 0  # prompts that produced their first token this step
    generation_tokens: int = 0
    ttft_seconds: list[float] = field(default_factory=list)
    inter_token_seconds: list[float] = field(default_factory=list)
    finished: list[FinishedStats] = field(default_factory=list)
    adapter_load_seconds: list[float] = field(default_factory=list)  # host -> device slot
    adapter_read_seconds: list[float] = field(default_factory=list)  # disk -> host, parsed
    adapter_load_failures: int = 0  # reads that failed (their requests ended with an error)
    adapter_hits: int = 0  # admissions whose adapter was already in a slot
    adapter_misses: int = 0
    # Residency changes since the last report: adapter -> {tier: 0 or 1}.
    residency: dict[str, dict[str, int]] = field(default_factory=dict)
    merge_switches: list[str] = field(default_factory=list)  # "merge" / "unmerge", finished
    merged_adapter: str | None = None  # fully merged into the base at the report


class StatLogger(Protocol):
    def record(self, stats: StepStats) -> None: ...
