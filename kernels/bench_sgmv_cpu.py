"""The CPU LoRA path of one decode step: the C kernel against the torch reference, side by side.

    python -m loraplex.kernels.bench_sgmv_cpu [--adapters 8] [--tokens 32] [--layers 30]

Shapes are SmolLM2-135M's seven projections per layer (hidden 576, KV width 192, MLP 1536),
the embedded model's; adapters take ranks 8, 16, 32, 64 in turn on every projection, and the
step's tokens are shared equally among them, as in a decode batch. Every projection has its
own weights, so each step streams all of them from memory as a real forward does (they do
not fit in cache). Each path reads the same weights in its own storage, as the engine keeps
them: the reference PEFT's layout padded to rank 64, the kernel `PackedSlots`. Reported: the
median step time of each path and their ratio, with the results checked against each other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import sgmv_cpu
from .segments import Segments
from .sgmv import sgmv_ref

SMOLLM2_LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536),
                 (1536, 576)]  # q, k, v, o, gate, up, down: (in, out)
RANKS = (8, 16, 32, 64)


def make_step(lib, num_adapters: int, num_tokens: int, num_layers: int, rank_cap: int = 64):
    gen = torch.Generator().manual_seed(0)
    ranks = torch.tensor([RANKS[i % len(RANKS)] for i in range(num_adapters)],
                         dtype=torch.int32)
    scales = torch.full((num_adapters,), 2.0)
    segments = Segments.from_token_slots(
        [i * num_adapters // num_tokens for i in range(num_tokens)])
    projections = []
    for _ in range(num_layers):
        for in_features, out in SMOLLM2_LAYER:
            lora_a = torch.randn(num_adapters, rank_cap, in_features, generator=gen)
            lora_a /= in_features ** 0.5
            lora_b = torch.randn(num_adapters, out, rank_cap, generator=gen) / rank_cap
            packed = sgmv_cpu.PackedSlots(lib, num_adapters, rank_cap, in_features, out,
                                          ranks, scales)
            for s, r in enumerate(ranks.tolist()):
                packed.write(s, lora_a[s, :r], lora_b[s, :, :r])
            x = torch.randn(num_tokens, in_features, generator=gen)
            projections.append((lora_a, lora_b, packed, x, torch.zeros(num_tokens, out)))
    return projections, segments, ranks.tolist(), scales.tolist()


def time_step(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)

    lib = sgmv_cpu.load()
    if lib is None:
        print("the C kernel could not be built here (no C compiler?)", file=sys.stderr)
        return 1
    projections, segments, ranks, scales = make_step(lib, args.adapters, args.tokens,
                                                     args.layers)
    table = sgmv_cpu.SegmentTable(segments)
    weight_mb = sum(4 * r * (a.shape[2] + b.shape[1]) for a, b, *_ in projections
                    for r in ranks) / 2**20

    def reference():
        for lora_a, lora_b, _, x, y in projections:
            sgmv_ref(y, x, lora_a, lora_b, segments, ranks, scales)

    def kernel():
        for _, _, packed, x, y in projections:
            sgmv_cpu.sgmv_cpu(y, x, packed, table)

    lora_a, lora_b, packed, x, _ = projections[-1]
    want = sgmv_ref(torch.zeros(args.tokens, lora_b.shape[1]), x, lora_a, lora_b, segments,
                    ranks, scales)
    got = sgmv_cpu.sgmv_cpu(torch.zeros_like(want), x, packed, table)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    print(f"{len(projections)} projections, {args.adapters} adapters (ranks "
          f"{'/'.join(map(str, sorted(set(ranks))))}), {args.tokens} tokens, {weight_mb:.0f} MB "
          f"of adapter weights read per step, {torch.get_num_threads()} threads", flush=True)
    t_ref = time_step(reference, args.repeats)
    t_kernel = time_step(kernel, args.repeats)
    print(f"| path | ms per step |\n|---|---|\n| torch reference | {1e3 * t_ref:.1f} |\n"
          f"| C kernel | {1e3 * t_kernel:.1f} |\n\nkernel speed-up: {t_ref / t_kernel:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
