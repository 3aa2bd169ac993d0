"""Self-tests of tests/peft_fixtures.py: the oracle must be trustworthy before the engine is
measured against it. Fast (tiny random models only)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft_fixtures import (
    ADAPTER_SPECS,
    ARCHS,
    DEFAULT_LORA_REL_NORM,
    NEAR_TIE_REL_GAP,
    PeftReference,
    assert_tokens_match,
    diagnose_mismatch,
    explain_mismatch,
    make_adapters,
    save_tiny_model,
    tiny_config,
    tiny_model,
)
from safetensors import safe_open

PROMPT = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 200, 33]
N_NEW = 8


def _prompts(n: int, seed: int = 123) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(4, 32, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    return make_adapters(lambda: tiny_model("llama"), tmp_path_factory.mktemp("llama_adapters"))


@pytest.fixture(scope="module")
def llama_ref(llama_adapters):
    return PeftReference(lambda: tiny_model("llama"), llama_adapters)


# --- base models -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_config_shapes(arch):
    cfg = tiny_config(arch)
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == 256 and cfg.max_position_embeddings == 256
    assert cfg.tie_word_embeddings is False
    assert tiny_config(arch, num_hidden_layers=5).num_hidden_layers == 5
    model = tiny_model(arch)
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "sdpa"
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (32, 64)  # 2 KV heads x head_dim 16
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    has_bias = attn.q_proj.bias is not None
    assert has_bias == (arch == "qwen2")
    if arch == "qwen2":
        assert attn.k_proj.bias is not None and attn.v_proj.bias is not None
        assert attn.o_proj.bias is None
    if arch == "mistral":
        assert cfg.sliding_window is None
        assert tiny_config(arch, sliding_window=24).sliding_window == 24


def test_tiny_model_deterministic_in_seed():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    # Building a model does not disturb the caller's RNG stream.
    torch.manual_seed(7)
    x = torch.rand(3)
    torch.manual_seed(7)
    tiny_model("qwen2", seed=3)
    assert torch.equal(torch.rand(3), x)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_greedy_is_not_degenerate(arch):
    """initializer_range 0.2: continuations are varied and argmaxes are clear, not near-ties."""
    model = tiny_model(arch)
    rel_gaps, distinct = [], []
    with torch.no_grad():
        for prompt in _prompts(6):
            ids = torch.tensor([prompt])
            out = model.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=None,
                                 pad_token_id=0)
            new = out[0, len(prompt):].tolist()
            assert len(new) == 16
            distinct.append(len(set(new)))
            logits = model(out).logits[0, len(prompt) - 1:-1]
            top2 = logits.topk(2, dim=-1).values
            rel_gaps.append((top2[:, 0] - top2[:, 1]) / logits.abs().amax(-1))
    gaps = torch.cat(rel_gaps)
    assert min(distinct) >= 2, distinct  # never one token repeated
    assert sorted(distinct)[len(distinct) // 2] >= 8, distinct
    assert gaps.median() > 1e-2, gaps.median()
    assert (gaps > NEAR_TIE_REL_GAP).float().mean() > 0.97


def test_save_tiny_model_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model("qwen2", tmp_path / "m", seed=4)
    assert (path / "config.json").is_file()
    assert any(path.glob("*.safetensors")) and not any(path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fresh = tiny_model("qwen2", seed=4)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fresh(ids).logits)


# --- adapters --------------------------------------------------------------------------------


def test_specs_cover_the_required_variants():
    specs = ADAPTER_SPECS
    assert len(specs) >= 9
    assert all(s["init_lora_weights"] is False and s["lora_dropout"] == 0 for s in specs.values())
    assert all(s["task_type"] == "CAUSAL_LM" for s in specs.values())
    assert {1, 8, 16, 64} <= {s["r"] for s in specs.values()}
    assert any(s.get("use_rslora") for s in specs.values())
    assert any(s.get("rank_pattern") and s.get("alpha_pattern") for s in specs.values())
    assert any(s.get("layers_to_transform") is not None for s in specs.values())
    assert any(isinstance(s["target_modules"], str) for s in specs.values())
    assert any(s.get("fan_in_fan_out") for s in specs.values())
    assert len({s["lora_alpha"] for s in specs.values()}) >= 4


def test_saved_adapters_are_safetensors(llama_adapters):
    assert list(llama_adapters) == list(ADAPTER_SPECS)
    for name, path in llama_adapters.items():
        files = {p.name for p in path.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, (name, files)
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files), (name, files)
        cfg = json.loads((path / "adapter_config.json").read_text())
        spec = ADAPTER_SPECS[name]
        assert cfg["peft_type"] == "LORA"
        assert cfg["r"] == spec["r"] and cfg["lora_alpha"] == spec["lora_alpha"], name
        assert cfg["use_rslora"] == spec.get("use_rslora", False), name
        assert (cfg["rank_pattern"] or {}) == spec.get("rank_pattern", {}), name
        assert (cfg["alpha_pattern"] or {}) == spec.get("alpha_pattern", {}), name
        assert cfg["layers_to_transform"] == spec.get("layers_to_transform"), name
        assert cfg["fan_in_fan_out"] == spec.get("fan_in_fan_out", False), name
        targets = cfg["target_modules"]
        if isinstance(spec["target_modules"], str):
            assert targets == spec["target_modules"], name
        else:
            assert sorted(targets) == sorted(spec["target_modules"]), name
        with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
            keys = list(f.keys())
            assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
            assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
            assert all(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)


def _wrapped(ref: PeftReference, name: str) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in ref.model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and name in m.lora_A}


def test_adapter_targets_and_ranks(llama_ref):
    """The specs select what they claim to (as PEFT reads them back from disk)."""
    def targets(name):
        return set(_wrapped(llama_ref, name))

    all7 = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in targets("r1_qv")} == {"q_proj", "v_proj"}
    assert len(targets("r16_all")) == 3 * 7
    assert {n.split(".")[2] for n in targets("layers_02")} == {"0", "2"}
    assert {n.split(".")[2] for n in targets("layer1_pattern")} == {"1"}
    assert len(targets("layers_02")) == 2 * 7
    assert targets("regex_mlp01") == {f"model.layers.{i}.mlp.{p}_proj"
                                      for i in (0, 1) for p in ("gate", "up")}
    assert {n.rsplit(".", 1)[1] for n in targets("regex_qk")} == {"q_proj", "k_proj"}
    assert {n.rsplit(".", 1)[1] for n in targets("rslora_r32")} == all7
    mods = _wrapped(llama_ref, "patterns")
    assert mods["model.layers.0.self_attn.q_proj"].r["patterns"] == 4
    assert mods["model.layers.0.mlp.down_proj"].r["patterns"] == 16
    assert mods["model.layers.0.self_attn.k_proj"].r["patterns"] == 8
    assert mods["model.layers.0.self_attn.v_proj"].scaling["patterns"] == 32 / 8
    mods = _wrapped(llama_ref, "rslora_patterns")
    assert math.isclose(mods["model.layers.2.self_attn.k_proj"].scaling["rslora_patterns"],
                        12 / math.sqrt(2))
    assert math.isclose(mods["model.layers.2.self_attn.o_proj"].scaling["rslora_patterns"],
                        4 / math.sqrt(8))
    assert math.isclose(_wrapped(llama_ref, "rslora_r32")["model.layers.1.mlp.up_proj"]
                        .scaling["rslora_r32"], 16 / math.sqrt(32))
    # fan_in_fan_out=True on nn.Linear: PEFT loads it and ignores it.
    for module in _wrapped(llama_ref, "fan_in_fan_out").values():
        assert module.fan_in_fan_out is False


def test_lora_delta_is_rel_norm_of_base(llama_ref):
    for name in ADAPTER_SPECS:
        for module_name, m in _wrapped(llama_ref, name).items():
            b, a = m.lora_B[name].weight.double(), m.lora_A[name].weight.double()
            delta = m.scaling[name] * (b @ a)
            ratio = (delta.norm() / m.get_base_layer().weight.double().norm()).item()
            assert math.isclose(ratio, DEFAULT_LORA_REL_NORM, rel_tol=1e-4), (name, module_name)


def test_make_adapters_deterministic(tmp_path, llama_adapters):
    specs = {k: ADAPTER_SPECS[k] for k in ("r1_qv", "patterns")}
    again = make_adapters(lambda: tiny_model("llama"), tmp_path, specs)
    for name, path in again.items():
        assert ((path / "adapter_model.safetensors").read_bytes()
                == (llama_adapters[name] / "adapter_model.safetensors").read_bytes())


@pytest.mark.parametrize("name", list(ADAPTER_SPECS))
def test_each_adapter_changes_base_greedy_output(llama_ref, name):
    base = llama_ref.greedy(PROMPT, None, N_NEW)
    got = llama_ref.greedy(PROMPT, name, N_NEW)
    assert len(got) == N_NEW
    assert got != base, f"{name} did not change the base greedy output {base}"
    # logits stay in the base model's range (no blow-up)
    base_max = llama_ref.step_logits(PROMPT, None).abs().max()
    assert llama_ref.step_logits(PROMPT, name).abs().max() < 3 * base_max


# --- the oracle ------------------------------------------------------------------------------


def test_base_greedy_matches_plain_model(llama_ref):
    """disable_adapter really gives the base model, also after an adapter was active."""
    model = tiny_model("llama")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        plain = model.generate(ids, do_sample=False, max_new_tokens=N_NEW, eos_token_id=None,
                               pad_token_id=0)[0, len(PROMPT):].tolist()
    llama_ref.greedy(PROMPT, "r64_all", 2)
    assert llama_ref.greedy(PROMPT, None, N_NEW) == plain


@pytest.mark.parametrize("adapter", [None, "r8_attn", "layers_02"])
def test_greedy_matches_stepwise_argmax(llama_ref, adapter):
    """generate (KV cache) == argmax of step_logits (full forward each step)."""
    got = llama_ref.greedy(PROMPT, adapter, N_NEW)
    manual: list[int] = []
    for _ in range(N_NEW):
        manual.append(int(llama_ref.step_logits(PROMPT, adapter, manual).argmax()))
    assert_tokens_match(manual, got, llama_ref.logits_fn(PROMPT, adapter))


def test_greedy_never_stops_or_suppresses_eos(tmp_path, llama_adapters):
    base_first = PeftReference(lambda: tiny_model("llama"),
                               {"r1_qv": llama_adapters["r1_qv"]}).greedy(PROMPT, None, 1)[0]

    def factory():
        # the model's EOS is exactly the token the base greedily emits first
        return tiny_model("llama", eos_token_id=base_first)

    ref = PeftReference(factory, {"r1_qv": llama_adapters["r1_qv"]})
    assert ref.eos_token_id == base_first
    out = ref.greedy(PROMPT, None, 5)
    assert len(out) == 5 and out[0] == base_first
    # not suppressed either: the tokens are the plain argmaxes, EOS included
    manual: list[int] = []
    for _ in range(5):
        manual.append(int(ref.step_logits(PROMPT, None, manual).argmax()))
    assert out == manual
    # the trap this guards against: plain generate with the model's defaults stops at once
    model = factory()
    with torch.no_grad():
        stopped = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=5)
    assert stopped.shape[1] == len(PROMPT) + 1


def test_model_factory_called_once_per_reference(llama_adapters):
    calls = []

    def factory():
        calls.append(1)
        return tiny_model("llama")

    PeftReference(factory, {k: llama_adapters[k] for k in ("r1_qv", "r8_attn")})
    assert len(calls) == 1


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_archs(tmp_path, arch):
    specs = {k: ADAPTER_SPECS[k] for k in ("r8_attn", "regex_mlp01", "rslora_r32")}
    paths = make_adapters(lambda: tiny_model(arch, seed=1), tmp_path, specs)
    ref = PeftReference(lambda: tiny_model(arch, seed=1), paths)
    base = ref.greedy(PROMPT, None, N_NEW)
    assert len(base) == N_NEW
    for name in specs:
        got = ref.greedy(PROMPT, name, N_NEW)
        assert len(got) == N_NEW and got != base, (arch, name)
    assert ref.greedy(PROMPT, None, N_NEW) == base


# --- mismatch analysis -----------------------------------------------------------------------


def test_explain_mismatch_real_bug(llama_ref):
    ref_tokens = llama_ref.greedy(PROMPT, "r16_all", N_NEW)
    fn = llama_ref.logits_fn(PROMPT, "r16_all")
    assert explain_mismatch(ref_tokens, ref_tokens, fn) == "outputs are identical"
    assert diagnose_mismatch(ref_tokens, list(ref_tokens), fn) is None
    # a wrong token at position 3: the reference's 2nd choice there
    second = int(fn(ref_tokens[:3]).topk(2).indices[1])
    bad = ref_tokens[:3] + [second] + ref_tokens[4:]
    m = diagnose_mismatch(ref_tokens, bad, fn)
    assert m.position == 3 and m.ref_token == ref_tokens[3] and m.got_token == second
    assert m.top2[0][0] == ref_tokens[3] and m.top2[1][0] == second and m.got_rank == 1
    assert m.rel_gap > NEAR_TIE_REL_GAP and not m.near_tie
    text = explain_mismatch(ref_tokens, bad, fn)
    assert "position 3" in text and "REAL MISMATCH" in text
    with pytest.raises(AssertionError, match="REAL MISMATCH"):
        assert_tokens_match(ref_tokens, bad, fn, allow_near_tie=True)


def test_explain_mismatch_near_tie_and_length():
    logits = torch.zeros(256)
    logits[10], logits[11], logits[12] = 5.0, 5.0 - 1e-6, 1.0

    def fn(prefix):
        return logits

    text = explain_mismatch([4, 10, 9], [4, 11, 9], fn)
    assert "position 1" in text and "NEAR-TIE" in text
    m = assert_tokens_match([4, 10, 9], [4, 11, 9], fn, allow_near_tie=True)
    assert m is not None and m.near_tie
    with pytest.raises(AssertionError, match="NEAR-TIE"):
        assert_tokens_match([4, 10, 9], [4, 11, 9], fn)
    assert "length mismatch" in explain_mismatch([4, 10], [4, 10, 9], fn)
