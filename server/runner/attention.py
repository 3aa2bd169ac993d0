"""Paged KV cache and the attention function transformers' models call for packed batches.

The model runner packs every scheduled sequence's new tokens into one row and passes an
`AttentionMetadata` as the `lp_attn` keyword; transformers forwards it to the function
registered here under `ATTN_IMPLEMENTATION`. Each layer writes the new keys/values into the
cache (`module.layer_idx`), then every sequence attends over its own cached context: decodes
in one batch (the Triton or C paged kernel reading blocks in place, or a padded gather and
SDPA), prefill chunks one sequence at a time (causal within the chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from loraplex.kernels.paged_attention import (
    decode_mask,
    paged_decode,
    paged_decode_cpu,
    paged_decode_ref,
    tables_fit,
)
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "loraplex_paged"


@dataclass(frozen=True)
class KVGeometry:
    """What a model's KV cache looks like, read once from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int  # query heads

    @classmethod
    def of(cls, config) -> KVGeometry:  # a transformers text config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim,
                   config.num_attention_heads)


class PagedKVCache:
    def __init__(self, geometry: KVGeometry, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        g = geometry
        shape = (g.num_layers, num_blocks, block_size, g.num_kv_heads, g.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size


@dataclass
class PrefillSeq:
    row: int  # first packed row of this sequence's new tokens
    num_new: int
    context_len: int  # cached tokens after this step, the new ones included
    block_ids: torch.Tensor  # [num_blocks_of_seq]


@dataclass
class AttentionMetadata:
    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    prefills: list[PrefillSeq]
    # [B] packed row of each single-token sequence: 0 .. B-1 in a step without prefills
    decode_rows: torch.Tensor | None
    decode_block_tables: torch.Tensor | None  # [B, max_blocks], padded with block 0
    decode_context_lens: torch.Tensor | None  # [B]
    # "triton" or "cpu-kernel": a paged decode kernel reads blocks in place; "torch": gather
    # and SDPA.
    decode_backend: str = "torch"
    _masks: dict = field(default_factory=dict)  # masks per sliding window, built once a step
    _tables_fit: bool | None = None  # tables_fit, checked once a step

    def decode_tables_fit(self) -> bool:
        """Whether the decode tables stay within the cache, for every layer of the step."""
        if self._tables_fit is None:
            self._tables_fit = tables_fit(self.decode_block_tables, self.decode_context_lens,
                                          self.cache.k.shape[1], self.cache.block_size)
        return self._tables_fit

    def decode_mask(self, window: int | None) -> torch.Tensor:  # [B, max_blocks * bs]
        key = ("decode", window)
        if key not in self._masks:
            self._masks[key] = decode_mask(
                self.decode_context_lens,
                self.decode_block_tables.shape[1] * self.cache.block_size, window)
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor | None:  # [n, ctx]
        seq = self.prefills[i]
        if seq.num_new == seq.context_len and window is None:
            return None  # plain causal
        key = (i, window)
        if key not in self._masks:
            device = self.slot_mapping.device
            q_pos = torch.arange(seq.context_len - seq.num_new, seq.context_len, device=device)
            k_pos = torch.arange(seq.context_len, device=device)
            mask = k_pos[None, :] <= q_pos[:, None]
            if window is not None:
                mask &= k_pos[None, :] > (q_pos[:, None] - window)
            self._masks[key] = mask
        return self._masks[key]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,  # [1, KVH, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    lp_attn: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    assert lp_attn is not None, "the paged attention needs the runner's `lp_attn` metadata"
    out = paged_attention(lp_attn, module.layer_idx, query[0].transpose(0, 1),
                          key[0].transpose(0, 1), value[0].transpose(0, 1), scaling,
                          sliding_window)
    return out[None], None  # [1, T, H, D]


def paged_attention(
    meta: AttentionMetadata,
    layer: int,
    q: torch.Tensor,  # [T, H, D]
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:  # [T, H, D]
    """Write the step's keys and values into layer `layer`'s cache, then attend: the decodes
    in one batch, each prefill chunk on its own."""
    cache = meta.cache
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    k_flat = cache.k[layer].view(-1, num_kv_heads, head_dim)  # [blocks * bs, KVH, D]
    v_flat = cache.v[layer].view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, meta.slot_mapping, key.to(k_flat.dtype))
    v_flat.index_copy_(0, meta.slot_mapping, value.to(v_flat.dtype))

    # A step of decodes only packs them in order, one row each: no gather, no scatter.
    decode_only = not meta.prefills and meta.decode_rows is not None
    out = None if decode_only else torch.empty_like(q)
    if meta.decode_rows is not None:
        qd = q if decode_only else q[meta.decode_rows]  # [B, H, D]
        scale = scaling if scaling is not None else head_dim ** -0.5
        if meta.decode_backend == "triton":
            o = paged_decode(qd, cache.k[layer], cache.v[layer], meta.decode_block_tables,
                             meta.decode_context_lens, scale, sliding_window)
        elif meta.decode_backend == "cpu-kernel":
            o = paged_decode_cpu(qd, cache.k[layer], cache.v[layer], meta.decode_block_tables,
                                 meta.decode_context_lens, scale, sliding_window,
                                 tables_checked=meta.decode_tables_fit())
        else:
            o = paged_decode_ref(qd, cache.k[layer], cache.v[layer], meta.decode_block_tables,
                                 meta.decode_context_lens, scale, sliding_window,
                                 meta.decode_mask(sliding_window))
        if decode_only:
            return o
        out[meta.decode_rows] = o
    for i, seq in enumerate(meta.prefills):
        k = cache.k[layer].index_select(0, seq.block_ids)  # [blocks, bs, KVH, D]
        v = cache.v[layer].index_select(0, seq.block_ids)
        k = k.view(-1, num_kv_heads, head_dim)[: seq.context_len].transpose(0, 1)[None]
        v = v.view(-1, num_kv_heads, head_dim)[: seq.context_len].transpose(0, 1)[None]
        rows = slice(seq.row, seq.row + seq.num_new)
        qp = q[rows].transpose(0, 1)[None]  # [1, H, n, D]
        mask = meta.prefill_mask(i, sliding_window)
        o = F.scaled_dot_product_attention(
            qp, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None,
            scale=scaling, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    return out


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
