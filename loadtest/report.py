"""Reports: a JSON file with every raw record, a Markdown summary and PNG plots.

A report holds one or more named runs of the same workload (loraplex, loraplex on the base
model only, the PEFT baseline), so the ratios between them come from one file.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from .client import Record

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Run:
    name: str
    records: list[Record]
    wall_s: float


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, r: Record) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > self.ttft_ms):
            return False
        tpot = r.tpot
        return self.tpot_ms is None or tpot is None or tpot * 1000 <= self.tpot_ms


def summarize(run: Run, slo: SLO = SLO()) -> dict:
    """Throughput, latency percentiles in ms, errors by status and SLO attainment."""
    ok = [r for r in run.records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    series = {
        "ttft_ms": [r.ttft * 1000 for r in ok if r.ttft is not None],
        "tpot_ms": [r.tpot * 1000 for r in ok if r.tpot is not None],
        "itl_ms": [g * 1000 for r in ok for g in r.itl],
        "e2e_ms": [r.e2e * 1000 for r in ok if r.e2e is not None],
    }
    summary = {
        "requests": len(run.records),
        "completed": len(ok),
        "wall_s": run.wall_s,
        "request_per_s": len(ok) / run.wall_s if run.wall_s > 0 else math.nan,
        "output_tok_per_s": out_tokens / run.wall_s if run.wall_s > 0 else math.nan,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "errors": dict(Counter(r.status for r in run.records if not r.ok)),
    }
    for key, values in series.items():
        summary[key] = {"mean": sum(values) / len(values) if values else math.nan,
                        **{f"p{p}": percentile(values, p) for p in PERCENTILES}}
    if slo.ttft_ms is not None or slo.tpot_ms is not None:
        summary["slo"] = {**asdict(slo), "attained": sum(map(slo.met, run.records))
                          / len(run.records) if run.records else math.nan}
    return summary


def per_adapter(run: Run) -> dict[str, dict]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in run.records:
        groups[r.adapter or "(base)"].append(r)
    return {name: {"requests": len(rs), "ttft_ms": [r.ttft * 1000 for r in rs if r.ttft],
                   "e2e_ms": [r.e2e * 1000 for r in rs if r.ok and r.e2e]}
            for name, rs in groups.items()}


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(runs: list[Run], summaries: list[dict], title: str, workload: dict,
             baseline: str | None = None) -> str:
    lines = [f"# {title}", "", "Workload: " + ", ".join(f"{k} {v}" for k, v in workload.items()),
             "", ("| run | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p99 (ms) "
                  "| ITL p50 / p99 (ms) | e2e p50 / p99 (ms) | completed | errors |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for run, s in zip(runs, summaries):
        t, tp, itl, e = s["ttft_ms"], s["tpot_ms"], s["itl_ms"], s["e2e_ms"]
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
        lines.append(
            f"| {run.name} | {_fmt(s['request_per_s'], 2)} | {_fmt(s['output_tok_per_s'])} "
            f"| {_fmt(t['p50'])} / {_fmt(t['p90'])} / {_fmt(t['p99'])} "
            f"| {_fmt(tp['p50'])} / {_fmt(tp['p99'])} | {_fmt(itl['p50'])} / {_fmt(itl['p99'])} "
            f"| {_fmt(e['p50'])} / {_fmt(e['p99'])} | {s['completed']}/{s['requests']} "
            f"| {errors} |")
    if any("slo" in s for s in summaries):
        slo = next(s["slo"] for s in summaries if "slo" in s)
        lines += ["", f"SLO (TTFT <= {slo['ttft_ms']} ms, TPOT <= {slo['tpot_ms']} ms) attained: "
                  + ", ".join(f"{run.name} {100 * s['slo']['attained']:.0f}%"
                              for run, s in zip(runs, summaries))]
    if baseline is not None and len(runs) > 1:
        ref = summaries[[r.name for r in runs].index(baseline)]
        lines += ["", f"Ratios against {baseline}:", "",
                  "| run | output tok/s | TTFT p50 | TTFT p99 |", "|---|---|---|---|"]
        for run, s in zip(runs, summaries):
            lines.append(
                f"| {run.name} | {_ratio(s['output_tok_per_s'], ref['output_tok_per_s'])} "
                f"| {_ratio(s['ttft_ms']['p50'], ref['ttft_ms']['p50'])} "
                f"| {_ratio(s['ttft_ms']['p99'], ref['ttft_ms']['p99'])} |")
    return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> str:
    return "-" if not (b and math.isfinite(a) and math.isfinite(b)) else f"{a / b:.2f}x"


def token_times(r: Record) -> list[float]:
    """When each streamed chunk arrived, in seconds from the run's start."""
    if r.ttft is None:
        return []
    t = r.start + r.ttft
    out = [t]
    for gap in r.itl:
        t += gap
        out.append(t)
    return out


def plot(runs: list[Run], out_dir: Path) -> list[Path]:
    """Latency CDFs, output throughput over time, and per-adapter TTFT, one PNG each."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'loraplex[bench]', "
                           "or pass --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, label) in zip(axes, [("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"),
                                       ("e2e", "end-to-end latency (ms)")]):
        for run in runs:
            values = sorted(getattr(r, key) * 1000 for r in run.records
                            if r.ok and getattr(r, key) is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))],
                        where="post", label=run.name)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    _legend(axes[0])
    paths.append(_save(fig, out_dir / "latency_cdf.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        # Chunks are counted by arrival second; one chunk is one token for loraplex and PEFT.
        times = [t for r in run.records if r.ok for t in token_times(r)]
        if times:
            bins = Counter(int(t) for t in times)
            xs = list(range(int(max(times)) + 1))
            ax.plot(xs, [bins.get(x, 0) for x in xs], label=run.name)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens / s")
    ax.grid(alpha=0.3)
    _legend(ax)
    paths.append(_save(fig, out_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(runs)
    names = sorted({n for run in runs for n in per_adapter(run)})[:40]
    for i, run in enumerate(runs):
        stats = per_adapter(run)
        p50 = [percentile(stats.get(n, {}).get("ttft_ms", []), 50) for n in names]
        p99 = [percentile(stats.get(n, {}).get("ttft_ms", []), 99) for n in names]
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, p99, width, alpha=0.35, color=f"C{i}")
        ax.bar(xs, p50, width, color=f"C{i}", label=f"{run.name} (p50 solid, p99 light)")
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names,
                  rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("TTFT (ms)")
    _legend(ax, fontsize=8)
    paths.append(_save(fig, out_dir / "per_adapter_ttft.png"))
    return paths


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:  # a run with no successful request draws nothing
        ax.legend(**kw)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _finite(value):
    """NaN (an empty percentile) becomes null: strict JSON readers refuse NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(out_dir: str | Path, runs: list[Run], title: str, workload: dict,
                 slo: SLO = SLO(), baseline: str | None = None, plots: bool = True) -> Path:
    """Writes report.json, report.md and the plots into `out_dir`; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(run, slo) for run in runs]
    (out / "report.json").write_text(json.dumps(_finite({
        "title": title, "workload": workload,
        "runs": [{"name": run.name, "wall_s": run.wall_s, "summary": s,
                  "per_adapter": {n: {"requests": v["requests"],
                                      "ttft_p50_ms": percentile(v["ttft_ms"], 50),
                                      "ttft_p99_ms": percentile(v["ttft_ms"], 99)}
                                  for n, v in per_adapter(run).items()},
                  "records": [asdict(r) for r in run.records]}
                 for run, s in zip(runs, summaries)],
    }), indent=1))
    text = markdown(runs, summaries, title, workload, baseline)
    if plots:
        names = [p.name for p in plot(runs, out)]
        text += "\n" + "\n".join(f"![{n}]({n})" for n in names) + "\n"
    md = out / "report.md"
    md.write_text(text)
    return md
