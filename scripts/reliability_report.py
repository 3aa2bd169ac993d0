"""Write the reliability suite's figures (JSON lines from tests/reliability) as a Markdown
report: the F/L/B table with each figure, the command, commit, date and machine, each test's
outcome, and the cases that did not run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

CASES = {
    "F1-F2": "truncated, bit-flipped and lying uploads",
    "F3": "disk full during an upload",
    "F5": "mid-stream disconnects",
    "F6": "kill -9 during uploads, then restart",
    "F7": "same-name upload / replace / delete / infer races",
    "F9": "cross-tenant isolation",
    "F10": "SIGTERM under load",
    "L1": "steady load",
    "L2": "2x overload",
    "L3": "soak",
    "B1": "schemathesis against /openapi.json",
    "B2": "hypothesis: sampling parameters, safetensors headers",
    "B3": "atheris on the adapter parser",
    "B4": "giant and malformed fields and headers",
    "F11": "slow-header (slowloris) connections",
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _value(row: dict) -> str:
    value = row["value"]
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return f"{text} {row['unit']}".strip()


def _outcomes(log: Path | None) -> list[tuple[str, str]]:
    """(outcome, test id) from pytest's -rA summary."""
    if log is None or not log.exists():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)(.*)$", line)
        if m:
            found.append((m.group(1), m.group(2) + (m.group(3) if m.group(1) == "SKIPPED"
                                                   else "")))
    return found


def render(rows: list[dict], outcomes: list[tuple[str, str]], mode: str, seconds: int,
           command: str) -> str:
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    lines = [
        "# Reliability",
        "",
        f"What a hostile or unlucky client does to `loraplex serve`, measured by the suite in "
        f"`tests/reliability/` ({'full counts' if mode == 'long' else 'short counts, as CI runs it'}).",
        "",
        f"- Command: `{command.strip()}`",
        f"- Commit: `{commit}`{dirty}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {os.cpu_count()} cores ({_cpu()}), Python {platform.python_version()}; "
        f"the embedded SmolLM2-135M in fp32 on the CPU",
        f"- Wall time: {seconds // 60} min {seconds % 60} s",
        "",
        "| case | what | figure | note |",
        "|---|---|---|---|",
    ]
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    order = list(CASES) + sorted(set(by_case) - set(CASES))
    for case in order:
        for row in by_case.get(case, []):
            lines.append(f"| {case} | {row['what']} | {_value(row)} | {row['note']} |")
    missing = [c for c in CASES if c not in by_case]
    lines += ["", "## Not run or without figures", ""]
    lines += [f"- {c}: {CASES[c]}" for c in missing] or ["- none"]
    if outcomes:
        lines += ["", "## Tests", "", "| outcome | test |", "|---|---|"]
        lines += [f"| {o} | `{t.strip()}` |" for o, t in outcomes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("figures", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--mode", choices=["short", "long"], default="short")
    parser.add_argument("--seconds", type=int, default=0)
    parser.add_argument("--command", default="bash scripts/reliability.sh")
    args = parser.parse_args()
    rows = ([json.loads(line) for line in args.figures.read_text().splitlines() if line]
            if args.figures.exists() else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, _outcomes(args.log), args.mode, args.seconds,
                               args.command))


if __name__ == "__main__":
    main()
