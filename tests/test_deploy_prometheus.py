"""The monitoring in deploy/ against a real Prometheus scraping a real `loraplex serve`.

Prometheus runs deploy/prometheus/prometheus.yml with only the target, the intervals and the
rule file's path swapped for the test's, and the server runs with a metrics key, tenant keys and
two adapters. After traffic through both adapters, the base model, a wrong key, a missing model
and a merge, every PromQL expression of the alert rules and the dashboard runs through
Prometheus' HTTP API: each must parse, each metric name it reads must have data, and every
dashboard panel and recording rule must return data. A query naming a series we do not export
fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from conftest import free_port
from deploy_queries import (
    DEPLOY,
    RULES,
    dashboard_expressions,
    metric_names,
    rule_expressions,
    substitute,
    variable_selectors,
)

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CI"),
    reason="Debian's prometheus package is not installed (scripts/install.sh installs it where "
           "apt-get runs as root; CI always has it)")

ADMIN, METRICS = "admin-key", "metrics-key"
TENANTS = {"acme": ("sk-acme-0123", "sql"), "zeta": ("sk-zeta-0123", "poet")}


def _wait(what, check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except (httpx.TransportError, KeyError, IndexError, ValueError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, embedded_dir, embedded_adapters):
    """A loraplex server and a Prometheus scraping it every second; yields both URLs."""
    tmp = tmp_path_factory.mktemp("monitoring")
    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {
        name: {"keys": [key], "adapters": [adapter]} for name, (key, adapter) in TENANTS.items()}}))
    port = free_port()
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "loraplex.server.cli", "serve", str(embedded_dir),
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smol",
         "--admin-key", ADMIN, "--metrics-key", METRICS, "--tenant-keys", str(tenants),
         "--adapter-store", str(tmp / "store"), "--num-kv-blocks", "256",
         "--lora-modules", *(f"{n}={p}" for n, p in embedded_adapters.items())],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    # The committed config, with the test's target and intervals; its key file is read
    # relative to the config, as in compose.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp / "secrets").mkdir()
    (tmp / "secrets" / "metrics_key").write_text(METRICS)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_port = free_port()
    with open(tmp / "prometheus.log", "w") as prom_log:  # the child keeps its own handle
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=prom_log, stderr=subprocess.STDOUT)
    url, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    try:
        def healthy():
            assert server.poll() is None, (tmp / "server.log").read_text()[-4000:]
            return httpx.get(f"{url}/health").status_code == 200

        _wait("the server", healthy, 180)
        _wait("prometheus", lambda: httpx.get(f"{prom}/-/ready").status_code == 200, 60)
        yield url, prom
    finally:
        for proc in (server, prometheus):
            proc.terminate()
        for proc in (server, prometheus):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        if server.returncode not in (0, -15):
            print((tmp / "server.log").read_text()[-4000:])


def _query(prom: str, expr: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {body}"
    return body["data"]["result"]


@pytest.fixture(scope="module")
def scraped(stack):
    """Traffic of every kind the dashboard shows, then enough scrapes to rate it."""
    import openai

    url, prom = stack
    for key, adapter in TENANTS.values():
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        for model in (adapter, adapter, "smol"):
            client.completions.create(model=model, prompt="Hello there", max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=1)
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}
                     ).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{url}/v1/adapters/sql/merge", headers=admin).status_code == 202
    _wait("the merge", lambda: httpx.get(f"{url}/v1/merge", headers=admin
                                         ).json()["state"] == "merged", 120)
    # Six requests through adapters, seen by Prometheus and rated over at least two scrapes.
    _wait("the scrape", lambda: _query(
        prom, "sum(loraplex_adapter_requests_total)")[0]["value"][1] == "6", 60)
    _wait("the merged gauge", lambda: _query(prom, "loraplex_merged_adapter_info"), 30)
    _wait("the recording rules", lambda: _query(prom, "loraplex:ttft_slo_errors:ratio_rate1h"),
          30)
    time.sleep(3)
    return prom


def test_the_endpoint_pickers_series_are_there(stack, scraped):
    """What the Gateway API Inference Extension's picker reads from a pod's /metrics for
    engine-type vllm (v1.5.0: pkg/epp/framework/plugins/datalayer/extractor/metrics/
    factories.go and extractor.go). It scrapes pods itself, so the raw exposition counts."""
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = stack
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    samples = {f.name: f.samples for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc"):
        assert samples[name], name
    (info,) = samples["vllm:lora_requests_info"]  # one live series, its value a timestamp
    assert {"running_lora_adapters", "waiting_lora_adapters", "max_lora"} <= info.labels.keys()
    assert int(info.labels["max_lora"]) > 0 and info.value > 1.7e9
    (cache,) = samples["vllm:cache_config_info"]
    assert int(cache.labels["block_size"]) > 0 and cache.labels["num_gpu_blocks"] == "256"


def test_prometheus_scrapes_the_server_with_the_metrics_key(scraped):
    up = _query(scraped, 'up{job="loraplex"}')
    assert [s["value"][1] for s in up] == ["1"]
    # The keyed view names adapters and tenants; the anonymous one would not.
    adapters = {s["metric"]["adapter"] for s in _query(scraped, "loraplex_adapter_requests_total")}
    assert {"sql", "poet"} <= adapters


@pytest.mark.parametrize("name", sorted(rule_expressions()))
def test_every_rule_parses_and_reads_exported_series(scraped, name):
    expr = rule_expressions()[name]
    _query(scraped, expr)  # parses and evaluates
    for metric in metric_names(expr):
        assert _query(scraped, f'count({{__name__="{metric}"}})'), \
            f"{name}: no series {metric} in the scrape"
    if not name[0].isupper():  # a recording rule: its own series has data too
        assert _query(scraped, expr), f"recording rule {name} returns nothing"


@pytest.mark.parametrize("title", sorted(dashboard_expressions()))
def test_every_dashboard_query_returns_data(scraped, title):
    expr = substitute(dashboard_expressions()[title])
    for metric in metric_names(expr):
        assert _query(scraped, f'count({{__name__="{metric}"}})'), \
            f"{title}: no series {metric} in the scrape"
    assert _query(scraped, expr), f"{title}: {expr} returns nothing"


def test_every_dashboard_variable_has_values(scraped):
    for name, (label, selector) in variable_selectors().items():
        r = httpx.get(f"{scraped}/api/v1/label/{label}/values",
                      params={"match[]": substitute(selector)}).json()
        assert r["status"] == "success" and r["data"], f"variable {name} has no values: {r}"
    tenants = httpx.get(f"{scraped}/api/v1/label/tenant/values").json()["data"]
    assert set(TENANTS) <= set(tenants)
