"""Merging an adapter into the base: what it buys and what it costs, measured in one run.

    python -m loraplex.loadtest.merge_bench [--model DIR] [--out docs/merge] [--smoke]

1. Single tenant: the same requests, all for one adapter, served unmerged (SGMV), merged,
   and by the base model alone; output tok/s and their ratios. Also the seconds a whole
   merge and unmerge take on an idle engine, and the memory kept aside while merged.
2. A traffic trace that shifts from mixed (`--adapters`, 8) to one hot adapter and back, with a
   fixed number of requests in flight (closed loop), run with --auto-merge off and on:
   throughput over time with the switch points (throughput.png), and the totals.
3. While an adapter is merged, other requests drained (they wait for an unmerge) or
   corrected (they run beside it, taking its delta back out): closed loop at several shares
   of requests for the merged adapter, against not merging at all; output tok/s, switches,
   and the mean latency of the merged adapter's requests and of the others.
4. Drift of an NF4 base merged and quantized again (PEFT's merge, which ours equals bit for
   bit) and of the dense option, against the unmerged NF4 base + LoRA: the largest logit
   error and greedy agreement over `--drift-prompts` prompts; beside them the fp32 base +
   LoRA against the same, which is NF4's own error.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from .engine_vs_peft import TEXT, Req, make_requests

HOT = "bench-001"  # rank 16 (make_benchmark_adapters cycles 8, 16, 32, 64)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _engine(model: str | None, quantization: str, adapters: dict, **merge):
    from loraplex.server.config import (
        CacheConfig,
        EngineConfig,
        LoRAConfig,
        MergeConfig,
        ModelConfig,
    )
    from loraplex.server.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=model, quantization=quantization), cache=CacheConfig(),
        lora=LoRAConfig(max_loras=len(adapters), max_lora_rank=64), merge=MergeConfig(**merge)))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


def _drain(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def _serve(engine, reqs: list[Req], label: str) -> tuple[float, list[list[int]]]:
    from loraplex.server.engine.request import SamplingParams

    out: dict[str, list[int]] = {str(i): [] for i in range(len(reqs))}
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(f"{label}-{i}", r.prompt,
                           SamplingParams(max_tokens=r.max_tokens, temperature=0.0,
                                          ignore_eos=True), r.adapter,
                           callback=lambda o: out[o.request_id.rsplit("-", 1)[1]].extend(
                               o.new_token_ids))
    done, total = 0, sum(r.max_tokens for r in reqs)
    while engine.has_unfinished():
        done += len(engine.step())
        print(f"\r  {label}: {done}/{total} tokens", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return time.perf_counter() - t0, [out[str(i)] for i in range(len(reqs))]


def single_tenant(args, adapters: dict) -> dict:
    """`--rounds` rounds of the three modes (unmerged, merged, base only) on the same
    requests, the order rotated each round so that every mode runs first, second and last
    once in three rounds: this VM speeds up and slows down over minutes, and a fixed order
    would credit that to whichever mode runs last. Merges happen on an idle engine (every
    layer at once) and are timed, as are unmerges."""
    engine = _engine(args.model, "none", adapters)
    low, high = map(int, args.single_tokens.split(","))
    reqs = make_requests(engine.tokenizer, [HOT], args.requests, args.seed,
                         output_range=(low, high))
    base = [Req(r.prompt, None, r.max_tokens) for r in reqs]
    tokens = sum(r.max_tokens for r in reqs)
    _serve(engine, reqs[:2], "warm-up")
    modes = ["unmerged", "merged", "base"]
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    switch_s: dict[str, list[float]] = {"merge": [], "unmerge": []}
    outputs: dict[str, list[list[int]]] = {}
    kept = 0

    def switch(target: str | None, direction: str) -> None:
        t0 = time.perf_counter()
        engine.merger.request(target)
        _drain(engine)
        switch_s[direction].append(round(time.perf_counter() - t0, 3))

    for k in range(args.rounds):
        order = modes[k % 3:] + modes[:k % 3]
        for mode in order:
            if mode == "merged":
                switch(HOT, "merge")
                kept = engine.merger.status()["kept_aside_bytes"]
            elapsed, outputs[mode] = _serve(engine, base if mode == "base" else reqs,
                                            f"{k}-{mode}")
            if mode == "merged":
                assert engine.merger.state == "merged"
                switch(None, "unmerge")
            seconds[mode].append(elapsed)
    rate = {m: [round(tokens / t, 1) for t in ts] for m, ts in seconds.items()}
    total = {m: sum(ts) for m, ts in seconds.items()}
    same = sum(a == b for a, b in zip(outputs["unmerged"], outputs["merged"]))
    return {"requests": len(reqs), "output_tokens": tokens, "adapter": HOT, "rank": 16,
            "rounds": args.rounds, "tok_s_by_round": rate,
            "tok_s": {m: round(tokens * args.rounds / t, 1) for m, t in total.items()},
            "merged_vs_unmerged": round(total["unmerged"] / total["merged"], 3),
            "merged_vs_base": round(total["base"] / total["merged"], 3),
            "merge_s": switch_s["merge"], "unmerge_s": switch_s["unmerge"],
            "kept_aside_mb": round(kept / 2**20, 1),
            "identical_outputs_merged_vs_unmerged": f"{same}/{len(reqs)}"}


def others(args, adapters: dict) -> list[dict]:
    """Part 3: `--concurrency` requests in flight for `--phase` seconds per run; a new
    request is for HOT with probability `share`, else for another adapter or the base model
    alike. HOT pinned merged (--merge) with the others drained or corrected, and not merged
    at all, one after another at each share."""
    from loraplex.server.engine.request import SamplingParams

    rows = []
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    names = [n for n in adapters if n != HOT] + [None]
    for share in [float(x) for x in args.shares.split(",")]:
        for mode in ("unmerged", "drain", "correct"):
            engine = _engine(args.model, "none", adapters, window_s=args.window,
                             adapter=None if mode == "unmerged" else HOT,
                             others="drain" if mode == "drain" else "correct")
            _drain(engine)  # merged on the idle engine before the clock starts
            rng = random.Random(args.seed)
            words = engine.tokenizer.encode(TEXT * 4)
            sent: dict[str, tuple[float, bool]] = {}  # request id -> (arrival, is HOT's)
            latency: dict[bool, list[float]] = {True: [], False: []}
            tokens = 0
            t0 = time.perf_counter()
            while (t := time.perf_counter() - t0) < args.phase:
                while engine.scheduler.num_running + engine.scheduler.num_waiting \
                        < args.concurrency:
                    n = rng.randint(16, 48)
                    start = rng.randrange(0, len(words) - n)
                    hot = rng.random() < share
                    rid = f"o{len(sent)}"
                    engine.add_request(rid, words[start:start + n], params,
                                       HOT if hot else rng.choice(names))
                    sent[rid] = (time.perf_counter(), hot)
                for out in engine.step():
                    tokens += len(out.new_token_ids)
                    if out.finished:
                        arrived, hot = sent[out.request_id]
                        latency[hot].append(time.perf_counter() - arrived)
                print(f"\r  others: share {share:.2f} {mode:8} {t:5.1f}/{args.phase} s "
                      f"{engine.merger.state:9}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            elapsed = time.perf_counter() - t0
            for rid in [r.request_id for r in (*engine.scheduler.running,
                                               *engine.scheduler.waiting)]:
                engine.abort(rid)
            _drain(engine)
            rows.append({"hot_share": share, "mode": mode,
                         "tok_s": round(tokens / elapsed, 1),
                         "switches": dict(engine.merger.switches),
                         "hot_latency_s": _mean(latency[True]),
                         "others_latency_s": _mean(latency[False]),
                         "completed": {"hot": len(latency[True]),
                                       "others": len(latency[False])}})
            _say(f"  {rows[-1]}")
    return rows


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def trace(args, adapters: dict, auto: bool) -> dict:
    """Closed loop: `--concurrency` requests in flight; each finished one is replaced by a
    new one whose adapter the current phase draws (mixed: any adapter; hot: HOT only)."""
    from loraplex.server.engine.request import SamplingParams

    engine = _engine(args.model, "none", adapters, auto=auto, threshold=args.threshold,
                     window_s=args.window)
    rng = random.Random(args.seed)
    words = engine.tokenizer.encode(TEXT * 4)
    phases = [("mixed", args.phase), ("hot", 2 * args.phase), ("mixed", args.phase)]
    ends = [sum(p[1] for p in phases[:i + 1]) for i in range(len(phases))]
    names = list(adapters)
    events: list[tuple[float, int]] = []  # (seconds since start, tokens this step)
    switches: list[tuple[float, str]] = []
    counter = 0
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.merger.on_switch = lambda direction, name: (
        switches.append((time.perf_counter() - t0, direction)),
        engine._stats.merge_switches.append(direction))

    def phase_at(t: float) -> str:
        return next((p[0] for p, end in zip(phases, ends) if t < end), "")

    def add(phase: str) -> None:
        nonlocal counter
        n = rng.randint(16, 48)
        start = rng.randrange(0, len(words) - n)
        adapter = HOT if phase == "hot" else rng.choice(names)
        engine.add_request(f"t{counter}", words[start:start + n], params, adapter)
        counter += 1

    while True:
        t = time.perf_counter() - t0
        phase = phase_at(t)
        if not phase:
            break
        while engine.scheduler.num_running + engine.scheduler.num_waiting < args.concurrency:
            add(phase)
        outputs = engine.step()
        events.append((time.perf_counter() - t0, len(outputs)))
        print(f"\r  trace auto-merge {'on' if auto else 'off'}: {t:5.1f}/{ends[-1]} s {phase:5}"
              f" {engine.merger.state:9}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for rid in [r.request_id for r in (*engine.scheduler.running, *engine.scheduler.waiting)]:
        engine.abort(rid)
    buckets = [0] * int(ends[-1] + 1)
    for t, n in events:
        if int(t) < len(buckets):
            buckets[int(t)] += n
    per_phase = {}
    for i, (name, _) in enumerate(phases):
        lo = ends[i - 1] if i else 0
        n = sum(c for t, c in events if lo <= t < ends[i])
        per_phase[f"{i + 1}-{name}"] = round(n / (ends[i] - lo), 1)
    return {"auto_merge": auto, "tok_s_by_second": buckets, "tok_s_by_phase": per_phase,
            "total_tokens": sum(n for _, n in events), "switches": switches,
            "phase_ends_s": ends}


@torch.no_grad()
def drift(args, adapters: dict) -> dict:
    """NF4: unmerged (PEFT: the NF4 base plus LoRA) vs merged and requantized (PEFT's merge,
    which adapters/merge.py equals bit for bit) vs merged dense (our option)."""
    import warnings

    from loraplex.adapters.merge import merge_module
    from loraplex.adapters.peft_format import load_adapter
    from loraplex.server.config import ModelConfig
    from loraplex.server.runner.loader import load_model
    from peft import PeftModel

    def fresh():
        return load_model(ModelConfig(model=args.model, quantization="nf4"))

    loaded = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerged = PeftModel.from_pretrained(loaded.model, str(adapters[HOT])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = PeftModel.from_pretrained(
            load_model(ModelConfig(model=args.model, quantization="none")).model,
            str(adapters[HOT])).eval()
    # The fp32 base + LoRA, unquantized: NF4's own error, the scale to read the others by.
    variants = {"unmerged": unmerged, "fp32 base, unmerged (NF4's own error)": fp32}
    for dense in (False, True):
        model = fresh().model
        modules = {n: m for n, m in model.named_modules()
                   if n.rsplit(".", 1)[-1].endswith("_proj")}
        shapes = {n: (m.in_features, m.out_features) for n, m in modules.items()}
        adapter = load_adapter(adapters[HOT], HOT, shapes, 64, torch.float32)
        for name, weights in adapter.modules.items():
            merged = merge_module(modules[name], weights, dense, torch.float32)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, merged.module)
        variants["dense" if dense else "requantized"] = model.eval()
    # Same prompts for all: slices of the text; each variant decodes greedily on its own.
    rng = random.Random(args.seed)
    words = loaded.tokenizer.encode(TEXT * 4)
    prompts = []
    for _ in range(args.drift_prompts):
        n = rng.randint(8, 32)
        start = rng.randrange(0, len(words) - n)
        prompts.append(words[start:start + n])
    result = {}
    greedy = {k: [] for k in variants}
    max_err = {k: 0.0 for k in variants if k != "unmerged"}
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        ref_logits = variants["unmerged"](input_ids=ids).logits[0, -1].float()
        for k, model in variants.items():
            if k != "unmerged":
                logits = model(input_ids=ids).logits[0, -1].float()
                max_err[k] = max(max_err[k], (logits - ref_logits).abs().max().item())
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=args.drift_tokens,
                                 eos_token_id=None, pad_token_id=0)
            greedy[k].append(out[0, ids.shape[1]:].tolist())
        print(f"\r  drift: {i + 1}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for k in max_err:
        same = sum(a == b for a, b in zip(greedy[k], greedy["unmerged"]))
        first = sum(a[0] == b[0] for a, b in zip(greedy[k], greedy["unmerged"]))
        result[k] = {"max_logit_error": round(max_err[k], 4),
                     "greedy_sequences_identical": f"{same}/{len(prompts)}",
                     "first_token_identical": f"{first}/{len(prompts)}"}
    result["prompts"], result["tokens_each"] = len(prompts), args.drift_tokens
    return result


def plot(traces: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for tr, color in zip(traces, ("tab:gray", "tab:blue")):
        label = f"auto-merge {'on' if tr['auto_merge'] else 'off'}"
        ax.plot(range(len(tr["tok_s_by_second"])), tr["tok_s_by_second"], color=color,
                label=label)
        for t, direction in tr["switches"]:
            ax.axvline(t, color=color, linestyle="--" if direction == "merge" else ":",
                       alpha=0.8)
    for end in traces[0]["phase_ends_s"][:-1]:
        ax.axvline(end, color="black", linewidth=0.5)
    ax.set_xlabel("seconds (phases: mixed | one hot adapter | mixed); dashed: merge, "
                  "dotted: unmerge")
    ax.set_ylabel("output tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    from loraplex.loadtest.fixtures import make_benchmark_adapters
    from loraplex.server.config import ModelConfig
    from loraplex.server.runner.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8, help="adapters of the mixed phases")
    ap.add_argument("--rounds", type=int, default=3, help="single-tenant rounds")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--single-tokens", default="16,96",
                    help="part 1: each request's new tokens, drawn from LOW,HIGH")
    ap.add_argument("--phase", type=float, default=20.0, help="seconds of each mixed phase "
                    "(the hot phase lasts twice as long)")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--drift-prompts", type=int, default=100)
    ap.add_argument("--drift-tokens", type=int, default=16)
    ap.add_argument("--shares", default="1.0,0.9,0.7,0.5",
                    help="part 3: shares of requests for the merged adapter")
    ap.add_argument("--parts", default="single,trace,others,drift")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for results.json and throughput.png")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.phase, args.window, args.rounds = 2, 1.0, 0.3, 1
        args.shares = "0.5"
        args.adapters = 2
        args.drift_prompts, args.drift_tokens, args.output_tokens = 2, 2, 4
        args.single_tokens = "4,8"
    parts = set(args.parts.split(","))
    results: dict = {"model": args.model or "embedded SmolLM2-135M-Instruct", "dtype": "float32",
                     "threads": torch.get_num_threads(), "argv": argv or sys.argv[1:]}
    with tempfile.TemporaryDirectory() as tmp:
        _say(f"making {args.adapters} adapters (ranks 8-64, all linear layers)")
        adapters = make_benchmark_adapters(
            lambda: load_model(ModelConfig(model=args.model, quantization="none")).model, tmp,
            max(args.adapters, 2), seed=args.seed,
            progress=lambda i, n: _say(f"  adapter {i}/{n}"))
        if "single" in parts:
            _say("1. single tenant: unmerged, merged, base only")
            results["single_tenant"] = single_tenant(args, adapters)
            _say(json.dumps(results["single_tenant"]))
        if "trace" in parts:
            _say("2. traffic trace, auto-merge off then on")
            results["trace"] = [trace(args, adapters, auto) for auto in (False, True)]
            for tr in results["trace"]:
                _say(f"  auto-merge {tr['auto_merge']}: {tr['tok_s_by_phase']}, "
                     f"switches {tr['switches']}")
        if "others" in parts:
            _say("3. others drained or corrected while an adapter is merged")
            results["others"] = others(args, adapters)
        if "drift" in parts:
            _say("4. NF4 drift: merged and requantized, merged dense, vs unmerged")
            results["drift_nf4"] = drift(args, adapters)
            _say(json.dumps(results["drift_nf4"]))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text)
        if "trace" in results:
            plot(results["trace"], out / "throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
