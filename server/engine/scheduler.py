"""Continuous batching under a token budget. Plain Python: no torch here.

Each step: running requests first (decodes, then prefill chunks), then waiting requests in
arrival order while the token budget, the sequence limit and KV blocks allow.
When a running request needs a KV block and none is free, the newest running request is
preempted: its blocks are freed and it goes back to the front of the queue to recompute.

A waiting request whose adapter cannot have a slot yet (every slot busy, or its weights still
on their way from disk) is passed over, as vLLM does, by later requests that need no new
slot: base-model requests and requests for adapters already resident. Later requests that
would need a slot stay behind it, so slots go out in arrival order. Each request can be
passed over at most `max_overtakes` times; after that nobody is admitted before it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..config import SchedulerConfig
from .block_manager import BlockManager
from .request import Request, RequestStatus


class AdapterSlots(Protocol):
    def slot_of(self, name: str) -> int | None: ...
    def acquire(self, name: str) -> int | None: ...
    def release(self, name: str) -> None: ...


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # True when this step computes the request's last pending token, so a new one is
    # sampled; False for a prefill chunk that leaves more of the prompt for later.
    samples: bool

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledRequest:
        assert 0 < num_new_tokens <= request.num_pending_tokens
        return cls(request, num_new_tokens, num_new_tokens == request.num_pending_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, slots: AdapterSlots,
                 admits: Callable[[Request], bool] | None = None):
        self.config = config
        self.blocks = blocks
        self.slots = slots
        # Whether a waiting request may start now (False: it keeps its place, later ones
        # may go ahead): while an adapter is merged, only its own requests may.
        self.admits = admits
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest is preempted first

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        assert request.status is RequestStatus.WAITING
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        limit = self.config.max_num_batched_tokens
        # Decodes first: they are one token each and hold the latency users see.
        decodes = [r for r in self.running if r.num_pending_tokens == 1]
        prefills = [r for r in self.running if r.num_pending_tokens > 1]
        for request in decodes + prefills:
            budget = limit - out.num_batched_tokens
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = min(request.num_pending_tokens, budget)
            if self._reserve_blocks(request, num_new, out):
                out.scheduled.append(ScheduledRequest.of(request, num_new))
        budget = limit - out.num_batched_tokens
        if out.preempted:
            return out  # memory is short: admit nobody new this step
        cap = self.config.max_overtakes
        admitted = 0
        # Requests waiting for a slot, passed over this step, with `admitted` when passed.
        passed: list[tuple[Request, int]] = []
        held: list[Request] = []  # refused by `admits`, in queue order with `passed`
        stop_at = None  # `admitted` count at which a passed request reaches its cap
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if stop_at is not None and admitted >= stop_at:
                break
            request = self.waiting.popleft()
            if self.admits is not None and not self.admits(request):
                held.append(request)
                continue
            num_new = min(request.num_pending_tokens, budget)
            if not self.blocks.can_allocate(request, num_new):
                self.waiting.appendleft(request)
                break
            if request.adapter is not None:
                # Behind a request waiting for a slot, only a resident adapter may go ahead.
                wait = passed and self.slots.slot_of(request.adapter) is None
                slot = None if wait else self.slots.acquire(request.adapter)
                if slot is None:
                    if request.num_overtaken >= cap:
                        self.waiting.appendleft(request)
                        break
                    passed.append((request, admitted))
                    held.append(request)
                    stop = admitted + cap - request.num_overtaken
                    stop_at = stop if stop_at is None else min(stop_at, stop)
                    continue
                request.lora_slot = slot
            self.blocks.allocate(request, num_new)
            if request.admitted_time is None:
                request.admitted_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new
            admitted += 1
        for request, at in passed:
            request.num_overtaken += admitted - at
        self.waiting.extendleft(reversed(held))
        return out

    def _reserve_blocks(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for `num_new` more tokens, preempting the newest running requests
        (possibly `request` itself, then False) until they fit."""
        while not self.blocks.can_allocate(request, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            # A victim already planned this step gives its tokens back to the budget.
            out.scheduled = [s for s in out.scheduled if s.request is not victim]
            if victim is request:
                return False
        self.blocks.allocate(request, num_new)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.blocks.free(request)
        if request.adapter is not None and request.lora_slot >= 0:
            self.slots.release(request.adapter)
        request.lora_slot = -1

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the step's forward computed every scheduled token."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens

    def finish(self, request: Request, status: RequestStatus) -> None:
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._release(request)
        request.status = status

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is; None if unknown or already finished."""
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                return request
        return None
