"""A request's state as the scheduler sees it. Plain Python: no torch here."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine refuses; `param` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters, validated on construction (vLLM's names)."""

    max_tokens: int = 16
    temperature: float = 1.0  # below GREEDY_BELOW means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Number of top log-probabilities to return per generated token (None: none).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0.0, "temperature",
             f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k",
             f"top_k must be -1, 0 (off) or positive, got {self.top_k}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop",
             "stop must be a list of non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "stop_token_ids must be non-negative integers"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed",
             "seed must fit in 64 bits"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
             f"logprobs must be between 0 and 20, got {self.logprobs}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise RequestError(message, param=param)

    @property
    def greedy(self) -> bool:
        # As vLLM (_SAMPLING_EPS): dividing logits by a temperature near 0 (1e-300, a
        # denormal) overflows to inf and the softmax to NaN, where greedy is the limit anyway.
        return self.temperature < GREEDY_BELOW


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    """One generation. Tokens `[0, num_computed_tokens)` are in the KV cache; the rest of
    `all_token_ids` is pending and gets scheduled (a prefill chunk, or the one new token of a
    decode). A preempted request drops its cache and recomputes prompt + output so far."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # adapter name; None is the base model
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    lora_slot: int = -1  # slot of `adapter` while admitted; -1 for none
    num_preemptions: int = 0
    # Later requests admitted first while it waited for a slot, over its whole life (a
    # preempted request keeps its count: it has waited that long already).
    num_overtaken: int = 0
    # Monotonic timestamps for latency metrics.
    admitted_time: float | None = None  # first admitted to the running batch
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def pending_token_ids(self, num: int) -> list[int]:
        """The next `num` tokens to feed the model."""
        start = self.num_computed_tokens
        n = len(self.prompt_token_ids)
        if start + num <= n:
            return self.prompt_token_ids[start:start + num]
        return (self.prompt_token_ids + self.output_token_ids)[start:start + num]

    @property
    def is_finished(self) -> bool:
        return self.status.finished
