"""Prometheus metrics under vLLM's names and types (label `model_name`), so vLLM's Grafana
dashboards and the Gateway API Inference Extension's endpoint picker read loraplex unchanged;
plus per-adapter and per-tenant series of our own, `loraplex_*`, with capped label values."""

from __future__ import annotations

import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from .engine.stats import StepStats

# vLLM's bucket edges, so dashboards built for vLLM show the same quantiles.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LabelCap:
    """At most `limit` distinct values of a label; later newcomers are reported as "other".
    The first values seen keep their series, so a series never changes meaning."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or ""
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return "other"


class Metrics:
    def __init__(self, model_name: str, max_label_values: int = 50):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.adapter_label = LabelCap(max_label_values)
        self.tenant_label = LabelCap(max_label_values)
        r, m = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", m,
                             registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.", m,
                             registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 means 100%).", m,
                              registry=r)
        # vLLM's info series: the endpoint picker reads the KV geometry from its labels.
        self.cache_info = Gauge("vllm:cache_config_info", "KV cache geometry (value 1).",
                                ["block_size", "num_gpu_blocks"], registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting LoRA adapters.",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                               registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", m,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", m,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Finished requests.",
                               m + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting for admission.",
                               m, buckets=LATENCY_BUCKETS, registry=r)
        a = ["adapter", "tenant"]
        self.adapter_requests = Counter("loraplex_adapter_requests", "Requests per adapter.", a,
                                        registry=r)
        self.adapter_tokens = Counter("loraplex_adapter_tokens", "Tokens per adapter.",
                                      a + ["kind"], registry=r)
        self.residency = Gauge("loraplex_adapter_residency",
                               "1 where an adapter is resident in a tier.", ["adapter", "tier"],
                               registry=r)
        self.load_seconds = Histogram("loraplex_adapter_load_seconds",
                                      "Time to copy an adapter into a device slot.",
                                      buckets=LOAD_BUCKETS, registry=r)
        self.read_seconds = Histogram("loraplex_adapter_read_seconds",
                                      "Time to read and check an adapter from disk into host "
                                      "memory.", buckets=LOAD_BUCKETS, registry=r)
        self.load_failures = Counter("loraplex_adapter_load_failures",
                                     "Adapter reads that failed; their requests got an error.",
                                     registry=r)
        self.cache_hits = Counter("loraplex_adapter_cache_hits",
                                  "Admissions whose adapter was already in a slot.", registry=r)
        self.cache_misses = Counter("loraplex_adapter_cache_misses",
                                    "Admissions that had to load their adapter.", registry=r)
        self.merge_switches = Counter("loraplex_merge_switches",
                                      "Finished merges and unmerges of an adapter into the base.",
                                      ["direction"], registry=r)
        for direction in ("merge", "unmerge"):
            self.merge_switches.labels(direction)
        self.merged_info = Gauge("loraplex_merged_adapter_info",
                                 "1 for the adapter merged into the base weights, if any.",
                                 ["adapter"], registry=r)
        # As vLLM's HTTP instrumentation names it; `handler` is the route template, never
        # the raw path, so unknown paths cannot grow the label set.
        self.http_requests = Counter("http_requests", "HTTP responses by route and status.",
                                     ["handler", "method", "status"], registry=r)
        # process_resident_memory_bytes and friends, for the memory-growth alert.
        ProcessCollector(registry=r)
        self._lora_info_labels: tuple[str, str, str] | None = None
        self._merged_label: str | None = None

    def describe_cache(self, block_size: int, num_blocks: int) -> None:
        self.cache_info.labels(str(block_size), str(num_blocks)).set(1)

    def record(self, stats: StepStats) -> None:
        """StatLogger: called by the engine thread after every step that did work."""
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.kv_cache_usage)
        labels = (str(stats.max_loras), ",".join(stats.running_adapters),
                  ",".join(stats.waiting_adapters))
        if labels != self._lora_info_labels:
            # One live series, as vLLM keeps: the old combination is removed.
            if self._lora_info_labels is not None:
                self.lora_info.remove(*self._lora_info_labels)
            self._lora_info_labels = labels
        self.lora_info.labels(*labels).set(time.time())
        self.prompt_tokens.labels(name).inc(stats.prompt_tokens)
        self.generation_tokens.labels(name).inc(stats.generation_tokens)
        for seconds in stats.ttft_seconds:
            self.ttft.labels(name).observe(seconds)
        for seconds in stats.inter_token_seconds:
            self.itl.labels(name).observe(seconds)
        for f in stats.finished:
            self.success.labels(name, f.reason).inc()
            self.e2e.labels(name).observe(f.e2e_seconds)
            if f.queue_seconds is not None:
                self.queue.labels(name).observe(f.queue_seconds)
        for seconds in stats.adapter_load_seconds:
            self.load_seconds.observe(seconds)
        for seconds in stats.adapter_read_seconds:
            self.read_seconds.observe(seconds)
        self.load_failures.inc(stats.adapter_load_failures)
        self.cache_hits.inc(stats.adapter_hits)
        self.cache_misses.inc(stats.adapter_misses)
        for direction in stats.merge_switches:
            self.merge_switches.labels(direction).inc()
        merged = (self.adapter_label(stats.merged_adapter)
                  if stats.merged_adapter is not None else None)
        if merged != self._merged_label:
            if self._merged_label is not None:
                self.merged_info.remove(self._merged_label)
            if merged is not None:
                self.merged_info.labels(merged).set(1)
            self._merged_label = merged
        for adapter, tiers in stats.residency.items():
            for tier, present in tiers.items():
                self.residency.labels(self.adapter_label(adapter), tier).set(present)

    def observe_request(self, adapter: str | None, tenant: str | None, prompt_tokens: int,
                        generation_tokens: int) -> None:
        """A finished HTTP call: per adapter and tenant, labels capped."""
        labels = (self.adapter_label(adapter or self.model_name), self.tenant_label(tenant))
        self.adapter_requests.labels(*labels).inc()
        self.adapter_tokens.labels(*labels, "prompt").inc(prompt_tokens)
        self.adapter_tokens.labels(*labels, "generation").inc(generation_tokens)

    def render(self, names_visible: bool = True) -> bytes:
        """The exposition; without `names_visible`, no adapter or tenant name appears."""
        return generate_latest(self.registry if names_visible else _Anonymous(self.registry))


class _Anonymous:
    """A registry view without names: series labelled by adapter or tenant are left out and
    `vllm:lora_requests_info` keeps its series (the picker reads `max_lora`) with empty adapter
    lists. Counts, latencies and KV usage, which the endpoint picker balances on, stay."""

    NAMED = {"adapter", "tenant"}
    LISTS = ("running_lora_adapters", "waiting_lora_adapters")

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            samples = [s for s in family.samples if not self.NAMED & s.labels.keys()]
            if family.name == "vllm:lora_requests_info":
                samples = [s._replace(labels=dict(s.labels, **dict.fromkeys(self.LISTS, "")))
                           for s in samples]
            if samples:
                family.samples = samples
                yield family
