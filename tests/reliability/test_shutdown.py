"""F10: SIGTERM under load. New requests are refused while the drain runs; at
`--drain-timeout` every request still generating is ended with finish_reason "abort" (its
client gets a proper ending, never a reset) and the process exits promptly."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass

import httpx

from .conftest import TENANT_KEYS, auth, scale

DRAIN = 5.0
# Past the drain deadline: the aborts reach their clients, uvicorn closes the connections,
# the engine thread stops and the interpreter exits (torch's teardown alone takes 2 to 3 s
# on two busy cores). Seconds, with room for a busy CI machine.
EXIT_BOUND = 6.0
# Done well within DRAIN: a step of 8 to 32 requests takes 0.2 to 0.5 s on two busy cores.
SHORT = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
LONG = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}  # never done within DRAIN
KEY = auth(TENANT_KEYS["acme"])


@dataclass
class Outcome:
    """How one call ended, as its client saw it."""

    stream: bool
    long: bool
    status: int | None = None
    finish_reason: str | None = None
    done: bool = False  # a stream's last event was [DONE]
    error: str | None = None  # a transport error (a reset, a timeout): never acceptable
    ended: float | None = None  # time.monotonic() when the response was complete


def _call(url: str, i: int, out: Outcome) -> None:
    params = LONG if out.long else SHORT
    if i % 3 == 0:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": f"Count to a thousand, step {i}"}]}
    else:
        path, body = "/v1/completions", {"prompt": f"Count to a thousand, step {i}:"}
    body = dict(body, **params, stream=out.stream)
    try:
        if out.stream:
            with httpx.stream("POST", url + path, json=body, headers=KEY,
                              timeout=DRAIN + 30) as r:
                out.status = r.status_code
                events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
            out.done = events[-1:] == ["[DONE]"]
            reasons = [c["finish_reason"] for e in events[:-1]
                       for c in json.loads(e).get("choices", []) if c.get("finish_reason")]
            out.finish_reason = reasons[-1] if reasons else None
        else:
            r = httpx.post(url + path, json=body, headers=KEY, timeout=DRAIN + 30)
            out.status = r.status_code
            out.finish_reason = r.json().get("choices", [{}])[0].get("finish_reason")
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.ended = time.monotonic()


def _in_engine(url: str) -> int:
    """Requests running or waiting in the engine, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))))


def test_sigterm_under_load_aborts_at_the_deadline_then_exits(make_server, figures):
    server = make_server("--drain-timeout", str(DRAIN))
    server.start()
    n = scale(8, 32)
    # Every mix of streaming or not, short or long; a third of them chat.
    outcomes = [Outcome(stream=i % 2 == 0, long=i % 4 >= 2) for i in range(n)]
    threads = [threading.Thread(target=_call, args=(server.url, i, o), daemon=True)
               for i, o in enumerate(outcomes)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while _in_engine(server.url) < n:
        assert time.monotonic() < deadline, "the requests never all reached the engine"
        time.sleep(0.02)

    server.signal(signal.SIGTERM)
    t0 = time.monotonic()
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                         headers=KEY, timeout=5)
    try:
        code = server.wait(DRAIN + EXIT_BOUND)
    finally:
        exit_seconds = time.monotonic() - t0
        for t in threads:
            t.join(DRAIN + 35)

    ended = [o.ended for o in outcomes if o.ended is not None]
    completed = [o for o in outcomes if o.finish_reason in ("length", "stop")]
    figures.record("F10", "in-flight requests completed during the drain",
                   round(len(completed) / n, 3), "share", f"of {n}, drain {DRAIN:g} s")
    figures.record("F10", "drain: SIGTERM to the last in-flight response",
                   round(max(ended) - t0, 2) if ended else None, "s")
    figures.record("F10", "exit after SIGTERM", round(exit_seconds, 2), "s")
    figures.record("F10", "exit code", code)

    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
    assert error["message"] and int(refused.headers["Retry-After"]) >= 1
    for i, o in enumerate(outcomes):
        assert o.error is None and o.status == 200, (i, o)
        assert o.done or not o.stream, (i, o)
        # The long ones cannot finish within the drain; the short ones were meant to.
        assert o.finish_reason == ("abort" if o.long else "length"), (i, o)
    assert code == 0
    assert exit_seconds < DRAIN + EXIT_BOUND
