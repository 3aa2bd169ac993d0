"""Turns a scheduled batch into tensors and runs one forward of the transformers model."""

from __future__ import annotations

import logging

import torch
from loraplex.kernels.paged_attention import (
    CPU_MAX_BLOCK,
    CPU_MAX_GROUP,
    CPU_MAX_HEAD_DIM,
    cpu_kernel_fits,
    load_cpu,
)
from loraplex.kernels.segments import Segments

from ..config import ConfigError, EngineConfig
from ..engine.request import Request, SamplingParams
from ..engine.scheduler import ScheduledRequest
from . import cpu_layers
from .attention import ATTN_IMPLEMENTATION, AttentionMetadata, KVGeometry, PagedKVCache, PrefillSeq
from .cpu_gemm import pack_linears, resolve_cpu_gemm
from .decode_graphs import DEFAULT_SIZES, DecodeGraphs
from .loader import LoadedModel
from .lora_layers import LoRAModel, check_triton, lora_weight_dtype, resolve_backend

log = logging.getLogger(__name__)


def _decode_backend(wanted: str, loaded: LoadedModel, geometry: KVGeometry,
                    block_size: int) -> str:
    if wanted == "triton":
        check_triton("--decode-attention triton", loaded.device)
        return wanted
    if wanted == "torch":
        return wanted
    if loaded.device.type != "cpu":
        if wanted == "cpu-kernel":
            raise ConfigError("--decode-attention cpu-kernel runs on the CPU only")
        return "triton" if loaded.device.type == "cuda" else "torch"
    fits = cpu_kernel_fits(geometry.num_heads, geometry.num_kv_heads, geometry.head_dim,
                           block_size, loaded.dtype)
    if fits and load_cpu() is not None:
        return "cpu-kernel"
    if wanted == "cpu-kernel":
        raise ConfigError("--decode-attention cpu-kernel: " + (
            "the C kernel did not build (see the log)" if fits else
            f"the C kernel takes fp32 or bf16, head_dim a multiple of 16 up to "
            f"{CPU_MAX_HEAD_DIM}, up to {CPU_MAX_GROUP} query heads per KV head and blocks "
            f"of up to {CPU_MAX_BLOCK}"))
    return "torch"


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, num_blocks: int):
        model = loaded.model
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION, (
            "load the model with attn_implementation=ATTN_IMPLEMENTATION")
        self.model = model
        self.device = loaded.device
        self.block_size = config.cache.block_size
        quantized = loaded.quantization != "none"
        self.cpu_gemm = resolve_cpu_gemm(config.model.cpu_gemm, loaded.device, loaded.dtype,
                                         quantized)
        if self.cpu_gemm in ("onednn", "onednn+c"):
            # before the LoRA wrappers take the layers as their bases
            pack_linears(model, dense=self.cpu_gemm == "onednn+c")
        # whether RMSNorm and the rotary embedding run in C (cpu_layers.py)
        self.cpu_layers = (config.model.cpu_layers == "auto" and loaded.device.type == "cpu"
                           and loaded.dtype == torch.float32 and not quantized
                           and cpu_layers.install(model) > 0)
        backend = resolve_backend(config.lora.backend, loaded.device, loaded.dtype, quantized)
        self.lora = LoRAModel(model, config.lora.max_loras, config.lora.max_lora_rank,
                              loaded.dtype, loaded.device, backend, config.lora.fuse,
                              shadow=config.merge.shadow_slot(loaded.quantization),
                              cpu_weight_dtype=lora_weight_dtype(config.lora.dtype, backend,
                                                                 loaded.dtype))
        geometry = KVGeometry.of(model.config.get_text_config())
        self.decode_attention = _decode_backend(config.cache.decode_attention, loaded,
                                                geometry, self.block_size)
        decode = self.decode_attention
        self.kv = PagedKVCache(geometry, num_blocks, self.block_size, loaded.dtype,
                               loaded.device)
        self.graphs: DecodeGraphs | None = None
        self.graphs_paused = False  # a merge swapped weights the captured graphs read
        self.num_usable_blocks = num_blocks
        static = backend == "triton" and decode == "triton"
        wanted = config.model.cuda_graphs
        if wanted and not static:
            raise ConfigError("--cuda-graphs needs --lora-backend triton and "
                              "--decode-attention triton (the torch paths decide on the host)")
        if wanted or (wanted is None and static and loaded.device.type == "cuda"):
            # The cache's last block is the padded rows' scratch: no request may own it.
            self.num_usable_blocks = num_blocks - 1
            max_len = min(loaded.max_model_len, self.num_usable_blocks * self.block_size)
            capture = loaded.device.type == "cuda"
            max_seqs = config.scheduler.max_num_seqs  # no larger decode step can come
            sizes = sorted({s for s in DEFAULT_SIZES if s < max_seqs} | {min(max_seqs, 256)})
            try:
                self.graphs = DecodeGraphs(self, tuple(sizes), -(-max_len // self.block_size),
                                           num_blocks - 1, capture)
            except Exception:  # noqa: BLE001 - an uncapturable model still serves, eagerly
                if not capture or wanted:
                    raise
                log.warning("CUDA graph capture failed; decoding eagerly", exc_info=True)
                self.num_usable_blocks = num_blocks
                for group in self.lora.groups:
                    group.reset()

    def pause_graphs(self, paused: bool) -> None:
        """Decode eagerly while `paused` (see Merger): captured graphs would read weights
        that a merge has replaced. Without captured graphs there is nothing to pause."""
        self.graphs_paused = paused and self.graphs is not None and self.graphs.capture

    def warm_up(self) -> None:
        """One throwaway forward before serving. bitsandbytes repacks 4-bit weights at a
        layer's first forward on the CPU and computes differently afterwards, and CUDA
        initializes lazily: after this, every request's forward takes the same path."""
        num_tokens = min(8, self.block_size * self.kv.k.shape[1])
        dummy = Request("warm-up", [0] * num_tokens, SamplingParams(max_tokens=1))
        dummy.block_ids = list(range(-(-num_tokens // self.block_size)))
        # The blocks written here are free again: their contents are never read before
        # a real request overwrites them.
        self.execute([ScheduledRequest.of(dummy, num_tokens)])

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> torch.Tensor:
        """One forward over every scheduled sequence's new tokens.

        Returns fp32 logits `[num_sampling, vocab]` for the sequences with `samples` set, in
        the order they appear in `scheduled`.
        """
        fixed = self.lora.correcting_slot
        # Captured graphs hold no correction pass: a step that needs one runs eagerly (the
        # merged adapter's own steps still replay).
        corrected = fixed is not None and any(s.request.lora_slot != fixed for s in scheduled)
        size = (self.graphs.size_for(scheduled) if self.graphs is not None
                and not self.graphs_paused and not corrected else None)
        if size is not None:
            return self.graphs.run(scheduled, size)
        # Grouping sequences by adapter slot makes each adapter's tokens one segment. While
        # the other tokens are corrected for a merged adapter, its tokens come last, so that
        # the others form one segment of the correction pass.
        order = sorted(range(len(scheduled)), key=lambda i: (
            scheduled[i].request.lora_slot == fixed, scheduled[i].request.lora_slot))
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        token_slots: list[int] = []
        prefills: list[PrefillSeq] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        last_row: dict[int, int] = {}  # index in `scheduled` -> packed row of its last token
        for i in order:
            s = scheduled[i]
            req, n = s.request, s.num_new_tokens
            start, row = req.num_computed_tokens, len(input_ids)
            input_ids += req.pending_token_ids(n)
            positions += range(start, start + n)
            slot_mapping += (req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
            token_slots += [self.lora.effective_slot(req.lora_slot)] * n
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(req.block_ids)
                decode_lens.append(start + 1)
            else:
                num_blocks = -(-(start + n) // bs)
                prefills.append(PrefillSeq(row, n, start + n, self._tensor(req.block_ids[:num_blocks])))
            if s.samples:
                last_row[i] = row + n - 1

        meta = AttentionMetadata(
            cache=self.kv,
            slot_mapping=self._tensor(slot_mapping),
            prefills=prefills,
            decode_rows=self._tensor(decode_rows) if decode_rows else None,
            decode_block_tables=self._padded(decode_tables) if decode_rows else None,
            decode_context_lens=self._tensor(decode_lens) if decode_rows else None,
            decode_backend=self.decode_attention,
        )
        correction = None
        if corrected:
            # Every token but the merged adapter's takes its delta negated: the base weights
            # carry it now (rank 0 in the shadow slot for modules not merged yet).
            others = sum(scheduled[i].num_new_tokens for i in order
                         if scheduled[i].request.lora_slot != fixed)
            if others:
                correction = Segments.from_token_slots(
                    [self.lora.shadow_slot] * others + [-1] * (len(token_slots) - others))
        self.lora.prepare(Segments.from_token_slots(token_slots), correction)
        self.lora.await_loads()
        keep = [last_row[i] for i in range(len(scheduled)) if i in last_row]
        if not keep:
            keep_t = self._tensor([len(input_ids) - 1])  # a chunk-only step samples nothing
        else:
            keep_t = self._tensor(keep)
        out = self.model(
            input_ids=self._tensor(input_ids)[None],  # [1, T]
            position_ids=self._tensor(positions)[None],  # [1, T]
            use_cache=False,
            logits_to_keep=keep_t,
            lp_attn=meta,
        )
        logits = out.logits[0].float()  # [len(keep_t), vocab]
        return logits if keep else logits[:0]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _padded(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables])
