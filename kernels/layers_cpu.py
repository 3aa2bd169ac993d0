"""RMSNorm and the rotary embedding in C (`layers_cpu.c`), each beside its torch reference:
one call where transformers makes six and ten small torch ops (server/runner/cpu_layers.py
puts them in a model). fp32, on the CPU; built by cpu_build.py, None without a compiler."""

from __future__ import annotations

import ctypes
import functools
import pathlib

import torch

from .cpu_build import build_and_load

SOURCE = pathlib.Path(__file__).with_name("layers_cpu.c")


@functools.cache
def load() -> ctypes.CDLL | None:
    return build_and_load(SOURCE, "torch's ops for RMSNorm and the rotary embedding",
                          {"lp_rmsnorm_f32": "pppiif", "lp_rope_f32": "pipippii"})


def _fits(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, for fp32 x."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rmsnorm_cpu(x: torch.Tensor,  # [..., n] fp32, contiguous
                weight: torch.Tensor,  # [n] fp32, contiguous
                eps: float) -> torch.Tensor:  # [..., n]
    n = weight.numel()
    if not (_fits(x, weight) and x.shape[-1] == n):
        raise ValueError(f"rmsnorm_cpu needs contiguous fp32 rows of {n} on the CPU and a "
                         f"weight of {n}, not {x.dtype} {tuple(x.shape)}")
    y = torch.empty_like(x)
    load().lp_rmsnorm_f32(y.data_ptr(), x.data_ptr(), weight.data_ptr(), x.numel() // n, n, eps)
    return y


def rope_ref(x: torch.Tensor,  # [T, heads, d]
             cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # [T, d]
    """transformers' apply_rotary_pos_emb for one tensor, heads in the middle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_cpu(q: torch.Tensor,  # [T, hq * d] fp32, contiguous: rotated in place
             k: torch.Tensor,  # [T, hk * d]
             cos: torch.Tensor, sin: torch.Tensor,  # [T, d]
             head_dim: int) -> None:
    rows = cos.numel() // head_dim
    if not (_fits(q, k, cos, sin) and head_dim % 2 == 0 and cos.shape == sin.shape
            and cos.shape[-1] == head_dim and q.numel() % (rows * head_dim) == 0
            and k.numel() % (rows * head_dim) == 0):
        raise ValueError(f"rope_cpu: q {tuple(q.shape)}, k {tuple(k.shape)}, cos "
                         f"{tuple(cos.shape)} {cos.dtype}: not contiguous fp32 rows of whole "
                         f"heads of {head_dim}")
    load().lp_rope_f32(q.data_ptr(), q.numel() // (rows * head_dim), k.data_ptr(),
                       k.numel() // (rows * head_dim), cos.data_ptr(), sin.data_ptr(), rows,
                       head_dim)
