"""scripts/gpu_check.sh --dry-run: every stage of the GPU check, on the CPU at tiny sizes with
Triton in its interpreter, so that the script is known to work before a GPU sees it. Its
kernel stage is the SGMV benchmark's smoke mode, checked here too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_stage_result(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path),
                           "--commit", "test"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["commit"] == "test"
    assert report["env"]["torch"] and "triton" in report["env"]
    assert [s["stage"] for s in report["stages"]] == ["tests", "kernels", "engine"]
    assert all(s["status"] == "ok" for s in report["stages"]), report["stages"]
    tests = report["stages"][0]
    assert len(tests["summary"]) == 2 and all("passed" in line and "failed" not in line
                                              for line in tests["summary"])

    # kernels: the benchmark's smoke grid, every implementation checked against the reference
    bench = json.loads((tmp_path / "bench_sgmv.json").read_text())
    rows = bench["rows"]
    assert [(r["batch"], r["adapters"], r["rank"]) for r in rows] == [
        (b, a, r) for b in (1, 5) for a in ("1", "B") for r in ("8", "mixed")]
    for row in rows:
        assert set(row["groups"]) == {"qkv", "o", "gate_up", "down"}
        assert row["ours"] > 0 and row["torch"] > 0 and row["bytes"] > 0
    assert "vLLM LoRA ops: not fetched" in (tmp_path / "kernels.log").read_text()
    paged = json.loads((tmp_path / "bench_paged.json").read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in paged] == [(1, 5), (1, 17), (3, 5), (3, 17)]
    assert all(r["max_abs_diff"] < 1e-4 for r in paged)

    # engine: both quantizations, both adapter counts, PEFT beside each, on the Triton backend
    scale = json.loads((tmp_path / "engine_scale.json").read_text())
    assert not scale["skipped"]
    assert [(r["quantization"], r["adapters"], "merge_s" in r) for r in scale["rows"]] == [
        ("nf4", 1, False), ("nf4", 1, True), ("none", 1, False), ("none", 1, True)]
    for row in scale["rows"]:
        assert row["lora_backend"].startswith("triton fused")
        assert row["loraplex_tok_s"] > 0
        if "merge_s" in row:  # one adapter merged into the base, on the fused Triton path
            assert row["lora_backend"].endswith("merged") and row["merge_s"] > 0
            assert row["unmerge_s"] >= 0 and row["kept_aside_bytes"] > 0
        else:
            assert row["peft_tok_s"] > 0 and row["identical_to_peft"] == "2/2"

    md = (tmp_path / "gpu_check.md").read_text()
    assert "| tests | ok |" in md and "## SGMV kernels" in md and "## Engine" in md
    assert "## Paged decode attention" in md


def test_gpu_check_notes_a_stage_out_of_time_and_goes_on(tmp_path):
    """A budget too small for the kernel stage: it is killed and noted, and the report is
    still written."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path),
                           "--stages", "kernels", "--budget", "30"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [("kernels", "timeout")]
    assert "| kernels | timeout |" in (tmp_path / "gpu_check.md").read_text()
