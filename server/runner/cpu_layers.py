"""The decoder layers' small ops on the CPU in C (kernels/layers_cpu.c), for fp32 models.

Once the linear layers read their weights at the memory's speed (cpu_gemm.py), what is left
of a decode step is mostly torch's dispatch: a 30-layer SmolLM2 with its widths cut to 64,
whose weights cost next to nothing, still took 7.3 ms a step at one sequence against 23.6 ms
for the real model. In it, each layer's two RMSNorms took 33 us and its attention block 131
us, of which 25 the rotary embedding and 42 the attention proper.

`install` changes, in place and only where the model is fp32 on the CPU:
- each RMSNorm of Llama, Qwen2 and Mistral becomes a `CRMSNorm` on the same weight: one C call;
- each attention block of those models takes `attention_forward`: the projections as before
  (LoRA and merges included), the rotary embedding in place on their outputs in one C call,
  then the paged attention without the transposes to and from transformers' layout.
Anything else (another dtype, a non-contiguous tensor, a forward without the runner's
metadata) runs the model's own code. The rotary embedding gives torch's bits; RMSNorm may
differ in the last bit of its sum (layers_cpu.c).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from loraplex.kernels import layers_cpu
from loraplex.kernels.layers_cpu import rmsnorm_cpu, rope_cpu

from .attention import paged_attention

log = logging.getLogger(__name__)

NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
# attention class -> its sliding window, as its own forward passes it to the attention function
WINDOWS = {
    "LlamaAttention": lambda module: None,
    "Qwen2Attention": lambda module: module.sliding_window,
    "MistralAttention": lambda module: getattr(module.config, "sliding_window", None),
}


class CRMSNorm(nn.Module):
    """transformers' RMSNorm (weight * x / sqrt(mean(x^2) + eps)) in one C call for
    contiguous fp32 rows; its own formula otherwise. Holds the replaced module's Parameter."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden]
        if x.dtype is torch.float32 and x.is_contiguous() and self.weight.is_contiguous():
            return rmsnorm_cpu(x, self.weight, self.variance_epsilon)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)


def attention_forward(self: nn.Module, hidden_states: torch.Tensor,  # [1, T, hidden]
                      position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                      attention_mask: torch.Tensor | None = None, lp_attn=None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """A Llama-family attention block's forward, bound to one module by `install`."""
    if lp_attn is None or hidden_states.dtype is not torch.float32:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  lp_attn=lp_attn, **kwargs)
    # Each projection's output is a tensor of its own, or a slice of the Triton backend's
    # group buffer that nothing reads again: rotated in place.
    q = self.q_proj(hidden_states).contiguous()  # [1, T, H * D]
    k = self.k_proj(hidden_states).contiguous()  # [1, T, KVH * D]
    v = self.v_proj(hidden_states).contiguous()
    cos, sin = (t.contiguous() for t in position_embeddings)  # [1, T, D] each
    d, rows = self.head_dim, q.shape[-2]
    rope_cpu(q, k, cos, sin, d)
    out = paged_attention(lp_attn, self.layer_idx, q.view(rows, -1, d), k.view(rows, -1, d),
                          v.view(rows, -1, d), self.scaling, self.lp_window)
    return self.o_proj(out.view(1, rows, -1)), None


def install(model: nn.Module) -> int:
    """Put the C ops into `model`'s RMSNorms and attention blocks (see the module's doc), if
    the kernels build. The caller has checked that the model is dense fp32 on the CPU.
    Returns how many modules changed."""
    if layers_cpu.load() is None:
        return 0
    changed = 0
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind in NORMS:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, CRMSNorm(module))
            changed += 1
        elif kind in WINDOWS:
            module.lp_window = WINDOWS[kind](module)
            module.forward = types.MethodType(attention_forward, module)
            changed += 1
    log.info("CPU layers: %d RMSNorms and attention blocks take the C kernels", changed)
    return changed
