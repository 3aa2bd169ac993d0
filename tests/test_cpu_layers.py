"""RMSNorm and the rotary embedding in C (kernels/layers_cpu.c, server/runner/cpu_layers.py):
against transformers' own modules here; the engine's PEFT equivalence tests run fp32 models
through them (and assert so)."""

import pytest
import torch
from loraplex.kernels import layers_cpu
from loraplex.server.runner import cpu_layers
from peft_fixtures import tiny_model
from transformers.models.llama import modeling_llama

pytestmark = pytest.mark.skipif(layers_cpu.load() is None, reason="no C compiler")


@pytest.mark.parametrize("rows,width", [(1, 576), (3, 64), (17, 100)])
def test_rmsnorm_matches_transformers(rows, width):
    gen = torch.Generator().manual_seed(rows)
    norm = modeling_llama.LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = torch.randn(width, generator=gen)
    x = torch.randn(2, rows, width, generator=gen) * 3  # [2, rows, width]
    want = norm(x)
    assert torch.equal(layers_cpu.rmsnorm_ref(x, norm.weight, 1e-5), want)
    got = layers_cpu.rmsnorm_cpu(x, norm.weight.data, 1e-5)
    # the sum of squares in another order: at most a last bit apart
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows,heads,kv_heads,head_dim", [(1, 9, 3, 64), (7, 4, 2, 16)])
def test_rope_gives_transformers_bits(rows, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(rows)
    config = modeling_llama.LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, head_dim=head_dim,
                                        rope_theta=100000.0)
    cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(
        torch.zeros(1), torch.arange(rows)[None] + 37)  # [1, rows, head_dim] each
    q = torch.randn(1, rows, heads * head_dim, generator=gen)
    k = torch.randn(1, rows, kv_heads * head_dim, generator=gen)
    want_q, want_k = modeling_llama.apply_rotary_pos_emb(
        q.view(1, rows, heads, head_dim).transpose(1, 2),
        k.view(1, rows, kv_heads, head_dim).transpose(1, 2), cos, sin)
    assert torch.equal(layers_cpu.rope_ref(q.view(rows, heads, head_dim), cos[0], sin[0]),
                       want_q[0].transpose(0, 1))
    layers_cpu.rope_cpu(q, k, cos, sin, head_dim)  # in place
    assert torch.equal(q, want_q.transpose(1, 2).reshape(q.shape))
    assert torch.equal(k, want_k.transpose(1, 2).reshape(k.shape))


def test_kernels_refuse_what_they_cannot_read():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="rmsnorm_cpu"):
        layers_cpu.rmsnorm_cpu(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="rmsnorm_cpu"):
        layers_cpu.rmsnorm_cpu(x.bfloat16(), torch.ones(64), 1e-6)
    cos = torch.randn(4, 16)
    with pytest.raises(ValueError, match="rope_cpu"):
        layers_cpu.rope_cpu(x.t(), x, cos, cos, 16)  # not contiguous
    with pytest.raises(ValueError, match="rope_cpu"):
        layers_cpu.rope_cpu(x, torch.randn(4, 24), cos, cos, 16)  # not whole heads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_install_swaps_norms_and_attention_and_keeps_plain_forwards(arch):
    """Every RMSNorm and attention block of a fp32 model changes; a forward without the
    runner's metadata (plain transformers, SDPA) still gives the model's own logits."""
    model = tiny_model(arch)
    ids = torch.tensor([[5, 9, 3, 17, 4]])
    with torch.inference_mode():
        want = model(ids).logits
        layers = model.config.num_hidden_layers
        assert cpu_layers.install(model) == 3 * layers + 1  # 2 norms, 1 block each; the last norm
        got = model(ids).logits
    assert sum(isinstance(m, cpu_layers.CRMSNorm) for m in model.modules()) == 2 * layers + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_norm_keeps_its_formula_for_other_dtypes():
    norm = modeling_llama.LlamaRMSNorm(64, eps=1e-6)
    norm.weight.data = torch.randn(64).bfloat16()
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(cpu_layers.CRMSNorm(norm)(x), norm(x))
