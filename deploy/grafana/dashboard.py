"""The loraplex Grafana dashboard, as code (grafana-foundation-sdk, Grafana 11 models).

    python deploy/grafana/dashboard.py > deploy/grafana/dashboards/loraplex.json

The JSON is committed, and Grafana loads it through provisioning/. tests/test_deploy_static.py
checks that the committed file is this script's output and a valid dashboard model, and
tests/test_deploy_prometheus.py runs every query below against a live server's scrape.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query filters on these; `All` is ".*", which also matches an empty tenant (a server
# run without --tenant-keys).
SEL = 'instance=~"$instance"'
ADAPTER_SEL = 'instance=~"$instance", tenant=~"$tenant", adapter=~"$adapter"'
RATE = "$__rate_interval"


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def series(title: str, unit: str, description: str, *targets: tuple[str, str],
           width: int = 8, stacked: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).span(width).height(8).fill_opacity(10))
    if stacked:
        from grafana_foundation_sdk.builders.common import StackingConfig
        from grafana_foundation_sdk.models.common import StackingMode

        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    for expr, legend in targets:
        panel = panel.with_target(query(expr, legend))
    return panel


def single(title: str, unit: str, description: str, expr: str, width: int = 6) -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
            .span(width).height(4).with_target(query(expr, title)))


def quantiles(metric: str, selector: str = SEL) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
             f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]


def variable(name: str, label: str, source: str) -> db.QueryVariable:
    return (db.QueryVariable(name).label(label).datasource(DATASOURCE)
            .query(f"label_values({source}, {name})").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all")))


def build() -> db.Dashboard:
    d = (db.Dashboard("loraplex").uid("loraplex").tags(["loraplex", "llm", "lora"])
         .description("Multi-LoRA serving: traffic and latency per adapter and tenant, queue, "
                      "KV cache, adapter residency and loads, merges, errors.")
         .refresh("30s").time("now-1h", "now").timezone("browser").editable()
         .tooltip(DashboardCursorSync.CROSSHAIR)
         .with_variable(db.DatasourceVariable("datasource").label("Data source")
                        .type("prometheus"))
         .with_variable(variable("instance", "Replica", "vllm:num_requests_running"))
         .with_variable(variable("tenant", "Tenant", "loraplex_adapter_requests_total"))
         .with_variable(variable("adapter", "Adapter",
                                 'loraplex_adapter_requests_total{tenant=~"$tenant"}')))

    d = d.with_row(db.Row("Overview"))
    d = d.with_panel(single(
        "Requests / s", "reqps", "Requests finished per second, all adapters.",
        f"sum(rate(loraplex_adapter_requests_total{{{ADAPTER_SEL}}}[{RATE}]))"))
    d = d.with_panel(single(
        "Generated tokens / s", "short", "Output tokens per second, all replicas selected.",
        f"sum(rate(vllm:generation_tokens_total{{{SEL}}}[{RATE}]))"))
    d = d.with_panel(single(
        "Slot hit rate", "percentunit",
        "Admissions whose adapter was already in a device slot. Low: --max-loras is too small "
        "for the working set of adapters.",
        f"sum(rate(loraplex_adapter_cache_hits_total{{{SEL}}}[{RATE}])) / "
        f"(sum(rate(loraplex_adapter_cache_hits_total{{{SEL}}}[{RATE}])) + "
        f"sum(rate(loraplex_adapter_cache_misses_total{{{SEL}}}[{RATE}])))"))
    d = d.with_panel(single(
        "TTFT SLO errors (1h)", "percentunit",
        "Share of requests over the 2.5 s time-to-first-token SLO in the last hour (the "
        "recording rule of deploy/prometheus/alerts.yml; alerts burn on it).",
        "max(loraplex:ttft_slo_errors:ratio_rate1h)"))

    d = d.with_row(db.Row("Traffic per adapter"))
    d = d.with_panel(series(
        "Request rate by adapter", "reqps", "Finished requests per second, by adapter.",
        (f"sum by (adapter) (rate(loraplex_adapter_requests_total{{{ADAPTER_SEL}}}[{RATE}]))",
         "{{adapter}}"), stacked=True))
    d = d.with_panel(series(
        "Tokens by adapter", "short", "Prompt and generated tokens per second, by adapter.",
        (f"sum by (adapter, kind) (rate(loraplex_adapter_tokens_total{{{ADAPTER_SEL}}}[{RATE}]))",
         "{{adapter}} {{kind}}")))
    d = d.with_panel(series(
        "Request rate by tenant", "reqps", "Finished requests per second, by tenant key.",
        (f"sum by (tenant) (rate(loraplex_adapter_requests_total{{{ADAPTER_SEL}}}[{RATE}]))",
         "{{tenant}}"), stacked=True))

    d = d.with_row(db.Row("Latency"))
    d = d.with_panel(series("Time to first token", "s", "Quantiles over the selected replicas.",
                            *quantiles("vllm:time_to_first_token_seconds")))
    d = d.with_panel(series("Inter-token latency", "s", "Time between two output tokens.",
                            *quantiles("vllm:inter_token_latency_seconds")))
    d = d.with_panel(series("End-to-end latency", "s", "Arrival to last token.",
                            *quantiles("vllm:e2e_request_latency_seconds")))

    d = d.with_row(db.Row("Engine"))
    d = d.with_panel(series(
        "Queue", "short", "Requests in the running batch and waiting to be admitted (the HPA "
        "scales on waiting).",
        (f"sum(vllm:num_requests_running{{{SEL}}})", "running"),
        (f"sum(vllm:num_requests_waiting{{{SEL}}})", "waiting")))
    d = d.with_panel(series(
        "KV cache usage", "percentunit", "Share of KV blocks in use, per replica.",
        (f"max by (instance) (vllm:kv_cache_usage_perc{{{SEL}}})", "{{instance}}")))
    d = d.with_panel(series(
        "Queue time", "s", "Arrival to admission into the running batch.",
        *quantiles("vllm:request_queue_time_seconds")))

    d = d.with_row(db.Row("Adapters"))
    d = d.with_panel(series(
        "Adapters resident", "short", "Adapters in device slots and in the host cache.",
        (f"sum by (tier) (loraplex_adapter_residency{{{SEL}, adapter=~\"$adapter\"}})",
         "{{tier}}")))
    d = d.with_panel(series(
        "Adapter load latency", "s", "p50/p99 of reads from disk into host memory, and of "
        "copies into a device slot.",
        (f"histogram_quantile(0.5, sum by (le) (rate(loraplex_adapter_read_seconds_bucket{{{SEL}}}[{RATE}])))",
         "read p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(loraplex_adapter_read_seconds_bucket{{{SEL}}}[{RATE}])))",
         "read p99"),
        (f"histogram_quantile(0.5, sum by (le) (rate(loraplex_adapter_load_seconds_bucket{{{SEL}}}[{RATE}])))",
         "slot p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(loraplex_adapter_load_seconds_bucket{{{SEL}}}[{RATE}])))",
         "slot p99")))
    d = d.with_panel(series(
        "Adapter loads and failures", "short", "Slot misses (loads) and failed reads per "
        "second.",
        (f"sum(rate(loraplex_adapter_cache_misses_total{{{SEL}}}[{RATE}]))", "loads"),
        (f"sum(rate(loraplex_adapter_load_failures_total{{{SEL}}}[{RATE}]))", "failures")))
    d = d.with_panel(series(
        "Merges", "short", "Merges and unmerges of an adapter into the base per second, and the "
        "adapter merged now (1).",
        (f"sum by (direction) (rate(loraplex_merge_switches_total{{{SEL}}}[{RATE}]))",
         "{{direction}}"),
        (f"max by (adapter) (loraplex_merged_adapter_info{{{SEL}}})", "merged: {{adapter}}")))

    d = d.with_row(db.Row("Errors and resources"))
    d = d.with_panel(series(
        "Responses by status", "reqps", "HTTP responses per second by status code, /health "
        "probes included.",
        (f"sum by (status) (rate(http_requests_total{{{SEL}}}[{RATE}]))", "{{status}}"),
        stacked=True))
    d = d.with_panel(series(
        "Errors by route", "reqps", "4xx and 5xx responses per second by route and status.",
        (f"sum by (handler, status) (rate(http_requests_total{{{SEL}, status=~\"[45]..\"}}[{RATE}]))",
         "{{status}} {{handler}}")))
    d = d.with_panel(series(
        "Resident memory", "bytes", "Process resident memory per replica (the memory-growth "
        "alert watches it).",
        (f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")))
    return d


def render() -> str:
    model = build().build()
    for i, panel in enumerate(model.panels, 1):  # Grafana wants ids unique in a dashboard
        panel.id_val = i
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
