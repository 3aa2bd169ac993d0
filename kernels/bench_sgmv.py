"""SGMV benchmark: the Triton kernels against the torch reference and vLLM's LoRA ops, on the
LoRA projections of one Llama-3-8B decoder layer, at decode (one token per request).

GPU (writes a Markdown table and a JSON file; about 10 minutes on an H100):

    python -m loraplex.kernels.bench_sgmv --out bench_sgmv.json --md bench_sgmv.md

CPU smoke run (tiny shapes, Triton interpreter; checks every implementation against the
reference and prints the table, timings meaningless):

    python -m loraplex.kernels.bench_sgmv --smoke

Cells: batch 1, 4, 16, 64, 256 x distinct adapters 1, 8, sqrt(B), B, zipf (B draws from a
Zipf(1.1) over B adapters) x rank 8, 16, 64, mixed (4, 8, 16, 64 in turn); bf16. Projection
groups, each one launch pair of ours: qkv (4096 -> 4096/1024/1024, GQA), o (4096 -> 4096),
gate/up (4096 -> 14336 x 2), down (14336 -> 4096); a cell's times are the layer's sums.

Method. Each implementation's launches for a group are captured in one CUDA graph and
replayed; the graph holds `copies` launches over separate copies of the weights and
activations, enough copies that one replay touches more than twice the L2 (50 MB on an H100),
so every launch starts cold, as in a real forward where 32 layers pass between two uses of a
layer's adapters. Time per launch = replay time / copies, median of repeated replays.
Bandwidth: the roofline bytes `e * sum_u r_u * sum_p (in + out_p)` (the distinct adapters'
weights) + `e * B * (in + 2 * sum_p out_p)` (x read, y read and written), e = 2 bytes, over
our time, as a fraction of the device-to-device copy bandwidth measured here (a 1 GiB copy).
The torch reference is `sgmv_ref` per slice, i.e. the engine's per-module CPU path run on the
GPU. Scales are 1 (vLLM folds them into B); vLLM pads every adapter to the cell's largest
rank and is given the same weights so.

vLLM peer (optional). From vllm-project/vllm via the `read_file` tool (the store holds no
single commit with all five files; the three kernel files share one): kernel_utils.py,
lora_shrink_op.py, lora_expand_op.py at f9b1d4440e1150b39955f4e5fc92093fed308602
(vllm/runtime/modeling/lora/ops/triton_ops/), utils.py at
055e47c28003156421365af985d676fc921cb075 (same directory) and lora_kernel_metadata.py at
85caa35b6a5c7e85192e83fd39284d91ae66b79b (vllm/lora/ops/triton_ops/), saved under
peers/vllm_lora/ (git-ignored) with an empty __init__.py. Edits: imports point at that
directory; the ops' torch custom-op registration is dropped (lora_shrink = _lora_shrink,
likewise expand); PDL is off (VLLM_LORA_ENABLE_DUAL_STREAM = False); utils.py is reduced to
the two pointer helpers (verbatim, async_tensor_h2d -> torch.tensor), the default configs of
get_lora_op_configs for "shrink" and "expand", and supports_pdl -> False.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .peers import DEFAULT_PEERS_DIR, VLLMLoRA, vllm_missing
from .segments import Segments, SGMVMeta
from .sgmv import sgmv_ref, sgmv_triton

L2_BYTES = 50 * 2**20
MAX_COPIES = 512
RANK_CYCLE = (4, 8, 16, 64)


@dataclass(frozen=True)
class Group:
    name: str
    in_features: int
    widths: tuple[int, ...]


LLAMA3_8B = (Group("qkv", 4096, (4096, 1024, 1024)), Group("o", 4096, (4096,)),
             Group("gate_up", 4096, (14336, 14336)), Group("down", 14336, (4096,)))
SMOKE = (Group("qkv", 64, (64, 16, 16)), Group("o", 64, (64,)), Group("gate_up", 64, (96, 96)),
         Group("down", 96, (64,)))


def token_slots(batch: int, adapters: str, rng: random.Random) -> list[int]:
    """Each request's adapter (dense ids from 0), grouped as the engine groups them."""
    if adapters == "zipf":
        weights = [1 / (k + 1) ** 1.1 for k in range(batch)]
        drawn = rng.choices(range(batch), weights, k=batch)
        dense = {a: i for i, a in enumerate(sorted(set(drawn)))}
        return sorted(dense[a] for a in drawn)
    count = {"1": 1, "8": 8, "sqrt": round(math.sqrt(batch)), "B": batch}[adapters]
    return sorted(i % min(count, batch) for i in range(batch))


def adapter_ranks(rank: str, num_adapters: int) -> list[int]:
    if rank == "mixed":
        return [RANK_CYCLE[u % len(RANK_CYCLE)] for u in range(num_adapters)]
    return [int(rank)] * num_adapters


def roofline_bytes(group: Group, ranks: list[int], batch: int, elem: int) -> int:
    out = sum(group.widths)
    return (elem * sum(ranks) * len(group.widths) * group.in_features + elem * sum(ranks) * out
            + elem * batch * (group.in_features + 2 * out))


class GroupCopy:
    """One copy of a group's weights and activations, and a launch of each implementation."""

    def __init__(self, group: Group, slots: list[int], ranks: list[int], dtype: torch.dtype,
                 device: torch.device, gen: torch.Generator):
        num_slots, max_rank, num_slices = len(ranks), max(ranks), len(group.widths)
        self.group, self.slots, self.ranks = group, slots, ranks
        self.segments = Segments.from_token_slots(slots)
        self.meta = SGMVMeta.build(self.segments, num_slots, device)
        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=device)

        lora_a = randn(num_slices, num_slots, max_rank, group.in_features)
        lora_b = randn(num_slots, sum(group.widths), max_rank)
        for s, r in enumerate(ranks):  # zero padding, as the engine's slots keep it
            lora_a[:, s, r:] = 0
            lora_b[s, :, r:] = 0
        self.lora_a = (lora_a / group.in_features ** 0.5).to(dtype)
        self.lora_b = (lora_b / max_rank ** 0.5).to(dtype)
        self.ranks_dev = torch.tensor([ranks] * num_slices, dtype=torch.int32, device=device)
        self.scales_dev = torch.ones(num_slices, num_slots, dtype=torch.float32, device=device)
        self.x = randn(len(slots), group.in_features).to(dtype)
        self.y = randn(len(slots), sum(group.widths)).to(dtype)
        self.offsets = [sum(group.widths[:p]) for p in range(num_slices)]

    def ours(self) -> torch.Tensor:
        return sgmv_triton(self.y, self.x, self.lora_a, self.lora_b, self.meta, self.ranks_dev,
                           self.scales_dev, self.group.widths)

    def reference(self) -> torch.Tensor:
        for p, (o, w) in enumerate(zip(self.offsets, self.group.widths)):
            sgmv_ref(self.y[:, o:o + w], self.x, self.lora_a[p], self.lora_b[:, o:o + w],
                     self.segments, self.ranks, [1.0] * len(self.ranks))
        return self.y

    def vllm(self, peers_dir: Path) -> Callable[[], torch.Tensor]:
        lora_b = [self.lora_b[:, o:o + w].contiguous()
                  for o, w in zip(self.offsets, self.group.widths)]
        ops = VLLMLoRA(peers_dir, list(self.lora_a.unbind(0)), lora_b, self.slots)
        return lambda: ops(self.y, self.x)


def time_launches(launches: list[Callable[[], object]], repeats: int) -> float:
    """Seconds per launch: all `launches` back to back in one CUDA graph, median replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiles, fills caches, and is outside the graph
        for launch in launches:
            launch()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for launch in launches:
            launch()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(launches))
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_launches([lambda: dst.copy_(src)] * 4, 10)


def run_cell(groups: tuple[Group, ...], batch: int, adapters: str, rank: str,
             dtype: torch.dtype, device: torch.device, peers_dir: Path | None,
             repeats: int, seed: int) -> dict:
    rng = random.Random(f"{seed}-{batch}-{adapters}-{rank}")
    slots = token_slots(batch, adapters, rng)
    ranks = adapter_ranks(rank, max(slots) + 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    row = {"batch": batch, "adapters": adapters, "distinct": len(ranks), "rank": rank,
           "bytes": 0, "groups": {}}
    impls = ["ours", "torch"] + (["vllm"] if peers_dir else [])
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype != torch.float32 else {}
    for group in groups:
        nbytes = roofline_bytes(group, ranks, batch, torch.finfo(dtype).bits // 8)
        copies = 1 if device.type == "cpu" else min(MAX_COPIES, -(-2 * L2_BYTES // nbytes))
        data = [GroupCopy(group, slots, ranks, dtype, device, gen) for _ in range(copies)]
        launch = {"ours": [d.ours for d in data], "torch": [d.reference for d in data]}
        if peers_dir:
            launch["vllm"] = [d.vllm(peers_dir) for d in data]
        result: dict = {"bytes": nbytes, "copies": copies, "max_err": {}}
        first, y0 = data[0], data[0].y.clone()
        expected = first.reference().float()
        for impl in impls:  # one launch each from the same y: all must agree
            first.y.copy_(y0)
            got = launch[impl][0]().float()
            result["max_err"][impl] = (got - expected).abs().max().item()
            torch.testing.assert_close(got, expected, **tolerance,
                                       msg=lambda m, at=f"{group.name} {impl}": f"{at}: {m}")
        for impl in impls:
            if device.type == "cuda":
                result[impl] = time_launches(launch[impl], repeats)
            else:
                start = time.perf_counter()
                launch[impl][0]()
                result[impl] = time.perf_counter() - start
        row["groups"][group.name] = result
        row["bytes"] += nbytes
    for impl in impls:
        row[impl] = sum(g[impl] for g in row["groups"].values())
    return row


def markdown(rows: list[dict], copy_bw: float | None, has_vllm: bool, device: str) -> str:
    vllm_head = " vLLM (us) |" if has_vllm else ""
    method = (f"CUDA graphs, cold L2; copy bandwidth {copy_bw / 1e12:.2f} TB/s" if copy_bw
              else "one interpreted launch each, times meaningless")
    lines = [f"Device: {device}; times per decoder layer (qkv + o + gate/up + down); {method}.",
             "",
             (f"| batch | adapters | distinct | rank | MB | ours (us) | torch (us) |{vllm_head}"
              " ours % of copy bw |"),
             "|---:|---|---:|---|---:|---:|---:|" + ("---:|" if has_vllm else "") + "---:|"]
    for r in rows:
        vllm_cell = f" {r['vllm'] * 1e6:.1f} |" if has_vllm else ""
        pct = f"{100 * r['bytes'] / r['ours'] / copy_bw:.0f}%" if copy_bw else "-"
        lines.append(f"| {r['batch']} | {r['adapters']} | {r['distinct']} | {r['rank']} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['ours'] * 1e6:.1f} | {r['torch'] * 1e6:.1f} |"
                     f"{vllm_cell} {pct} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--batches", default="1,4,16,64,256")
    parser.add_argument("--adapters", default="1,8,sqrt,B,zipf")
    parser.add_argument("--ranks", default="8,16,64,mixed")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peers", type=Path, default=DEFAULT_PEERS_DIR)
    parser.add_argument("--out", type=Path, help="JSON results")
    parser.add_argument("--md", type=Path, help="Markdown table")
    args = parser.parse_args(argv)
    if args.smoke:
        assert os.environ.get("TRITON_INTERPRET") == "1", (
            "--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        groups, device, dtype = SMOKE, torch.device("cpu"), torch.float16
        batches, adapters, ranks = [1, 5], ["1", "B"], ["8", "mixed"]
    else:
        assert torch.cuda.is_available(), "the benchmark needs a GPU; --smoke runs on the CPU"
        groups, device, dtype = LLAMA3_8B, torch.device("cuda"), torch.bfloat16
        batches = [int(b) for b in args.batches.split(",")]
        adapters, ranks = args.adapters.split(","), args.ranks.split(",")
    missing = vllm_missing(args.peers)
    print(f"vLLM LoRA ops: {missing or 'loaded from ' + str(args.peers)}")
    peers_dir = None if missing else args.peers
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for batch in batches:
        for adapter in adapters:
            for rank in ranks:
                rows.append(run_cell(groups, batch, adapter, rank, dtype, device, peers_dir,
                                     args.repeats, seed=0))
                print(f"batch {batch} adapters {adapter} rank {rank}: "
                      f"ours {rows[-1]['ours'] * 1e6:.1f} us", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    table = markdown(rows, copy_bw, peers_dir is not None, name)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "copy_bandwidth": copy_bw,
                                        "dtype": str(dtype), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
