"""Side by side in one run: loraplex with adapters, loraplex on the base model only, and the
transformers + PEFT baseline, all on the same workload; then one report with the ratios.

loraplex runs as its own process (`loraplex serve` on a loopback port, driven over HTTP by
this process's client); the baseline runs in this process after the server has stopped, so
the two never share the CPU or GPU.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from .client import Record, Target, run_items
from .report import SLO, Run, summarize, write_report
from .workload import Distinct, Fixed, WorkloadSpec

BASE_NAME = "base"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A progress bar on stderr for requests as they finish."""

    def __init__(self, total: int, label: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=True,
                        dynamic_ncols=True)
        self.failed = 0

    def __call__(self, record: Record) -> None:
        self.failed += not record.ok
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_http(spec: WorkloadSpec, target: Target, name: str, concurrency: int | None) -> Run:
    items = spec.items()
    progress = Progress(len(items), name)
    try:
        records, wall = asyncio.run(run_items(items, target, concurrency, progress))
    finally:
        progress.close()
    return Run(name, records, wall)


def wait_ready(url: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not healthy after {timeout_s:.0f}s")


def warm_up(spec: WorkloadSpec, target: Target) -> None:
    """One short request per adapter, so that no measured run pays for first-use costs (lazy
    initialisation, the first read of each adapter) the others do not."""
    warm = replace(spec, num_requests=max(1, len(spec.adapters)), duration_s=None,
                   output_len=Fixed(1), popularity=Distinct())
    run_http(warm, target, "warm-up", concurrency=4)


def mixed_and_base(spec: WorkloadSpec, url: str, name: str, concurrency: int | None,
                   extra: Callable[[str | None], dict] | None = None,
                   rounds: int = 1) -> list[Run]:
    """A warmed-up server's runs: the workload over its adapters, then on the base model
    (`extra`: see Target); `rounds` times in turn, each run named with its round."""
    target = Target(url, BASE_NAME, extra=extra)
    warm_up(spec, target)
    runs = []
    for k in range(1, rounds + 1):
        tag = f" #{k}" if rounds > 1 else ""
        runs += [run_http(spec, target, f"{name}, 8 adapters mixed{tag}", concurrency),
                 run_http(replace(spec, adapters=()), target, f"{name}, base only{tag}",
                          concurrency)]
    return runs


@contextmanager
def loraplex_server(port: int, adapters: dict[str, str], model: str | None, extra: list[str],
                    timeout_s: float = 600, command: str = "serve", env: dict | None = None):
    """`loraplex serve` (or `command`, e.g. serve-ray) in a child process on
    127.0.0.1:`port`, with `env` added to its environment; stopped on exit."""
    cmd = [sys.executable, "-m", "loraplex.server.cli", command, *([model] if model else []),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", BASE_NAME,
           "--log-level", "warning", *extra]
    if adapters:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    say("starting: " + " ".join(cmd[:8]) + " ...")
    process = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout_s)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class CompareOptions:
    model: str | None  # None: the embedded SmolLM2
    quantization: str
    adapters: dict[str, str]  # name -> PEFT directory
    concurrency: int | None
    peft_batch: int
    port: int
    server_args: tuple[str, ...] = ()
    slo: SLO = field(default_factory=SLO)
    skip_peft: bool = False
    skip_base: bool = False


def compare(spec: WorkloadSpec, opts: CompareOptions, out_dir: str | Path,
            workload_desc: dict) -> tuple[Path, list[Run]]:
    runs = []
    quant = ["--quantization", opts.quantization]
    with loraplex_server(opts.port, opts.adapters, opts.model,
                         quant + list(opts.server_args)) as url:
        target = Target(url, BASE_NAME)
        warm_up(spec, target)
        runs.append(run_http(spec, target, "loraplex", opts.concurrency))
        if not opts.skip_base:
            base_spec = replace(spec, adapters=())
            runs.append(run_http(base_spec, target, "loraplex base only", opts.concurrency))
    if not opts.skip_peft:
        runs.append(run_peft(spec, opts))
    path = write_report(out_dir, runs, "loraplex vs transformers + PEFT", workload_desc,
                        opts.slo, baseline=runs[-1].name if not opts.skip_peft else None)
    return path, runs


def run_peft(spec: WorkloadSpec, opts: CompareOptions, name: str = "transformers + PEFT") -> Run:
    from loraplex.server.config import ModelConfig
    from loraplex.server.runner.loader import load_model

    say(f"loading the PEFT baseline ({len(opts.adapters)} adapters)")
    loaded = load_model(ModelConfig(model=opts.model, quantization=opts.quantization))
    from .peft_baseline import PeftBaseline

    baseline = PeftBaseline(loaded.model, loaded.tokenizer, opts.adapters, opts.peft_batch)
    items = spec.items()
    progress = Progress(len(items), name)
    try:
        records, wall = baseline.run(items, opts.concurrency, progress)
    finally:
        progress.close()
    return Run(name, records, wall)


def ratio_lines(runs: list[Run]) -> list[str]:
    """The headline: loraplex against PEFT and against itself on the base model."""
    s = {run.name: summarize(run) for run in runs}
    lora = s["loraplex"]
    lines = []
    if "transformers + PEFT" in s:
        peft = s["transformers + PEFT"]
        lines.append(f"loraplex / PEFT output tok/s: "
                     f"{lora['output_tok_per_s'] / peft['output_tok_per_s']:.2f}x "
                     f"({lora['output_tok_per_s']:.1f} vs {peft['output_tok_per_s']:.1f}); "
                     f"TTFT p50 {lora['ttft_ms']['p50']:.0f} vs {peft['ttft_ms']['p50']:.0f} ms, "
                     f"p99 {lora['ttft_ms']['p99']:.0f} vs {peft['ttft_ms']['p99']:.0f} ms")
        lora_runs = {r.name: r for r in runs}
        same = sum(a.text == b.text for a, b in zip(lora_runs["loraplex"].records,
                                                    lora_runs["transformers + PEFT"].records)
                   if a.ok and b.ok)
        lines.append(f"identical greedy text to PEFT: {same}/{len(runs[0].records)}")
    if "loraplex base only" in s:
        base = s["loraplex base only"]
        lines.append(f"LoRA overhead vs the same server on the base model: "
                     f"{100 * (base['output_tok_per_s'] / lora['output_tok_per_s'] - 1):.1f}% "
                     f"({base['output_tok_per_s']:.1f} tok/s base only)")
    return lines
