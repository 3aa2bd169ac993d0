"""Admin API, tenants and the route table, on the real server with the embedded model."""

from __future__ import annotations

import io
import json
import re

import httpx
import pytest
import torch
from conftest import running_server
from loraplex.server.app import build_app
from loraplex.server.auth import route_class
from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from loraplex.server.serve import build_state
from safetensors.torch import load_file, save

ADMIN, SHARED = "sk-admin-0000", "sk-shared-000"
ACME, GLOBEX, SLOW = "sk-acme-00001", "sk-globex-0001", "sk-slow-00001"


@pytest.fixture(scope="module")
def setup(embedded_dir, embedded_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {
        "acme": {"keys": [ACME], "adapters": ["acme/*"]},
        "globex": {"keys": [GLOBEX], "adapters": ["globex/*"]},
        "slow": {"keys": [SLOW], "adapters": ["slow/*"], "requests_per_minute": 2},
    }}))
    config = ServerConfig(
        engine=EngineConfig(model=ModelConfig(model=str(embedded_dir), quantization="none"),
                            cache=CacheConfig(num_blocks=512)),
        served_model_name="smol", api_key=SHARED, admin_key=ADMIN, tenant_keys=str(tenants),
        adapter_store=str(tmp / "store"), allowed_lora_dirs=(str(embedded_adapters["sql"].parent),),
        max_adapter_mb=2.0,
        lora_modules=(("acme/sql", str(embedded_adapters["sql"])),
                      ("globex/poet", str(embedded_adapters["poet"]))))
    state = build_state(config)
    app = build_app(state)
    with running_server(app) as url:
        yield url, app, state
    state.engine.shutdown()


def call(url, method, path, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=60, **kw)


def files_of(adapter_dir, name, weights: bytes | None = None, config: bytes | None = None):
    return {"name": (None, name),
            "config": ("adapter_config.json",
                       config or (adapter_dir / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors",
                        weights if weights is not None
                        else (adapter_dir / "adapter_model.safetensors").read_bytes())}


def completion(url, key, model):
    return call(url, "POST", "/v1/completions", key,
                json={"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0})


# ---- the route table ------------------------------------------------------------------------

def test_no_route_lets_a_caller_through_where_it_should_not(setup):
    url, app, _ = setup
    leaks = []
    for route in app.routes:
        for method in sorted(route.methods - {"HEAD"}):
            path = re.sub(r"\{name(:path)?\}", "globex/poet", route.path)
            kind = route_class(path)
            body = {"model": "globex/poet", "prompt": "x", "max_tokens": 1,
                    "messages": [{"role": "user", "content": "x"}],
                    "lora_name": "globex/poet", "lora_path": "/nonexistent"}
            for who, key in (("none", None), ("wrong", "sk-wrong-000000"),
                             ("other-tenant", ACME), ("tenant", GLOBEX), ("shared", SHARED)):
                r = call(url, method, path, key, json=body if method == "POST" else None)
                allowed = {"open": True, "admin": False, "metrics": True,
                           "inference": who in ("tenant", "shared", "other-tenant")}[kind]
                passed = r.status_code not in (401, 403)
                if passed and not allowed:
                    leaks.append((method, path, who, r.status_code))
                if kind == "metrics" and ("globex" in r.text or "acme" in r.text):
                    leaks.append((method, path, who, "names an adapter or tenant"))
                if kind == "inference" and who == "other-tenant" and path != "/v1/models":
                    if r.status_code != 404:
                        leaks.append((method, path, who, r.status_code))
    assert leaks == []


def test_tenants_see_only_their_adapters(setup):
    url, _, _ = setup
    ids = {m["id"] for m in call(url, "GET", "/v1/models", ACME).json()["data"]}
    assert ids == {"smol", "acme/sql"}
    assert completion(url, ACME, "acme/sql").status_code == 200
    assert completion(url, ACME, "smol").status_code == 200
    hidden = completion(url, ACME, "globex/poet")
    missing = completion(url, ACME, "acme/nope")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    everything = {m["id"] for m in call(url, "GET", "/v1/models", SHARED).json()["data"]}
    assert {"acme/sql", "globex/poet"} <= everything


def test_tenant_rate_limit_answers_429_with_retry_after(setup):
    url, _, _ = setup
    codes = [completion(url, SLOW, "smol") for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[2].headers["Retry-After"]) >= 1
    assert codes[2].json()["error"]["type"] == "rate_limit_error"
    assert completion(url, ACME, "smol").status_code == 200  # other tenants unaffected


# ---- uploads -------------------------------------------------------------------------------

def test_upload_serves_right_away_then_delete(setup, embedded_adapters):
    url, _, state = setup
    r = call(url, "POST", "/v1/adapters", ADMIN, files=files_of(embedded_adapters["poet"],
                                                                  "acme/poet"))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["rank"] == 4 and info["targets"] == ["down_proj", "o_proj"]
    assert len(info["sha256"]) == 64 and info["size"] > 0 and info["source"] == "upload"
    assert completion(url, ACME, "acme/poet").status_code == 200
    got = call(url, "GET", "/v1/adapters/acme/poet", ADMIN).json()
    assert got["residency"] == "device" and got["sha256"] == info["sha256"]
    assert any(a["id"] == "acme/poet" for a in call(url, "GET", "/v1/adapters", ADMIN).json()["data"])
    assert call(url, "POST", "/v1/adapters/acme/poet/pin", ADMIN).json()["pinned"] is True
    assert call(url, "POST", "/v1/adapters/acme/poet/unpin", ADMIN).json()["pinned"] is False
    assert call(url, "DELETE", "/v1/adapters/acme/poet", ADMIN).status_code == 200
    assert completion(url, ACME, "acme/poet").status_code == 404
    assert state.store.get("acme/poet") is None
    assert call(url, "DELETE", "/v1/adapters/acme/poet", ADMIN).status_code == 404


def _tensors(adapter_dir):
    return load_file(adapter_dir / "adapter_model.safetensors")


def _bytes(tensors):
    return save(tensors)


def _bad_uploads(adapters):
    sql = adapters["sql"]
    good = (sql / "adapter_model.safetensors").read_bytes()
    nan = _tensors(sql)
    first = sorted(nan)[0]
    nan[first][0, 0] = float("nan")
    narrow = {k: v[:, :-8].contiguous() if "lora_A" in k else v for k, v in _tensors(sql).items()}
    pickled = io.BytesIO()
    torch.save(_tensors(sql), pickled)
    header_len = int.from_bytes(good[:8], "little")
    lying = bytearray(good)
    lying[8:8 + header_len] = good[8:8 + header_len].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
    config = json.loads((sql / "adapter_config.json").read_text())
    return {
        "pickle": (dict(weights=pickled.getvalue()), "pickle"),
        "truncated": (dict(weights=good[: len(good) // 2]), "truncated"),
        "lying header": (dict(weights=bytes(lying)), "offsets"),
        "wrong shapes": (dict(weights=_bytes(narrow)), "do not match"),
        "nan": (dict(weights=_bytes(nan)), "NaN"),
        "dora": (dict(config=json.dumps(dict(config, use_dora=True)).encode()), "use_dora"),
        "rank too high": (dict(config=json.dumps(dict(config, r=512)).encode()), "max_lora_rank"),
        "bad json": (dict(config=b"{nope"), "JSON"),
        "oversize": (dict(weights=good + b"\0" * (3 << 20)), "exceeds"),
    }


@pytest.mark.parametrize("case", ["pickle", "truncated", "lying header", "wrong shapes", "nan",
                                  "dora", "rank too high", "bad json", "oversize"])
def test_bad_upload_is_refused_and_nothing_changes(setup, embedded_adapters, case):
    url, _, state = setup
    before = ([s.name for s in state.store.list()], sorted(state.engine.engine.adapters))
    kwargs, needle = _bad_uploads(embedded_adapters)[case]
    r = call(url, "POST", "/v1/adapters", ADMIN,
             files=files_of(embedded_adapters["sql"], "acme/bad", **kwargs))
    assert 400 <= r.status_code < 500 and r.status_code != 404, (case, r.status_code, r.text)
    assert needle.lower() in r.json()["error"]["message"].lower(), (case, r.json())
    after = ([s.name for s in state.store.list()], sorted(state.engine.engine.adapters))
    assert after == before
    assert not list(state.store.staging_root.iterdir())  # nothing half-written left
    assert {p.name for p in state.store.objects.iterdir()} == {
        s.sha256 for s in state.store.list()}  # no orphan objects
    assert completion(url, ACME, "acme/sql").status_code == 200  # everyone else still served


@pytest.mark.parametrize("name", ["../etc", "UPPER", "a" * 65, "x/y/z", "smol", "",
                                  "mix-0123456789abcdef", "acme/mix-0123456789abcdef"])
def test_bad_names_are_refused(setup, embedded_adapters, name):
    url, _, _ = setup
    r = call(url, "POST", "/v1/adapters", ADMIN, files=files_of(embedded_adapters["sql"], name))
    assert r.status_code == 400 and "name" in r.json()["error"]["message"]


def test_vllm_load_and_unload(setup, embedded_adapters, tmp_path):
    url, _, _ = setup
    r = call(url, "POST", "/v1/load_lora_adapter", ADMIN,
             json={"lora_name": "acme/again", "lora_path": str(embedded_adapters["poet"])})
    assert r.status_code == 200, r.text
    assert completion(url, ACME, "acme/again").status_code == 200
    outside = call(url, "POST", "/v1/load_lora_adapter", ADMIN,
                   json={"lora_name": "acme/x", "lora_path": str(tmp_path)})
    assert outside.status_code == 403
    r = call(url, "POST", "/v1/unload_lora_adapter", ADMIN, json={"lora_name": "acme/again"})
    assert r.status_code == 200 and completion(url, ACME, "acme/again").status_code == 404


# ---- merge ---------------------------------------------------------------------------------

def _merge_state(url, want, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = call(url, "GET", "/v1/merge", ADMIN).json()
        if status["state"] == want:
            return status
        time.sleep(0.05)
    raise AssertionError(f"merge state never became {want}: {status}")


def test_merge_and_unmerge_over_http_serve_the_same_tokens(setup):
    url, _, _ = setup
    body = {"model": "acme/sql", "prompt": "Hello, my name is", "max_tokens": 8,
            "temperature": 0}
    unmerged = call(url, "POST", "/v1/completions", ACME, json=body).json()["choices"][0]
    base = call(url, "POST", "/v1/completions", SHARED,
                json={**body, "model": "smol"}).json()["choices"][0]
    assert unmerged["text"] != base["text"]  # the adapter changes the answer
    assert call(url, "POST", "/v1/adapters/nope/merge", ADMIN).status_code == 404
    assert call(url, "POST", "/v1/adapters/acme/sql/merge", ACME).status_code == 403
    r = call(url, "POST", "/v1/adapters/acme/sql/merge", ADMIN)
    assert r.status_code in (200, 202) and r.json()["requested"] == "acme/sql"
    status = _merge_state(url, "merged")
    assert status["adapter"] == "acme/sql" and status["modules_merged"] == status["modules"]
    assert status["kept_aside_bytes"] > 0
    merged = call(url, "POST", "/v1/completions", ACME, json=body).json()["choices"][0]
    assert merged["text"] == unmerged["text"]
    metrics = call(url, "GET", "/metrics", ADMIN).text
    assert 'loraplex_merged_adapter_info{adapter="acme/sql"} 1.0' in metrics
    # The base model needs the base weights: the engine unmerges, serves it, merges again.
    again = call(url, "POST", "/v1/completions", SHARED,
                 json={**body, "model": "smol"}).json()["choices"][0]
    assert again["text"] == base["text"]
    r = call(url, "POST", "/v1/unmerge", ADMIN)
    assert r.status_code in (200, 202) and r.json()["requested"] is None
    status = _merge_state(url, "unmerged")
    assert status["switches"]["unmerge"] >= 1
    metrics = call(url, "GET", "/metrics", ADMIN).text
    assert "loraplex_merged_adapter_info{" not in metrics
    assert re.search(r'loraplex_merge_switches_total\{direction="merge"\} [1-9]', metrics)


def test_compose_builds_stores_and_serves_a_new_adapter(setup):
    url, _, state = setup
    path = "/v1/adapters/acme/mix/compose"
    body = {"sources": [{"name": "acme/sql", "weight": 0.6}, {"name": "globex/poet",
                                                               "weight": 0.4}],
            "method": "cat"}
    assert call(url, "POST", path, ACME, json=body).status_code == 403
    bad = [({**body, "method": "average"}, 400, "method"),
           ({**body, "sources": [{"name": "nope"}]}, 404, "sources"),
           ({**body, "method": "ties"}, 400, "density"),
           ({**body, "method": "linear"}, 400, None),  # PEFT: ranks differ
           ({**body, "method": "slerp", "t": 2}, 400, "t"),
           ({**body, "sources": [{"name": "acme/sql", "weight": "x"}]}, 400, "sources"),
           ({**body, "sources": [{"name": "acme/sql", "weight": 10**400}]}, 400, "sources"),
           ({**body, "sources": [{"name": "acme/sql", "weight": 1e39}]}, 400, "sources")]
    for case, status, param in bad:
        r = call(url, "POST", path, ADMIN, json=case)
        assert r.status_code == status, (case, r.text)
        assert r.json()["error"]["param"] == param or param is None
        assert state.store.get("acme/mix") is None  # nothing stored
    r = call(url, "POST", path, ADMIN, json=body)  # cat: ranks add up past --max-adapter-mb
    assert r.status_code == 400 and "exceed" in r.json()["error"]["message"]
    assert state.store.get("acme/mix") is None
    r = call(url, "POST", path, ADMIN, json={**body, "method": "svd", "rank": 2})
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "compose" and r.json()["rank"] == 2
    assert completion(url, ACME, "acme/mix").status_code == 200
    r = call(url, "POST", path, ADMIN, json={**body, "method": "slerp", "t": 0.25, "rank": 3})
    assert r.status_code == 201 and r.json()["rank"] == 3  # a replacement, as an upload
    assert completion(url, ACME, "acme/mix").status_code == 200
    assert call(url, "DELETE", "/v1/adapters/acme/mix", ADMIN).status_code == 200


def _mixes(url) -> list[str]:
    listed = call(url, "GET", "/v1/adapters", ADMIN).json()["data"]
    return sorted(a["id"] for a in listed if a["source"] == "mix")


def test_per_request_mixtures_are_built_once_and_serve_like_the_composed_adapter(setup):
    """`adapters` in a completions body: the same adapter as the compose route builds from
    the same arguments (which test_compose holds to PEFT's add_weighted_adapter), built at
    the first request only, then served by name too."""
    url, _, state = setup
    sources = [{"name": "acme/sql", "weight": 0.6}, {"name": "globex/poet", "weight": 0.4}]
    spec = {"method": "svd", "rank": 2}
    r = call(url, "POST", "/v1/adapters/ref-mix/compose", ADMIN, json={"sources": sources, **spec})
    assert r.status_code == 201, r.text
    ref_sha = r.json()["sha256"]

    def complete(key, **kw):
        return call(url, "POST", "/v1/completions", key, json={
            "prompt": "Write a query that", "max_tokens": 8, "temperature": 0, **kw})

    base = complete(SHARED, model="smol").json()["choices"][0]["text"]
    ref = complete(SHARED, model="ref-mix").json()["choices"][0]["text"]
    assert ref != base  # the mixture changes the output
    before = _mixes(url)
    r = complete(SHARED, model="smol", adapters=sources, **spec)
    assert r.status_code == 200, r.text
    name = r.json()["model"]
    assert re.fullmatch(r"mix-[0-9a-f]{16}", name) and r.json()["choices"][0]["text"] == ref
    info = call(url, "GET", f"/v1/adapters/{name}", ADMIN).json()
    assert info["source"] == "mix" and info["sha256"] == ref_sha
    assert _mixes(url) == sorted([*before, name])
    # Asked again (chat, model omitted): the same adapter, not built again; and by its name.
    r = call(url, "POST", "/v1/chat/completions", SHARED, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "adapters": sources,
        **spec})
    assert r.status_code == 200 and r.json()["model"] == name, r.text
    assert call(url, "GET", f"/v1/adapters/{name}", ADMIN).json()["created"] == info["created"]
    assert complete(SHARED, model=name).json()["choices"][0]["text"] == ref
    assert _mixes(url) == sorted([*before, name])

    # Refused with nothing built: other tenants' sources, bad arguments, reserved names.
    bad = [(ACME, {"adapters": sources}, 404, "adapters"),
           (SHARED, {"adapters": [{"name": "nope"}]}, 404, "adapters"),
           (SHARED, {"adapters": sources, "model": "acme/sql"}, 400, "model"),
           (SHARED, {"adapters": "acme/sql"}, 400, "adapters"),
           (SHARED, {"adapters": [{"name": "acme/sql", "weight": "x"}]}, 400, "adapters"),
           (SHARED, {"adapters": sources, "method": "average"}, 400, "method"),
           (SHARED, {"adapters": sources, "method": "ties"}, 400, "density"),
           (SHARED, {"density": 0.5}, 400, "density"),
           (SHARED, {"adapters": sources, "method": "cat"}, 400, None)]  # past --max-adapter-mb
    for key, case, status, param in bad:
        r = complete(key, **case)
        assert r.status_code == status, (case, r.text)
        assert r.json()["error"]["param"] == param or param is None, (case, r.text)
    assert _mixes(url) == sorted([*before, name])
    r = call(url, "POST", "/v1/adapters/mix-0123456789abcdef/compose", ADMIN,
             json={"sources": sources, **spec})
    assert r.status_code == 400 and "mixtures" in r.json()["error"]["message"]

    # A tenant's own mixture is named under the tenant: its key may call it by name, others not.
    r = complete(ACME, adapters=[{"name": "acme/sql", "weight": 0.5}])
    assert r.status_code == 200, r.text
    own = r.json()["model"]
    assert re.fullmatch(r"acme/mix-[0-9a-f]{16}", own)
    assert complete(ACME, model=own).status_code == 200
    assert complete(GLOBEX, model=own).status_code == 404

    # Past --max-mixes a tenant's least recently used mixture goes, never another tenant's;
    # 0 turns mixtures off.
    assert _mixes(url) == sorted([name, own])
    state.max_mixes = 1
    try:
        complete(SHARED, model=name)  # `own` is now the least recently used overall
        r = complete(SHARED, adapters=sources, method="svd", rank=1)
        assert r.status_code == 200, r.text
        assert _mixes(url) == sorted([own, r.json()["model"]])  # the shared keys' went
        state.max_mixes = 0
        r = complete(SHARED, adapters=sources, **spec)
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapters"
    finally:
        state.max_mixes = 32
    for n in [*_mixes(url), "ref-mix"]:
        assert call(url, "DELETE", f"/v1/adapters/{n}", ADMIN).status_code == 200
