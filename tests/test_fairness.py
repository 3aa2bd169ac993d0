"""More adapters wanted than slots: 32 adapters round-robin through 4 slots.

The bound: admission is first come, first served (nobody is admitted before a request that
arrived earlier), so with S slots and every request holding its slot for at most D engine
steps (its prefill chunks plus its tokens), a request with k requests ahead of it is admitted
within (k // S + 1) * D working steps of arriving. Steps count batches that ran; while an
adapter is read from disk (off the engine thread) the loop runs no batch, and that time is
the loader's latency, not a share taken by other requests.
"""

from __future__ import annotations

import random

from loraplex.server.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
)
from loraplex.server.engine.engine import LLMEngine
from loraplex.server.engine.request import SamplingParams
from loraplex.server.runner.loader import load_model
from peft_fixtures import PeftReference, make_adapters, save_tiny_model

SLOTS, ADAPTERS, REQUESTS, BUDGET = 4, 32, 64, 64


def test_32_adapters_through_4_slots_exact_and_fair(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "model")
    cfg = ModelConfig(model=str(model_dir), quantization="none")
    rng = random.Random(0)
    specs = {f"a{i:02d}": dict(r=rng.choice([2, 4, 8, 16]), lora_alpha=16,
                               target_modules=rng.choice([["q_proj", "v_proj"],
                                                          ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                          ["gate_proj", "up_proj", "down_proj"]]),
                               task_type="CAUSAL_LM", init_lora_weights=False)
             for i in range(ADAPTERS)}
    paths = make_adapters(lambda: load_model(cfg).model, tmp_path / "adapters", specs)
    reference = PeftReference(lambda: load_model(cfg).model, paths)
    engine = LLMEngine(EngineConfig(
        model=cfg, cache=CacheConfig(num_blocks=256, block_size=8),
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET),
        lora=LoRAConfig(max_loras=SLOTS, max_cpu_loras=8, max_lora_rank=16)))
    for name, path in paths.items():
        engine.register_adapter(name, str(path))

    names = list(paths)
    cases = [(f"r{i:02d}", [rng.randrange(3, 256) for _ in range(rng.randint(2, 40))],
              names[i % ADAPTERS], rng.randint(2, 10)) for i in range(REQUESTS)]
    tokens = {rid: [] for rid, *_ in cases}
    arrived, admitted, requests = {}, {}, {}
    step = 0  # working steps: batches that ran
    pending = list(cases)
    while pending or engine.has_unfinished():
        if not engine.idle or step == 0:  # four new requests every working step
            for rid, prompt, adapter, n in pending[:4]:
                requests[rid] = engine.add_request(
                    rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                    adapter, callback=lambda o: tokens[o.request_id].extend(o.new_token_ids))
                arrived[rid] = step
            pending = pending[4:]
        engine.step()
        step += not engine.idle
        for rid, req in requests.items():
            if rid not in admitted and req.admitted_time is not None:
                admitted[rid] = step

    for rid, prompt, adapter, n in cases:
        assert tokens[rid] == reference.greedy(prompt, adapter, n), rid
    order = [rid for rid, *_ in cases]
    assert sorted(order, key=lambda r: (admitted[r], order.index(r))) == order, "overtaken"
    longest = max(-(-len(p) // BUDGET) + n for _, p, _, n in cases)
    for i, (rid, *_rest) in enumerate(cases):
        ahead = sum(1 for other, *_ in cases[:i] if admitted[other] > arrived[rid])
        waited = admitted[rid] - arrived[rid]
        assert waited <= (ahead // SLOTS + 1) * longest, (rid, waited, ahead, longest)
    assert engine.slots.misses > ADAPTERS  # slots really were recycled
