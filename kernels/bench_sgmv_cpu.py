"""The CPU LoRA path of one decode step: the C kernel against the torch reference, side by side.

    python -m loraplex.kernels.bench_sgmv_cpu [--adapters 8] [--tokens 32] [--layers 30]
        [--ranks 8,16,32,64] [--against OLD_sgmv_cpu.c]

Shapes are SmolLM2-135M's seven projections per layer (hidden 576, KV width 192, MLP 1536),
the embedded model's; adapters take `--ranks` in turn on every projection, and the step's
tokens are shared equally among them, as in a decode batch (fewer tokens than adapters: one
token each for the first ones, as in the tail of a run). Every projection has its
own weights, so each step streams all of them from memory as a real forward does (they do
not fit in cache). Each path reads the same weights in its own storage, as the engine keeps
them: the reference PEFT's layout padded to rank 64, the kernel `PackedSlots`. Reported: the
median step time of each path and their ratio, with the results checked against each other.

`--with-base` also gives each projection a base weight (the C kernel's dense copy, as the
engine keeps fp32 bases at decode) and times the base alone, the base then the adapters as two
calls, and both in one call (`linear_lora_cpu`, the engine's default), in turn: the adapters'
cost is each path's time over the base alone's.

`--against` builds another version of sgmv_cpu.c (`git show REV:kernels/sgmv_cpu.c > old.c`)
with the same entry points, packs the same weights for it, checks its results against this
one's, and times the two in turn, repeat by repeat: a change to the kernel measured side by
side in one run.
"""

from __future__ import annotations

import argparse
import pathlib
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


def make_step(libs, num_adapters: int, num_tokens: int, num_layers: int,
              ranks_cycle: tuple[int, ...] = RANKS, rank_cap: int = 64):
    """Each projection's weights in PEFT's layout and packed once per library in `libs`."""
    gen = torch.Generator().manual_seed(0)
    ranks = torch.tensor([ranks_cycle[i % len(ranks_cycle)] for i in range(num_adapters)],
                         dtype=torch.int32)
    scales = torch.full((num_adapters,), 2.0)
    segments = Segments.from_token_slots(
        [i * num_adapters // num_tokens if num_tokens >= num_adapters else i
         for i in range(num_tokens)])
    # one arena per library, as the engine's LoRAModel allocates its slots
    arenas = [sgmv_cpu.SlotArena(sgmv_cpu.SlotArena.size([
        (num_adapters * sgmv_cpu.slot_stride(rank_cap, i, o), lib.weight_dtype)
        for i, o in SMOLLM2_LAYER] * num_layers)) for lib in libs]
    projections = []
    for _ in range(num_layers):
        for in_features, out in SMOLLM2_LAYER:
            lora_a = torch.randn(num_adapters, rank_cap, in_features, generator=gen)
            lora_a /= in_features ** 0.5
            lora_b = torch.randn(num_adapters, out, rank_cap, generator=gen) / rank_cap
            packed = []
            for lib, arena in zip(libs, arenas):
                packed.append(sgmv_cpu.PackedSlots(lib, num_adapters, rank_cap, in_features,
                                                   out, ranks, scales, arena))
                for s, r in enumerate(ranks.tolist()):
                    packed[-1].write(s, lora_a[s, :r], lora_b[s, :, :r])
            x = torch.randn(num_tokens, in_features, generator=gen)
            projections.append((lora_a, lora_b, packed, x, torch.zeros(num_tokens, out)))
    return projections, segments, ranks.tolist(), scales.tolist()


def time_step(run, repeats: int, warm: bool = True) -> float:
    if warm:
        run()
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
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)),
                    help="ranks the adapters take in turn (at most 64)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--against", type=pathlib.Path,
                    help="another sgmv_cpu.c to time beside this one, in turn")
    ap.add_argument("--with-base", action="store_true",
                    help="time the adapters with each projection's base: two calls against one")
    args = ap.parse_args(argv)
    ranks_cycle = tuple(int(r) for r in args.ranks.split(","))
    if not all(0 < r <= 64 for r in ranks_cycle):
        ap.error("--ranks: between 1 and 64")

    libs = [sgmv_cpu.load()]
    if args.against is not None:
        libs.append(sgmv_cpu.load_source(args.against))
    if None in libs:
        print("the C kernel could not be built here (no C compiler?)", file=sys.stderr)
        return 1
    projections, segments, ranks, scales = make_step(libs, args.adapters, args.tokens,
                                                     args.layers, ranks_cycle)
    table = sgmv_cpu.SegmentTable(segments)
    used = {s for s in segments.slots if s >= 0}
    weight_mb = sum(4 * ranks[s] * (a.shape[2] + b.shape[1]) for a, b, *_ in projections
                    for s in used) / 2**20

    def reference():
        for lora_a, lora_b, _, x, y in projections:
            sgmv_ref(y, x, lora_a, lora_b, segments, ranks, scales)

    def kernel(k: int):
        def run():
            for _, _, packed, x, y in projections:
                sgmv_cpu.sgmv_cpu(y, x, packed[k], table)
        return run

    lora_a, lora_b, packed, x, _ = projections[-1]
    want = sgmv_ref(torch.zeros(args.tokens, lora_b.shape[1]), x, lora_a, lora_b, segments,
                    ranks, scales)
    for p in packed:
        got = sgmv_cpu.sgmv_cpu(torch.zeros_like(want), x, p, table)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    print(f"{len(projections)} projections, {args.adapters} adapters (ranks "
          f"{'/'.join(map(str, sorted(set(ranks))))}), {args.tokens} tokens, {weight_mb:.0f} MB "
          f"of adapter weights read per step, {torch.get_num_threads()} threads", flush=True)
    t_ref = time_step(reference, args.repeats)
    paths = ["C kernel"] + ([f"C kernel from {args.against}"] if args.against else [])
    runs = [kernel(k) for k in range(len(libs))]
    for run in runs:  # warm-up
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):
        for k, run in enumerate(runs):
            times[k].append(time_step(run, 1, warm=False))
    t_kernel = [statistics.median(t) for t in times]
    print("| path | ms per step |\n|---|---|\n" f"| torch reference | {1e3 * t_ref:.1f} |")
    for path, t in zip(paths, t_kernel):
        print(f"| {path} | {1e3 * t:.2f} |")
    print(f"\nkernel speed-up: {t_ref / t_kernel[0]:.2f}x")
    if args.with_base:
        with_base(libs[0], projections, segments, args.repeats)
    if args.against:
        print(f"this kernel against {args.against}: {t_kernel[1] / t_kernel[0]:.3f}x "
              f"({1e3 * t_kernel[0]:.2f} against {1e3 * t_kernel[1]:.2f} ms per step)")
    return 0


def with_base(lib, projections, segments: Segments, repeats: int) -> None:
    """The base alone, base then adapters (two calls), and both in one call, over the step's
    projections, in turn repeat by repeat; the last two checked equal to the bit."""
    gen = torch.Generator().manual_seed(1)
    arena = sgmv_cpu.SlotArena(sgmv_cpu.SlotArena.size([
        (sgmv_cpu.DenseWeights.numel(x.shape[1], y.shape[1]), torch.float32)
        for *_, x, y in projections]))
    dense = [sgmv_cpu.DenseWeights(lib, torch.randn(y.shape[1], x.shape[1], generator=gen)
                                   / x.shape[1] ** 0.5, None, arena) for *_, x, y in projections]
    table = sgmv_cpu.SegmentTable(segments)
    fused_table = sgmv_cpu.SegmentTable(segments, 64, segments.num_tokens)
    work = [(d, packed[0], x) for d, (_, _, packed, x, _) in zip(dense, projections)]
    d, w, x = work[-1]
    two = sgmv_cpu.sgmv_cpu(sgmv_cpu.dense_cpu(x, d), x, w, table)
    assert torch.equal(sgmv_cpu.linear_lora_cpu(x, d, w, fused_table), two)

    paths = {"base alone": lambda: [sgmv_cpu.dense_cpu(x, d) for d, _, x in work],
             "base, then adapters": lambda: [sgmv_cpu.sgmv_cpu(sgmv_cpu.dense_cpu(x, d), x, w,
                                                               table) for d, w, x in work],
             "one call": lambda: [sgmv_cpu.linear_lora_cpu(x, d, w, fused_table)
                                  for d, w, x in work]}
    times = {name: [] for name in paths}
    for run in paths.values():
        run()
    for _ in range(repeats):
        for name, run in paths.items():
            times[name].append(time_step(run, 1, warm=False))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    base = ms["base alone"]
    print("\n| with the base | ms per step | adapters' cost |\n|---|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {'-' if t == base else f'{t - base:.2f} ms'} |")
    print(f"\nthe adapters' cost, one call against two: "
          f"{(ms['one call'] - base) / (ms['base, then adapters'] - base):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
