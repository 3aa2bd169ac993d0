"""The base's linear layers through oneDNN with packed weights, and through the C kernel at
steps of few rows (server/runner/cpu_gemm.py): the same products as F.linear, the same
Parameters, refreshed after in-place changes, and chosen only where they run. The engine's
PEFT equivalence and merge tests run through them."""

import pytest
import torch
import torch.nn.functional as F
from loraplex.kernels import sgmv_cpu
from loraplex.server.cli import build_parser, config_from_args
from loraplex.server.config import ConfigError
from loraplex.server.runner.cpu_gemm import (
    PackedLinear,
    _works,
    bucket,
    pack_linears,
    resolve_cpu_gemm,
)
from torch import nn

CPU = torch.device("cpu")
LIB = sgmv_cpu.load(torch.float32)
# fp32 layers with and without the C kernel's copy for steps of few rows.
DENSE = pytest.param(True, marks=pytest.mark.skipif(LIB is None, reason="no C compiler"))


# bf16 packing needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, or an Arm CPU with bf16.
BF16 = pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
    not _works(torch.bfloat16), reason="this CPU has no oneDNN bf16 path"))


def test_row_counts_run_at_a_bounded_set_of_sizes():
    """Each size oneDNN sees costs it memory for good: the row counts of steps up to 2048
    come down to 72 sizes, none more than 12.5% above the count."""
    sizes = {bucket(rows) for rows in range(1, 2049)}
    assert len(sizes) == 72
    assert [bucket(r) for r in (1, 16, 17, 31, 32, 33, 64, 65, 129, 2047)] == \
        [1, 16, 18, 32, 32, 36, 64, 72, 144, 2048]
    assert all(rows <= bucket(rows) <= 1.125 * rows for rows in range(1, 5000))


@pytest.mark.parametrize("dtype,tol,dense", [
    (torch.float32, 1e-5, False), pytest.param(torch.float32, 1e-5, True, marks=DENSE.marks),
    pytest.param(*BF16.values, False, marks=BF16.marks)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_computes_what_f_linear_does(monkeypatch, dense_rows_64, dtype, tol,
                                                   dense, bias):
    """Row counts on and off the sizes oneDNN runs at (17 and 99 rows are padded); with the C
    kernel's copy, the calls of up to DENSE_ROWS rows (and only they) take it (pinned to 64)."""
    import loraplex.server.runner.cpu_gemm as cpu_gemm

    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(dtype)
    packed = PackedLinear.of(linear, LIB if dense else None)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    assert (packed.dense is not None) == dense
    dense_rows = []
    monkeypatch.setattr(cpu_gemm, "dense_cpu", lambda x, w: dense_rows.append(x.numel() // 96)
                        or sgmv_cpu.dense_cpu(x, w))
    shapes = [(1, 96), (1, 7, 96), (3, 5, 96), (1, dense_rows_64, 96), (3, 33, 96),
              (dense_rows_64 + 1, 96), (1, 99, 96)]
    for shape in shapes:
        x = torch.randn(shape).to(dtype)
        got, want = packed(x), F.linear(x, linear.weight, linear.bias)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert dense_rows == ([1, 7, 15, dense_rows_64] if dense else [])  # 17, 99 rows: oneDNN's
    # A strided input, as a column slice of a wider activation (oneDNN's, even at 5 rows).
    x = torch.randn(5, 192).to(dtype)[:, ::2]
    torch.testing.assert_close(packed(x).float(), F.linear(x, linear.weight, linear.bias).float(),
                               atol=tol, rtol=tol)
    assert len(dense_rows) == (4 if dense else 0)


@pytest.mark.parametrize("rows", [4, 24])  # the C kernel's copy, oneDNN's
def test_packed_linear_follows_its_weight_after_repack(rows):
    torch.manual_seed(0)
    packed = PackedLinear.of(nn.Linear(64, 32, bias=False), LIB)
    x = torch.randn(rows, 64)
    before = packed(x)
    with torch.no_grad():
        packed.weight.data += 1.0  # as a merge writes it
    # The packed copy is derived: until repacked it still holds the old weight.
    torch.testing.assert_close(packed(x), before)
    packed.repack()
    torch.testing.assert_close(packed(x), F.linear(x, packed.weight), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(packed(x), before)


def test_a_failed_repack_falls_back_to_the_weight_itself(monkeypatch):
    """Out of memory while packing again (after a merge changed the weight): the layer
    multiplies by the new weight with F.linear, never by the stale packed copy."""
    import loraplex.server.runner.cpu_gemm as cpu_gemm

    torch.manual_seed(0)
    packed = PackedLinear.of(nn.Linear(64, 32))  # no C kernel's copy, which never fails
    with torch.no_grad():
        packed.weight.data *= 2.0

    def out_of_memory(weight):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cpu_gemm, "_pack", out_of_memory)
    packed.repack()
    assert packed.packed is None
    x = torch.randn(5, 64)
    torch.testing.assert_close(packed(x), F.linear(x, packed.weight, packed.bias))


def test_merge_and_its_undo_repack_the_layer():
    """adapters/merge.py adds the delta to the weight in place and repacks; the undo copies
    the weight back and repacks again."""
    from loraplex.adapters.merge import delta_weight, merge_module
    from loraplex.adapters.peft_format import LoRAWeights

    torch.manual_seed(0)
    packed = PackedLinear.of(nn.Linear(64, 48, bias=False), LIB)
    weights = LoRAWeights(lora_a=torch.randn(4, 64), lora_b=torch.randn(48, 4), scale=0.5)
    original = packed.weight.detach().clone()
    x = torch.randn(6, 64)
    merged = merge_module(packed, weights)
    want = F.linear(x, original + delta_weight(weights, torch.device("cpu")))
    torch.testing.assert_close(packed(x), want, atol=1e-4, rtol=1e-4)
    assert merged.undo() is packed
    assert torch.equal(packed.weight, original)
    torch.testing.assert_close(packed(x), F.linear(x, original), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dense", [False, DENSE])
def test_pack_linears_keeps_names_ties_and_outputs(dense):
    """Every nn.Linear of a model is replaced in place; a tied lm_head stays tied to the
    embedding, the state dict keeps its keys, and the model computes the same (five tokens:
    through the C kernel's copies where they are kept)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    keys = list(model.state_dict())
    ids = torch.tensor([[5, 9, 17, 3, 60]])
    with torch.no_grad():
        want = model(ids).logits
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert linears == 2 * 7 + 1
    total = pack_linears(model, dense=dense)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == linears
    assert all((m.dense is not None) == dense for m in model.modules()
               if isinstance(m, PackedLinear))
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(model.state_dict()) == keys
    # the C kernel's copies pad each weight's rows to a multiple of 64
    assert total == sum(m.weight.numel() * 4 + (m.dense.data.nbytes if dense else 0)
                        for m in model.modules() if isinstance(m, PackedLinear))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_cpu_gemm_is_chosen_where_it_runs_and_refused_elsewhere():
    assert config_from_args(build_parser().parse_args(["serve"])).engine.model.cpu_gemm == "auto"
    assert config_from_args(build_parser().parse_args(
        ["serve", "--cpu-gemm", "torch"])).engine.model.cpu_gemm == "torch"
    # fp32 takes the C kernel at steps of few rows where it builds; bf16 and asked-for
    # oneDNN do not.
    assert resolve_cpu_gemm("auto", CPU, torch.float32, quantized=False) == (
        "onednn+c" if LIB is not None else "onednn")
    assert resolve_cpu_gemm("auto", CPU, torch.bfloat16, quantized=False) == (
        "onednn" if _works(torch.bfloat16) else "torch")
    assert resolve_cpu_gemm("onednn", CPU, torch.float32, quantized=False) == "onednn"
    assert resolve_cpu_gemm("torch", CPU, torch.float32, quantized=False) == "torch"
    # bitsandbytes layers, fp16 and CUDA keep torch's calls.
    assert resolve_cpu_gemm("auto", CPU, torch.float32, quantized=True) == "torch"
    assert resolve_cpu_gemm("auto", CPU, torch.float16, quantized=False) == "torch"
    assert resolve_cpu_gemm("auto", torch.device("cuda"), torch.bfloat16,
                            quantized=False) == "torch"
    for dtype, quantized in ((torch.float16, False), (torch.float32, True)):
        with pytest.raises(ConfigError, match="--cpu-gemm onednn"):
            resolve_cpu_gemm("onednn", CPU, dtype, quantized=quantized)
