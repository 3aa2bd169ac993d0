"""Loader tests: tiny random Llama/Qwen2/Mistral checkpoints under every quantization, the
refusals, and the embedded SmolLM2 GGUF (converted once per session)."""

from __future__ import annotations

import time

import bitsandbytes as bnb
import pytest
import torch
from loraplex.server.config import ModelConfig
from loraplex.server.runner import loader
from loraplex.server.runner.loader import (
    convert_gguf,
    embedded_gguf_path,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
)
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
Q_PROJ_TYPES = {"none": nn.Linear, "nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_checkpoint(request, tmp_path_factory):
    """(dir, input_ids, reference logits) of a tiny random model saved as safetensors."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param](**TINY)).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    input_ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        logits = model(input_ids).logits
    return path, input_ids, logits


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_tiny_models_load(tiny_checkpoint, quantization):
    path, input_ids, ref_logits = tiny_checkpoint
    lm = load_model(ModelConfig(model=str(path), quantization=quantization))

    assert lm.quantization == quantization
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.max_model_len == TINY["max_position_embeddings"]
    assert lm.name == str(path)
    assert lm.tokenizer is None
    assert not lm.model.training
    q_proj = lm.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is Q_PROJ_TYPES[quantization]

    with torch.no_grad():
        logits = lm.model(input_ids).logits
    assert torch.isfinite(logits).all()
    if quantization == "none":
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_resolution_on_cpu():
    cfg = ModelConfig(device="cpu")
    device = resolve_device(cfg)
    assert device == torch.device("cpu")
    assert resolve_dtype(cfg, device) == torch.float32
    assert resolve_dtype(ModelConfig(dtype="bfloat16"), device) == torch.bfloat16
    assert resolve_quantization(cfg, device) == "none"
    assert resolve_quantization(ModelConfig(quantization="nf4"), device) == "nf4"
    assert resolve_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_quantization(cfg, torch.device("cuda")) == "nf4"


def test_refuses_pickled_weights(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="unpickle"):
        load_model(ModelConfig(model=str(tmp_path)))


@pytest.mark.parametrize("name", ["nope", "nope.gguf"])
def test_refuses_missing_path(tmp_path, name):
    missing = str(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=missing):
        load_model(ModelConfig(model=missing))


def test_refuses_max_model_len_beyond_positions(tiny_checkpoint):
    path = tiny_checkpoint[0]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_model(ModelConfig(model=str(path), max_model_len=TINY["max_position_embeddings"] + 1))


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The embedded SmolLM2, converted into a fresh per-session cache (the slow part)."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, load_model(ModelConfig(cache_dir=str(cache)))


def test_embedded_model_answers(embedded):
    _, lm = embedded
    assert lm.name == "SmolLM2-135M-Instruct"
    assert lm.quantization == "none" and lm.model.dtype == torch.float32
    assert lm.max_model_len == 8192
    # Tied embeddings survived the round trip through safetensors.
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = lm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=20, do_sample=False)
    text = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


def test_embedded_conversion_is_cached(embedded, monkeypatch):
    cache, _ = embedded
    (entry,) = (cache / "gguf").iterdir()  # one complete entry, no leftover temp dirs
    def snapshot():
        return [(p.name, p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(entry.iterdir())]

    before = snapshot()
    logged: list[str] = []
    monkeypatch.setattr(loader, "_log", logged.append)

    start = time.monotonic()
    assert convert_gguf(embedded_gguf_path(), cache) == entry
    assert time.monotonic() - start < 1.0

    # An explicit .gguf path hits the same entry; its served name is the path as given.
    gguf = str(embedded_gguf_path())
    lm = load_model(ModelConfig(model=gguf, cache_dir=str(cache), max_model_len=512))
    assert lm.name == gguf and lm.max_model_len == 512

    assert logged == []
    assert snapshot() == before
