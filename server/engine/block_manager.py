"""Fixed-size KV blocks handed out to requests. Plain Python: no torch here.

A request owns `block_ids`; token `i` of the request lives in block `block_ids[i // block_size]`
at offset `i % block_size`. The model runner turns that into slot indices of the KV tensors.
"""

from __future__ import annotations

from collections import deque

from .request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's kv_cache_usage_perc, as a fraction)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so that the request can hold `num_new_tokens` more computed tokens."""
        total = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        return max(0, total - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(request, num_new_tokens) <= len(self._free)

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        needed = self.num_blocks_needed(request, num_new_tokens)
        assert needed <= len(self._free), "allocate() without can_allocate()"
        request.block_ids.extend(self._free.popleft() for _ in range(needed))

    def free(self, request: Request) -> None:
        self._free.extend(request.block_ids)
        request.block_ids = []
