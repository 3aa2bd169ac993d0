"""`loraplex bench cpu-variants`: the same server under variants (allocator, torch threads,
bf16, decode attention, linear layers), one after another in one run on the same workload: 8 adapters mixed, then the
base model only, per variant; ratios against the first variant."""

from __future__ import annotations

import os
from pathlib import Path

from .compare import CompareOptions, loraplex_server, mixed_and_base, say
from .report import Run, summarize, write_report
from .workload import WorkloadSpec

_LIB = "/usr/lib/x86_64-linux-gnu"
# name -> (environment added to the server's, extra server flags)
VARIANTS = {
    "glibc": ({}, []),
    "tcmalloc": ({"LD_PRELOAD": f"{_LIB}/libtcmalloc_minimal.so.4"}, []),
    "jemalloc": ({"LD_PRELOAD": f"{_LIB}/libjemalloc.so.2"}, []),
    "threads1": ({"OMP_NUM_THREADS": "1"}, []),
    # glibc's malloc asks for transparent huge pages on its mmaps (glibc 2.35+): fewer TLB
    # misses over the weights, slots and KV cache, which are streamed every step.
    "hugepages": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, []),
    # bf16 weights and activations: oneDNN's AVX512-BF16 / AMX paths where the CPU has them.
    "bf16": ({}, ["--dtype", "bfloat16"]),
    # Decode attention by padded gather and SDPA, as before the C kernel (the default now).
    "torch-attention": ({}, ["--decode-attention", "torch"]),
    "bf16-torch-attention": ({}, ["--dtype", "bfloat16", "--decode-attention", "torch"]),
    # The base's linear layers through torch's F.linear, as before oneDNN-packed weights.
    "torch-gemm": ({}, ["--cpu-gemm", "torch"]),
    "bf16-torch-gemm": ({}, ["--dtype", "bfloat16", "--cpu-gemm", "torch"]),
    # oneDNN at every step, as before the C kernel took fp32 steps of up to 64 rows.
    "onednn-gemm": ({}, ["--cpu-gemm", "onednn"]),
    # RMSNorm and the rotary embedding as transformers' torch ops, as before their C calls.
    "torch-layers": ({}, ["--cpu-layers", "torch"]),
    # A projection's base and adapters as two C calls, as before --lora-fuse took them in.
    "unfused": ({}, ["--no-lora-fuse"]),
    # Adapters stored in bf16 in the C kernel's slots: half the bytes each step streams.
    "lora-bf16": ({}, ["--lora-dtype", "bfloat16"]),
    "bf16-lora-bf16": ({}, ["--dtype", "bfloat16", "--lora-dtype", "bfloat16"]),
}


def available(name: str) -> bool:
    lib = VARIANTS[name][0].get("LD_PRELOAD")
    return lib is None or os.path.exists(lib)


def cpu_variants(spec: WorkloadSpec, opts: CompareOptions, names: list[str],
                 out_dir: str | Path, workload_desc: dict) -> tuple[Path, list[str]]:
    runs: list[Run] = []
    for name in names:
        if not available(name):
            say(f"{name}: {VARIANTS[name][0]['LD_PRELOAD']} is not installed: skipped")
            continue
        env, flags = VARIANTS[name]
        args = ["--quantization", opts.quantization, *opts.server_args, *flags]
        with loraplex_server(opts.port, opts.adapters, opts.model, args, env=env) as url:
            runs += mixed_and_base(spec, url, name, opts.concurrency)
    path = write_report(out_dir, runs, "loraplex under CPU variants", workload_desc, opts.slo,
                        baseline=runs[0].name)
    lines = ratio_lines(runs)
    with path.open("a") as f:
        f.write("\n## Variants\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    return path, lines


def ratio_lines(runs: list[Run]) -> list[str]:
    tok = {run.name: summarize(run)["output_tok_per_s"] for run in runs}
    names = list(dict.fromkeys(n.split(",")[0] for n in tok))
    first = names[0]
    lines = []
    for name in names:
        mixed, base = tok[f"{name}, 8 adapters mixed"], tok[f"{name}, base only"]
        lines.append(
            f"{name}: mixed {mixed:.1f} tok/s ({mixed / tok[f'{first}, 8 adapters mixed']:.2f}x "
            f"{first}), base only {base:.1f} tok/s ({base / tok[f'{first}, base only']:.2f}x), "
            f"LoRA overhead {100 * (base / mixed - 1):.1f}%")
    return lines
