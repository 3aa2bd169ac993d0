"""F5: clients that go away mid-request. Every disconnect must end its request in the engine
(abort), and once they have all gone nothing may be left behind: no sequence running or
waiting, no KV block held, no adapter marked as running."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from urllib.parse import urlsplit

import httpx
from loraplex.loadtest.report import percentile
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ADMIN, TENANT_KEYS, auth, scale, upload_files

# Long enough that no victim or blocker finishes on its own while the test looks at it.
LONG_CALL = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}
# As long as two can be in make_server's cache (512 blocks of 16 tokens) at once.
BLOCKER_TOKENS = 4000
ABORT_TIMEOUT_S = 10.0  # bounded wait; a leaked request would run for minutes instead


@dataclass(frozen=True)
class EngineGauges:
    """The part of /metrics that says what the engine still holds."""

    aborted: float
    errors: float
    running: float
    waiting: float
    kv_usage: float
    running_adapters: str
    waiting_adapters: str


def scrape(client: httpx.Client) -> EngineGauges:
    response = client.get("/metrics", headers=auth(ADMIN))
    assert response.status_code == 200
    samples = [s for family in text_string_to_metric_families(response.text)
               for s in family.samples]

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    # One live series, as in vLLM; none before the engine's first step.
    info = [s.labels for s in samples if s.name == "vllm:lora_requests_info"]
    assert len(info) <= 1, info
    info_labels = info[0] if info else {}
    return EngineGauges(
        aborted=total("vllm:request_success_total", finished_reason="abort"),
        errors=total("vllm:request_success_total", finished_reason="error"),
        running=total("vllm:num_requests_running"),
        waiting=total("vllm:num_requests_waiting"),
        kv_usage=total("vllm:kv_cache_usage_perc"),
        running_adapters=info_labels.get("running_lora_adapters", ""),
        waiting_adapters=info_labels.get("waiting_lora_adapters", ""))


def wait_for(client: httpx.Client, done: Callable[[EngineGauges], bool], what: str,
             timeout: float = ABORT_TIMEOUT_S) -> EngineGauges:
    """Scrape until `done`; the first scrape that satisfies it is returned."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = scrape(client)
        if done(gauges):
            return gauges
        assert time.monotonic() < deadline, f"{what} within {timeout}s: {gauges}"
        time.sleep(0.005)


class RawCall:
    """One HTTP request on its own socket, so the test picks the instant its client leaves
    (an httpx client decides for itself when to close a pooled connection)."""

    def __init__(self, url: str, path: str, body: dict, key: str):
        parts = urlsplit(url)
        data = json.dumps(body).encode()
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data)
        self.received = b""

    def read_until(self, marker: bytes, count: int) -> None:
        while self.received.count(marker) < count:
            chunk = self.sock.recv(65536)
            assert chunk, f"the server ended the response early: {self.received[-500:]!r}"
            self.received += chunk

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Case:
    stream: bool
    model: str  # "" for the base model
    stage: str  # "running", "queued" or "at once" (closed right after sending)
    chat: bool
    n: int  # choices in the call: each one is a sequence to abort

    @property
    def key(self) -> str:
        return TENANT_KEYS["globex" if self.model.startswith("globex/") else "acme"]

    def body(self) -> dict:
        if self.chat:
            body = {"messages": [{"role": "user", "content": "Count slowly to a thousand."}]}
        else:
            body = {"prompt": "Count slowly:"}
        return dict(body, **LONG_CALL, model=self.model, stream=self.stream, n=self.n)

    def send(self, url: str) -> RawCall:
        return RawCall(url, "/v1/chat/completions" if self.chat else "/v1/completions",
                       self.body(), self.key)


def cases(count: int, stages: tuple[str, ...], rng: random.Random) -> list[Case]:
    """`count` disconnects covering every (stream, model, stage) in turn, in random order;
    the route and the number of choices drawn at random."""
    kinds = list(product((True, False), ("", "acme/sql", "globex/poet"), stages))
    rng.shuffle(kinds)
    return [Case(*kinds[i % len(kinds)], chat=rng.random() < 0.5, n=rng.choice((1, 2)))
            for i in range(count)]


def disconnect(client: httpx.Client, url: str, case: Case, seated: int,
               rng: random.Random) -> float:
    """Send `case`, close its connection once it is running (mid-stream) or queued, and
    return the seconds until /metrics shows its abort; then wait until it is gone."""
    before = scrape(client)
    call = case.send(url)
    if case.stage == "queued":
        wait_for(client, lambda g: g.waiting == case.n, f"{case} queued")
    else:
        wait_for(client, lambda g: g.running == seated + case.n, f"{case} running")
        if case.stream:  # mid-stream: the client has read some tokens (chat: a role first)
            call.read_until(b"data: ", 3 if case.chat else 2)
        time.sleep(rng.uniform(0, 0.3))  # a random point in its generation
    closed = time.monotonic()
    call.close()
    after = wait_for(client, lambda g: g.aborted >= before.aborted + case.n, f"{case} aborted")
    seconds = time.monotonic() - closed
    assert after.aborted == before.aborted + case.n, "an abort nobody asked for"
    # (fewer running: a blocker may have finished meanwhile)
    wait_for(client, lambda g: g.waiting == 0 and g.running <= seated, f"{case} gone")
    return seconds


def settle(client: httpx.Client) -> EngineGauges:
    """The engine once idle, or as it is after ABORT_TIMEOUT_S. Waits past the server's
    0.25 s disconnect poll of non-streaming calls first, so that each request closed before
    any reply has either reached the engine or been dropped; one that reached it and was
    never aborted runs for minutes, and is still there at the end."""
    time.sleep(2.0)
    deadline = time.monotonic() + ABORT_TIMEOUT_S
    while (gauges := scrape(client)).running + gauges.waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    return gauges


def test_disconnects_abort_and_leave_nothing_behind(make_server, embedded_adapters, figures):
    """F5: mid-stream and queued disconnects (streaming or not, base and two tenants'
    adapters, completions and chat, one or two choices), each timed from the client's close
    to the first /metrics scrape that shows its abort (a scrape's few ms included); then as
    many closed right after sending, before any reply, where a race with the request's
    submission would show. Afterwards: no sequence running or waiting, KV usage 0, no adapter
    listed as running or waiting, no request ended in error, and the server still answers."""
    max_num_seqs = 2
    server = make_server("--max-num-seqs", str(max_num_seqs))
    server.start()
    for name, adapter in (("acme/sql", "sql"), ("globex/poet", "poet")):
        r = httpx.post(f"{server.url}/v1/adapters", headers=auth(ADMIN),
                       files=upload_files(embedded_adapters[adapter], name), timeout=60)
        assert r.status_code == 201, r.text
    rng = random.Random(5)
    timed = cases(scale(20, 200), ("running", "queued"), rng)
    at_once = cases(scale(20, 200), ("at once",), rng)
    abort_seconds: dict[tuple[bool, str], list[float]] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:

        def timed_disconnect(case: Case, seated: int) -> None:
            seconds = disconnect(client, server.url, case, seated, rng)
            abort_seconds.setdefault((case.stream, case.stage), []).append(seconds)

        for case in timed:
            if case.stage == "running":
                timed_disconnect(case, 0)
        # Long requests fill every running seat, so a victim must wait; topped up before
        # each victim, in case one finished.
        blockers: list[RawCall] = []
        blocker = dict(LONG_CALL, prompt="Count slowly:", stream=True, max_tokens=BLOCKER_TOKENS)
        for case in timed:
            if case.stage == "queued":
                blockers += [RawCall(server.url, "/v1/completions", blocker, TENANT_KEYS["acme"])
                             for _ in range(max_num_seqs - int(scrape(client).running))]
                wait_for(client, lambda g: g.running == max_num_seqs, "the blockers running")
                timed_disconnect(case, max_num_seqs)
        for call in blockers:
            call.close()
        wait_for(client, lambda g: (g.running, g.waiting) == (0, 0), "the blockers gone")

        every = [s for seconds in abort_seconds.values() for s in seconds]
        figures.record("F5", "time to abort p50", round(percentile(every, 50) * 1000, 1), "ms",
                       f"{len(every)} disconnects mid-stream or queued")
        figures.record("F5", "time to abort p99", round(percentile(every, 99) * 1000, 1), "ms")
        for (stream, stage), seconds in sorted(abort_seconds.items()):
            figures.record(
                "F5", f"time to abort p99, {'streaming' if stream else 'non-streaming'} {stage}",
                round(percentile(seconds, 99) * 1000, 1), "ms", f"{len(seconds)} disconnects")

        for case in at_once:
            case.send(server.url).close()
            # One at a time, as lone clients do: sent as one burst, they hit the race with
            # submission far less often here (none of 9 streaming, against 1 to 5).
            time.sleep(0.3)
        left = settle(client)
        figures.record("F5", "sequences left after disconnects before any reply",
                       left.running + left.waiting, "",
                       f"of {len(at_once)} such disconnects, "
                       f"{sum(c.stream for c in at_once)} streaming")
        assert (left.running, left.waiting) == (0, 0), (
            f"requests whose client left before any reply were never aborted: {left}")

        # A server that lost track of an aborted request would refuse or stall the next one.
        r = client.post("/v1/completions", headers=auth(TENANT_KEYS["acme"]),
                        json={"model": "acme/sql", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        end = wait_for(client, lambda g: (g.running, g.waiting) == (0, 0), "idle again")
    figures.record("F5", "KV cache usage after", end.kv_usage)
    assert end.kv_usage == 0.0
    assert (end.running_adapters, end.waiting_adapters) == ("", "")
    assert end.errors == 0
