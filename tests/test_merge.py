"""Merge math (adapters/merge.py) against PEFT's `merge_and_unload()`, parameter by parameter,
and the undo, by hashes of every base parameter, on dense and bitsandbytes bases."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from loraplex.adapters.merge import Workspace, merge_module
from loraplex.adapters.peft_format import load_adapter
from loraplex.server.config import ModelConfig
from loraplex.server.engine.request import SamplingParams
from loraplex.server.runner.loader import load_model
from loraplex.server.runner.lora_layers import TARGET_NAMES
from peft import PeftModel
from peft.utils.integrations import dequantize_bnb_weight
from peft_fixtures import ADAPTER_SPECS, make_adapters, save_tiny_model

SPECS = {k: ADAPTER_SPECS[k] for k in ("r16_all", "rslora_patterns", "layers_02")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model_dir = save_tiny_model("llama", root / "model")

    def dense():
        return load_model(ModelConfig(model=str(model_dir), quantization="none")).model

    return model_dir, make_adapters(dense, root / "adapters", SPECS)


def targets(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGET_NAMES}


def fingerprint(model) -> dict[str, str]:
    """A hash of every parameter and buffer, and of a quantized weight's quantization state."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8)
                                   .numpy().tobytes()).hexdigest()
        state = getattr(t, "quant_state", None)
        if state is not None:
            for field, value in state.as_dict(packed=False).items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}:{field}"] = hashlib.sha256(
                        value.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def effective_weight(module) -> torch.Tensor:
    """The weight a projection computes with, dequantized the way PEFT does."""
    kind = type(module.weight).__name__
    if kind in ("Params4bit", "Int8Params"):
        return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
    return module.weight.data


CASES = [("none", "float32"), ("none", "bfloat16"), ("nf4", "float32"), ("int8", "float32")]


@pytest.mark.parametrize("quantization,dtype", CASES)
def test_merge_equals_peft_and_undo_restores_every_parameter(tiny, quantization, dtype):
    model_dir, adapters = tiny
    cfg = ModelConfig(model=str(model_dir), quantization=quantization, dtype=dtype)
    for name, path in adapters.items():
        # PEFT's merge on a fresh copy of the same base.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(load_model(cfg).model, str(path))
            merged_ref = peft_model.merge_and_unload()
        ref = targets(merged_ref)

        model = load_model(cfg).model
        before = fingerprint(model)
        modules = targets(model)
        shapes = {n: (m.in_features, m.out_features) for n, m in modules.items()}
        adapter = load_adapter(path, name, shapes, 64, torch.float32)  # PEFT's adapter dtype
        undo = {}
        changed = 0
        workspace = Workspace()  # as the engine merges: one reused buffer for the deltas
        for module_name, weights in adapter.modules.items():
            merged = merge_module(modules[module_name], weights, workspace=workspace)
            assert merged.module is modules[module_name]
            undo[module_name] = merged.undo
            got, want = effective_weight(merged.module), effective_weight(ref[module_name])
            assert got.dtype == want.dtype and torch.equal(got, want), module_name
            changed += not torch.equal(got, effective_weight(_fresh(cfg, module_name)))
        assert changed >= len(adapter.modules) // 2  # the merge did change the weights
        for fn in undo.values():
            assert fn() is not None
        assert fingerprint(model) == before


def _fresh(cfg: ModelConfig, module_name: str):
    return load_model(cfg).model.get_submodule(module_name)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_dense_merge_of_a_quantized_base_keeps_the_sum_unrounded(tiny, quantization):
    """`dense=True`: the merged layer is an nn.Linear holding dequantized base + delta exactly,
    and the undo hands back the untouched quantized module."""
    model_dir, adapters = tiny
    cfg = ModelConfig(model=str(model_dir), quantization=quantization)
    model = load_model(cfg).model
    before = fingerprint(model)
    modules = targets(model)
    shapes = {n: (m.in_features, m.out_features) for n, m in modules.items()}
    adapter = load_adapter(adapters["r16_all"], "r16_all", shapes, 64, torch.float32)
    name = "model.layers.1.mlp.down_proj"
    base = modules[name]
    expected = effective_weight(base).float() + (adapter.modules[name].lora_b
                                                 @ adapter.modules[name].lora_a) * adapter.modules[name].scale
    merged = merge_module(base, adapter.modules[name], dense=True, dtype=torch.float32)
    assert isinstance(merged.module, torch.nn.Linear) and merged.module is not base
    assert torch.equal(merged.module.weight, expected)
    assert merged.extra_bytes > 0  # a dense layer costs more than the quantized one
    assert merged.undo() is base
    assert fingerprint(model) == before


# ---- the engine: merged traffic, mixed traffic, switches while requests run ----------------

PROMPTS = [[1, 5, 9, 33, 71, 12], [1, 40, 41, 42], [1, 200, 17, 3, 3, 90, 101, 7], [1, 8, 250]]


def engine_for(model_dir, adapters, max_loras=4, backend="auto", **merge):
    from loraplex.server.config import (
        CacheConfig,
        EngineConfig,
        LoRAConfig,
        MergeConfig,
        SchedulerConfig,
    )
    from loraplex.server.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=str(model_dir), quantization="none"),
        cache=CacheConfig(num_blocks=256, block_size=8),
        scheduler=SchedulerConfig(max_num_batched_tokens=64),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=64, backend=backend),
        merge=MergeConfig(window_s=1e-3, **merge)))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    return engine


def peft_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             num_beams=1, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def references(tiny):
    """Greedy tokens of every prompt: PEFT unmerged (every adapter and the base) and PEFT
    merge_and_unload() of r16_all."""
    from peft_fixtures import PeftReference
    from transformers import GenerationConfig

    model_dir, adapters = tiny
    cfg = ModelConfig(model=str(model_dir), quantization="none")
    ref = PeftReference(lambda: load_model(cfg).model, adapters)
    unmerged = {(a, i): ref.greedy(p, a, 10) for a in (None, *adapters)
                for i, p in enumerate(PROMPTS)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_model = PeftModel.from_pretrained(load_model(cfg).model,
                                                 str(adapters["r16_all"])).merge_and_unload()
    merged_model.generation_config = GenerationConfig()
    merged = {i: peft_greedy(merged_model, p, 10) for i, p in enumerate(PROMPTS)}
    return unmerged, merged


def drain(engine, got, check=lambda: None):
    while engine.has_unfinished():
        check()
        engine.step()


def submit(engine, got, rid, prompt, adapter, n=10):
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    got[rid] = []
    engine.add_request(rid, prompt, params, adapter,
                       callback=lambda out: got[out.request_id].extend(out.new_token_ids))


def test_merged_adapter_serves_like_peft_merge_and_unload(tiny, references):
    unmerged, merged = references
    model_dir, adapters = tiny
    # The adapter changes the output, merged or not: equality below cannot be trivial.
    assert all(merged[i] != unmerged[(None, i)] for i in range(len(PROMPTS)))
    engine = engine_for(model_dir, adapters, adapter="r16_all")
    drain(engine, {})  # idle: the whole model is merged before any request
    assert engine.merger.state == "merged" and engine.runner.lora.silent_slot is not None
    got = {}
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"m{i}", p, "r16_all")
    drain(engine, got)
    assert engine.merger.state == "merged"  # only its requests came: it stayed merged
    assert got == {f"m{i}": merged[i] for i in range(len(PROMPTS))}
    assert engine.merger.status()["kept_aside_bytes"] > 0


def test_mixed_traffic_and_switches_while_requests_run_stay_exact(tiny, references):
    """Merge layer by layer under running requests, then base and other-adapter requests
    arrive: the engine unmerges layer by layer while the merged adapter's requests go on,
    serves everyone, and merges again. No request other than the merged adapter's ever runs
    while anything is merged; every request matches PEFT; unmerge restores every parameter."""
    unmerged, merged = references
    model_dir, adapters = tiny
    # Merged and unmerged PEFT agree on these prompts, so a request that lives through a
    # switch has one right answer to be compared with.
    assert all(merged[i] == unmerged[("r16_all", i)] for i in range(len(PROMPTS)))
    engine = engine_for(model_dir, adapters, others="drain")
    before = fingerprint(engine.runner.model)
    merger, sched = engine.merger, engine.scheduler
    seen = set()

    def check():
        seen.add((merger.state, bool(sched.running)))
        if merger.state != "unmerged":
            assert all(r.adapter == merger.key for r in sched.running)

    got = {}
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"a{i}", p, "r16_all")
    for _ in range(2):
        check()
        engine.step()
    merger.request("r16_all")  # the operator merges it while its requests run
    check()
    engine.step()  # the merger starts reading the adapter in fp32 on its worker thread
    # Waited for here, so that the merge starts at the next step whatever the machine's
    # load: its requests are then still running when the mixed traffic arrives.
    assert merger.status()["reading"]
    merger.wait(60)
    while merger.state != "merged":
        check()
        engine.step()
    # Mixed traffic returns: the base model and two other adapters.
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"b{i}", p, None)
        submit(engine, got, f"c{i}", p, "rslora_patterns")
    drain(engine, got, check)
    for i, p in enumerate(PROMPTS):  # its traffic alone again: merged again
        submit(engine, got, f"d{i}", p, "r16_all")
    drain(engine, got, check)
    assert ("merging", True) in seen and ("unmerging", True) in seen
    assert merger.switches["merge"] >= 2 and merger.switches["unmerge"] >= 1  # merged again
    for rid, tokens in got.items():
        adapter = {"a": "r16_all", "b": None, "c": "rslora_patterns", "d": "r16_all"}[rid[0]]
        assert tokens == unmerged[(adapter, int(rid[1:]))], rid
    merger.request(None)
    drain(engine, got)
    assert merger.state == "unmerged" and engine.runner.lora.silent_slot is None
    assert fingerprint(engine.runner.model) == before
    assert not engine.slots.refs(engine.adapter_manager.current_key("r16_all"))


# Triton's interpreter makes the triton case the slowest test here (about 4 minutes on two
# cores): it is the long form. CI runs the correction on the other two backends and the Triton
# kernel itself in test_peft_equivalence's fused case.
@pytest.mark.parametrize("backend", ["auto", "torch",
                                     pytest.param("triton", marks=pytest.mark.long)])
def test_other_requests_run_corrected_while_merging_merged_and_unmerging(tiny, references,
                                                                         backend):
    """--merge-others correct: base and other-adapter requests are admitted beside the merged
    adapter's at every stage, each of their tokens taking the merged delta back out of the
    modules merged so far; all match PEFT unmerged token for token, with no unmerge forced
    by them; the unmerge asked for restores every parameter. On every LoRA backend (auto is
    the C kernel here; Triton runs in its interpreter off the GPU, q/k/v and gate/up fused)."""
    if backend == "triton":
        pytest.importorskip("triton")
    unmerged, _ = references
    model_dir, adapters = tiny
    engine = engine_for(model_dir, adapters, backend=backend, others="correct")
    assert engine.runner.lora.backend == ("cpu-kernel" if backend == "auto" else backend)
    assert engine.runner.lora.shadow_slot == engine.runner.lora.num_slots - 1
    before = fingerprint(engine.runner.model)
    merger, sched = engine.merger, engine.scheduler
    beside = set()  # merge states in which another request ran

    def check():
        if merger.state != "unmerged" and any(r.adapter != merger.key for r in sched.running):
            beside.add(merger.state)

    def step_until(done):
        while not done():
            check()
            engine.step()

    got = {}
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"a{i}", p, "r16_all")
    engine.step()
    merger.request("r16_all")
    engine.step()  # the fp32 read starts on the merger's thread
    assert merger.status()["reading"]
    merger.wait(60)
    for i, p in enumerate(PROMPTS):  # the base model, arriving as the merge begins
        submit(engine, got, f"b{i}", p, None)
    step_until(lambda: merger.state == "merged")
    assert merger.status()["correcting"] and engine.runner.lora.correcting_slot == merger.slot
    for i, p in enumerate(PROMPTS):  # another adapter, while merged
        submit(engine, got, f"c{i}", p, "rslora_patterns")
    step_until(lambda: not any(r.request_id.startswith("c") for r in sched.running)
               and not sched.waiting)
    assert merger.state == "merged" and merger.switches == {"merge": 1, "unmerge": 0}
    for i, p in enumerate(PROMPTS):  # the unmerge asked for while both kinds run
        submit(engine, got, f"d{i}", p, "r16_all")
        submit(engine, got, f"e{i}", p, "rslora_patterns")
    engine.step()
    merger.request(None)
    drain(engine, got, check)
    assert beside >= {"merging", "merged", "unmerging"}, beside
    for rid, tokens in got.items():
        adapter = {"a": "r16_all", "b": None, "c": "rslora_patterns", "d": "r16_all",
                   "e": "rslora_patterns"}[rid[0]]
        assert tokens == unmerged[(adapter, int(rid[1:]))], rid
    assert merger.state == "unmerged" and engine.runner.lora.correcting_slot is None
    assert fingerprint(engine.runner.model) == before


def test_a_single_slot_drains_instead(tiny, references):
    """With one adapter slot, which the merged adapter holds, other adapters could never be
    loaded beside it: the merge drains them instead of correcting."""
    unmerged, _ = references
    model_dir, adapters = tiny
    engine = engine_for(model_dir, adapters, max_loras=1, others="correct", adapter="r16_all")
    drain(engine, {})
    assert engine.merger.state == "merged" and not engine.merger.correcting
    got = {}
    submit(engine, got, "b", PROMPTS[0], "rslora_patterns")
    drain(engine, got)
    assert got["b"] == unmerged[("rslora_patterns", 0)]
    assert engine.merger.switches["unmerge"] == 1


def test_nf4_merged_engine_serves_like_peft_s_nf4_merge(tiny):
    """NF4: the engine merged (dequantize, add, quantize again) against PEFT's
    merge_and_unload() on the same NF4 base, one sequence per step, as bitsandbytes' CPU
    kernel makes a row's result depend on its batch-mates' shapes."""
    from loraplex.server.config import (
        CacheConfig,
        EngineConfig,
        LoRAConfig,
        MergeConfig,
        SchedulerConfig,
    )
    from loraplex.server.engine.engine import LLMEngine
    from transformers import GenerationConfig

    model_dir, adapters = tiny
    cfg = ModelConfig(model=str(model_dir), quantization="nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(load_model(cfg).model,
                                        str(adapters["r16_all"])).merge_and_unload()
    ref.generation_config = GenerationConfig()
    base = load_model(cfg).model
    base.generation_config = GenerationConfig()
    engine = LLMEngine(EngineConfig(
        model=cfg, cache=CacheConfig(num_blocks=64, block_size=8),
        scheduler=SchedulerConfig(max_num_seqs=1), lora=LoRAConfig(max_loras=2),
        merge=MergeConfig(adapter="r16_all")))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    drain(engine, {})
    assert engine.merger.state == "merged"
    got, changed = {}, 0
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"m{i}", p, "r16_all", n=8)
    drain(engine, got)
    for i, p in enumerate(PROMPTS):
        want = peft_greedy(ref, p, 8)
        changed += want != peft_greedy(base, p, 8)
        assert got[f"m{i}"] == want, i
    assert changed  # the merged adapter changes the output


@pytest.mark.parametrize("others", ["drain", "correct"])
def test_a_replaced_version_still_running_keeps_the_base_unmerged(tiny, references, others):
    """An adapter replaced under its name while requests of the old version run: old
    requests finish on the old weights, new ones get the new weights. Drained: the new
    version is not merged under the old requests (names alike, versions not), only once they
    are gone. Corrected: the old version is unmerged and the new one merged at once, the old
    requests running corrected."""
    unmerged, _ = references
    model_dir, adapters = tiny
    engine = engine_for(model_dir, adapters, others=others)
    merger, sched = engine.merger, engine.scheduler
    got = {}
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"old{i}", p, "r16_all")
    engine.step()
    merger.request("r16_all")
    while merger.state != "merged":
        engine.step()
    old_key = merger.key
    # Same name, another adapter's files: a new version.
    engine.register_adapter("r16_all", str(adapters["rslora_patterns"]))
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"new{i}", p, "r16_all")
    merged_keys = set()
    while engine.has_unfinished():
        if merger.state != "unmerged":
            merged_keys.add(merger.key)
            assert others == "correct" or all(r.adapter == merger.key for r in sched.running)
        engine.step()
    assert merged_keys == {old_key, engine.adapter_manager.current_key("r16_all")}
    for i in range(len(PROMPTS)):
        assert got[f"old{i}"] == unmerged[("r16_all", i)]
        assert got[f"new{i}"] == unmerged[("rslora_patterns", i)]


def test_a_merge_that_fails_midway_restores_the_base_and_the_engine_goes_on(
        tiny, references, monkeypatch):
    from loraplex.server.engine import merger as merger_module

    unmerged, _ = references
    model_dir, adapters = tiny
    engine = engine_for(model_dir, adapters)
    before = fingerprint(engine.runner.model)
    calls = {"n": 0}
    real = merger_module.merge_module

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # mid-way through the second layer
            raise torch.OutOfMemoryError("no room for the delta")
        return real(*args, **kwargs)

    monkeypatch.setattr(merger_module, "merge_module", failing)
    got = {}
    for i, p in enumerate(PROMPTS):
        submit(engine, got, f"a{i}", p, "r16_all")
    engine.step()
    engine.merger.request("r16_all")
    drain(engine, got)
    status = engine.merger.status()
    assert status["state"] == "unmerged" and status["requested"] is None
    assert status["switches"] == {"merge": 0, "unmerge": 1}
    assert fingerprint(engine.runner.model) == before
    assert got == {f"a{i}": unmerged[("r16_all", i)] for i in range(len(PROMPTS))}
    key = engine.adapter_manager.current_key("r16_all")
    assert not engine.slots.refs(key)
