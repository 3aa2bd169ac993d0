"""OpenAI request parsing and response shapes. Every refusal is an `APIError` carrying the
status code and OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

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
    for field, ok in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1)):
        if _get(body, field, (int, float), ok) != ok:
            raise bad(f"{field} is not supported yet", field)
    for field, message in _UNSUPPORTED.items():
        if body.get(field):
            raise bad(message, field)
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 16,
            temperature=float(_get(body, "temperature", (int, float), 1.0)),
            top_p=float(_get(body, "top_p", (int, float), 1.0)),
            top_k=_get(body, "top_k", int, 0),
            seed=_get(body, "seed", int),
            stop=tuple(stop or ()),
            stop_token_ids=tuple(_get(body, "stop_token_ids", list, [])),
            ignore_eos=_get(body, "ignore_eos", bool, False),
            logprobs=logprobs,
        )
    except RequestError as e:
        raise bad(str(e), e.param) from None


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
                                   and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p))
            for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("'prompt' must be a string, an array of strings, or an array of token arrays",
                  "prompt")
    if any(p == "" or p == [] for p in prompts):
        raise bad("'prompt' must not be empty", "prompt")
    logprobs = _get(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise bad("'logprobs' must be between 0 and 20", "logprobs")
    params = _sampling(body, _get(body, "max_tokens", int, 16), logprobs)
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
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"messages[{i}]: only text content parts are supported", "messages")
            m = dict(m, content="".join(p.get("text", "") for p in content))
            messages[i] = m
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
    fmt = _get(body, "response_format", dict)
    if fmt and fmt.get("type", "text") != "text":
        raise bad("only response_format type 'text' is supported", "response_format")
    max_tokens = _get(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, max_default)
    logprobs = None
    if _get(body, "logprobs", bool, False):
        logprobs = _get(body, "top_logprobs", int, 0)
        if not 0 <= logprobs <= 20:
            raise bad("'top_logprobs' must be between 0 and 20", "top_logprobs")
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
