"""`loraplex bench engine-overhead`: the LoRA overhead of the engine alone, in one process.

The served benchmarks (`cpu-variants`, `peers`) measure through HTTP, where on a 2-core VM one
run of the same build varies by 10-20%: more than the adapters' share of a step. Here the
same workload (`WorkloadSpec`: the prompts, adapters and lengths the served commands send) is
submitted straight to engines built in this process, greedy, EOS ignored, in rounds: each
round runs every variant's engine with the adapters mixed, then the first engine on the base
model only, one after another (and the base model only once more for each other way of
running the base among the variants: `onednn-gemm`'s --cpu-gemm onednn, `torch-layers`'
--cpu-layers torch). The overhead is given two ways: from each run's median over the rounds,
and as the median of each round's ratio to its base-only run in the same round (which shares
that minute's machine speed); each both by wall time and by this process's CPU time, which
leaves out what the hypervisor stole from the VM (reported beside each run: /proc/stat's
`steal`, the share of all CPUs' time over the run).

`--kernel-stats` then runs each variant once more with the C kernel's calls timed
(monkeypatched in; these runs are not among the timed rounds, whose engines run as served),
gives their seconds over the rest of that run (the kernel's share, from one run: steadier than
a ratio of two runs, though it leaves out any cost outside the calls), and counts the adapter
bytes each call has to read: the rank-sized regions of the slots its tokens use. The report
splits the calls by the size of their step in tokens (a decode step has one per sequence).
Where a projection's base and adapters run as one call (--lora-fuse, the default, at decode
steps), the adapters' part cannot be timed apart: those calls are counted on their own line,
and the `unfused` variant times the adapters' calls alone. Beside each, a plain `torch.sum`
over 256 MB, at the same threads, measures what this machine reads per second at that
moment: bytes divided by that is the kernel's floor.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compare import say
from .workload import WorkloadSpec

# variant name -> (LoRAConfig fields and ModelConfig fields that differ from the defaults;
# the latter are the base's way of running, which takes a base-only run of its own)
VARIANTS = {"fp32-slots": ({}, {}), "bf16-slots": ({"dtype": "bfloat16"}, {}),
            # the base and the adapters as two calls per projection, as before --lora-fuse
            # took in the C kernel
            "unfused": ({"fuse": False}, {}),
            # oneDNN at every step, as before the C kernel took the steps of few rows
            "onednn-gemm": ({}, {"cpu_gemm": "onednn"}),
            # RMSNorm and the rotary embedding as transformers' torch ops, as before cpu_layers
            "torch-layers": ({}, {"cpu_layers": "torch"})}


def _flags(model_fields: dict[str, str]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in model_fields.items())


@dataclass
class KernelStats:
    """The C kernel's calls during one run: count, seconds, and each call's weights, step
    table and seconds, whose adapter bytes are summed after the run (`by_step`)."""

    calls: list = field(default_factory=list)  # (weights, table, seconds) per call
    seconds: float = 0.0
    run_seconds: float = 0.0  # the whole run's
    # Calls that ran a projection's base and adapters together (--lora-fuse, decode steps):
    # their adapters' time is not separable, so they count here, not in `seconds`.
    fused_calls: int = 0
    fused_seconds: float = 0.0

    @property
    def share(self) -> float:
        """The kernel's calls over the rest of their own run: an overhead measured within one
        run, which a machine's drift from minute to minute moves little."""
        return self.seconds / (self.run_seconds - self.seconds)

    def wrap(self, kernel: Callable) -> Callable:
        def timed(y, x, weights, table):
            start = time.perf_counter()
            out = kernel(y, x, weights, table)
            seconds = time.perf_counter() - start
            self.seconds += seconds
            self.calls.append((weights, table, seconds))
            return out
        return timed

    def wrap_fused(self, fused: Callable) -> Callable:
        def timed(x, dense, weights, table):
            start = time.perf_counter()
            out = fused(x, dense, weights, table)
            if out is not None:
                self.fused_seconds += time.perf_counter() - start
                self.fused_calls += 1
            return out
        return timed

    def by_step(self) -> dict[str, tuple[int, float, int]]:
        """Step size (tokens, bucketed) -> calls, seconds, adapter bytes the calls had to read
        (each call's slots in use, at their ranks)."""
        slots: dict[int, list[int]] = {}
        buckets: dict[str, list] = {}
        for weights, table, seconds in self.calls:
            used = slots.setdefault(id(table), sorted({s for s in table.slots.tolist()
                                                       if s >= 0}))
            ranks = weights.ranks()
            n = table.num_tokens
            bucket = next((name for name, most in STEP_SIZES if n <= most), "65+")
            b = buckets.setdefault(bucket, [0, 0.0, 0])
            b[0] += 1
            b[1] += seconds
            b[2] += sum(weights.slot_bytes(ranks[s]) for s in used)
        return {k: tuple(buckets[k]) for k in [*dict(STEP_SIZES), "65+"] if k in buckets}


# Step sizes (name, most tokens) the kernel's calls are grouped by; past 64, prefill only.
STEP_SIZES = (("1-2", 2), ("3-8", 8), ("9-16", 16), ("17-32", 32), ("33-64", 64))


def read_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """GB/s of a plain `torch.sum` over `mb` MB at torch's threads: the best of `repeats`."""
    data = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    data.sum()
    best = min(_timed(data.sum) for _ in range(repeats))
    return data.nbytes / best / 1e9


def _timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def steal_seconds() -> float:
    """CPU seconds the hypervisor has taken from this machine's CPUs since boot, all CPUs
    together (/proc/stat's `steal`); nan where Linux does not say."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


@dataclass(frozen=True)
class Timing:
    """One run: wall seconds, this process's CPU seconds (all threads, user and system), and
    the CPU seconds the hypervisor stole from the machine meanwhile. CPU time leaves out
    stolen time, which wall time counts; a machine that slows without steal (a Zen 3 VM whose
    memory ran slower from one run to the next) moves both alike."""

    wall: float
    cpu: float
    steal: float


def _run(engine, requests: list[tuple[list[int], str | None, int]],
         base_only: bool) -> Timing:
    from loraplex.server.engine.request import SamplingParams

    steal, cpu, start = steal_seconds(), time.process_time(), time.perf_counter()
    for i, (prompt, adapter, max_tokens) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens,
                                                           temperature=0.0, ignore_eos=True),
                           None if base_only else adapter)
    while engine.has_unfinished():
        engine.step()
    return Timing(time.perf_counter() - start, time.process_time() - cpu,
                  steal_seconds() - steal)


def _paired(runs: list[float], bases: list[float]) -> float:
    """The median of each round's run over the base-only run right after it: this VM's speed
    drifts by 10% and more within minutes, and a pair run close together shares the drift."""
    return statistics.median(s / b - 1 for s, b in zip(runs, bases))


def engine_overhead(spec: WorkloadSpec, model: str | None, quantization: str,
                    adapters: dict[str, str], variants: list[str], rounds: int,
                    kernel_stats: bool, out_dir: str | Path,
                    workload_desc: dict) -> tuple[Path, list[str]]:
    from loraplex.kernels import sgmv_cpu
    from loraplex.server.config import EngineConfig, LoRAConfig, ModelConfig
    from loraplex.server.engine.engine import LLMEngine

    max_rank = max(json.loads((Path(p) / "adapter_config.json").read_text())["r"]
                   for p in adapters.values())
    engines = {}
    for name in variants:
        say(f"engine {name} ...")
        lora_fields, model_fields = VARIANTS[name]
        engine = LLMEngine(EngineConfig(
            model=ModelConfig(model=model, quantization=quantization, **model_fields),
            lora=LoRAConfig(max_loras=max(len(adapters), 1), max_lora_rank=max_rank,
                            **lora_fields)))
        for adapter, path in adapters.items():
            engine.register_adapter(adapter, path)
        engines[name] = engine
    tokenizer = next(iter(engines.values())).tokenizer
    requests = [(tokenizer.encode(item.prompt), item.adapter, item.max_tokens)
                for item in spec.items()]
    tokens = sum(r[2] for r in requests)
    # A whole run on each engine first: its first steps at each row count build oneDNN's
    # primitives (process-wide, so for the first engine only), and each adapter's first
    # request loads its slot. Warmed on 4 requests only, the first engine's first timed run
    # took 10.7-11.5 s against 7.1-9.8 for its others (four runs at 9c7ca49 and d9badc7).
    for engine in engines.values():
        _run(engine, requests, base_only=False)

    # One base-only run per way of running the base (--cpu-gemm, --cpu-layers) among the
    # variants, on the first variant's engine that runs it; each mixed run is set against
    # its own.
    first_base = _flags(VARIANTS[variants[0]][1])
    mixed = [f"{name}, mixed" for name in variants]
    base_run = {}  # mixed run -> its base-only run
    engine_of = {}  # run -> engine
    for name, run in zip(variants, mixed):
        flags = _flags(VARIANTS[name][1])
        base_run[run] = "base only" if flags == first_base else f"base only, {flags}"
        engine_of[run] = engines[name]
        engine_of.setdefault(base_run[run], engines[name])
    runs = mixed + list(dict.fromkeys(base_run.values()))
    timings: dict[str, list[Timing]] = {run: [] for run in runs}
    cpus = os.cpu_count() or 1
    for r in range(rounds):
        for run in runs:
            t = _run(engine_of[run], requests, base_only=run.startswith("base only"))
            timings[run].append(t)
            say(f"round {r + 1}/{rounds}: {run}: {t.wall:.2f} s ({tokens / t.wall:.1f} output "
                f"tok/s), CPU {t.cpu:.2f} s, stolen {t.steal / (t.wall * cpus):.1%}")
    seconds = {run: [t.wall for t in ts] for run, ts in timings.items()}
    cpu = {run: [t.cpu for t in ts] for run, ts in timings.items()}
    stats: dict[str, KernelStats] = {}
    bandwidth: list[float] = []
    original, original_fused = sgmv_cpu.sgmv_cpu, sgmv_cpu.linear_lora_cpu
    try:
        for name in variants if kernel_stats else ():
            bandwidth.append(read_bandwidth())
            stats[f"{name}, mixed"] = ks = KernelStats()
            sgmv_cpu.sgmv_cpu = ks.wrap(original)
            sgmv_cpu.linear_lora_cpu = ks.wrap_fused(original_fused)
            ks.run_seconds = _run(engines[name], requests, base_only=False).wall
            sgmv_cpu.sgmv_cpu, sgmv_cpu.linear_lora_cpu = original, original_fused
            say(f"{name}, mixed, kernel timed: {ks.seconds:.2f} s in {len(ks.calls)} calls, "
                f"{ks.share:.1%} of the rest of the run; {ks.fused_calls} calls with the base "
                f"({ks.fused_seconds:.2f} s)")
    finally:
        sgmv_cpu.sgmv_cpu, sgmv_cpu.linear_lora_cpu = original, original_fused

    rows, results = [], {}
    for run in runs:
        own_base = base_run.get(run, run)
        med, base = statistics.median(seconds[run]), statistics.median(seconds[own_base])
        paired = _paired(seconds[run], seconds[own_base])
        cpu_med, cpu_base = statistics.median(cpu[run]), statistics.median(cpu[own_base])
        cpu_paired = _paired(cpu[run], cpu[own_base])
        stolen = statistics.median(t.steal / (t.wall * cpus) for t in timings[run])
        result = {"seconds": seconds[run], "median_s": round(med, 3),
                  "output_tok_per_s": round(tokens / med, 1),
                  "lora_overhead": round(med / base - 1, 4),
                  "lora_overhead_paired": round(paired, 4),
                  # microseconds: a short run's CPU seconds at 3 decimals move the ratio by 1%
                  "cpu_seconds": [round(c, 6) for c in cpu[run]],
                  "cpu_overhead": round(cpu_med / cpu_base - 1, 4),
                  "cpu_overhead_paired": round(cpu_paired, 4),
                  "stolen_share": round(stolen, 4)}
        own = run == own_base
        cells = [run, f"{med:.2f} ({', '.join(f'{s:.2f}' for s in seconds[run])})",
                 f"{tokens / med:.1f}", "-" if own else f"{med / base - 1:.1%}",
                 "-" if own else f"{paired:.1%}", f"{cpu_med:.2f}",
                 "-" if own else f"{cpu_med / cpu_base - 1:.1%} / {cpu_paired:.1%}",
                 f"{stolen:.1%}"]
        if run in stats:
            by_step = stats[run].by_step()
            kernel_s = stats[run].seconds
            gb = sum(nbytes for _, _, nbytes in by_step.values()) / 1e9
            result.update(kernel_s=round(kernel_s, 3), kernel_gb=round(gb, 2),
                          kernel_calls=len(stats[run].calls),
                          fused_calls=stats[run].fused_calls,
                          fused_s=round(stats[run].fused_seconds, 3),
                          kernel_share=round(stats[run].share, 4),
                          kernel_by_step={k: {"calls": c, "seconds": round(sec, 4),
                                              "bytes": nbytes}
                                          for k, (c, sec, nbytes) in by_step.items()})
            cells += [f"{kernel_s:.2f}", f"{stats[run].share:.1%}",
                      f"{gb / kernel_s:.1f}" if kernel_s else "-"]
        elif kernel_stats:
            cells += ["-", "-", "-"]
        results[run] = result
        rows.append("| " + " | ".join(cells) + " |")
    head = ("| run | seconds (rounds) | output tok/s | LoRA overhead (run / base - 1) "
            "| paired by round (median) | CPU s (median) | overhead by CPU time (medians / "
            "paired) | stolen by the hypervisor (median) |")
    if kernel_stats:
        head += (" C kernel s (a run of its own) | kernel / rest of that run "
                 "| kernel GB/s |")
    lines = [f"{run}: LoRA overhead {results[run]['lora_overhead']:.1%} (medians), "
             f"{results[run]['lora_overhead_paired']:.1%} (round by round, median); "
             f"by CPU time {results[run]['cpu_overhead']:.1%}, "
             f"{results[run]['cpu_overhead_paired']:.1%}" for run in mixed]
    lines += [f"{run}: {results['base only']['median_s'] / results[run]['median_s']:.2f}x "
              "the speed of the first base-only run (medians)" for run in runs[len(mixed) + 1:]]
    if kernel_stats:
        bw = statistics.median(bandwidth)
        lines.append(f"plain read (torch.sum, {torch.get_num_threads()} threads): {bw:.1f} GB/s "
                     f"(rounds {', '.join(f'{b:.1f}' for b in bandwidth)})")
        lines += [f"{run}: {results[run]['fused_calls']} calls ran a projection's base and "
                  f"adapters together ({results[run]['fused_s']:.2f} s), not counted above: "
                  "the `unfused` variant times the adapters alone"
                  for run in mixed if results[run].get("fused_calls")]
        for run in (run for run in mixed if results[run].get("kernel_gb")):
            floor = results[run]["kernel_gb"] / bw
            lines.append(f"{run}: {results[run]['kernel_gb']:.1f} GB of adapter weights to read "
                         f"take {floor:.2f} s at that rate: an overhead floor of "
                         f"{floor / results[base_run[run]]['median_s']:.1%}")
    step_tables = ""
    for run in (run for run in mixed if "kernel_by_step" in results[run]):
        step_tables += (f"\n## {run}: the C kernel's calls by step size\n\n| tokens in the "
                        "step | calls | s | us per call | KB per call | GB/s |\n"
                        "|---|---|---|---|---|---|\n")
        for bucket, b in results[run]["kernel_by_step"].items():
            c, sec, nbytes = b["calls"], b["seconds"], b["bytes"]
            step_tables += (f"| {bucket} | {c} | {sec:.3f} | {1e6 * sec / c:.1f} | "
                            f"{nbytes / c / 1024:.0f} | "
                            f"{nbytes / sec / 1e9 if sec else 0:.1f} |\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(
        "# The engine's LoRA overhead, in process\n\n"
        f"Workload: {json.dumps(workload_desc)}; {len(requests)} requests, {tokens} output "
        f"tokens; {rounds} rounds, medians.\n\n" + head + "\n"
        + "|---" * (head.count("|") - 1) + "|\n" + "\n".join(rows) + "\n\n"
        + "\n".join(f"- {line}" for line in lines) + "\n" + step_tables)
    path.with_name("report.json").write_text(json.dumps(
        {"workload": workload_desc, "output_tokens": tokens, "rounds": rounds,
         "threads": torch.get_num_threads(), "runs": results,
         "read_gb_per_s": bandwidth}, indent=2))
    return path, lines
