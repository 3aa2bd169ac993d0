"""The engine on a large model's shapes: 1 and N adapters mixed vs the base model alone vs
transformers + PEFT, for each quantization, in one process, results written as they come.

    python -m loraplex.loadtest.engine_scale --out DIR [--shape llama3-8b --layers 8]
        [--quantizations nf4,none] [--adapter-counts 1,100] [--deadline SECONDS]

The base is a random Llama-shaped checkpoint (`fixtures.make_random_model`: real layer shapes,
`--layers` of them, Llama 3's vocabulary, no tokenizer) and the adapters are random PEFT files
written from its config (`fixtures.write_random_adapters`), so nothing is downloaded. Prompts
are random token ids; every request decodes exactly `--max-tokens` tokens, greedily.

For each quantization: one engine with every adapter registered runs the same requests with
their adapters spread over the first n adapters (for each n of --adapter-counts), then on the
base model alone, then (--merged) all on the first adapter with it merged into the base; PEFT (one PeftModel holding the first n adapters, static batches) runs the
first --peft-requests of them, and its tokens are compared with the engine's. Output tok/s
counts requested tokens only. `scripts/gpu_check.sh` runs this on a GPU with a deadline: what
does not fit is listed as skipped, and `DIR/engine_scale.json` holds whatever finished.
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

from .engine_vs_peft import Req, run_engine, run_peft


def _say(message: str) -> None:
    print(f"[engine-scale] {message}", file=sys.stderr, flush=True)


def make_token_requests(vocab: int, adapters: list[str], count: int, max_tokens: int,
                        seed: int, prompt_range=(32, 128)) -> list[Req]:
    rng = random.Random(seed)
    return [Req([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))],
                adapters[i % len(adapters)], max_tokens) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    from loraplex.loadtest.fixtures import make_random_model, write_random_adapters
    from loraplex.loadtest.peft_baseline import PeftBaseline
    from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
    from loraplex.server.engine.engine import LLMEngine
    from loraplex.server.runner.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama3-8b", choices=["llama3-8b", "tiny"])
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's own")
    ap.add_argument("--merged", action=argparse.BooleanOptionalAction, default=True,
                    help="also one adapter merged into the base, and merge/unmerge times")
    ap.add_argument("--quantizations", default="nf4,none",
                    help="comma-separated; none is the dense dtype (bf16 on CUDA, fp32 on CPU); "
                         "a name ending in :eager runs without CUDA graphs, with the torch "
                         "decode attention and unfused LoRA groups (e.g. nf4,nf4:eager)")
    ap.add_argument("--adapter-counts", default="1,100")
    ap.add_argument("--ranks", default="8,16", help="cycled over the adapters; all-linear")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--peft-requests", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--lora-backend", default="auto")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from start after which remaining phases are skipped")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    counts = [int(n) for n in args.adapter_counts.split(",")]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
                     "requests": args.requests, "max_tokens": args.max_tokens,
                     "peft_requests": args.peft_requests, "rows": [], "skipped": [],
                     "errors": []}

    def save() -> None:
        (args.out / "engine_scale.json").write_text(json.dumps(results, indent=1))

    def time_left(what: str) -> bool:
        if args.deadline is None or time.monotonic() - t_start < args.deadline:
            return True
        results["skipped"].append(what)
        _say(f"deadline reached: skipping {what}")
        save()
        return False

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_random_model(Path(tmp) / "model", args.shape, None,
                                      dtype=torch.bfloat16 if cuda else torch.float32,
                                      num_layers=args.layers, device=device, say=_say)
        results["layers"] = args.layers or "all"
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        t0 = time.monotonic()
        paths = write_random_adapters(model_dir, Path(tmp) / "adapters", max(counts),
                                      ranks=tuple(int(r) for r in args.ranks.split(",")),
                                      dtype=torch.bfloat16 if cuda else torch.float32)
        _say(f"{len(paths)} adapters written in {time.monotonic() - t0:.1f}s")
        names = list(paths)

        def run_variant(variant: str) -> None:
            quantization, _, mode = variant.partition(":")
            eager = mode == "eager"
            t0 = time.monotonic()
            engine = LLMEngine(EngineConfig(
                model=ModelConfig(model=str(model_dir), quantization=quantization,
                                  cuda_graphs=False if eager else None),
                # Room left on the GPU for PEFT's copy of the model, loaded beside the engine.
                cache=CacheConfig(kv_cache_memory_gb=1.0, gpu_memory_utilization=0.5,
                                  decode_attention="torch" if eager else "auto"),
                lora=LoRAConfig(max_loras=min(args.max_loras, max(counts)), max_lora_rank=64,
                                max_cpu_loras=max(counts), backend=args.lora_backend,
                                fuse=not eager)))
            try:
                for name in names:
                    engine.register_adapter(name, str(paths[name]))
                runner = engine.runner
                backend = (f"{runner.lora.backend}{' fused' if runner.lora.groups else ''}, "
                           f"{runner.decode_attention} decode"
                           f"{', CUDA graphs' if runner.graphs and runner.graphs.capture else ''}")
                _say(f"{variant}: engine ready in {time.monotonic() - t0:.1f}s "
                     f"(LoRA backend {backend})")
                # Warm-up: Triton compiles its kernels for the shapes it meets first.
                run_engine(engine, make_token_requests(vocab, names[:4], min(8, args.requests),
                                                       min(4, args.max_tokens), 1))
                base_reqs = make_token_requests(vocab, [None], args.requests, args.max_tokens, 0)
                t_base, _ = run_engine(engine, base_reqs, base_only=True)
                for n in counts:
                    if not time_left(f"{variant}: {n} adapters"):
                        continue
                    row = run_count(engine, variant, backend, n, t_base)
                    if eager:  # PEFT's side is the same as for the plain variant
                        continue
                    if time_left(f"{variant}: PEFT with {n} adapters"):
                        run_peft_side(quantization, n, row)
                if args.merged and not eager and time_left(f"{variant}: merged"):
                    run_merged(engine, variant, backend, t_base)
            finally:
                engine.adapter_manager.shutdown()

        def run_count(engine, variant: str, backend: str, n: int, t_base: float) -> dict:
            reqs = make_token_requests(vocab, names[:n], args.requests, args.max_tokens, 0)
            t_lora, outputs[n] = run_engine(engine, reqs)
            useful = args.requests * args.max_tokens
            row = {"quantization": variant, "lora_backend": backend, "adapters": n,
                   "loraplex_tok_s": round(useful / t_lora, 1),
                   "base_only_tok_s": round(useful / t_base, 1),
                   "lora_overhead": round(t_lora / t_base - 1, 3)}
            results["rows"].append(row)
            save()
            return row

        def run_merged(engine, variant: str, backend: str, t_base: float) -> None:
            """One adapter's requests with it merged into the base (loraplex serve --merge),
            and the seconds a merge and an unmerge take on the idle engine."""
            def switch(target: str | None) -> float:
                t0 = time.perf_counter()
                engine.merger.request(target)
                while engine.has_unfinished():
                    engine.step()
                if cuda:
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            merge_s = switch(names[0])
            status = engine.merger.status()
            reqs = make_token_requests(vocab, names[:1], args.requests, args.max_tokens, 0)
            t_merged, _ = run_engine(engine, reqs)
            unmerge_s = switch(None)
            useful = args.requests * args.max_tokens
            results["rows"].append({
                "quantization": variant, "lora_backend": f"{backend}, merged", "adapters": 1,
                "loraplex_tok_s": round(useful / t_merged, 1),
                "base_only_tok_s": round(useful / t_base, 1),
                "lora_overhead": round(t_merged / t_base - 1, 3),
                "merge_s": round(merge_s, 4), "unmerge_s": round(unmerge_s, 4),
                "kept_aside_bytes": status["kept_aside_bytes"]})
            save()

        def run_peft_side(quantization: str, n: int, row: dict) -> None:
            loaded = load_model(ModelConfig(model=str(model_dir), quantization=quantization))
            baseline = PeftBaseline(loaded.model, None,
                                    {name: str(paths[name]) for name in names[:n]})
            sub = make_token_requests(vocab, names[:n], args.requests, args.max_tokens,
                                      0)[:args.peft_requests]
            t_peft, out_peft = run_peft(baseline, sub, batch=len(sub))
            peft_tok_s = len(sub) * args.max_tokens / t_peft
            same = sum(a == b for a, b in zip(outputs[n], out_peft))
            row.update(peft_tok_s=round(peft_tok_s, 1),
                       speedup_vs_peft=round(row["loraplex_tok_s"] / peft_tok_s, 2),
                       identical_to_peft=f"{same}/{len(sub)}")
            save()
            _say(f"{row['quantization']}, {n} adapters: {row}")

        outputs: dict[int, list[list[int]]] = {}  # adapters -> the engine's tokens per request
        for variant in args.quantizations.split(","):
            if not time_left(f"{variant}: everything"):
                continue
            try:
                run_variant(variant)
            except Exception as e:  # noqa: BLE001 - one variant's failure leaves the others
                results["errors"].append(f"{variant}: {type(e).__name__}: {e}")
                _say(f"{variant} failed: {type(e).__name__}: {e}")
                save()
            if cuda:
                torch.cuda.empty_cache()
    results["seconds"] = round(time.monotonic() - t_start, 1)
    save()
    print(markdown(results))
    return 1 if results["errors"] else 0


def markdown(results: dict) -> str:
    lines = [f"Engine at scale: {results['shape']} shapes, {results.get('layers')} layers, "
             f"{results['device']}; {results['requests']} requests x {results['max_tokens']} "
             f"tokens (PEFT: the first {results['peft_requests']})", "",
             "| quantization | kernels | adapters | loraplex tok/s | base only tok/s | "
             "LoRA overhead | PEFT tok/s | vs PEFT | identical to PEFT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['quantization']} | {r['lora_backend']} | {r['adapters']} | "
                     f"{r['loraplex_tok_s']} | {r['base_only_tok_s']} | "
                     f"{100 * r['lora_overhead']:.1f}% | {r.get('peft_tok_s', '-')} | "
                     f"{str(r['speedup_vs_peft']) + 'x' if 'speedup_vs_peft' in r else '-'} | "
                     f"{r.get('identical_to_peft', '-')} |")
    merges = [r for r in results["rows"] if "merge_s" in r]
    if merges:
        lines += ["", "Merged rows: " + "; ".join(
            f"{r['quantization']}: merge {r['merge_s']} s, unmerge {r['unmerge_s']} s, "
            f"{r['kept_aside_bytes'] / 2**20:.1f} MiB kept aside" for r in merges)]
    if results["skipped"]:
        lines += ["", "Skipped at the deadline: " + "; ".join(results["skipped"])]
    if results.get("errors"):
        lines += ["", "Failed: " + "; ".join(results["errors"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
