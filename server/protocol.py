"""OpenAI request parsing and response shapes. Every refusal is an `APIError` carrying the
status code and OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .engine.request import RequestError, SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_server_error",
               503: "service_unavailable", 507: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    @classmethod
    def from_request_error(cls, e: RequestError) -> APIError:
        status = 404 if e.code == "model_not_found" else 400
        return cls(status, str(e), e.param, e.code)


def bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param)


# The limits every request is held to, in one place (the OpenAPI document states them too).
MAX_PROMPTS = 64  # prompts in one /v1/completions call
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters in one stop string
MAX_STOP_TOKEN_IDS = 64
MAX_TEMPERATURE = 2.0  # OpenAI's range
INT64 = (-(2**63), 2**63 - 1)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """A request body as JSON, or a 400: invalid JSON, NaN/Infinity (not JSON, though
    Python's parser takes them), integers beyond Python's 4,300-digit limit, or nesting
    deeper than the parser's recursion limit."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise bad("the request body is nested too deeply", None) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the digit limit
        raise bad(f"the request body is not valid JSON: {e}", None) from None


def _number(body: dict, key: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    """A finite number in [lo, hi] ((lo, hi] with `lo_open`). JSON integers of any size are
    compared exactly, before any conversion to float could overflow."""
    value = _get(body, key, (int, float), default)
    if (isinstance(value, float) and not math.isfinite(value)) or value > hi or (
            value <= lo if lo_open else value < lo):
        low = f"({lo}" if lo_open else f"[{lo}"
        raise bad(f"'{key}' must be a number in {low}, {hi}], got {_short(value)}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = _get(body, key, int, default)
    if value is not None and not lo <= value <= hi:
        raise bad(f"'{key}' must be an integer in [{lo}, {hi}], got {_short(value)}", key)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _get(body: dict, key: str, types: type | tuple, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true where a number belongs is still an error.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad(f"'{key}' must be of type {_type_name(types)}", key)
    if not isinstance(value, types):
        raise bad(f"'{key}' must be of type {_type_name(types)}", key)
    return value


def _type_name(types: type | tuple) -> str:
    names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
    return " or ".join({"int": "integer", "float": "number", "str": "string", "bool": "boolean",
                        "list": "array", "dict": "object"}.get(n, n) for n in names)


_UNSUPPORTED = {
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix is not supported",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "best_of": "best_of is not supported",
}


@dataclass(frozen=True)
class GenerationRequest:
    """What both OpenAI endpoints reduce to."""

    model: str | None
    prompts: list[str | list[int]]  # chat: one rendered conversation
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False


def _sampling(body: dict, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if stop and (len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop)):
        raise bad(f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} "
                  "characters", "stop")
    stop_token_ids = _get(body, "stop_token_ids", list, [])
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
            _is_int(t) and 0 <= t < 2**31 for t in stop_token_ids):
        raise bad(f"'stop_token_ids' must be at most {MAX_STOP_TOKEN_IDS} token ids",
                  "stop_token_ids")
    for field, ok in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1)):
        if _get(body, field, (int, float), ok) != ok:
            raise bad(f"{field} is not supported yet", field)
    for field, message in _UNSUPPORTED.items():
        if body.get(field):
            raise bad(message, field)
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 16,
            temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=_integer(body, "top_k", 0, -1, INT64[1]),
            seed=_integer(body, "seed", None, *SEED_RANGE),
            stop=tuple(stop or ()),
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=_get(body, "ignore_eos", bool, False),
            logprobs=logprobs,
        )
    except RequestError as e:
        raise bad(str(e), e.param) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(body: dict, key: str, default: int | None) -> int | None:
    # Past the context length the engine refuses it with vLLM's message; this only keeps
    # absurd integers out of that message.
    return _integer(body, key, default, 1, INT64[1])


def _common(body: dict) -> tuple[str | None, int, bool, bool]:
    model = _get(body, "model", str)
    n = _get(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise bad("'n' must be between 1 and 16", "n")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = bool(options.get("include_usage", False))
    return model, n, stream, include_usage


def parse_completion(body: Any) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None)
    model, n, stream, include_usage = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(_is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(_is_int(t) for t in p))
            for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("'prompt' must be a string, an array of strings, or an array of token arrays",
                  "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"'prompt' takes at most {MAX_PROMPTS} prompts per call", "prompt")
    if any(p == "" or p == [] for p in prompts):
        raise bad("'prompt' must not be empty", "prompt")
    logprobs = _integer(body, "logprobs", None, 0, 20)
    params = _sampling(body, _max_tokens(body, "max_tokens", 16), logprobs)
    return GenerationRequest(model, prompts, params, n, stream, include_usage,
                             echo=_get(body, "echo", bool, False))


def parse_chat(body: Any, max_default: int | None = None) -> tuple[GenerationRequest, list[dict]]:
    """Returns the request (prompts filled in later by the chat template) and the messages."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None)
    model, n, stream, include_usage = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                               "developer", "tool"):
            raise bad(f"messages[{i}] must be an object with a valid 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text", ""), str) for p in content):
                raise bad(f"messages[{i}]: only text content parts are supported", "messages")
            m = dict(m, content="".join(p.get("text", "") for p in content))
            messages[i] = m
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
    fmt = _get(body, "response_format", dict)
    if fmt and fmt.get("type", "text") != "text":
        raise bad("only response_format type 'text' is supported", "response_format")
    max_tokens = _max_tokens(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens", max_default)
    logprobs = None
    if _get(body, "logprobs", bool, False):
        logprobs = _integer(body, "top_logprobs", 0, 0, 20)
    elif body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    params = _sampling(body, max_tokens, logprobs)
    return GenerationRequest(model, [], params, n, stream, include_usage), messages


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
