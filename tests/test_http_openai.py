"""The real server (uvicorn on a loopback port) driven by the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import running_server
from loraplex.server.app import build_app
from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from loraplex.server.serve import build_state

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "sk-test-shared"


@pytest.fixture(scope="module")
def server(embedded_dir, embedded_adapters, tmp_path_factory):
    config = ServerConfig(
        adapter_store=str(tmp_path_factory.mktemp("store")),
        engine=EngineConfig(model=ModelConfig(model=str(embedded_dir), quantization="none"),
                            cache=CacheConfig(num_blocks=512)),
        served_model_name="smol", api_key=KEY,
        lora_modules=tuple((name, str(path)) for name, path in embedded_adapters.items()))
    state = build_state(config)
    with running_server(build_app(state)) as url:
        yield url
    state.engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def test_chat_base_answers_and_adapter_differs(client):
    base = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                          max_tokens=16)
    assert "Paris" in base.choices[0].message.content
    assert base.choices[0].finish_reason == "stop"
    assert base.usage.completion_tokens > 0 and base.usage.total_tokens == (
        base.usage.prompt_tokens + base.usage.completion_tokens)
    tuned = client.chat.completions.create(model="sql", messages=QUESTION, temperature=0,
                                           max_tokens=16)
    assert tuned.model == "sql"
    assert tuned.choices[0].message.content != base.choices[0].message.content


def test_completion_with_adapter_and_base(client):
    for model in ("smol", "poet", ""):
        out = client.completions.create(model=model, prompt="The capital of France is",
                                        max_tokens=5, temperature=0)
        assert out.object == "text_completion" and len(out.choices) == 1
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    base = client.completions.create(model="smol", prompt="The capital of France is",
                                     max_tokens=3, temperature=0)
    assert "Paris" in base.choices[0].text


def test_streaming_with_usage_matches_non_streaming(client):
    whole = client.chat.completions.create(model="sql", messages=QUESTION, temperature=0,
                                           max_tokens=12)
    chunks = list(client.chat.completions.create(
        model="sql", messages=QUESTION, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    stream = list(client.completions.create(model="poet", prompt="Once upon a time", max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert stream[-1].usage.completion_tokens == 6


def test_n_logprobs_and_seed(client):
    out = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=6, n=3,
                                         temperature=1.0, seed=7, logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        assert 1 <= len(choice.logprobs.content) <= 6
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    again = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=6, n=1,
                                           temperature=1.0, seed=7)
    assert again.choices[0].message.content == out.choices[0].message.content
    comp = client.completions.create(model="smol", prompt="Hello", max_tokens=3, logprobs=2,
                                     temperature=0)
    assert len(comp.choices[0].logprobs.tokens) == 3
    assert all(len(t) == 2 for t in comp.choices[0].logprobs.top_logprobs)


def test_models_list_has_base_and_adapters_with_parents(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"smol", "sql", "poet"}
    assert models["sql"].model_extra["parent"] == "smol"
    assert models["smol"].model_extra["parent"] is None
    assert models["smol"].model_extra["max_model_len"] == 8192


def test_client_errors(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smol", prompt="hi " * 9000, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    # The server keeps serving afterwards.
    ok = client.completions.create(model="smol", prompt="Hi", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_error_shape_and_open_routes(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/health", "/ping", "/version"):
        assert httpx.get(f"{server}{path}").status_code == 200


def test_metrics_after_traffic_have_vllm_names_and_types(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="sql", prompt="Hello there", max_tokens=4)
    client.completions.create(model="smol", prompt="Hello there", max_tokens=4)
    assert httpx.get(f"{server}/v1/models").status_code == 401  # no key
    assert httpx.get(f"{server}/no/such/route/{'x' * 40}",
                     headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    text = httpx.get(f"{server}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:lora_requests_info": "gauge",
        "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "loraplex_adapter_requests": "counter", "loraplex_adapter_tokens": "counter",
        "loraplex_adapter_residency": "gauge", "loraplex_adapter_load_seconds": "histogram",
        "loraplex_adapter_cache_hits": "counter", "loraplex_adapter_cache_misses": "counter",
        "loraplex_adapter_read_seconds": "histogram",
        "loraplex_adapter_load_failures": "counter", "http_requests": "counter",
        "process_resident_memory_bytes": "gauge",
    }
    assert {name: families[name].type for name in expected if name in families} == expected

    def value(name, suffix="", **labels):
        return sum(s.value for s in families[name].samples if s.name == name + suffix
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("vllm:generation_tokens", "_total", model_name="smol") >= 8
    assert value("vllm:request_success", "_total", finished_reason="length") >= 2
    assert value("vllm:time_to_first_token_seconds", "_count") >= 2
    assert value("loraplex_adapter_requests", "_total", adapter="sql") >= 1
    assert value("loraplex_adapter_residency", adapter="sql", tier="device") == 1
    assert value("loraplex_adapter_cache_misses", "_total") >= 1
    assert value("loraplex_adapter_load_failures", "_total") == 0
    assert value("http_requests", "_total", handler="/v1/completions", method="POST",
                 status="200") >= 2
    # Route templates and a fixed "none", never raw paths, so probes cannot grow the labels.
    assert value("http_requests", "_total", handler="/v1/models", status="401") >= 1
    assert value("http_requests", "_total", handler="none", status="404") >= 1
    assert not [s for s in families["http_requests"].samples if "x" * 40 in s.labels["handler"]]
    info = [s for s in families["vllm:lora_requests_info"].samples]
    assert len(info) == 1 and info[0].labels["max_lora"] == "8"
    assert value("vllm:num_requests_running", model_name="smol") == 0
