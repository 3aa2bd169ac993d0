"""Decode steps through static buffers, replayed from CUDA graphs captured per batch size.

A step in which every sequence decodes one token, at most `max(sizes)` of them, is padded to
the next captured size. Padded rows decode token 0 at position 0 into a scratch KV block that
no request owns (the runner keeps the cache's last block out of the block manager), with no
adapter, and their logits are dropped. Everything the forward reads per step (token ids,
positions, cache slots, block tables, context lengths, the SGMV segment table) lives in
buffers allocated once and filled by copies, so one captured graph per size serves every
step of that size: no per-layer Python and no launch overhead on the GPU.

That needs both Triton paths: the SGMV kernels read their segments from a device table, and
the paged decode kernel reads block tables and lengths from device tensors; neither makes a
host decision per step. (The torch paths loop over segments and build masks on the host.)

On the CPU the same static-buffer steps run without capture (`capture=False`), which is how
tests check the padding, the scratch block and the buffers against PEFT without a GPU.
"""

from __future__ import annotations

import logging

import torch
from loraplex.kernels.segments import Segments, SGMVMeta

from ..engine.scheduler import ScheduledRequest
from .attention import AttentionMetadata

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraphs:
    def __init__(self, runner, sizes: tuple[int, ...], max_blocks_per_seq: int,
                 scratch_block: int, capture: bool):
        assert runner.lora.backend == "triton" and runner.decode_attention == "triton"
        self.runner = runner
        self.sizes = sorted(sizes)
        self.capture = capture
        self.scratch_block = scratch_block
        device, n = runner.device, self.sizes[-1]

        def buf(*shape, dtype=torch.long, fill=0):
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids = buf(n)  # [n]
        self.positions = buf(n)  # [n]
        self.slot_mapping = buf(n, fill=scratch_block * runner.block_size)  # [n]
        self.rows = torch.arange(n, device=device)  # [n] every row decodes
        self.block_tables = buf(n, max_blocks_per_seq, fill=scratch_block)  # [n, max_blocks]
        self.context_lens = buf(n, fill=1)  # [n]
        self.seg_table = buf(3, runner.lora.num_slots, dtype=torch.int32)  # SGMVMeta rows
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # size -> the graph's output [size, vocab]
        if capture:
            self._capture_all()

    def size_for(self, scheduled: list[ScheduledRequest]) -> int | None:
        """The padded size this step runs at, or None if it is not a plain decode step."""
        if not all(s.num_new_tokens == 1 and s.samples for s in scheduled):
            return None
        return next((size for size in self.sizes if size >= len(scheduled)), None)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledRequest], size: int) -> torch.Tensor:
        """fp32 logits [len(scheduled), vocab], in the order of `scheduled`."""
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].request.lora_slot)
        bs, pad = self.runner.block_size, size - len(scheduled)
        ids, pos, slots, lens, token_slots, tables = [], [], [], [], [], []
        for i in order:
            req = scheduled[i].request
            p = req.num_computed_tokens
            ids += req.pending_token_ids(1)
            pos.append(p)
            slots.append(req.block_ids[p // bs] * bs + p % bs)
            lens.append(p + 1)
            token_slots.append(self.runner.lora.effective_slot(req.lora_slot))
            tables.append(req.block_ids)
        width = max(len(t) for t in tables)
        tables = [t + [self.scratch_block] * (width - len(t)) for t in tables]
        tables += [[self.scratch_block] * width] * pad
        self._fill(self.input_ids, ids + [0] * pad)
        self._fill(self.positions, pos + [0] * pad)
        self._fill(self.slot_mapping, slots + [self.scratch_block * bs] * pad)
        self._fill(self.context_lens, lens + [1] * pad)
        # Only the columns this step's sequences use: the kernel reads no page past a length.
        self.block_tables[:size, :width].copy_(torch.tensor(tables), non_blocking=True)
        segments = Segments.from_token_slots(token_slots + [-1] * pad)
        self.seg_table.copy_(torch.tensor(SGMVMeta.rows(segments, self.seg_table.shape[1]),
                                          dtype=torch.int32), non_blocking=True)
        self.runner.lora.await_loads()
        if self.capture:
            self.graphs[size].replay()
            logits = self.logits[size]
        else:
            logits = self._forward(size)
        back = {i: row for row, i in enumerate(order)}
        return logits[[back[i] for i in range(len(scheduled))]].float()

    def _fill(self, buffer: torch.Tensor, values: list[int]) -> None:
        buffer[:len(values)].copy_(torch.tensor(values), non_blocking=True)

    def _forward(self, size: int) -> torch.Tensor:  # [size, vocab]
        lora = self.runner.lora
        # Every LoRA layer launches its kernels: in a captured graph the launches are fixed,
        # and rows without an adapter are simply absent from the segment table.
        lora.context.segments = Segments((0, size), (0,))
        lora.context.meta = SGMVMeta(self.seg_table, size)
        lora.context.correction = None  # such steps run eagerly (ModelRunner.execute)
        meta = AttentionMetadata(
            cache=self.runner.kv, slot_mapping=self.slot_mapping[:size], prefills=[],
            decode_rows=self.rows[:size], decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size], decode_backend="triton")
        out = self.runner.model(input_ids=self.input_ids[:size][None],
                                position_ids=self.positions[:size][None], use_cache=False,
                                logits_to_keep=0, lp_attn=meta)
        return out.logits[0]

    def _capture_all(self) -> None:
        """Largest size first, all in one memory pool. Each size runs twice outside capture
        first (Triton compiles, allocator settles) on a side stream, as torch requires."""
        pool = None
        for size in reversed(self.sizes):
            stream = torch.cuda.Stream(self.runner.device)
            stream.wait_stream(torch.cuda.current_stream(self.runner.device))
            with torch.inference_mode(), torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(size)
            torch.cuda.current_stream(self.runner.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call from another thread (an adapter being pinned) does not
            # invalidate this capture.
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool,
                                                          capture_error_mode="thread_local"):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        log.info("captured decode graphs for batch sizes %s", self.sizes)
