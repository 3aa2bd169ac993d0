"""The SGMV benchmark's CPU smoke mode: tiny shapes in Triton's interpreter, every
implementation checked against the reference, a table and a JSON file out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_bench_smoke_mode(tmp_path):
    out = tmp_path / "bench.json"
    # An empty peers directory: vLLM's ops, when fetched, take minutes in the interpreter.
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.kernels.bench_sgmv", "--smoke", "--peers",
         str(tmp_path), "--out", str(out), "--md", str(tmp_path / "bench.md")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "vLLM LoRA ops: not fetched" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["adapters"], r["rank"]) for r in rows] == [
        (b, a, r) for b in (1, 5) for a in ("1", "B") for r in ("8", "mixed")]
    for row in rows:
        assert set(row["groups"]) == {"qkv", "o", "gate_up", "down"}
        assert row["ours"] > 0 and row["torch"] > 0 and row["bytes"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # header and one line per cell
