"""`loraplex plan`: the arithmetic against hand-computed figures, and on the CPU against what a
real engine allocates (weights, adapter slots, KV cache) for dense, NF4 and int8 bases."""

from __future__ import annotations

import json

import pytest
import torch
from loraplex.server.cli import main
from loraplex.server.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
)
from loraplex.server.plan import (
    KNOWN_SHAPES,
    ModelShape,
    PlanInputs,
    adapter_bytes,
    kv_block_bytes,
    kv_blocks,
    lora_slot_bytes,
    plan,
    weight_bytes,
)
from peft_fixtures import save_tiny_model

LLAMA_8B = KNOWN_SHAPES["llama-3.1-8b"]


def test_llama_8b_by_hand():
    # Llama-3.1-8B has 8,030,261,248 parameters: two bytes each in bf16.
    w = weight_bytes(LLAMA_8B, "bfloat16", "none")
    assert sum(w.values()) == 8_030_261_248 * 2
    # Per layer 218,103,808 linear weights: NF4 keeps half a byte each, 4 bytes per 64, and
    # a 64-byte code per projection.
    nf4 = weight_bytes(LLAMA_8B, "bfloat16", "nf4")["decoder linear layers"]
    assert nf4 == 32 * (218_103_808 // 2 + 218_103_808 // 64 * 4 + 7 * 64)
    int8 = weight_bytes(LLAMA_8B, "bfloat16", "int8")["decoder linear layers"]
    assert int8 == 32 * (218_103_808 + 4 * (4096 + 1024 + 1024 + 4096 + 14336 * 2 + 4096))
    # 128 KiB of keys and values per token: 2 x 32 layers x 8 heads x 128 x 2 bytes.
    assert kv_block_bytes(LLAMA_8B, 16, "bfloat16") == 16 * 128 * 1024
    # Slots: rank 64 x (in + out) summed over the 7 projections = 64 x 81,920 per layer.
    per_layer = 4096 * 2 + (4096 + 1024) * 2 + 4096 * 2 + (4096 + 14336) * 3
    assert per_layer == 81_920
    assert lora_slot_bytes(LLAMA_8B, 8, 64, "bfloat16", "triton") == 32 * 7 * 8 * 8 + \
        8 * 32 * 64 * 81_920 * 2
    assert adapter_bytes(LLAMA_8B, 16, ("q_proj", "v_proj"), "bfloat16") == \
        32 * 16 * (8192 + 5120) * 2


def test_what_fits_on_an_80_gb_gpu():
    p = plan(PlanInputs(LLAMA_8B, "nf4", "bfloat16", "cuda", gpu_memory_gb=80,
                        gpu_memory_utilization=0.9, max_loras=8, max_lora_rank=64,
                        max_model_len=8192))
    budget = 80 * 2**30 * 0.9 - sum(p.weights.values()) - p.lora_slots
    assert p.num_blocks == int(budget // (2 * 2**20))
    assert p.seqs_at_context == min(256, p.num_blocks // (8192 // 16))
    assert p.context == 8192 and any("DOES NOT FIT" in line for line in p.lines) is False
    too_small = plan(PlanInputs(KNOWN_SHAPES["llama-3.1-70b"], "none", "bfloat16", "cuda",
                                gpu_memory_gb=80))
    assert too_small.kv_budget < 0 and "DOES NOT FIT" in too_small.lines[-1]


def test_kv_blocks_never_below_one():
    assert kv_blocks(-5.0, 1024) == 1 and kv_blocks(4096, 1024) == 4


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _weights(model) -> list[torch.Tensor]:
    out = []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            out.append(p)
            state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit
            if state is not None:
                out += [state.absmax, state.code]
            # bitsandbytes int8 row scales: on the weight until its first forward, then on
            # the layer's matmul state
            out += [getattr(p, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)]
    return out


def _packed_bytes(model) -> int:
    """The oneDNN copies of the linear layers' weights (--cpu-gemm): opaque tensors without a
    storage to ask, counted at their logical size; and the C kernel's copies, regions of one
    arena (as the slots' below)."""
    from loraplex.server.runner.cpu_gemm import PackedLinear

    return sum(m.packed.numel() * m.packed.element_size()
               + (0 if m.dense is None else m.dense.data.nbytes)
               for m in model.modules() if isinstance(m, PackedLinear))


def _slot_bytes(lora) -> int:
    """Bytes of the slots' storage. The C kernel's slots are regions of one arena
    (`SlotArena`), whose mapping reserves up to 2 MB more address space to start on a huge
    page, never touched: its regions are what it allocates."""
    tensors, packed = [], 0
    for s in lora.modules.values():
        tensors += [s.ranks_dev, s.scales_dev, getattr(s, "lora_a", None),
                    getattr(s, "lora_b", None)]
        if getattr(s, "packed", None) is not None:
            packed += s.packed.data.numel() * s.packed.data.element_size()
    return _storage_bytes(tensors) + packed


@pytest.mark.parametrize("arch,quantization,backend,lora_dtype", [
    ("llama", "none", "cpu-kernel", "auto"), ("llama", "none", "cpu-kernel", "bfloat16"),
    ("qwen2", "none", "torch", "auto"), ("llama", "nf4", "torch", "auto"),
    ("llama", "int8", "torch", "auto")])
def test_the_plan_is_what_the_engine_allocates(tmp_path, arch, quantization, backend,
                                               lora_dtype):
    from loraplex.server.engine.engine import LLMEngine

    model_dir = save_tiny_model(arch, tmp_path / "model", num_hidden_layers=2)
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=str(model_dir), quantization=quantization),
        cache=CacheConfig(kv_cache_memory_gb=0.001, block_size=4),
        lora=LoRAConfig(max_loras=3, max_lora_rank=8, backend=backend, dtype=lora_dtype)))
    shape = ModelShape.from_directory(model_dir)
    p = plan(PlanInputs(shape, quantization, "float32", "cpu", kv_cache_memory_gb=0.001,
                        max_loras=3, max_lora_rank=8, block_size=4, backend=backend,
                        lora_dtype=lora_dtype))
    assert p.backend == engine.runner.lora.backend
    model = engine.loaded.model
    assert ("oneDNN packed copies" in p.weights) == (engine.runner.cpu_gemm != "torch")
    assert ("C kernel copies" in p.weights) == (engine.runner.cpu_gemm == "onednn+c")
    assert sum(p.weights.values()) == _storage_bytes(_weights(model)) + _packed_bytes(model)
    assert p.lora_slots == _slot_bytes(engine.runner.lora)
    kv = engine.runner.kv
    assert p.num_blocks == engine.blocks.num_blocks == kv.k.shape[1]
    assert p.num_blocks * p.block_bytes == kv.k.nbytes + kv.v.nbytes


def test_the_plan_of_the_embedded_model_is_what_the_server_allocates(embedded_dir):
    from loraplex.server.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(embedded_dir))))
    shape = ModelShape.from_directory(embedded_dir)
    assert shape == KNOWN_SHAPES["smollm2-135m"].__class__(**{
        **KNOWN_SHAPES["smollm2-135m"].__dict__, "name": shape.name})
    p = plan(PlanInputs(shape, "none", "float32", "cpu"))
    model = engine.loaded.model
    assert engine.runner.cpu_gemm == "onednn+c" and p.weights["oneDNN packed copies"] > 0
    # every SmolLM2 width is a multiple of the C copies' 64-row panels: no padding
    assert p.weights["C kernel copies"] == p.weights["oneDNN packed copies"]
    assert sum(p.weights.values()) == _storage_bytes(_weights(model)) + _packed_bytes(model)
    assert p.lora_slots == _slot_bytes(engine.runner.lora)
    assert p.num_blocks == engine.blocks.num_blocks
    assert p.num_blocks * p.block_bytes == engine.runner.kv.k.nbytes * 2


def test_plan_command(capsys, tmp_path):
    assert main(["plan", "llama-3.1-8b", "--gpu-memory-gb", "80", "--max-model-len", "8192"]) == 0
    text = capsys.readouterr().out
    assert "Llama-3.1-8B" in text and "blocks" in text and "sequences" in text
    assert main(["plan", "llama-3.1-8b", "--json", "--quantization", "none"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["weights"]["decoder linear layers"] == 32 * 218_103_808 * 2
    assert main(["plan", "llama-3.1-70b", "--quantization", "none"]) == 1  # does not fit
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "missing")]) == 2
    assert "not a known shape" in capsys.readouterr().err
    assert main(["plan", "--adapter-targets", "q_proj,nope"]) == 2
