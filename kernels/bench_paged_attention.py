"""Paged decode attention benchmark: the Triton kernel (reads blocks in place) against the torch
path (gathers each sequence's blocks into a padded copy, then SDPA), at Llama-3-8B's attention
shapes (32 query heads, 8 KV heads, head_dim 128, blocks of 16), bf16, one layer.

    python -m loraplex.kernels.bench_paged_attention --out bench_paged.json --md bench_paged.md
    TRITON_INTERPRET=1 python -m loraplex.kernels.bench_paged_attention --smoke   # CPU, tiny
    python -m loraplex.kernels.bench_paged_attention --cpu   # the C kernel against torch, CPU

`--cpu` times the C kernel (`paged_attention_cpu.c`) against the torch path at SmolLM2-135M's
shapes (9 query heads, 3 KV heads, head_dim 64, blocks of 16), fp32 and bf16, one layer,
median wall time of `--repeats` calls each, side by side in one process.

Cells: batch 1, 16, 64, 256 x context 512, 4096 (every sequence the same length). Each
implementation's launches are captured in one CUDA graph over enough copies of the cache that
a replay reads more than twice the L2, and replayed (`bench_sgmv.time_launches`). Roofline
bytes: K and V of every context read once, q read and o written; as a fraction of the
device-to-device copy bandwidth measured here. Every cell first checks the kernel against
the torch path (max abs difference reported).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .paged_attention import paged_decode, paged_decode_cpu, paged_decode_ref

SHAPE = {"heads": 32, "kv_heads": 8, "head_dim": 128, "block_size": 16}
SMOKE = {"heads": 4, "kv_heads": 2, "head_dim": 16, "block_size": 4}
CPU_SHAPE = {"heads": 9, "kv_heads": 3, "head_dim": 64, "block_size": 16}  # SmolLM2-135M
L2_BYTES = 60 * 2**20


def make_cell(batch: int, context: int, shape: dict, dtype: torch.dtype, device: torch.device,
              seed: int = 0):
    gen = torch.Generator(device).manual_seed(seed)
    bs, kvh, d = shape["block_size"], shape["kv_heads"], shape["head_dim"]
    per_seq = -(-context // bs)
    num_blocks = batch * per_seq
    k = torch.randn(num_blocks, bs, kvh, d, generator=gen, device=device).to(dtype)
    v = torch.randn(num_blocks, bs, kvh, d, generator=gen, device=device).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.long, device=device)
    q = torch.randn(batch, shape["heads"], d, generator=gen, device=device).to(dtype)
    return q, k, v, tables.contiguous(), lens


def roofline_bytes(batch: int, context: int, shape: dict, elem: int) -> int:
    kv = 2 * batch * context * shape["kv_heads"] * shape["head_dim"] * elem
    return kv + 2 * batch * shape["heads"] * shape["head_dim"] * elem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--cpu", action="store_true", help="the C kernel against torch")
    parser.add_argument("--batches", help="default 1,16,64,256 (--cpu: 1,8,32)")
    parser.add_argument("--contexts", help="default 512,4096 (--cpu: 128,512,2048)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="JSON results")
    parser.add_argument("--md", type=Path, help="Markdown table")
    args = parser.parse_args(argv)
    if args.cpu:
        return cpu_main(args)
    args.batches, args.contexts = args.batches or "1,16,64,256", args.contexts or "512,4096"
    if args.smoke:
        assert os.environ.get("TRITON_INTERPRET") == "1", (
            "--smoke runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
        shape, device, dtype = SMOKE, torch.device("cpu"), torch.float32
        batches, contexts = [1, 3], [5, 17]
    else:
        assert torch.cuda.is_available(), "the benchmark needs a GPU; --smoke runs on the CPU"
        from .bench_sgmv import copy_bandwidth

        shape, device, dtype = SHAPE, torch.device("cuda"), torch.bfloat16
        batches = [int(b) for b in args.batches.split(",")]
        contexts = [int(c) for c in args.contexts.split(",")]
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    scale = shape["head_dim"] ** -0.5
    rows = []
    for batch in batches:
        for context in contexts:
            cell = make_cell(batch, context, shape, dtype, device)
            want = paged_decode_ref(*cell, scale)
            got = paged_decode(*cell, scale)
            row = {"batch": batch, "context": context,
                   "max_abs_diff": (got.float() - want.float()).abs().max().item(),
                   "bytes": roofline_bytes(batch, context, shape, dtype.itemsize)}
            if device.type == "cuda":
                from .bench_sgmv import time_launches

                copies = [cell] + [make_cell(batch, context, shape, dtype, device, seed=i)
                                   for i in range(1, max(1, -(-2 * L2_BYTES // row["bytes"])))]
                row["triton_s"] = time_launches(
                    [lambda c=c: paged_decode(*c, scale) for c in copies], args.repeats)
                row["torch_s"] = time_launches(
                    [lambda c=c: paged_decode_ref(*c, scale) for c in copies], args.repeats)
                row["speedup"] = row["torch_s"] / row["triton_s"]
                row["copy_bw_fraction"] = row["bytes"] / row["triton_s"] / copy_bw
            rows.append(row)
            print(f"batch {batch} context {context}: {row}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    lines = [f"Paged decode attention, {name}, {dtype}, one layer: H {shape['heads']}, "
             f"KVH {shape['kv_heads']}, D {shape['head_dim']}, block {shape['block_size']}", "",
             "| batch | context | MB | triton (us) | torch (us) | speed-up | % of copy bw | "
             "max abs diff |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        timed = "triton_s" in r
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['bytes'] / 1e6:.2f} | "
            f"{r['triton_s'] * 1e6:.1f} | {r['torch_s'] * 1e6:.1f} | {r['speedup']:.2f}x | "
            f"{100 * r['copy_bw_fraction']:.0f}% | {r['max_abs_diff']:.2e} |" if timed else
            f"| {r['batch']} | {r['context']} | {r['bytes'] / 1e6:.2f} | - | - | - | - | "
            f"{r['max_abs_diff']:.2e} |")
    _report(args, lines, {"device": name, "copy_bandwidth": copy_bw, "dtype": str(dtype),
                          "rows": rows}, "the kernel")


def cpu_main(args) -> None:
    import statistics
    import time

    batches = [int(b) for b in (args.batches or "1,8,32").split(",")]
    contexts = [int(c) for c in (args.contexts or "128,512,2048").split(",")]
    scale = CPU_SHAPE["head_dim"] ** -0.5
    lines = [f"Paged decode attention on the CPU ({torch.get_num_threads()} threads), one "
             f"layer: H {CPU_SHAPE['heads']}, KVH {CPU_SHAPE['kv_heads']}, D "
             f"{CPU_SHAPE['head_dim']}, block {CPU_SHAPE['block_size']}", "",
             "| dtype | batch | context | C kernel (us) | torch (us) | speed-up | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for batch in batches:
            for context in contexts:
                cell = make_cell(batch, context, CPU_SHAPE, dtype, torch.device("cpu"))
                diff = (paged_decode_cpu(*cell, scale).float()
                        - paged_decode_ref(*cell, scale).float()).abs().max().item()
                row = {"dtype": str(dtype), "batch": batch, "context": context,
                       "max_abs_diff": diff}
                for name, fn in (("c_s", paged_decode_cpu), ("torch_s", paged_decode_ref)):
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        fn(*cell, scale)
                        times.append(time.perf_counter() - t0)
                    row[name] = statistics.median(times)
                rows.append(row)
                lines.append(f"| {dtype} | {batch} | {context} | {row['c_s'] * 1e6:.0f} | "
                             f"{row['torch_s'] * 1e6:.0f} | {row['torch_s'] / row['c_s']:.1f}x"
                             f" | {diff:.1e} |")
    _report(args, lines, {"device": "cpu", "rows": rows}, "the C kernel")


def _report(args, lines: list[str], results: dict, kernel: str) -> None:
    """Print the table, write it (--md) and the results (--out), then check that every cell
    agreed with the torch path (rows carry their dtype, or the results one for all)."""
    table = "\n".join(lines) + "\n"
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    bf16 = [("bfloat16" in r.get("dtype", results.get("dtype", ""))) for r in results["rows"]]
    assert all(r["max_abs_diff"] < (2e-2 if b else 1e-4)
               for r, b in zip(results["rows"], bf16)), f"{kernel} disagrees with the torch path"


if __name__ == "__main__":
    main()
