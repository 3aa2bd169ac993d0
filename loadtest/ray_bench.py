"""`loraplex bench ray`: one `loraplex serve` against `loraplex serve-ray` with adapter affinity
on and off, the same workload one after another in one run, then ratios and each replica's
adapter loads (from the replicas' own metrics, which the Ray ingress serves with a `replica`
label)."""

from __future__ import annotations

from pathlib import Path

from .client import Target
from .compare import BASE_NAME, CompareOptions, loraplex_server, run_http, say, warm_up
from .report import Run, summarize, write_report
from .workload import WorkloadSpec

ONE_REPLICA = "Ray Serve, 1 replica"


def replica_loads(metrics_text: str) -> dict[str, dict[str, int]]:
    """Replica -> distinct adapters it served and adapter loads into its slots."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            replica = s.labels.get("replica")
            if replica is None or not s.name.endswith("_total") or s.value <= 0:
                continue
            entry = out.setdefault(replica, {"adapters": set(), "slot_loads": 0})
            if family.name == "loraplex_adapter_requests" and s.labels["adapter"] != BASE_NAME:
                entry["adapters"].add(s.labels["adapter"])
            elif family.name == "loraplex_adapter_cache_misses":
                entry["slot_loads"] += int(s.value)
    return {r: {"adapters": len(v["adapters"]), "slot_loads": v["slot_loads"]}
            for r, v in sorted(out.items())}


def _measure(spec: WorkloadSpec, opts: CompareOptions, name: str, command: str,
             extra: list[str]) -> tuple[Run, dict]:
    import httpx

    args = ["--quantization", opts.quantization, *opts.server_args, *extra]
    with loraplex_server(opts.port, opts.adapters, opts.model, args, command=command) as url:
        target = Target(url, BASE_NAME)
        warm_up(spec, target)
        run = run_http(spec, target, name, opts.concurrency)
        loads = {}
        if command == "serve-ray":
            import time

            time.sleep(2.5)  # the replicas push their metrics every 2 s
            loads = replica_loads(httpx.get(f"{url}/metrics", timeout=30).text)
    return run, loads


def ray_bench(spec: WorkloadSpec, opts: CompareOptions, num_replicas: int, out_dir: str | Path,
              workload_desc: dict) -> tuple[Path, list[str]]:
    import os

    cores = len(os.sched_getaffinity(0))
    runs, loads = [], {}
    run, _ = _measure(spec, opts, "loraplex serve", "serve", [])
    runs.append(run)
    # One replica with the whole machine: the cost of the Ray path itself (proxy, ingress,
    # a hop between processes); then N replicas sharing the cores, with and without affinity.
    layouts = [(ONE_REPLICA, ["--num-replicas", "1", "--cpus-per-replica", str(cores)])]
    for affinity in (True, False):
        layouts.append((f"Ray Serve, {num_replicas} replicas, affinity "
                        f"{'on' if affinity else 'off'}",
                        ["--num-replicas", str(num_replicas),
                         # rounded down: N of them must fit the cluster's CPUs
                         "--cpus-per-replica", f"{int(cores / num_replicas * 1e4) / 1e4:g}",
                         "--affinity" if affinity else "--no-affinity"]))
    for name, extra in layouts:
        run, loads[name] = _measure(spec, opts, name, "serve-ray", extra)
        runs.append(run)
        say(f"{name}: {loads[name]}")
    path = write_report(out_dir, runs, "loraplex serve vs loraplex serve-ray", workload_desc,
                        opts.slo, baseline="loraplex serve")
    lines = ratio_lines(runs, loads, num_replicas)
    with path.open("a") as f:
        f.write("\n## Ray Serve\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    return path, lines


def ratio_lines(runs: list[Run], loads: dict[str, dict], num_replicas: int) -> list[str]:
    s = {run.name: summarize(run) for run in runs}
    one = s["loraplex serve"]["output_tok_per_s"]
    lines = []
    for name, figures in loads.items():
        tok = s[name]["output_tok_per_s"]
        per_replica = ", ".join(f"{v['adapters']} adapters / {v['slot_loads']} slot loads"
                                for v in figures.values())
        lines.append(f"{name}: {tok:.1f} output tok/s, {tok / one:.2f}x one `loraplex serve` "
                     f"({one:.1f}); TTFT p50 {s[name]['ttft_ms']['p50']:.0f} ms vs "
                     f"{s['loraplex serve']['ttft_ms']['p50']:.0f} ms; per replica: "
                     f"{per_replica}")
    eff = s[ONE_REPLICA]["output_tok_per_s"] / one
    lines.append(
        f"N nodes: the {num_replicas} replicas here share this machine's cores, so no "
        f"speed-up can show. With one replica per node of this machine's kind, each serving "
        f"as one `loraplex serve` does ({one:.1f} tok/s) times the Ray path's cost measured "
        f"with one replica ({eff:.2f}x), N nodes give about N x {one * eff:.1f} tok/s, so "
        f"long as affinity keeps each replica's adapters in its slots (the loads above) and "
        f"the ingress keeps up")
    return lines
