"""The load generator's client: streams completions over the OpenAI API and times each token.

Open loop: every request is sent at its scheduled time whether or not earlier ones have
finished, so a slow server meets a growing queue instead of a politely waiting client.
Closed loop: `concurrency` workers each send their next request when their last one ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .workload import Item


@dataclass
class Record:
    """What one request did. Times are seconds; `start` is from the run's start."""

    index: int
    adapter: str | None
    start: float = 0.0
    ttft: float | None = None  # to the first chunk carrying text
    itl: list[float] = field(default_factory=list)  # gaps between later chunks
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: int = 0  # HTTP status; 0: no response (connection refused, timeout)
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as vLLM's benchmark defines it."""
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse to load anything but loopback unless the user named the host on purpose."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ValueError(f"{url} is not a loopback address: pass --allow-remote to load it")


@dataclass(frozen=True)
class Target:
    url: str  # e.g. http://127.0.0.1:8000, without /v1
    base_model: str  # the served name, for requests with no adapter
    api_key: str | None = None
    timeout_s: float = 600.0
    # Fields a server needs besides OpenAI's, by adapter (None: the base model); e.g.
    # llama.cpp's server picks adapters by a `lora` list, not by `model`.
    extra: Callable[[str | None], dict] | None = None

    def model_for(self, item: Item) -> str:
        return item.adapter or self.base_model


async def _one(client, target: Target, item: Item, t0: float) -> Record:
    record = Record(item.index, item.adapter)
    body = {"model": target.model_for(item), "prompt": item.prompt, "max_tokens": item.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            **(target.extra(item.adapter) if target.extra else {})}
    sent = time.perf_counter()
    record.start = sent - t0
    last = sent
    try:
        async with client.stream("POST", f"{target.url}/v1/completions", json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                payload = (await response.aread()).decode(errors="replace")
                record.error = _error_message(payload)
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # an error after the stream began
                    record.error = _error_message(line[6:])
                    break
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
                if not text:
                    continue
                now = time.perf_counter()
                if record.ttft is None:
                    record.ttft = now - sent
                else:
                    record.itl.append(now - last)
                last = now
                record.text += text
    except Exception as e:  # noqa: BLE001 - any failure is the request's result, not ours
        record.error = f"{type(e).__name__}: {e}"
    record.e2e = time.perf_counter() - sent
    return record


def _error_message(payload: str) -> str:
    try:
        return json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return payload[:200]


async def run_items(items: list[Item], target: Target, concurrency: int | None = None,
                    on_done: Callable[[Record], None] | None = None) -> tuple[list[Record], float]:
    """Runs a workload; returns the records in item order and the wall time."""
    import httpx

    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    records: dict[int, Record] = {}
    async with httpx.AsyncClient(headers=headers, timeout=target.timeout_s,
                                 limits=limits) as client:
        t0 = time.perf_counter()

        async def send(item: Item) -> None:
            if item.send_at is not None:
                await asyncio.sleep(max(0.0, t0 + item.send_at - time.perf_counter()))
            records[item.index] = record = await _one(client, target, item, t0)
            if on_done is not None:
                on_done(record)

        if concurrency is None:
            await asyncio.gather(*(send(item) for item in items))
        else:
            queue = list(reversed(items))

            async def worker() -> None:
                while queue:
                    await send(queue.pop())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return [records[item.index] for item in items], wall
