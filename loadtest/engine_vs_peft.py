"""Offline throughput: the loraplex engine vs transformers + PEFT on the same requests.

    python -m loraplex.loadtest.engine_vs_peft [--requests 32] [--adapters 8] [--model DIR]

Both sides get the same mixed-adapter requests (greedy, exact output lengths, EOS ignored)
and run in this one process, one after the other:
- loraplex: every request submitted at once to the continuous-batching engine;
- PEFT: a PeftModel holding every adapter, static left-padded batches of `--peft-batch`
  requests via `generate(adapter_names=...)`, each batch decoding to its longest request.
  Tokens past a request's own length are waste, and are not counted.
A third run, the engine serving the same requests on the base model only, gives the LoRA
overhead. Output tok/s counts requested tokens only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TEXT = ("The history of mathematics spans thousands of years, from counting with tally marks "
        "to modern abstract algebra. Early civilizations in Mesopotamia and Egypt developed "
        "arithmetic for trade and astronomy, while Greek scholars introduced proofs. Later, "
        "scholars in India and the Islamic world refined algebra and the decimal system. ")


@dataclass(frozen=True)
class Req:
    prompt: list[int]
    adapter: str | None
    max_tokens: int


def make_requests(tokenizer, adapters: list[str], count: int, seed: int,
                  prompt_range=(8, 96), output_range=(16, 96)) -> list[Req]:
    rng = random.Random(seed)
    words = tokenizer.encode(TEXT * 4)
    reqs = []
    for i in range(count):
        n = rng.randint(*prompt_range)
        start = rng.randrange(0, len(words) - n)
        reqs.append(Req(words[start:start + n], adapters[i % len(adapters)],
                        rng.randint(*output_range)))
    return reqs


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_engine(engine, reqs: list[Req], base_only: bool = False) -> tuple[float, list[list[int]]]:
    from loraplex.server.engine.request import SamplingParams

    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(reqs))}
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(str(i), r.prompt,
                           SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True),
                           None if base_only else r.adapter,
                           callback=lambda out: outputs[out.request_id].extend(out.new_token_ids))
    done, total = 0, sum(r.max_tokens for r in reqs)
    while engine.has_unfinished():
        done += len(engine.step())
        print(f"\r  engine: {done}/{total} tokens", end="", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    print(file=sys.stderr)
    return elapsed, [outputs[str(i)] for i in range(len(reqs))]


def run_peft(baseline, reqs: list[Req], batch: int) -> tuple[float, list[list[int]]]:
    outputs = []
    t0 = time.perf_counter()
    for b in range(0, len(reqs), batch):
        chunk = reqs[b:b + batch]
        outputs += baseline.generate([(r.adapter, r.prompt, r.max_tokens) for r in chunk])[0]
        _say(f"  peft: batch {b // batch + 1}/{-(-len(reqs) // batch)} "
             f"({time.perf_counter() - t0:.1f}s)")
    return time.perf_counter() - t0, outputs


def main(argv: list[str] | None = None) -> int:
    from loraplex.loadtest.fixtures import make_benchmark_adapters
    from loraplex.loadtest.peft_baseline import PeftBaseline
    from loraplex.server.config import (
        CacheConfig,
        EngineConfig,
        LoRAConfig,
        ModelConfig,
        SchedulerConfig,
    )
    from loraplex.server.engine.engine import LLMEngine
    from loraplex.server.runner.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--peft-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(model=args.model, quantization=args.quantization)
    with tempfile.TemporaryDirectory() as tmp:
        _say(f"making {args.adapters} adapters (ranks 8-64, all linear layers)")
        adapters = make_benchmark_adapters(
            lambda: load_model(ModelConfig(model=args.model, quantization="none")).model, tmp,
            args.adapters, seed=args.seed,
            progress=lambda i, n: _say(f"  adapter {i}/{n}"))
        engine = LLMEngine(EngineConfig(
            model=model_cfg, cache=CacheConfig(), scheduler=SchedulerConfig(),
            lora=LoRAConfig(max_loras=max(args.adapters, 1), max_lora_rank=64)))
        for name, path in adapters.items():
            engine.register_adapter(name, str(path))
        reqs = make_requests(engine.tokenizer, list(adapters), args.requests, args.seed)
        useful = sum(r.max_tokens for r in reqs)
        _say(f"{len(reqs)} requests, {useful} output tokens, "
             f"prompts {min(len(r.prompt) for r in reqs)}-{max(len(r.prompt) for r in reqs)} "
             f"tokens, outputs {min(r.max_tokens for r in reqs)}-{max(r.max_tokens for r in reqs)}")

        _say("loraplex engine, mixed adapters")
        t_lora, out_lora = run_engine(engine, reqs)
        _say("loraplex engine, base model only")
        t_base, _ = run_engine(engine, reqs, base_only=True)
        del engine

        loaded = load_model(model_cfg)
        baseline = PeftBaseline(loaded.model, loaded.tokenizer,
                                {name: str(path) for name, path in adapters.items()})
        _say(f"transformers + PEFT, static batches of {args.peft_batch}")
        t_peft, out_peft = run_peft(baseline, reqs, args.peft_batch)

    same = sum(a == b for a, b in zip(out_lora, out_peft))
    results = {
        "model": loaded.name, "quantization": args.quantization, "threads": torch.get_num_threads(),
        "requests": len(reqs), "adapters": args.adapters, "output_tokens": useful,
        "loraplex_s": round(t_lora, 2), "loraplex_tok_s": round(useful / t_lora, 1),
        "loraplex_base_only_tok_s": round(useful / t_base, 1),
        "peft_s": round(t_peft, 2), "peft_tok_s": round(useful / t_peft, 1),
        "speedup_vs_peft": round(t_peft / t_lora, 2),
        "lora_overhead_vs_base": round(t_lora / t_base - 1, 3),
        "requests_identical_to_peft": f"{same}/{len(reqs)}",
        "request_list": [dict(asdict(r), prompt=len(r.prompt)) for r in reqs],
    }
    print(f"\n| system | output tok/s | time (s) |\n|---|---|---|\n"
          f"| loraplex, {args.adapters} adapters mixed | {results['loraplex_tok_s']} | {t_lora:.1f} |\n"
          f"| loraplex, base model only | {results['loraplex_base_only_tok_s']} | {t_base:.1f} |\n"
          f"| transformers + PEFT, batch {args.peft_batch} | {results['peft_tok_s']} | {t_peft:.1f} |\n"
          f"\nspeed-up vs PEFT: {results['speedup_vs_peft']}x; LoRA overhead vs base-only: "
          f"{100 * results['lora_overhead_vs_base']:.1f}%; identical greedy outputs: "
          f"{results['requests_identical_to_peft']} (batched PEFT pads, so a few may differ "
          f"at near-ties)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
