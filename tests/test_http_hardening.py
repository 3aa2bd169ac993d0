"""What a hostile or careless client sent that broke the server (issue #12), each refused
with a 4xx in OpenAI's error shape, and the server unharmed afterwards."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import running_server
from loraplex.server.app import build_app
from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from loraplex.server.engine.request import RequestError, SamplingParams
from loraplex.server.serve import build_state

ADMIN, ACME, METRICS = "sk-admin-hard", "sk-acme-hard01", "sk-metrics-hard"
JSON = {"Content-Type": "application/json"}


def make(embedded_dir, embedded_adapters, tmp, **server):
    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"acme": {"keys": [ACME],
                                                        "adapters": ["acme/*"]}}}))
    config = ServerConfig(
        engine=EngineConfig(model=ModelConfig(model=str(embedded_dir), quantization="none"),
                            cache=CacheConfig(num_blocks=256)),
        admin_key=ADMIN, tenant_keys=str(tenants), adapter_store=str(tmp / "store"),
        lora_modules=(("acme/sql", str(embedded_adapters["sql"])),), **server)
    return build_state(config)


@pytest.fixture(scope="module")
def live(embedded_dir, embedded_adapters, tmp_path_factory):
    state = make(embedded_dir, embedded_adapters, tmp_path_factory.mktemp("hard"))
    with running_server(build_app(state)) as url:
        yield url, state
    state.engine.shutdown()


def post(url, body: bytes | dict, key=ACME, headers=None, path="/v1/completions", timeout=60):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}", **JSON, **(headers or {})})


def refused(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def still_serving(url) -> None:
    r = post(url, {"model": "acme/sql", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_deeply_nested_json_is_400(live):
    url, _ = live
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested" in refused(post(url, deep), 400)["message"]
    still_serving(url)


@pytest.mark.parametrize("field", ["max_tokens", "seed", "top_k", "n", "logprobs"])
def test_integers_past_the_digit_limit_are_400(live, field):
    url, _ = live
    body = b'{"prompt": "Hi", "%s": %s}' % (field.encode(), b"9" * 5000)
    refused(post(url, body), 400)
    still_serving(url)


@pytest.mark.parametrize("field, value", [
    ("temperature", "1e308"), ("temperature", "Infinity"), ("temperature", "NaN"),
    ("temperature", "2.5"), ("temperature", "-1e-9"), ("top_p", "-Infinity"),
    ("top_p", "0"), ("temperature", "1" + "0" * 400), ("max_tokens", str(2**70)),
    ("seed", str(2**64)), ("top_k", "-2")])
def test_numbers_out_of_range_are_400(live, field, value):
    url, _ = live
    body = b'{"prompt": "Hi", "max_tokens": 2, "%s": %s}' % (field.encode(), value.encode())
    if value[0].isalpha() or value.startswith("-I"):  # not JSON: refused by the parser
        refused(post(url, body), 400)
    else:
        refused(post(url, body), 400, field)
    still_serving(url)


def test_edge_values_inside_the_ranges_are_served(live):
    url, _ = live
    for extra in ({"temperature": 2, "top_p": 1e-9, "seed": 2**64 - 1},
                  {"temperature": 0, "seed": -(2**63), "top_k": -1}):
        r = post(url, dict({"model": "acme/sql", "prompt": "Hi", "max_tokens": 2}, **extra))
        assert r.status_code == 200, (extra, r.text)


def test_a_top_p_below_float32s_smallest_keeps_the_top_token(live):
    url, _ = live  # found by hypothesis: 500, "invalid multinomial distribution"
    for top_p in (5e-324, 1e-46):
        r = post(url, {"model": "acme/sql", "prompt": "Hi", "max_tokens": 2, "top_p": top_p})
        assert r.status_code == 200, r.text


def test_a_seed_past_64_bits_never_reaches_the_sampler():
    with pytest.raises(RequestError):
        SamplingParams(seed=2**64)


def test_huge_stop_lists_are_400(live):
    url, _ = live
    refused(post(url, {"prompt": "Hi", "stop": ["x"] * 10_000}), 400, "stop")
    refused(post(url, {"prompt": "Hi", "stop": ["x" * 10_000]}), 400, "stop")
    refused(post(url, {"prompt": "Hi", "stop_token_ids": list(range(10_000))}), 400,
            "stop_token_ids")
    refused(post(url, {"prompt": ["Hi"] * 1000}), 400, "prompt")
    refused(post(url, {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
                 path="/v1/chat/completions"), 400, "messages")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None])
def test_json_only_with_a_json_content_type(live, ctype):
    url, _ = live
    headers = {"Authorization": f"Bearer {ACME}"}
    if ctype:
        headers["Content-Type"] = ctype
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    r = httpx.post(f"{url}/v1/completions", content=body, headers=headers)
    assert refused(r, 415)["code"] == "unsupported_media_type"
    r = httpx.post(f"{url}/v1/completions", content=body,
                   headers=dict(headers, **{"Content-Type": "application/json; charset=utf-8"}))
    assert r.status_code == 200


def test_a_5mb_prompt_is_refused_at_once_and_stalls_nobody(live):
    url, state = live
    prompt = "word " * (1 << 20)  # 5 MiB: more characters than the context can hold
    assert len(prompt) > state.max_prompt_chars
    t0 = time.monotonic()
    error = refused(post(url, {"prompt": prompt, "max_tokens": 1}), 400, "prompt")
    assert "context length" in error["message"] and time.monotonic() - t0 < 5
    # Under the cap, tokenizing still takes a while: it must not hold up /health meanwhile.
    long_prompt = "word " * (state.max_prompt_chars // 5 - 1)
    done, gaps = threading.Event(), []

    def probe():
        while not done.is_set():
            t = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            gaps.append(time.monotonic() - t)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        r = post(url, {"prompt": long_prompt, "max_tokens": 1})
    finally:
        done.set()
        prober.join()
    refused(r, 400, "prompt")  # too many tokens, found by tokenizing
    assert len(gaps) >= 3 and max(gaps) < 1.0, gaps


def test_bearer_scheme_is_case_insensitive(live):
    url, _ = live
    for header in (f"bearer {ACME}", f"BEARER {ACME}", f"Bearer   {ACME}"):
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": header})
        assert r.status_code == 200, header
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {ACME}"}
                     ).status_code == 401


def test_anonymous_metrics_name_no_adapter_or_tenant(live):
    url, _ = live
    still_serving(url)  # acme/sql has run: series labelled with it exist
    anonymous = httpx.get(f"{url}/metrics").text
    admin = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert "acme/sql" in admin and 'tenant="acme"' in admin
    assert "acme" not in anonymous
    for series in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                   "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"):
        assert series in anonymous  # what the endpoint picker reads stays


def test_a_metrics_key_closes_metrics_to_everyone_else(embedded_dir, embedded_adapters,
                                                       tmp_path):
    state = make(embedded_dir, embedded_adapters, tmp_path, metrics_key=METRICS)
    try:
        with running_server(build_app(state)) as url:
            still_serving(url)
            assert refused(httpx.get(f"{url}/metrics"), 401)["code"] == "invalid_api_key"
            assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ACME}"}
                             ).status_code == 401
            for key in (METRICS, ADMIN):
                r = httpx.get(f"{url}/metrics", headers={"Authorization": f"bearer {key}"})
                assert r.status_code == 200 and "acme/sql" in r.text
    finally:
        state.engine.shutdown()


def test_a_failing_sampler_fails_its_batch_not_the_engine(live):
    url, state = live
    engine = state.engine.engine
    real = engine.sampler.__class__.__call__

    def broken(self, logits, requests):
        raise RuntimeError("injected sampler failure")

    engine.sampler.__class__.__call__ = broken
    try:
        r = post(url, {"prompt": "Hi", "max_tokens": 2})
    finally:
        engine.sampler.__class__.__call__ = real
    assert r.status_code == 500 and "injected sampler failure" in r.json()["error"]["message"]
    assert state.engine.alive
    still_serving(url)
