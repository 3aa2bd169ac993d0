"""Everything a lent GPU must tell us, in one call: the stages of scripts/gpu_check.sh.

    python scripts/gpu_check.py [--dry-run] [--out DIR] [--commit SHA] [--budget SECONDS]

First the machine: GPU, driver, versions of python, torch, triton, transformers, peft,
bitsandbytes. Then the stages, each a subprocess with its own share of --budget: past it the
stage is killed and noted as timed out; a failing stage does not stop the later ones.

  tests    the compiled SGMV and paged decode kernels against their references, the
           `cuda`-marked tests (engine on CUDA vs PEFT, pinned side-stream slot loads) and the
           engine's Triton backend vs PEFT (`-k triton_backend`)
  kernels  a reduced grid of kernels/bench_sgmv.py: ours vs the torch reference and vLLM's
           ops (when peers/vllm_lora is present), and kernels/bench_paged_attention.py: the
           paged decode kernel vs the torch gather; both with the fraction of copy bandwidth
  engine   loadtest/engine_scale.py: a Llama-3-8B-shaped random model (8 of its 32 layers),
           NF4 and bf16, 1 and 100 adapters vs base only vs PEFT, and one adapter merged
           into the base (tok/s, merge and unmerge seconds); NF4 again without CUDA graphs,
           paged kernel or fused groups, to weigh them

--dry-run runs the same stages on the CPU at tiny sizes, Triton in its interpreter (CI runs
it, so that the script is known to work before a GPU sees it). Results: `gpu_check.json` and
`gpu_check.md` in --out (default $OUT when set, else build/gpu_check), with each stage's log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    name: str
    share: float  # of the whole budget
    gpu: list[list[str]]  # commands on a GPU
    dry: list[list[str]]  # commands of the dry run


def stages(out: Path) -> list[Stage]:
    py, pytest = sys.executable, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    bench = [py, "-m", "loraplex.kernels.bench_sgmv", "--out", str(out / "bench_sgmv.json"),
             "--md", str(out / "bench_sgmv.md")]
    paged = [py, "-m", "loraplex.kernels.bench_paged_attention", "--out",
             str(out / "bench_paged.json"), "--md", str(out / "bench_paged.md")]
    scale = [py, "-m", "loraplex.loadtest.engine_scale", "--out", str(out)]
    return [
        Stage("tests", 0.33,
              [[*pytest, "tests/test_sgmv.py", "tests/test_paged_attention.py"],
               [*pytest, "-m", "cuda", "tests/test_peft_equivalence.py", "tests/test_engine.py"],
               # Both Triton cases, the long form's unfused Qwen2 one included: fast on a GPU.
               [*pytest, "-m", "long or not long", "tests/test_peft_equivalence.py", "-k",
                "triton_backend"]],
              [[*pytest, "tests/test_sgmv.py", "tests/test_paged_attention.py", "-k",
                "one_launch or (bf16_cache and not cpu)"],
               [*pytest, "tests/test_peft_equivalence.py", "-k", "lora_backend_is"]]),
        Stage("kernels", 0.2,
              [[*bench, "--batches", "1,16,256", "--adapters", "1,B", "--ranks", "16,mixed",
                "--repeats", "10"], [*paged, "--repeats", "10"]],
              [[*bench, "--smoke", "--peers", str(out / "no-peers")], [*paged, "--smoke"]]),
        # The stage's own deadline leaves it time to write what finished before it is killed.
        Stage("engine", 0.45,
              [[*scale, "--layers", "8", "--quantizations", "nf4,none,nf4:eager",
                "--deadline", "{deadline}"]],
              [[*scale, "--shape", "tiny", "--layers", "1", "--adapter-counts", "1",
                "--requests", "2", "--max-tokens", "2", "--peft-requests", "2", "--ranks", "4,8",
                "--lora-backend", "triton", "--deadline", "{deadline}"]]),
    ]


def env_info() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - absent or broken: say which
            info[name] = f"unavailable ({type(e).__name__})"
    import torch

    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,"
                              "clocks.max.sm,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return info


def run_stage(stage: Stage, dry: bool, seconds: float, log: Path) -> dict:
    """The stage's commands in turn, all within `seconds`; never raises."""
    t0 = time.monotonic()
    result = {"stage": stage.name, "budget_s": round(seconds), "status": "ok", "commands": []}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry:
        env["TRITON_INTERPRET"] = "1"
    with log.open("w") as f:
        for command in (stage.dry if dry else stage.gpu):
            left = seconds - (time.monotonic() - t0)
            if left < 5:
                if result["status"] == "ok":
                    result["status"] = "timeout"
                result["commands"].append({"command": " ".join(command), "status": "skipped"})
                continue
            command = [c.replace("{deadline}", str(int(left * 0.8))) for c in command]
            f.write(f"$ {' '.join(command)}\n")
            f.flush()
            c0 = time.monotonic()
            try:
                proc = subprocess.run(command, cwd=ROOT, env=env, stdout=f,
                                      stderr=subprocess.STDOUT, timeout=left)
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = "timeout"
            result["commands"].append({"command": " ".join(command), "status": status,
                                       "seconds": round(time.monotonic() - c0, 1)})
            if result["status"] == "ok":
                result["status"] = status  # the first command that did not succeed
    result["seconds"] = round(time.monotonic() - t0, 1)
    text = log.read_text(errors="replace")
    result["summary"] = [line.strip() for line in text.splitlines()
                         if re.search(r"\b(passed|failed|error|skipped)\b.* in [\d.]+s", line)]
    result["log_tail"] = text[-3000:]
    return result


def markdown(report: dict, out: Path) -> str:
    env = report["env"]
    lines = [f"# GPU check ({'dry run, CPU' if report['dry_run'] else env.get('gpu', 'no GPU')})",
             "", f"- Date: {report['date']}", f"- Commit: `{report['commit']}`",
             f"- Command: `{report['command']}`",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "nvidia_smi"),
             f"- nvidia-smi: {env.get('nvidia_smi')}", f"- Wall time: {report['seconds']} s", "",
             "| stage | status | seconds (budget) | summary |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} ({s['budget_s']}) | "
                     f"{'; '.join(s['summary'])} |")
    for name, title in (("bench_sgmv.md", "SGMV kernels"),
                        ("bench_paged.md", "Paged decode attention")):
        if (out / name).is_file():
            lines += ["", f"## {title}", "", (out / name).read_text()]
    if (out / "engine_scale.json").is_file():
        sys.path.insert(0, str(ROOT))
        from loraplex.loadtest.engine_scale import markdown as engine_md

        lines += ["", "## Engine", "", engine_md(json.loads((out / "engine_scale.json").read_text()))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--commit", default=None, help="default: git rev-parse HEAD, if a checkout")
    # 9 minutes in all, less the installs and the imports before the first stage.
    ap.add_argument("--budget", type=float, default=440.0, help="seconds for all stages")
    ap.add_argument("--stages", default=None, help="comma-separated subset, e.g. tests,engine")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "build" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    commit = args.commit
    if commit is None:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True)
        commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    t0 = time.monotonic()
    report = {"dry_run": args.dry_run, "commit": commit,
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "bash scripts/gpu_check.sh " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
              "env": env_info(), "stages": []}
    wanted = set(args.stages.split(",")) if args.stages else None
    for stage in stages(out):
        if wanted is not None and stage.name not in wanted:
            continue
        print(f"[gpu-check] {stage.name} ...", file=sys.stderr, flush=True)
        result = run_stage(stage, args.dry_run, stage.share * args.budget,
                           out / f"{stage.name}.log")
        report["stages"].append(result)
        print(f"[gpu-check] {stage.name}: {result['status']} in {result['seconds']}s "
              f"{'; '.join(result['summary'])}", file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, out)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if all(s["status"] == "ok" for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
