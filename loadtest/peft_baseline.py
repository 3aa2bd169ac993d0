"""The baseline: the same workload through transformers + PEFT in this process, the way a
user without a serving system would run it.

One `PeftModel` holds every adapter. Requests are served in static batches as they arrive:
whenever the model is free, every request that has arrived (up to `max_batch`, oldest first)
is left-padded into one batch and decoded greedily with `generate(adapter_names=...)` until
its longest request is done; requests arriving meanwhile wait for the next batch. A stopping
criterion timestamps every decoding step, so each request gets the same TTFT / ITL / e2e
records as the HTTP client's, measured from its arrival time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise

import torch

from .client import Record
from .workload import Item


class _StepClock:
    """A stopping criterion that never stops: it records when each new token exists."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class PeftBaseline:
    def __init__(self, model, tokenizer, adapters: dict[str, str], max_batch: int = 32):
        """`model`: a transformers causal LM (consumed); `adapters`: name -> PEFT directory."""
        from peft import PeftModel
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig()  # no sampling defaults from the checkpoint
        items = list(adapters.items())
        if items:
            model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
            for name, path in items[1:]:
                model.load_adapter(path, adapter_name=name)
        self.model = model.eval()
        self.has_adapters = bool(items)
        self.tokenizer = tokenizer  # None: token-id prompts only (`generate`)
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = pad if pad is not None else 0
        self.max_batch = max_batch

    def tokenize(self, prompt: str) -> list[int]:
        # As the server does for a completion prompt: no special tokens added.
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    @torch.inference_mode()
    def generate(self, batch: list[tuple[str | None, list[int], int]]
                 ) -> tuple[list[list[int]], list[float]]:
        """One left-padded static batch of (adapter, prompt ids, max_tokens), decoded greedily
        to its longest request with EOS ignored. Returns each request's own tokens and the
        time (perf_counter) at which each decoding step ended."""
        width = max(len(ids) for _, ids, _ in batch)
        device = self.model.device
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for _, ids, _ in batch],
                                 device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in batch],
                            device=device)
        clock = _StepClock()
        kwargs = {}
        if self.has_adapters:
            kwargs["adapter_names"] = [adapter or "__base__" for adapter, _, _ in batch]
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=max(n for _, _, n in batch), eos_token_id=None,
            pad_token_id=self.pad_id, stopping_criteria=[clock], **kwargs)
        return [out[i, width:width + n].tolist() for i, (_, _, n) in enumerate(batch)], clock.times

    def run(self, items: list[Item], concurrency: int | None = None,
            on_done: Callable[[Record], None] | None = None) -> tuple[list[Record], float]:
        """Serves `items` in arrival order; returns their records (in item order) and the wall
        time. In a closed loop (`concurrency` set) every batch holds `concurrency` requests,
        sent when the previous batch ends."""
        for item in items:
            if item.adapter is not None and not self.has_adapters:
                raise ValueError(f"request {item.index} asks for adapter {item.adapter!r}, "
                                 "but the baseline has none")
        batch_cap = min(self.max_batch, concurrency or self.max_batch)
        pending = sorted(items, key=lambda it: (it.send_at or 0.0, it.index))
        records: dict[int, Record] = {}
        t0 = time.perf_counter()
        while pending:
            now = time.perf_counter() - t0
            if concurrency is None and pending[0].send_at > now:
                time.sleep(pending[0].send_at - now)
                now = time.perf_counter() - t0
            ready = [it for it in pending[:batch_cap] if concurrency is not None or it.send_at <= now]
            pending = pending[len(ready):]
            batch = [(it, self.tokenize(it.prompt)) for it in ready]
            outputs, times = self.generate([(it.adapter, ids, it.max_tokens) for it, ids in batch])
            for (item, ids), tokens in zip(batch, outputs):
                arrived = item.send_at if concurrency is None else now
                stamps = [t - t0 for t in times[:item.max_tokens]]
                record = Record(item.index, item.adapter, start=arrived, status=200,
                                ttft=stamps[0] - arrived, e2e=stamps[-1] - arrived,
                                itl=[b - a for a, b in pairwise(stamps)],
                                prompt_tokens=len(ids), output_tokens=len(tokens),
                                text=self.tokenizer.decode(tokens, skip_special_tokens=True))
                records[item.index] = record
                if on_done is not None:
                    on_done(record)
        wall = max((r.start + r.e2e for r in records.values()), default=0.0)
        return [records[item.index] for item in items], wall
