"""Ray Serve: two replicas on a local Ray cluster behind one OpenAI endpoint (issue 16).

The same requests go to the Ray endpoint and to one in-process `loraplex serve` over the same
model and store: the tokens must match. Adapter affinity is counted from the replicas' own
metrics; a replica is killed mid-stream and must come back serving its adapters."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray  # in the test extras: these tests run in CI, never skipped
from conftest import free_port, running_server
from ray import serve

from loraplex.server.app import build_app
from loraplex.server.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    RayOptions,
    ServerConfig,
)
from loraplex.server.ray_serve import APP_NAME, NAMESPACE, build_application

pytestmark = pytest.mark.slow

API_KEY, ADMIN_KEY, METRICS_KEY = "api-key", "admin-key", "metrics-key"
ADAPTERS = [f"bench-{i:03d}" for i in range(8)]
PROMPT = [{"role": "user", "content": "Name a colour and a fruit."}]
MAX_TOKENS = 8


def _config(model_dir: Path, store: Path) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(
            model=ModelConfig(model=str(model_dir), max_model_len=512),
            cache=CacheConfig(num_blocks=512),
            lora=LoRAConfig(max_loras=2, max_cpu_loras=4)),
        adapter_store=str(store), api_key=API_KEY, admin_key=ADMIN_KEY, metrics_key=METRICS_KEY)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, embedded_dir) -> Path:
    """Eight adapters of ranks 4-64 on every linear layer (the benchmark's fixtures)."""
    from loraplex.loadtest.cli import make_fixtures

    out = tmp_path_factory.mktemp("ray-adapters")
    made = make_fixtures(str(out), len(ADAPTERS), [4, 8, 16, 32, 64], None, str(embedded_dir), 0)
    assert sorted(made) == ADAPTERS
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, embedded_dir, adapters_dir):
    """(URL of the Ray endpoint, its config); the adapters uploaded through it."""
    store = tmp_path_factory.mktemp("ray-store")
    config = _config(embedded_dir, store)
    port = free_port()
    ray.init(num_cpus=2, namespace=NAMESPACE, include_dashboard=False,
             object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(config, RayOptions(num_replicas=2)), name=APP_NAME,
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for name in ADAPTERS:  # through the ingress: each lands on one replica, in the store
            files = {"config": (adapters_dir / name / "adapter_config.json").read_bytes(),
                     "weights": (adapters_dir / name / "adapter_model.safetensors").read_bytes()}
            r = httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files,
                           headers=admin, timeout=60)
            assert r.status_code == 201, r.text
        yield url, config
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, model: str, stream: bool) -> tuple[str, str]:
    """(the completion's text, the replica that served it or "")."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=stream)
    replica = raw.headers.get("x-loraplex-replica", "")
    parsed = raw.parse()
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in parsed if c.choices), replica
    return parsed.choices[0].message.content, replica


def _metrics(url: str) -> str:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert r.status_code == 200, r.text
    return r.text


def _served(url: str, deadline_s: float = 10) -> dict[str, set[str]]:
    """Replica -> the adapters (base included) it served, from the replicas' own metrics
    (pushed every 2 s: polled until stable)."""
    from prometheus_client.parser import text_string_to_metric_families

    end, last = time.monotonic() + deadline_s, None
    while True:
        served: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(_metrics(url)):
            if family.name == "loraplex_adapter_requests":
                for s in family.samples:
                    if s.name.endswith("_total") and s.value > 0:
                        served.setdefault(s.labels["replica"], set()).add(s.labels["adapter"])
        if served == last or time.monotonic() > end:
            return served
        last = served
        time.sleep(2.5)


def test_ray_serve_config_builds():
    """deploy/ray/serve_config.yaml's args are serve-ray flags: the application builds."""
    import yaml
    from loraplex.server.ray_serve import app_builder

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy/ray/serve_config.yaml")
                            .read_text())
    [application] = config["applications"]
    assert application["import_path"] == "loraplex.server.ray_serve:app_builder"
    app = app_builder(application["args"])
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError):  # a misspelt flag fails the build, not a replica
        app_builder({"max-lora": 8})


def test_ray_metrics_merge_labels_each_replica():
    from loraplex.server.metrics import Metrics
    from loraplex.server.ray_serve import merge_expositions
    from prometheus_client.parser import text_string_to_metric_families

    texts = {}
    for replica, n in (("a", 1), ("b", 2)):
        metrics = Metrics("base")
        metrics.observe_request("sql", None, 3, n)
        texts[replica] = metrics.render()
    families = {f.name: f for f in text_string_to_metric_families(
        merge_expositions(texts).decode())}
    tokens = {(s.labels["replica"], s.labels["kind"]): s.value
              for s in families["loraplex_adapter_tokens"].samples if s.name.endswith("_total")}
    assert tokens == {("a", "prompt"): 3, ("a", "generation"): 1,
                      ("b", "prompt"): 3, ("b", "generation"): 2}


def test_ray_hot_adapter_spills_to_other_replicas():
    from collections import Counter

    from loraplex.server.ray_serve import affine

    assert not affine(Counter(), "", 2)  # the base model: any replica
    assert affine(Counter(), "a", 2)
    assert affine(Counter({"b": 3}), "a", 2)
    # One request of "a" in flight out of one: at a replica's share (0.5, at least 1): spills.
    assert not affine(Counter({"a": 1}), "a", 2)
    assert affine(Counter({"a": 2, "b": 4, "c": 4}), "a", 2)
    assert not affine(Counter({"a": 6, "b": 4}), "a", 2)
    assert affine(Counter({"a": 6, "b": 4}), "a", 1)  # one replica: nowhere to spill


def test_ray_same_tokens_as_serve_with_adapter_affinity(cluster, embedded_dir):
    url, config = cluster
    client = _client(url)
    for model in ADAPTERS:  # each adapter's first request places it; Ray's router learns
        _chat(client, model, False)  # where within a push period
    time.sleep(2)
    got = {(m, s): _chat(client, m, s) for m in ADAPTERS for s in (False, True)}
    base = config.served_model_name or str(embedded_dir)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # concurrent: both replicas busy
        base_runs = list(pool.map(lambda _: _chat(client, base, False), range(12)))

    from loraplex.server.serve import build_state

    state = build_state(config)  # one `loraplex serve` over the same store
    try:
        with running_server(build_app(state)) as ref_url:
            ref = _client(ref_url)
            want = {(m, s): _chat(ref, m, s)[0] for m in ADAPTERS for s in (False, True)}
            want_base = _chat(ref, base, False)[0]
    finally:
        state.engine.shutdown()

    changed = [m for m in ADAPTERS if want[(m, False)] != want_base]
    assert len(changed) >= 6, f"the adapters barely change the output: {want}"
    assert {k: v[0] for k, v in got.items()} == want
    assert {text for text, _ in base_runs} == {want_base}
    assert len({replica for _, replica in base_runs}) == 2, "the base model is served by both"

    served = _served(url)
    assert set(served) == {r for _, r in got.values()} | {r for _, r in base_runs}
    per_replica = {r: names - {base} for r, names in served.items()}
    # Affinity: each adapter on one replica (8 / 2 each), where plain balancing gives 8 each.
    assert sum(len(n) for n in per_replica.values()) == len(ADAPTERS), per_replica
    for (model, _), (_, replica) in got.items():
        assert model in per_replica[replica]


def test_ray_keys_errors_and_shared_store(cluster, adapters_dir):
    url, _ = cluster
    anonymous = httpx.post(f"{url}/v1/chat/completions",
                           json={"model": ADAPTERS[0], "messages": PROMPT})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"]
    client = _client(url)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-adapter", messages=PROMPT, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=ADAPTERS[0], messages=[], max_tokens=2)
    assert httpx.get(f"{url}/metrics").status_code == 401

    # An upload through one replica is served by both; a delete through one by neither.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    files = {"config": (adapters_dir / ADAPTERS[0] / "adapter_config.json").read_bytes(),
             "weights": (adapters_dir / ADAPTERS[0] / "adapter_model.safetensors").read_bytes()}
    bad = httpx.post(f"{url}/v1/adapters", data={"name": "broken"},
                     files={**files, "weights": b"not safetensors"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/adapters", data={"name": "copy"}, files=files, headers=admin,
                   timeout=60)
    assert r.status_code == 201, r.text
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert "copy" in {m["id"] for m in models.json()["data"]}
    assert "broken" not in {m["id"] for m in models.json()["data"]}
    assert _listed_by_both(url) == {True}
    wanted, _ = _chat(client, ADAPTERS[0], False)
    assert _chat(client, "copy", False)[0] == wanted
    assert httpx.delete(f"{url}/v1/adapters/copy", headers=admin).status_code == 200
    assert _listed_by_both(url) == {False}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="copy", messages=PROMPT, max_tokens=2)


def _listed_by_both(url: str) -> set[bool]:
    """Whether each replica lists the adapter "copy" (listings go to any replica: asked
    concurrently until both have answered)."""
    listed: dict[str, bool] = {}

    def ask(_):
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200
        listed[r.headers["x-loraplex-replica"]] = "copy" in {m["id"] for m in r.json()["data"]}

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            list(pool.map(ask, range(16)))
            if len(listed) == 2:
                return set(listed.values())
    raise AssertionError(f"one replica answered every listing: {listed}")


def test_ray_replica_killed_mid_stream(cluster):
    url, _ = cluster
    client = _client(url)
    expected = {m: _chat(client, m, False)[0] for m in ADAPTERS}
    victim_adapter = ADAPTERS[-1]  # the most recently placed: still in Ray's routing table

    body = {"model": victim_adapter, "messages": PROMPT, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=120) as stream:
        victim = stream.headers["x-loraplex-replica"]
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        [actor] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].endswith(victim)]
        ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
        events, dropped = [], False
        try:
            for line in lines:
                events += [line] if line.startswith("data: ") else []
        except httpx.HTTPError:
            dropped = True  # the connection ended early: as clear an end as an error event
    # The stream ends early with an error event (or the connection ends), never [DONE].
    assert len(events) < body["max_tokens"] and events[-1:] != ["data: [DONE]"]
    errors = [json.loads(e[6:])["error"] for e in events if '"error"' in e]
    assert dropped or [e["code"] for e in errors] == ["replica_unavailable"]

    # The other replica serves on meanwhile; Ray starts a new replica, which serves the
    # killed one's adapters again with the same tokens.
    for model in ADAPTERS:
        text, replica = _eventually(client, model)
        assert text == expected[model]
    assert replica != victim


def _eventually(client: openai.OpenAI, model: str, deadline_s: float = 180) -> tuple[str, str]:
    """A request retried until served (a killed replica's adapters wait for its restart)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return _chat(client, model, False)
        except openai.APIError:
            assert time.monotonic() < end, f"{model} is not served again"
            time.sleep(2)


# The long form (scripts/long_tests.sh): redeploying both replicas takes over a minute here.
@pytest.mark.long
def test_ray_without_affinity_every_replica_loads_every_adapter(cluster):
    """The control: the same application with affinity off (Ray replaces the replicas too)
    spreads each adapter over both replicas."""
    url, config = cluster
    before = _requests_by_replica(url)
    serve.run(build_application(config, RayOptions(num_replicas=2, affinity=False)),
              name=APP_NAME, route_prefix="/")
    client = _client(url)
    for _ in range(3):
        for model in ADAPTERS:
            _chat(client, model, False)
    after = _requests_by_replica(url)
    while after != (after := _stable(url)):
        pass
    grew = {key for key, n in after.items() if n > before.get(key, 0)}
    assert len({replica for replica, _ in grew}) == 2
    # With affinity each adapter went to one replica; now most go to both.
    assert len(grew) > len(ADAPTERS) + 2, sorted(grew)


def _stable(url: str) -> dict[tuple[str, str], float]:
    time.sleep(2.5)  # the replicas push their metrics every 2 s
    return _requests_by_replica(url)


def _requests_by_replica(url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.labels["replica"], s.labels["adapter"]): s.value
            for family in text_string_to_metric_families(_metrics(url))
            if family.name == "loraplex_adapter_requests"
            for s in family.samples if s.name.endswith("_total") and s.labels["adapter"]
            in ADAPTERS}
