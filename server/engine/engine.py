"""The engine: admit, schedule, run one forward, sample, stream, free. One thread owns it."""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from loraplex.adapters.peft_format import LoRAAdapter, load_adapter

from ..config import EngineConfig
from ..plan import ModelShape, kv_block_bytes, kv_blocks, lora_slot_bytes
from ..runner.attention import ATTN_IMPLEMENTATION
from ..runner.loader import LoadedModel, load_model
from ..runner.lora_layers import resolve_backend
from ..runner.model_runner import ModelRunner
from .adapter_manager import AdapterManager
from .block_manager import BlockManager
from .detokenizer import Detokenizer
from .merger import Merger
from .request import Request, RequestError, RequestStatus, SamplingParams
from .sampler import Sampler, TokenLogprobs
from .scheduler import Scheduler
from .stats import FinishedStats, StatLogger, StepStats

log = logging.getLogger("loraplex.engine")


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta; `finished` on its last)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None


OutputCallback = Callable[[RequestOutput], None]


@dataclass
class _Tracked:
    request: Request
    detokenizer: Detokenizer | None
    callback: OutputCallback | None


class LLMEngine:
    """Synchronous engine. `add_request` and `abort` between `step` calls; see
    `AsyncEngine` for the thread-safe front the HTTP server uses."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.loaded = loaded or load_model(config.model, attn_implementation=ATTN_IMPLEMENTATION)
        self.tokenizer = self.loaded.tokenizer
        model_config = self.loaded.model.config.get_text_config()
        self.vocab_size = model_config.vocab_size
        num_blocks = config.cache.num_blocks or self._num_kv_blocks(model_config)
        self.runner = ModelRunner(self.loaded, config, num_blocks)
        self.runner.warm_up()
        # A lone request must always fit in the cache, so the context is capped by its size.
        num_blocks = self.runner.num_usable_blocks  # less a scratch block for decode graphs
        self.max_model_len = min(self.loaded.max_model_len, num_blocks * config.cache.block_size)
        self.blocks = BlockManager(num_blocks, config.cache.block_size)
        self.adapter_manager = AdapterManager(config.lora, self.runner.lora, self.parse_adapter,
                                              lambda: self._stats)
        self.adapters = self.adapter_manager.current  # name -> AdapterSummary being served
        self.slots = self.adapter_manager.slots
        self.merger = Merger(config.merge, self.runner.lora, self.adapter_manager,
                             self.read_fp32, self.loaded.dtype, self.runner.pause_graphs)
        self.merger.on_switch = lambda direction, name: self._stats.merge_switches.append(
            direction)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.slots, self.merger.admits)
        self.sampler = Sampler()
        self.eos_token_ids = self._eos_token_ids()
        # What adapters may name as their base (hub id or path): see load_adapter.
        self.base_names = {n for n in (self.loaded.name,
                                       getattr(self.loaded.model.config, "_name_or_path", ""))
                           if n}
        self._tracked: dict[str, _Tracked] = {}
        # Metrics consumers (e.g. Prometheus) get a StepStats after every step that did work.
        self.stat_loggers: list[StatLogger] = []
        self._stats = StepStats()
        self._slot_counts = (0, 0)  # hits, misses already reported
        self.idle = True
        log.info("engine ready: %s (%s, %s), %d KV blocks of %d tokens, max_model_len %d",
                 self.loaded.name, self.loaded.quantization, self.loaded.dtype, num_blocks,
                 config.cache.block_size, self.max_model_len)

    # ---- adapters -------------------------------------------------------------------

    def parse_adapter(self, name: str, path: str) -> LoRAAdapter:
        """Read and check a PEFT adapter against this model. Touches no engine state, so it
        may run on any thread (disk reads stay off the engine loop)."""
        return self.runner.lora.stage(
            self._load(name, path, self.runner.lora.adapter_dtype or self.loaded.dtype))

    def read_fp32(self, name: str, path: str) -> LoRAAdapter:
        """An adapter in fp32, as PEFT holds adapter weights whatever the base dtype: the
        weights a merge adds to the base (adapters/merge.py). Any thread."""
        return self._load(name, path, torch.float32)

    def _load(self, name: str, path: str, dtype: torch.dtype) -> LoRAAdapter:
        return load_adapter(path, name, self.runner.lora.module_shapes,
                            self.config.lora.max_lora_rank, dtype,
                            None if self.config.lora.allow_base_mismatch else self.base_names)

    def install_adapter(self, adapter: LoRAAdapter) -> None:
        """Serve `adapter` under its name. Replacing a name makes a new version: requests
        already bound to the old one finish on its weights, new ones get the new weights."""
        self.adapter_manager.install(adapter)

    def register_adapter(self, name: str, path: str) -> LoRAAdapter:
        adapter = self.parse_adapter(name, path)
        self.install_adapter(adapter)
        return adapter

    def unregister_adapter(self, name: str) -> None:
        """Stop serving `name`; its requests in flight finish first."""
        self.adapter_manager.remove(name)

    # ---- requests -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter: str | None = None, callback: OutputCallback | None = None) -> Request:
        """Queue a request; raises RequestError (nothing queued) when it cannot be served."""
        if request_id in self._tracked:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        if adapter is not None and adapter not in self.adapters:
            raise RequestError(f"The model `{adapter}` does not exist.", param="model",
                               code="model_not_found")
        prompt_ids = self.tokenize(prompt)
        self.check_length(len(prompt_ids), params.max_tokens)
        detok = Detokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        if params.stop and detok is None:
            raise RequestError("stop strings need a tokenizer", param="stop")
        # The request is bound to the adapter version serving now (see AdapterManager).
        key = self.adapter_manager.bind(adapter) if adapter is not None else None
        request = Request(request_id, prompt_ids, params, key)
        self._tracked[request_id] = _Tracked(request, detok, callback)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._emit([self._finish_output(self._tracked[request_id], "abort")])
            self._publish()

    def abort_all(self) -> int:
        """End every request with finish_reason "abort" (a shutdown that cannot wait for
        them); returns how many there were."""
        requests = [t.request for t in self._tracked.values()]
        for req in requests:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._emit([self._finish_output(self._tracked[r.request_id], "abort") for r in requests])
        self._publish()
        return len(requests)

    def fail_all(self, message: str) -> None:
        """End every request with an error output (the engine cannot go on)."""
        self._fail([t.request for t in self._tracked.values()], message)
        self._publish()

    def _fail(self, requests: list[Request], message: str) -> list[RequestOutput]:
        outputs = []
        for req in requests:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            out = self._finish_output(self._tracked[req.request_id], "error")
            out.error = message
            outputs.append(out)
        self._emit(outputs)
        return outputs

    def has_unfinished(self) -> bool:
        """Requests to serve, or a merge or unmerge to carry out."""
        return self.scheduler.has_unfinished() or self.merger.busy

    # ---- the loop -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step. `self.idle` tells afterwards whether it found nothing to run
        (e.g. the next request waits for its adapter to be read from disk)."""
        failed = []
        for e in self.adapter_manager.collect():
            log.error("%s", e)
            failed += self._fail([t.request for t in self._tracked.values()
                                  if t.request.adapter == e.key], str(e))
        waiting = self.scheduler.waiting
        self.adapter_manager.prefetch([r.adapter for r in itertools.islice(waiting, 16)
                                       if r.adapter is not None])
        sched = self.scheduler
        merger = self.merger
        if merger.engaged:
            merger.step({r.adapter for r in sched.running}, {r.adapter for r in sched.waiting})
        plan = self.scheduler.schedule()
        self.idle = plan.empty
        if plan.empty:
            if failed or self._stats.merge_switches:
                self._publish()
            else:
                self.adapter_manager.wait_for_fetch(0.05)
                merger.wait(0.05)
            return failed
        try:
            logits = self.runner.execute(plan.scheduled)
        except Exception as e:  # a failed forward fails its batch, never the engine
            log.exception("forward failed; failing the %d requests of this step", len(plan.scheduled))
            outputs = self._fail([s.request for s in plan.scheduled],
                                 f"internal error: {type(e).__name__}: {e}")
            self._publish()
            return failed + outputs
        self.scheduler.advance(plan)
        if merger.policy.auto:  # only auto-merge reads the token shares
            name_of = self.adapter_manager.name_of
            computed: Counter[str | None] = Counter()
            for s in plan.scheduled:
                computed[name_of(s.request.adapter) if s.request.adapter else None] += (
                    s.num_new_tokens)
            merger.policy.record(computed)
        sampling = [s.request for s in plan.scheduled if s.samples]
        try:
            tokens, logprobs = self.sampler(logits, sampling)
        except Exception as e:  # as for the forward: the batch fails, the engine goes on
            log.exception("sampling failed; failing the %d requests sampled", len(sampling))
            outputs = self._fail(sampling, f"internal error: {type(e).__name__}: {e}")
            self._publish()
            return failed + outputs
        outputs = [self._append(req, tok, lp) for req, tok, lp in zip(sampling, tokens, logprobs)]
        self._emit(outputs)
        self._publish()
        return failed + outputs

    def _append(self, req: Request, token: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        tracked = self._tracked[req.request_id]
        req.output_token_ids.append(token)
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
            self._stats.ttft_seconds.append(now - req.arrival_time)
            self._stats.prompt_tokens += req.num_prompt_tokens
        else:
            self._stats.inter_token_seconds.append(now - req.last_token_time)
        req.last_token_time = now
        self._stats.generation_tokens += 1
        stopped_by_string = tracked.detokenizer.add(token) if tracked.detokenizer else False
        p = req.params
        reason = None
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            reason = "stop"
        elif stopped_by_string:
            reason = "stop"
        elif req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
            self.scheduler.finish(req, status)
        text = tracked.detokenizer.take(final=reason is not None) if tracked.detokenizer else ""
        out = RequestOutput(req.request_id, [token], text, [logprobs] if logprobs else [],
                            num_prompt_tokens=req.num_prompt_tokens,
                            num_output_tokens=req.num_output_tokens)
        if reason is not None:
            out.finished, out.finish_reason = True, reason
        return out

    def _finish_output(self, tracked: _Tracked, reason: str) -> RequestOutput:
        req = tracked.request
        text = tracked.detokenizer.take(final=True) if tracked.detokenizer else ""
        return RequestOutput(req.request_id, [], text, finished=True, finish_reason=reason,
                             num_prompt_tokens=req.num_prompt_tokens,
                             num_output_tokens=req.num_output_tokens)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            tracked = self._tracked[out.request_id]
            if out.finished:
                del self._tracked[out.request_id]
                self.sampler.forget(out.request_id)
                req = tracked.request
                if req.adapter is not None:
                    name = self.adapter_manager.name_of(req.adapter)
                    self.adapter_manager.unbind(req.adapter)
                else:
                    name = None
                self._stats.finished.append(FinishedStats(
                    out.finish_reason or "abort", name, req.num_prompt_tokens,
                    req.num_output_tokens, now - req.arrival_time,
                    None if req.admitted_time is None else req.admitted_time - req.arrival_time))
            if tracked.callback is not None:
                try:
                    tracked.callback(out)
                except Exception:  # a consumer's bug must not stop everyone else's stream
                    log.exception("output callback of %s failed", out.request_id)

    def _publish(self) -> None:
        stats, self._stats = self._stats, StepStats()
        if not self.stat_loggers:
            return
        sched = self.scheduler
        stats.num_running, stats.num_waiting = sched.num_running, sched.num_waiting
        stats.kv_cache_usage = self.blocks.usage
        stats.max_loras = self.config.lora.max_loras
        stats.merged_adapter = self.merger.merged_name
        name_of = self.adapter_manager.name_of
        stats.running_adapters = tuple(sorted({name_of(r.adapter) for r in sched.running
                                               if r.adapter}))
        stats.waiting_adapters = tuple(sorted({name_of(r.adapter) for r in sched.waiting
                                               if r.adapter}))
        hits, misses = self.slots.hits, self.slots.misses
        stats.adapter_hits = hits - self._slot_counts[0]
        stats.adapter_misses = misses - self._slot_counts[1]
        self._slot_counts = (hits, misses)
        for logger in self.stat_loggers:
            logger.record(stats)

    # ---- helpers --------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, checked against the vocabulary. Reads no engine state that
        changes, so the HTTP layer calls it on its own threads to refuse early."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids", param="prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]!r} is outside the vocabulary "
                                   f"[0, {self.vocab_size})", param="prompt")
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        return ids

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """The prompt and the tokens asked for must fit in the context (vLLM's messages)."""
        n, limit = num_prompt_tokens, self.max_model_len
        if n >= limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. "
                               f"However, your prompt has {n} tokens.", param="prompt")
        if n + max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the "
                f"completion).", param="max_tokens")

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.loaded.model, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update(eos if isinstance(eos, (list, tuple, set)) else [eos])
        return ids

    def _num_kv_blocks(self, model_config) -> int:
        """What is left for the KV cache, by plan.py's arithmetic (`loraplex plan`)."""
        cache, lora = self.config.cache, self.config.lora
        dtype = str(self.loaded.dtype).removeprefix("torch.")
        shape = ModelShape.from_config(model_config.to_dict(), self.loaded.name)
        device = self.loaded.device
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            # The adapter slots are allocated after this: their bytes come off the budget.
            backend = resolve_backend(lora.backend, device, self.loaded.dtype,
                                      quantized=self.loaded.quantization != "none")
            # LoRAModel's shadow slot, for merge corrections, is one more.
            num_slots = lora.max_loras + self.config.merge.shadow_slot(
                self.loaded.quantization)
            slots = lora_slot_bytes(shape, num_slots, lora.max_lora_rank, dtype, backend)
            budget = free - total * (1.0 - cache.gpu_memory_utilization) - slots
        else:
            budget = cache.kv_cache_memory_gb * 2**30
        return kv_blocks(budget, kv_block_bytes(shape, cache.block_size, dtype))
