"""Time to first token by where the adapter is: in a device slot, in host memory, on disk.

    python -m loraplex.loadtest.adapter_ttft [--rank 16] [--repeat 5]

One engine with one slot and one host entry, two adapters (all linear layers) taking turns,
so each request finds its adapter in the tier being measured. Prints medians in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    from loraplex.loadtest.fixtures import ALL_LINEAR, make_adapter
    from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
    from loraplex.server.engine.engine import LLMEngine
    from loraplex.server.engine.request import SamplingParams
    from loraplex.server.runner.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: make_adapter(load_model(ModelConfig(model=args.model)).model,
                                    f"{tmp}/{name}", {"r": args.rank, "lora_alpha": 2 * args.rank,
                                                      "target_modules": ALL_LINEAR}, name)
                 for name in ("a", "b", "c")}
        engine = LLMEngine(EngineConfig(model=ModelConfig(model=args.model),
                                        cache=CacheConfig(num_blocks=256),
                                        lora=LoRAConfig(max_loras=1, max_cpu_loras=2)))
        prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2)
        manager, counter = engine.adapter_manager, iter(range(10**6))

        def ttft(adapter: str) -> float:
            first: list[float] = []
            t0 = time.perf_counter()
            engine.add_request(f"r{next(counter)}", prompt,
                               SamplingParams(max_tokens=1, temperature=0.0), adapter,
                               callback=lambda o: first.append(time.perf_counter()))
            while engine.has_unfinished():
                engine.step()
            return (first[0] - t0) * 1000

        tiers: dict[str, list[float]] = {"base model (no adapter)": [], "device slot": [],
                                         "host memory": [], "disk": []}
        ttft(None)  # warm-up
        for i in range(args.repeat):
            # New versions each round: host memory holds the last two registered (b, a),
            # c is on disk only, and no slot holds any of them.
            for name in ("c", "b", "a"):
                engine.register_adapter(name, str(paths[name]))
            assert manager.in_host("a") and not manager.in_host("c")
            tiers["host memory"].append(ttft("a"))  # copied into the slot first
            tiers["device slot"].append(ttft("a"))
            tiers["base model (no adapter)"].append(ttft(None))
            tiers["disk"].append(ttft("c"))  # read on the loader thread, then copied
            print(f"  round {i + 1}/{args.repeat}", file=sys.stderr)
    print(f"adapter rank {args.rank} on all linear layers, prompt {len(prompt)} tokens")
    for tier, values in tiers.items():
        if values:
            print(f"| {tier} | {statistics.median(values):.1f} ms |")  # median
    return 0


if __name__ == "__main__":
    sys.exit(main())
