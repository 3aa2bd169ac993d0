"""Disconnects, capacity, a dead engine, and SIGTERM draining, on the real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import free_port, running_server
from loraplex.server.app import build_app
from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from loraplex.server.serve import build_state

LONG = {"prompt": "Count slowly:", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def live(embedded_dir, tmp_path_factory):
    config = ServerConfig(
        engine=EngineConfig(model=ModelConfig(model=str(embedded_dir), quantization="none"),
                            cache=CacheConfig(num_blocks=512)),
        adapter_store=str(tmp_path_factory.mktemp("store")))
    state = build_state(config)
    with running_server(build_app(state)) as url:
        yield url, state
    state.engine.shutdown()


def wait_idle(state, seconds=5.0) -> float:
    """Seconds until the engine has nothing left to run."""
    t0 = time.monotonic()
    while state.engine.call(lambda e: e.has_unfinished()).result(5):
        assert time.monotonic() - t0 < seconds, "the request is still running"
        time.sleep(0.02)
    return time.monotonic() - t0


def aborted(url) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total") and 'finished_reason="abort"' in line)


def test_stream_disconnect_aborts_the_request(live):
    url, state = live
    before = aborted(url)
    with httpx.stream("POST", f"{url}/v1/completions", json=dict(LONG, stream=True),
                      timeout=30) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))
    wait_idle(state)
    assert aborted(url) == before + 1


def test_non_streaming_disconnect_aborts_the_request(live):
    url, state = live
    before = aborted(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=LONG, timeout=1.0)
    wait_idle(state)
    assert aborted(url) == before + 1


def test_queue_full_gets_503_with_retry_after(live):
    url, state = live
    state.max_in_flight = 1
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=dict(LONG, stream=True),
                          timeout=30) as r:
            lines = r.iter_lines()  # kept referenced: dropping it closes the connection
            assert next(l for l in lines if l.startswith("data:"))
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    finally:
        state.max_in_flight = 1024
    assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["code"] == "queue_full"
    wait_idle(state)


def test_admin_api_is_off_without_an_admin_key(live):
    url, _ = live
    r = httpx.get(f"{url}/v1/adapters")
    assert r.status_code == 404 and "--admin-key" in r.json()["error"]["message"]


def test_dead_engine_fails_health_and_requests(embedded_dir, tmp_path):
    config = ServerConfig(
        engine=EngineConfig(model=ModelConfig(model=str(embedded_dir), quantization="none"),
                            cache=CacheConfig(num_blocks=64)),
        adapter_store=str(tmp_path / "store"))
    state = build_state(config)

    def crash():
        raise SystemExit("simulated engine crash")

    with running_server(build_app(state)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        state.engine.engine.step = crash
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "engine" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits(tmp_path, embedded_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.server.cli", "serve", str(embedded_dir), "--host",
         "127.0.0.1", "--port", str(port), "--adapter-store", str(tmp_path / "store"),
         "--drain-timeout", "120", "--num-kv-blocks", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        events, started = [], threading.Event()

        def stream():
            body = {"prompt": "Count:", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        health = httpx.get(f"{url}/health")
        reader.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert refused.status_code == 503 and health.status_code == 503
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_error_mid_stream_is_a_data_event_then_done(live):
    url, state = live
    engine = state.engine.engine
    real, calls = engine.runner.execute, {"n": 0}

    def failing_third_step(scheduled):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected forward failure")
        return real(scheduled)

    engine.runner.execute = failing_third_step
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50,
                "stream": True}) as r:
            events = [l[5:].strip() for l in r.iter_lines() if l.startswith("data:")]
    finally:
        engine.runner.execute = real
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "injected forward failure" in error["message"] and error["type"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200  # the server goes on


def test_body_over_the_limit_is_413(live):
    url, state = live
    big = b'{"prompt": "' + b"x" * (state.max_body_bytes + 1) + b'"}'
    r = httpx.post(f"{url}/v1/completions", content=big,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield big[: len(big) // 2]
        yield big[len(big) // 2:]

    r = httpx.post(f"{url}/v1/completions", content=chunks(),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
