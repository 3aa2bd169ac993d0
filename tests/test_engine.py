"""Engine behaviour on a tiny random Llama: refusals, abort, sampling, stops, async front."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from loraplex.server.config import CacheConfig, EngineConfig, SchedulerConfig
from loraplex.server.engine.async_engine import AsyncEngine
from loraplex.server.engine.detokenizer import Detokenizer
from loraplex.server.engine.engine import LLMEngine
from loraplex.server.engine.request import RequestError, SamplingParams
from loraplex.server.runner.attention import ATTN_IMPLEMENTATION
from loraplex.server.runner.loader import LoadedModel
from transformers import AutoModelForCausalLM, LlamaConfig

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                     max_position_embeddings=64, initializer_range=0.2)
GREEDY = dict(temperature=0.0, ignore_eos=True)


def tiny_model(impl=ATTN_IMPLEMENTATION):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation=impl).eval()


def make_engine(num_blocks=64, budget=64):
    loaded = LoadedModel(tiny_model(), None, torch.device("cpu"), torch.float32, "none", 64, "tiny")
    config = EngineConfig(cache=CacheConfig(num_blocks=num_blocks, block_size=4),
                          scheduler=SchedulerConfig(max_num_batched_tokens=budget))
    return LLMEngine(config, loaded)


def run(engine, requests):
    """requests: {id: (prompt, params[, adapter])} -> {id: (tokens, finish_reason)}"""
    outs: dict[str, list] = {}
    reasons: dict[str, str] = {}

    def collect(out):
        outs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if out.finished:
            reasons[out.request_id] = out.finish_reason

    for rid, (prompt, params, *adapter) in requests.items():
        engine.add_request(rid, prompt, params, *adapter, callback=collect)
    while engine.has_unfinished():
        engine.step()
    return {rid: (outs.get(rid, []), reasons[rid]) for rid in requests}


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture(scope="module")
def reference():
    """Greedy continuations from transformers' own generate (sdpa attention)."""
    model = tiny_model("sdpa")

    def greedy(prompt, n):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return greedy


def test_bad_requests_are_refused_and_the_rest_served(engine, reference):
    with pytest.raises(RequestError) as e:
        engine.add_request("x1", [1, 2], SamplingParams(max_tokens=4), adapter="nope")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    assert "nope" in str(e.value)
    with pytest.raises(RequestError) as e:
        engine.add_request("x2", list(range(1, 65)), SamplingParams(max_tokens=1))
    assert e.value.param == "prompt" and "maximum context length is 64" in str(e.value)
    with pytest.raises(RequestError) as e:
        engine.add_request("x3", [1, 2, 3], SamplingParams(max_tokens=62))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError) as e:
        SamplingParams(max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestError) as e:
        engine.add_request("x4", [1, 500], SamplingParams(max_tokens=2))
    assert e.value.param == "prompt" and "vocabulary" in str(e.value)
    with pytest.raises(RequestError):
        engine.add_request("x5", [], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()  # nothing half-queued

    got = run(engine, {"a": ([3, 4, 5], SamplingParams(max_tokens=6, **GREEDY)),
                       "b": ([9, 8], SamplingParams(max_tokens=5, **GREEDY))})
    assert got["a"] == (reference([3, 4, 5], 6), "length")
    assert got["b"] == (reference([9, 8], 5), "length")
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_duplicate_request_id_refused(engine):
    engine.add_request("dup", [1, 2], SamplingParams(max_tokens=2, **GREEDY))
    with pytest.raises(RequestError):
        engine.add_request("dup", [1, 2], SamplingParams(max_tokens=2, **GREEDY))
    while engine.has_unfinished():
        engine.step()


def test_abort_mid_generation_leaves_others_exact(engine, reference):
    outs: dict[str, list] = {}
    finals = {}

    def collect(out):
        outs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if out.finished:
            finals[out.request_id] = out.finish_reason

    engine.add_request("keep", [5, 6, 7], SamplingParams(max_tokens=10, **GREEDY), callback=collect)
    engine.add_request("drop", [5, 6, 7], SamplingParams(max_tokens=10, **GREEDY), callback=collect)
    for _ in range(3):
        engine.step()
    engine.abort("drop")
    engine.abort("drop")  # twice is harmless
    while engine.has_unfinished():
        engine.step()
    assert finals == {"drop": "abort", "keep": "length"}
    assert len(outs["drop"]) == 3
    assert outs["keep"] == reference([5, 6, 7], 10)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_abort_all_ends_running_and_waiting_requests_and_frees_everything():
    engine = make_engine(num_blocks=8, budget=8)  # room for one of them: the rest wait
    finals = {}

    def collect(out):
        if out.finished:
            finals[out.request_id] = out.finish_reason

    for i in range(3):
        engine.add_request(f"r{i}", [5, 6, 7, 8, 9], SamplingParams(max_tokens=20, **GREEDY),
                           callback=collect)
    engine.step()
    assert engine.scheduler.num_running and engine.scheduler.num_waiting
    assert engine.abort_all() == 3 and engine.abort_all() == 0
    assert finals == {"r0": "abort", "r1": "abort", "r2": "abort"}
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                            ignore_eos=True)
    alone = run(engine, {"s1": ([1, 2, 3], params)})["s1"][0]
    crowd = run(engine, {"s2": ([1, 2, 3], params),
                         "noise": ([4, 4], SamplingParams(max_tokens=12, temperature=1.0)),
                         "s3": ([1, 2, 3], params)})
    assert crowd["s2"][0] == alone and crowd["s3"][0] == alone
    other = run(engine, {"s4": ([1, 2, 3], SamplingParams(max_tokens=12, temperature=1.0,
                                                          seed=99, ignore_eos=True))})
    assert other["s4"][0] != alone


def test_top_k_one_is_greedy(engine, reference):
    got = run(engine, {"k": ([7, 7, 1], SamplingParams(max_tokens=8, temperature=0.8, top_k=1,
                                                       ignore_eos=True))})
    assert got["k"][0] == reference([7, 7, 1], 8)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_temperature_near_zero_is_greedy_not_a_failure(engine, reference, temperature):
    """Found by the long B2 run: logits / 1e-300 overflowed, the softmax was NaN and the
    request failed with 500. Below 1e-5 (vLLM's threshold) sampling is greedy."""
    got = run(engine, {"t": ([7, 7, 1], SamplingParams(max_tokens=8, temperature=temperature,
                                                       ignore_eos=True))})
    assert got["t"][0] == reference([7, 7, 1], 8)


def test_stop_token_ids_and_eos(engine, reference):
    expected = reference([2, 4, 6], 8)
    stop_at = expected[3]
    first = expected.index(stop_at)
    got = run(engine, {"st": ([2, 4, 6], SamplingParams(max_tokens=8, temperature=0.0,
                                                        stop_token_ids=(stop_at,)))})
    assert got["st"] == (expected[:first + 1], "stop")
    engine.eos_token_ids = {expected[0]}
    try:
        got = run(engine, {"eos": ([2, 4, 6], SamplingParams(max_tokens=8, temperature=0.0)),
                           "ign": ([2, 4, 6], SamplingParams(max_tokens=8, **GREEDY))})
    finally:
        engine.eos_token_ids = set()
    assert got["eos"] == (expected[:1], "stop")
    assert got["ign"] == (expected, "length")


def test_failed_forward_fails_its_batch_only():
    engine = make_engine()
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(scheduled):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(scheduled)

    engine.runner.execute = flaky
    errors = {}
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, **GREEDY),
                       callback=lambda o: o.finished and errors.setdefault(o.request_id, o.error))
    while engine.has_unfinished():
        engine.step()
    assert "boom" in errors["a"]
    got = run(engine, {"b": ([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY))})
    assert got["b"][1] == "length" and len(got["b"][0]) == 5


class CharTokenizer:
    """Token i is chr(i); token 0 decodes to nothing (a special token)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


@pytest.mark.parametrize("stop,tokens,text,stopped", [
    ((), "hello", "hello", False),
    (("lo",), "hello world", "hel", True),
    (("wor", "o w"), "hello world", "hell", True),  # the earliest match wins
    (("xyz",), "abcxy", "abcxy", False),
])
def test_detokenizer_stop_strings_never_stream(stop, tokens, text, stopped):
    d = Detokenizer(CharTokenizer(), stop)
    streamed, hit = "", False
    for ch in tokens:
        hit = d.add(ord(ch))
        streamed += d.take(final=hit)
        if hit:
            break
    if not hit:
        streamed += d.take(final=True)
    assert (streamed, hit) == (text, stopped)


def test_async_engine_streams_refuses_and_aborts():
    engine = make_engine()
    front = AsyncEngine(engine)

    async def scenario():
        tokens = []
        async for out in front.generate([1, 2, 3], SamplingParams(max_tokens=6, **GREEDY)):
            tokens += out.new_token_ids
        with pytest.raises(RequestError):
            async for _ in front.generate([1], SamplingParams(max_tokens=2), adapter="nope"):
                pass
        stream = front.generate([4, 5], SamplingParams(max_tokens=40, **GREEDY), request_id="gone")
        async for _ in stream:
            break  # the client went away
        await stream.aclose()
        for _ in range(100):
            if not await asyncio.wrap_future(front.call(lambda e: e.has_unfinished())):
                break
            await asyncio.sleep(0.01)
        return tokens

    try:
        tokens = asyncio.run(scenario())
        assert len(tokens) == 6
        assert not front.call(lambda e: e.has_unfinished()).result(timeout=5)
        assert front.call(lambda e: e.blocks.usage).result(timeout=5) == 0.0
    finally:
        front.shutdown()


def test_evicted_adapters_reload_exactly_and_a_broken_one_fails_alone(tmp_path):
    import shutil

    from loraplex.server.config import LoRAConfig
    from peft_fixtures import ADAPTER_SPECS, PeftReference, make_adapters

    names = ["r8_attn", "r16_all", "patterns", "regex_qk"]
    paths = make_adapters(lambda: tiny_model("sdpa"), tmp_path,
                          {n: ADAPTER_SPECS[n] for n in names})
    loaded = LoadedModel(tiny_model(), None, torch.device("cpu"), torch.float32, "none", 64, "t")
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64, block_size=4),
                                    lora=LoRAConfig(max_loras=1, max_cpu_loras=2)), loaded)
    for name, path in paths.items():
        engine.register_adapter(name, str(path))
    assert len(engine.adapter_manager.host) == 2  # only the two most recent stay parsed in host memory
    reference = PeftReference(lambda: tiny_model("sdpa"), paths)
    params = SamplingParams(max_tokens=5, **GREEDY)
    # One slot, two host entries, four adapters: every switch reloads, often from disk.
    for round_ in range(2):
        for name in names:
            got = run(engine, {f"{name}-{round_}": ([3, 4, 5], params, name)})
            assert got[f"{name}-{round_}"][0] == reference.greedy([3, 4, 5], name, 5), name
    assert engine.slots.misses >= 8
    broken = next(n for n in names if not engine.adapter_manager.in_host(n)
                  and engine.adapter_manager.slot_of(n) is None)
    shutil.rmtree(paths[broken])
    errors = {}
    engine.add_request("bad", [3, 4, 5], params, adapter=broken,
                       callback=lambda o: o.finished and errors.setdefault("bad", o.error))
    engine.add_request("good", [3, 4, 5], params)
    while engine.has_unfinished():
        engine.step()
    assert "could not be loaded" in errors["bad"]
    assert run(engine, {"after": ([3, 4, 5], params)})["after"][1] == "length"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_replacing_an_adapter_mid_generation_keeps_old_requests_on_old_weights(tmp_path):
    from loraplex.server.config import LoRAConfig
    from peft_fixtures import ADAPTER_SPECS, PeftReference, make_adapters

    specs = {"old": ADAPTER_SPECS["r8_attn"], "new": ADAPTER_SPECS["r16_all"]}
    paths = make_adapters(lambda: tiny_model("sdpa"), tmp_path, specs)
    reference = PeftReference(lambda: tiny_model("sdpa"), paths)
    loaded = LoadedModel(tiny_model(), None, torch.device("cpu"), torch.float32, "none", 64, "t")
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64, block_size=4),
                                    lora=LoRAConfig(max_loras=2)), loaded)
    engine.register_adapter("tenant/x", str(paths["old"]))
    tokens: dict[str, list[int]] = {}

    def submit(rid, prompt):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=8, **GREEDY), "tenant/x",
                           callback=lambda o: tokens.setdefault(o.request_id, []).extend(
                               o.new_token_ids))

    submit("running", [3, 4, 5])
    submit("queued", [6, 7])
    engine.step()
    engine.step()
    engine.register_adapter("tenant/x", str(paths["new"]))  # a new version, mid-generation
    submit("after", [3, 4, 5])
    while engine.has_unfinished():
        engine.step()
    assert tokens["running"] == reference.greedy([3, 4, 5], "old", 8)
    assert tokens["queued"] == reference.greedy([6, 7], "old", 8)
    assert tokens["after"] == reference.greedy([3, 4, 5], "new", 8)
    assert tokens["after"] != tokens["running"]
    # The old version is gone once its requests ended: one version, one slot at most.
    assert engine.slots.loaded == [k for k in engine.slots.loaded if k.startswith("tenant/x@2")]

    submit("doomed", [3, 4, 5])
    engine.step()
    engine.unregister_adapter("tenant/x")  # removal lets requests in flight finish
    with pytest.raises(RequestError):
        submit("refused", [3, 4, 5])
    while engine.has_unfinished():
        engine.step()
    assert tokens["doomed"] == tokens["after"]
    assert engine.slots.loaded == [] and len(engine.adapter_manager.host) == 0


def test_concurrent_register_replace_remove_and_use_of_one_name(tmp_path):
    import concurrent.futures
    import random
    import threading

    from loraplex.server.config import LoRAConfig
    from peft_fixtures import ADAPTER_SPECS, PeftReference, make_adapters

    paths = make_adapters(lambda: tiny_model("sdpa"), tmp_path,
                          {"v1": ADAPTER_SPECS["r8_attn"], "v2": ADAPTER_SPECS["r16_all"]})
    reference = PeftReference(lambda: tiny_model("sdpa"), paths)
    allowed = {tuple(reference.greedy([3, 4, 5], v, 4)) for v in ("v1", "v2")}
    loaded = LoadedModel(tiny_model(), None, torch.device("cpu"), torch.float32, "none", 64, "t")
    front = AsyncEngine(LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64, block_size=4),
                                               lora=LoRAConfig(max_loras=2)), loaded))
    served, refused = [], []
    lock = threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        for i in range(15):
            action = rng.choice(["v1", "v2", "remove", "use", "use"])
            if action in ("v1", "v2"):
                path = str(paths[action])
                front.call(lambda e, path=path: e.register_adapter("x", path)).result(30)
            elif action == "remove":
                try:
                    front.call(lambda e: e.unregister_adapter("x")).result(30)
                except RequestError:
                    pass  # already gone
            else:
                done, out = threading.Event(), []

                def collect(o, out=out, done=done):
                    out.extend(o.new_token_ids)
                    if o.finished:
                        done.set()
                try:
                    front.submit([3, 4, 5], SamplingParams(max_tokens=4, **GREEDY), "x",
                                 collect).result(30)
                except RequestError:
                    with lock:
                        refused.append(seed)
                    continue
                assert done.wait(30)
                with lock:
                    served.append(tuple(out))

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(worker, range(8)))
        engine = front.engine
        manager = front.call(lambda e: e.adapter_manager).result(5)
        assert not front.call(lambda e: e.has_unfinished()).result(5)
        assert served and set(served) <= allowed  # each ran wholly on one version
        # Nothing leaked: only the serving version (if any) is still known anywhere.
        live = set(manager._keys.values())
        assert set(manager._versions) == live and not manager._retired
        assert set(engine.slots.loaded) <= live and all(
            engine.slots.refs(k) == 0 for k in engine.slots.loaded)
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    finally:
        front.shutdown()


def test_decoding_goes_on_while_an_adapter_is_read_from_disk(tmp_path):
    import threading

    from loraplex.server.config import LoRAConfig
    from peft_fixtures import ADAPTER_SPECS, PeftReference, make_adapters

    paths = make_adapters(lambda: tiny_model("sdpa"), tmp_path,
                          {"warm": ADAPTER_SPECS["r8_attn"], "cold": ADAPTER_SPECS["r16_all"]})
    reference = PeftReference(lambda: tiny_model("sdpa"), paths)
    loaded = LoadedModel(tiny_model(), None, torch.device("cpu"), torch.float32, "none", 64, "t")
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64, block_size=4),
                                    lora=LoRAConfig(max_loras=2, max_cpu_loras=2)), loaded)
    engine.register_adapter("cold", str(paths["cold"]))
    engine.register_adapter("warm", str(paths["warm"]))
    engine.register_adapter("filler", str(paths["warm"]))  # pushes "cold" out of host memory
    assert not engine.adapter_manager.in_host("cold")
    manager, real_parse = engine.adapter_manager, engine.adapter_manager._parse
    # The read of "cold" is held until "warm" has decoded 10 tokens: if the engine waited for
    # the read, it would never get there (the event's timeout then fails the test).
    release = threading.Event()

    def held_parse(name, path):
        assert release.wait(30), "the engine stopped decoding while an adapter was read"
        return real_parse(name, path)

    manager._parse = held_parse
    tokens: dict[str, list[int]] = {"warm": [], "cold": []}
    for rid, adapter, n in (("warm", "warm", 40), ("cold", "cold", 5)):
        engine.add_request(rid, [3, 4, 5], SamplingParams(max_tokens=n, **GREEDY), adapter,
                           callback=lambda o: tokens[o.request_id].extend(o.new_token_ids))
    while engine.has_unfinished():
        engine.step()
        if len(tokens["warm"]) >= 10:
            release.set()
    assert release.is_set()
    assert tokens["warm"] == reference.greedy([3, 4, 5], "warm", 40)
    assert tokens["cold"] == reference.greedy([3, 4, 5], "cold", 5)


class _CountingDict(dict):
    """A dict that counts whole-registry walks (iteration, keys, values, items, len)."""

    walks = 0

    def _walk(self):
        type(self).walks += 1

    def __iter__(self):
        self._walk()
        return super().__iter__()

    def keys(self):
        self._walk()
        return super().keys()

    def values(self):
        self._walk()
        return super().values()

    def items(self):
        self._walk()
        return super().items()


def test_ten_thousand_adapters_add_no_per_step_work(tmp_path):
    import dataclasses

    from loraplex.server.config import LoRAConfig
    from peft_fixtures import ADAPTER_SPECS, PeftReference, make_adapters

    paths = make_adapters(lambda: tiny_model("sdpa"), tmp_path, {"a": ADAPTER_SPECS["r1_qv"]})
    reference = PeftReference(lambda: tiny_model("sdpa"), paths)
    loaded = LoadedModel(tiny_model(), None, torch.device("cpu"), torch.float32, "none", 64, "t")
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64, block_size=4),
                                    lora=LoRAConfig(max_loras=4, max_cpu_loras=8)), loaded)
    parsed = engine.parse_adapter("a", str(paths["a"]))
    for i in range(10_000):  # one parse, ten thousand names (each re-read from disk on use)
        engine.install_adapter(dataclasses.replace(parsed, name=f"t{i}"))
    manager = engine.adapter_manager
    assert len(engine.adapters) == 10_000 and len(manager.host) == 8
    # From here on, any walk over the registry's tables is counted.
    manager.current = engine.adapters = _CountingDict(manager.current)
    manager._versions = _CountingDict(manager._versions)
    manager._keys = _CountingDict(manager._keys)
    _CountingDict.walks = 0
    expected = reference.greedy([3, 4, 5], "a", 4)
    names = ["t0", "t5000", "t9999", "t1234", "t42", "t7777"]
    got = run(engine, {n: ([3, 4, 5], SamplingParams(max_tokens=4, **GREEDY), n) for n in names})
    assert all(got[n][0] == expected for n in names)
    assert _CountingDict.walks == 0, "the step path walked the adapter registry"
    assert len(manager.host) <= 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_slot_loads_come_from_pinned_memory_on_a_side_stream(tmp_path):
    """One slot, four adapters taking turns: every request reloads its adapter from pinned
    host memory on the copy stream while the compute stream only waits on the GPU. Tokens
    after many reloads equal those of the first load, in the same engine."""
    from loraplex.server.config import LoRAConfig
    from peft_fixtures import ADAPTER_SPECS, make_adapters

    names = ["r8_attn", "r16_all", "patterns", "regex_qk"]
    paths = make_adapters(lambda: tiny_model("sdpa"), tmp_path,
                          {n: ADAPTER_SPECS[n] for n in names})
    device = torch.device("cuda")
    loaded = LoadedModel(tiny_model().to(device), None, device, torch.float32, "none", 64, "t")
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64, block_size=4),
                                    lora=LoRAConfig(max_loras=1, max_cpu_loras=4)), loaded)
    assert engine.runner.lora.copy_stream is not None
    for name, path in paths.items():
        engine.register_adapter(name, str(path))
    for name in names:
        host = engine.adapter_manager.host.get(engine.adapter_manager._keys[name])
        assert all(w.lora_a.is_pinned() and w.lora_b.is_pinned() for w in host.modules.values())
    params = SamplingParams(max_tokens=6, **GREEDY)
    first = {n: run(engine, {f"{n}-0": ([3, 4, 5], params, n)})[f"{n}-0"][0] for n in names}
    assert len({tuple(t) for t in first.values()}) > 1  # the adapters differ
    for round_ in range(1, 4):
        for name in names:
            got = run(engine, {f"{name}-{round_}": ([3, 4, 5], params, name)})
            assert got[f"{name}-{round_}"][0] == first[name], name
    assert engine.slots.misses >= 16
