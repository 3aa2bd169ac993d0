"""vLLM's LoRA Triton ops, the kernels the SGMV benchmark races, loaded from `peers/vllm_lora/`
when someone has fetched them there (see `bench_sgmv`'s docstring for how). They are never
part of the package: nothing here imports vLLM, and without the files the benchmark says
"not fetched" and goes on without them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

DEFAULT_PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
FILES = ("kernel_utils.py", "lora_kernel_metadata.py", "lora_shrink_op.py",
         "lora_expand_op.py", "utils.py")


def vllm_missing(peers_dir: Path = DEFAULT_PEERS_DIR) -> str | None:
    """Why vLLM's ops cannot be loaded from `peers_dir`, or None when they can."""
    missing = [f for f in FILES if not (peers_dir / "vllm_lora" / f).is_file()]
    return f"not fetched ({', '.join(missing)} missing in {peers_dir / 'vllm_lora'})" \
        if missing else None


class VLLMLoRA:
    """vLLM's lora_shrink + lora_expand on one projection group, with vLLM's own metadata.

    vLLM takes one uniform (padded) rank and no per-adapter scale (it folds the scale into
    B), and a list of contiguous per-slice A and B tensors; the benchmark gives it the same
    weights in that form.
    """

    def __init__(self, peers_dir: Path, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                 token_slots: list[int]):
        if str(peers_dir) not in sys.path:
            sys.path.insert(0, str(peers_dir))
        self._shrink = importlib.import_module("vllm_lora.lora_shrink_op").lora_shrink
        self._expand = importlib.import_module("vllm_lora.lora_expand_op").lora_expand
        meta_cls = importlib.import_module("vllm_lora.lora_kernel_metadata").LoRAKernelMeta
        device = lora_a[0].device
        num_loras, max_rank = lora_a[0].shape[0], lora_a[0].shape[1]
        self.lora_a, self.lora_b = lora_a, lora_b
        self.meta = meta_cls.make(num_loras, len(token_slots), device)
        # One host sync here, outside any timing or capture, as vLLM does once per step.
        self.meta.prepare_tensors(torch.tensor(token_slots, dtype=torch.int32, device=device))
        self.num_active = torch.tensor([len(set(token_slots))], dtype=torch.int32)
        self.num_tokens = len(token_slots)
        self.h = torch.empty(len(lora_a), self.num_tokens, max_rank, dtype=torch.float32,
                             device=device)

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        args = (*self.meta.meta_args(self.num_tokens), self.num_active)
        self._shrink(x, self.lora_a, self.h, *args, 1.0)
        self._expand(self.h, self.lora_b, y, *args, offset_start=0, add_inputs=True)
        return y
