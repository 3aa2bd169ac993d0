"""Composed adapters (adapters/compose.py) against PEFT's own `add_weighted_adapter` on the
real base model, weight for weight, and served token for token; SLERP's end points."""

from __future__ import annotations

import warnings

import pytest
import torch
from loraplex.adapters.compose import PEFT_METHODS, Source, compose_peft, compose_slerp, slerp
from loraplex.adapters.peft_format import AdapterError, load_adapter
from loraplex.server.config import ModelConfig
from loraplex.server.runner.loader import load_model
from peft import PeftModel
from peft_fixtures import make_adapters, save_tiny_model
from safetensors.torch import load_file

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = dict(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", init_lora_weights=False)
SPECS = {
    "a": dict(r=8, lora_alpha=16, target_modules=ALL, **COMMON),
    "b": dict(r=8, lora_alpha=8, target_modules=ALL, **COMMON),
    "c": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **COMMON),
}
WEIGHTS = {"a": 0.7, "b": 0.5, "c": 1.2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    model_dir = save_tiny_model("llama", root / "model")
    cfg = ModelConfig(model=str(model_dir), quantization="none")
    adapters = make_adapters(lambda: load_model(cfg).model, root / "adapters", SPECS)
    model = load_model(cfg).model
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if n.rsplit(".", 1)[-1] in ALL}
    return cfg, adapters, shapes


def peft_reference(cfg, adapters, names, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_model(cfg).model, str(adapters[names[0]]),
                                          adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(adapters[n]), adapter_name=n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(kw.pop("seed", 0))
            model.add_weighted_adapter(names, [WEIGHTS[n] for n in names], "mix",
                                       combination_type=method, **kw)
    return model


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_peft_method_equals_peft_weight_for_weight(tiny, tmp_path, method):
    cfg, adapters, shapes = tiny
    names = ["a", "b"] if method in ("linear", "ties", "dare_linear", "dare_ties",
                                     "magnitude_prune") else ["a", "b", "c"]
    density = 0.5 if method.startswith(("ties", "dare", "magnitude")) else None
    rank = 6 if method.endswith("svd") else None
    compose_peft([Source(n, adapters[n], WEIGHTS[n]) for n in names], method, tmp_path, shapes,
                 density=density, rank=rank, seed=3)
    ref = peft_reference(cfg, adapters, names, method, density=density, svd_rank=rank, seed=3)
    got = load_file(str(tmp_path / "adapter_model.safetensors"))
    compared = 0
    for name, module in ref.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            key = name.replace("base_model.model.", "base_model.model.", 1)
            for ab, layer in (("A", module.lora_A["mix"]), ("B", module.lora_B["mix"])):
                assert torch.equal(got[f"{key}.lora_{ab}.weight"], layer.weight), (key, ab)
                compared += 1
    assert compared == len(got) > 0
    # It is a valid adapter for this model, which changes the output.
    adapter = load_adapter(tmp_path, "mix", shapes, 64, torch.float32)
    assert any(w.lora_b.abs().sum() > 0 for w in adapter.modules.values())


def test_incompatible_sources_are_refused_with_peft_s_reason(tiny, tmp_path):
    _, adapters, shapes = tiny
    with pytest.raises(AdapterError, match="same r"):
        compose_peft([Source(n, adapters[n], 1.0) for n in ("a", "c")], "linear", tmp_path,
                     shapes)


def test_slerp_end_points_and_midpoint(tiny, tmp_path):
    v0, v1 = torch.randn(6, 5), torch.randn(6, 5)
    v1 = v1 * (v0.norm() / v1.norm())  # equal norms: the midpoint is then equiangular
    assert torch.allclose(slerp(0.0, v0, v1), v0) and torch.allclose(slerp(1.0, v0, v1), v1)
    mid = slerp(0.5, v0, v1)
    # On the great circle: the angle to each end is half the angle between them, and the
    # norm is kept (a linear mix of two directions would shrink it).
    assert torch.allclose(mid.norm(), v0.norm(), rtol=1e-5)
    def angle(x, y):
        return torch.arccos((x / x.norm() * (y / y.norm())).sum())
    assert torch.allclose(angle(mid, v0), angle(mid, v1), atol=1e-5)
    assert torch.allclose(angle(mid, v0) * 2, angle(v0, v1), atol=1e-5)
    _, adapters, shapes = tiny
    a, b = (load_adapter(adapters[n], n, shapes, 64, torch.float32) for n in ("a", "b"))
    compose_slerp([a, b], 0.0, 8, tmp_path, None)
    out = load_adapter(tmp_path, "s", shapes, 64, torch.float32)
    for name, w in a.modules.items():  # t = 0 gives the first adapter's delta back
        got = (out.modules[name].lora_b @ out.modules[name].lora_a) * out.modules[name].scale
        torch.testing.assert_close(got, (w.lora_b @ w.lora_a) * w.scale, atol=1e-5, rtol=1e-4)


PROMPTS = [[1, 5, 9, 33, 71, 12], [1, 40, 41, 42, 43], [1, 200, 17, 3, 3, 90, 101, 7]]


def test_composed_adapters_serve_token_for_token_like_peft(tiny, tmp_path):
    """Composed adapters, served by the engine in one mixed batch, against PEFT serving the
    same files; each composed adapter first shown to change the base model's output."""
    from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig
    from loraplex.server.engine.engine import LLMEngine
    from loraplex.server.engine.request import SamplingParams
    from peft_fixtures import PeftReference

    cfg, adapters, shapes = tiny
    dirs = {}
    for method in ("cat", "ties_svd", "dare_linear"):
        names = ["a", "b"] if method == "dare_linear" else ["a", "b", "c"]
        dirs[method] = tmp_path / method
        compose_peft([Source(n, adapters[n], WEIGHTS[n]) for n in names], method,
                     dirs[method], shapes, density=0.6 if method != "cat" else None,
                     rank=8 if method.endswith("svd") else None, seed=1)
    a, b = (load_adapter(adapters[n], n, shapes, 64, torch.float32) for n in ("a", "b"))
    dirs["slerp"] = tmp_path / "slerp"
    compose_slerp([a, b], 0.3, 8, dirs["slerp"], None)
    ref = PeftReference(lambda: load_model(cfg).model, dirs)
    engine = LLMEngine(EngineConfig(model=cfg, cache=CacheConfig(num_blocks=128, block_size=8),
                                    lora=LoRAConfig(max_loras=4, max_lora_rank=64)))
    for name, path in dirs.items():
        engine.register_adapter(name, str(path))
    got, want = {}, {}
    for name in dirs:
        for i, p in enumerate(PROMPTS):
            rid = f"{name}-{i}"
            want[rid] = ref.greedy(p, name, 8)
            assert want[rid] != ref.greedy(p, None, 8) or i, name  # the adapter matters
            got[rid] = []
            engine.add_request(rid, p, SamplingParams(max_tokens=8, temperature=0.0,
                                                      ignore_eos=True), name,
                               callback=lambda o: got[o.request_id].extend(o.new_token_ids))
    while engine.has_unfinished():
        engine.step()
    assert got == want
