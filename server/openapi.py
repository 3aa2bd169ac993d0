"""The server's OpenAPI 3.1 document, built once from schema fragments and served as JSON at
`/openapi.json` (an open path: no key needed).

It states the request contract the handlers enforce (server/protocol.py): JSON bodies need
`Content-Type: application/json` (415), at most 8 MiB (413), valid and not too deeply nested
(400); a field out of range is 400 with `param` naming it. Every 4xx and 5xx body is OpenAI's
error shape, `#/components/schemas/Error`.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from loraplex.adapters.compose import METHODS as COMPOSE_METHODS
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .protocol import (
    INT64,
    MAX_PROMPTS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    SEED_RANGE,
)

MAX_BODY_BYTES = 8 * 2**20  # ServerState.max_body_bytes
MAX_N = 16
MAX_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1  # stop_token_ids; prompt token ids must be in the vocabulary

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema, description: str = "") -> Schema:
    """An optional field: null means "absent" (the default applies), as in OpenAI's API."""
    if "type" in schema:
        out = {**schema, "type": [schema["type"], "null"]}
        if "enum" in schema:
            out["enum"] = [*schema["enum"], None]
    else:
        out = {"anyOf": [schema, {"type": "null"}]}
    return {**out, "description": description} if description else out


def _int(lo: int | None = None, hi: int | None = None, description: str = "") -> Schema:
    bounds = {"minimum": lo} if lo is not None else {}
    if hi is not None:
        bounds["maximum"] = hi
    return _nullable({"type": "integer", **bounds}, description)


def _obj(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required)}


# ---- request fragments ----------------------------------------------------------------

TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
NOT_SUPPORTED = {"type": "null", "description": "Not supported: any other value is refused "
                                                "with 400."}
ZERO_ONLY = _nullable({"type": "number", "enum": [0]}, "Only 0 is supported (400 otherwise).")

SAMPLING: dict[str, Schema] = {
    "model": _nullable({"type": "string"}, "An adapter's name, the base model's name, or "
                       "empty for the base model; a name the caller may not use is 404."),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE},
                             "Finite; 0 is greedy. Default 1."),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "top_k": _int(-1, INT64[1], "0 or -1: no top-k cut."),
    "seed": _int(*SEED_RANGE),
    "max_tokens": _int(1, INT64[1], "Prompt plus max_tokens beyond the context is 400."),
    "n": _int(1, MAX_N),
    "stop": _nullable({"anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        {"type": "array", "maxItems": MAX_STOP,
         "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}}]}),
    "stop_token_ids": _nullable({"type": "array", "maxItems": MAX_STOP_TOKEN_IDS, "items": {
        "type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}}),
    "ignore_eos": _nullable({"type": "boolean"}),
    "stream": _nullable({"type": "boolean"}),
    "stream_options": _nullable(_obj({"include_usage": {"type": "boolean"}}),
                                "Only with stream: true."),
    "presence_penalty": ZERO_ONLY,
    "frequency_penalty": ZERO_ONLY,
    "repetition_penalty": _nullable({"type": "number", "enum": [1]},
                                    "Only 1 is supported (400 otherwise)."),
    **{field: NOT_SUPPORTED for field in ("logit_bias", "suffix", "tools", "functions",
                                           "best_of")},
}

SOURCES = {"type": "array", "minItems": 1, "maxItems": 16, "items": _obj(
    {"name": {"type": "string"}, "weight": {"type": "number", "minimum": -1000,
                                            "maximum": 1000, "default": 1}}, ("name",))}
COMPOSE_OPTIONS: dict[str, Schema] = {
    "density": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                "description": "ties, dare and magnitude_prune methods only (required there)."},
    "rank": {"type": "integer", "minimum": 1, "description": "svd methods and slerp."},
    "t": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
          "description": "slerp: 0 is the first source, 1 the second."},
    "majority_sign_method": {"enum": ["total", "frequency"], "default": "total"},
}
# Per-request mixtures (server/routes/compose.py), as LoRAX's merged_adapters.
MIXTURE: dict[str, Schema] = {
    "adapters": {**SOURCES, "description": "Serve this request with a mixture of served "
                 "adapters, built at the first request with these arguments and kept under "
                 "the name the response's `model` gives ([tenant/]mix-<hash>); `model` must "
                 "then be the base model's name or empty. Each source must be one the caller "
                 "may use (404 otherwise)."},
    "method": {"enum": list(COMPOSE_METHODS), "default": "cat", "description":
               "PEFT's add_weighted_adapter combination_type, or slerp (two sources); cat, "
               "the default, is the exact weighted sum of the sources' deltas. dare's draws "
               "are seeded with 0."},
    **COMPOSE_OPTIONS,
}

COMPLETION_REQUEST = _obj({
    **SAMPLING,
    **MIXTURE,
    "prompt": {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
         "items": {"type": "string", "minLength": 1}},
        TOKEN_IDS,
        {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": TOKEN_IDS}],
        "description": f"At most {MAX_PROMPTS} prompts; token ids must be in the vocabulary."},
    "logprobs": _int(0, MAX_LOGPROBS),
    "echo": NOT_SUPPORTED,
}, required=("prompt",))

TEXT_PART = _obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))
MESSAGE = _obj({
    "role": {"enum": ["system", "user", "assistant", "developer", "tool"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]},
    "name": {"type": "string"},
}, ("role", "content"))

CHAT_REQUEST = _obj({
    **SAMPLING,
    **MIXTURE,
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE,
                 "description": "Rendered with the model's chat template, which may refuse "
                                "an order of roles (400)."},
    "max_tokens": _int(1, INT64[1], "Default: whatever the context leaves after the prompt."),
    "max_completion_tokens": _int(1, INT64[1], "Takes precedence over max_tokens."),
    "logprobs": _nullable({"type": "boolean"}),
    "top_logprobs": _int(0, MAX_LOGPROBS, "Only with logprobs: true."),
    "response_format": _nullable(_obj({"type": {"const": "text"}})),
}, required=("messages",))

LOAD_REQUEST = _obj({"lora_name": {"type": "string"}, "lora_path": {
    "type": "string", "minLength": 1, "description": "A directory inside --allowed-lora-dirs "
    "(403 otherwise) holding adapter_config.json and adapter_model.safetensors."}},
    ("lora_name", "lora_path"))
UNLOAD_REQUEST = _obj({"lora_name": {"type": "string"}}, ("lora_name",))
COMPOSE_REQUEST = _obj({
    "sources": SOURCES,
    "method": {"enum": list(COMPOSE_METHODS), "default": "svd", "description":
               "PEFT's add_weighted_adapter combination_type, or slerp (two sources)."},
    **COMPOSE_OPTIONS,
    "seed": {"type": "integer", "minimum": 0, "default": 0, "description": "dare's draws."},
}, ("sources",))
UPLOAD_REQUEST = _obj({
    "name": {"type": "string", "description": "Lowercase letters, digits, '.', '_', '-', at "
             "most 64 characters, optionally under one 'tenant/' prefix."},
    "config": {"type": "string", "contentMediaType": "application/json",
               "description": "adapter_config.json"},
    "weights": {"type": "string", "contentMediaType": "application/octet-stream",
                "description": "adapter_model.safetensors (pickles are refused unopened)"},
}, ("name", "config", "weights"))

# ---- response fragments ---------------------------------------------------------------

STRING_OR_NULL = {"type": ["string", "null"]}
USAGE = _obj({k: {"type": "integer", "minimum": 0}
              for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
             ("prompt_tokens", "completion_tokens", "total_tokens"))
ERROR = _obj({"error": _obj({"message": {"type": "string"}, "type": {"type": "string"},
                             "param": STRING_OR_NULL, "code": STRING_OR_NULL},
                            ("message", "type", "param", "code"))}, ("error",))


def _generation(object_name: str, choice: Schema, usage: Schema = USAGE) -> Schema:
    return _obj({"id": {"type": "string"}, "object": {"const": object_name},
                 "created": {"type": "integer"}, "model": {"type": "string"}, "usage": usage,
                 "choices": {"type": "array", "items": choice}},
                ("id", "object", "created", "model", "usage", "choices"))


def _events(chunk: str) -> Schema:
    """One server-sent event of a stream: a chunk, an error (mid-stream), or `[DONE]`."""
    return _obj({"data": {"type": "string", "if": {"const": "[DONE]"}, "else": {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]}}}}, ("data",))


CHOICE = {"index": {"type": "integer", "minimum": 0}, "finish_reason": STRING_OR_NULL,
          "logprobs": {"type": ["object", "null"]}}
COMPLETION = _generation("text_completion", _obj(
    {**CHOICE, "text": {"type": "string"}}, ("index", "text", "finish_reason", "logprobs")))
CHAT_COMPLETION = _generation("chat.completion", _obj({
    **CHOICE, "message": _obj({"role": {"const": "assistant"}, "content": {"type": "string"}},
                              ("role", "content"))},
    ("index", "message", "finish_reason", "logprobs")))
USAGE_OR_NULL = {"anyOf": [USAGE, {"type": "null"}]}  # chunks: only the last has usage
COMPLETION_CHUNK = _generation("text_completion", _obj(
    {**CHOICE, "text": {"type": "string"}}, ("index", "text", "finish_reason")), USAGE_OR_NULL)
CHAT_COMPLETION_CHUNK = _generation("chat.completion.chunk", _obj({
    **CHOICE, "delta": _obj({"role": {"const": "assistant"}, "content": {"type": "string"}})},
    ("index", "delta", "finish_reason")), USAGE_OR_NULL)
MODEL_CARD = _obj({"id": {"type": "string"}, "object": {"const": "model"},
                   "created": {"type": "integer"}, "owned_by": {"type": "string"},
                   "root": {"type": "string"}, "parent": STRING_OR_NULL,
                   "max_model_len": {"type": "integer"}}, ("id", "object", "created"))
ADAPTER = _obj({
    "id": {"type": "string"}, "object": {"const": "adapter"}, "parent": {"type": "string"},
    "rank": {"type": "integer"}, "ranks": {"type": "array", "items": {"type": "integer"}},
    "targets": {"type": "array", "items": {"type": "string"}}, "modules": {"type": "integer"},
    "size": {"type": ["integer", "null"]}, "sha256": STRING_OR_NULL,
    "created": {"type": ["integer", "null"]}, "source": STRING_OR_NULL,
    "residency": {"enum": ["device", "host", "disk"]}, "pinned": {"type": "boolean"},
}, ("id", "object", "rank", "residency", "pinned"))

MERGE_STATUS = _obj({
    "object": {"const": "merge"}, "adapter": STRING_OR_NULL,
    "state": {"enum": ["unmerged", "merging", "merged", "unmerging"]},
    "modules_merged": {"type": "integer"}, "modules": {"type": "integer"},
    "requested": STRING_OR_NULL, "auto": {"type": "boolean"}, "dense": {"type": "boolean"},
    "switches": _obj({"merge": {"type": "integer"}, "unmerge": {"type": "integer"}},
                     ("merge", "unmerge")),
    "kept_aside_bytes": {"type": "integer"}, "extra_device_bytes": {"type": "integer"},
    "reading": {"type": "boolean", "description": "the adapter is being read for a merge"},
    "correcting": {"type": "boolean", "description": "other requests run corrected during "
                   "this merge (else they wait for the unmerge)"},
}, ("object", "adapter", "state", "requested", "switches"))


def _list_of(item: Schema) -> Schema:
    return _obj({"object": {"const": "list"}, "data": {"type": "array", "items": item}},
                ("object", "data"))


def _adapter_ack(flag: str) -> Schema:
    return _obj({"id": {"type": "string"}, "object": {"const": "adapter"},
                 flag: {"const": True}}, ("id", "object", flag))


COMPONENTS: dict[str, Schema] = {
    "Error": ERROR, "CompletionRequest": COMPLETION_REQUEST, "ChatRequest": CHAT_REQUEST,
    "Completion": COMPLETION, "ChatCompletion": CHAT_COMPLETION,
    "CompletionChunk": COMPLETION_CHUNK, "ChatCompletionChunk": CHAT_COMPLETION_CHUNK,
    "ModelList": _list_of(MODEL_CARD), "Adapter": ADAPTER, "AdapterList": _list_of(ADAPTER),
    "AdapterDeleted": _adapter_ack("deleted"), "AdapterLoaded": _adapter_ack("loaded"),
    "AdapterUnloaded": _adapter_ack("unloaded"), "LoadRequest": LOAD_REQUEST,
    "UnloadRequest": UNLOAD_REQUEST, "UploadRequest": UPLOAD_REQUEST,
    "MergeStatus": MERGE_STATUS, "ComposeRequest": COMPOSE_REQUEST,
}

# ---- operations -----------------------------------------------------------------------

ERROR_MEANINGS = {
    400: "Invalid request: bad JSON, a field out of range (`param` names it), or a refused "
         "adapter.",
    401: "Missing or unknown key.",
    403: "The key may not do this (admin routes, lora_path outside --allowed-lora-dirs).",
    404: "No such model or adapter (or one the caller may not see), or the admin API is off.",
    409: "Every adapter slot is in use.",
    413: f"The body is larger than {MAX_BODY_BYTES} bytes (uploads: the adapter size limit).",
    415: "A JSON route's body sent without `Content-Type: application/json`.",
    429: "Over the tenant's request or token rate.",
    503: "Shutting down, at capacity, or the engine died.",
    507: "The adapter store's disk is full (nothing is left behind).",
}
RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}}}
INFERENCE_ERRORS = (400, 401, 404, 413, 415, 429, 503)
ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 415)
BEARER = [{"bearer": []}]
BEARER_IF_CONFIGURED = [{"bearer": []}, {}]  # open when no --api-key or tenant keys


def _content(schema: Schema, media_type: str = "application/json") -> dict:
    return {media_type: {"schema": schema}}


def _responses(ok: dict[int, tuple[str, dict]], errors: tuple[int, ...]) -> dict:
    out = {str(code): {"description": description, "content": content}
           for code, (description, content) in ok.items()}
    for code in errors:
        out[str(code)] = {"description": ERROR_MEANINGS[code], "content": _content(_ref("Error"))}
        if code in (429, 503):
            out[str(code)]["headers"] = RETRY_AFTER
    return out


def _op(summary: str, ok: dict[int, tuple[str, dict]], errors: tuple[int, ...],
        security: list, body: tuple[str, Schema] | None = None, tag: str = "openai",
        parameters: list | None = None) -> dict:
    operation = {"summary": summary, "tags": [tag], "security": security,
                 "responses": _responses(ok, errors)}
    if body is not None:
        media_type, schema = body
        operation["requestBody"] = {"required": True, "content": _content(schema, media_type)}
    if parameters:
        operation["parameters"] = parameters
    return operation


def _json_ok(name: str, description: str = "OK") -> tuple[str, dict]:
    return description, _content(_ref(name))


def _admin(summary: str, ok: str, status: int = 200, body: tuple[str, Schema] | None = None,
           named: bool = False, stores: bool = False) -> dict:
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    return _op(summary, {status: _json_ok(ok)}, ADMIN_ERRORS + ((507,) if stores else ()),
               BEARER, body, "admin", name if named else None)


def _merge_op(summary: str, named: bool = False) -> dict:
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    return _op(summary, {200: _json_ok("MergeStatus", "Done."),
                         202: _json_ok("MergeStatus", "Under way or waiting for traffic.")},
               ADMIN_ERRORS, BEARER, None, "admin", name if named else None)


def _generation_op(summary: str, request: str, response: str) -> dict:
    ok = {200: ("The completion; with stream: true, server-sent events ending in "
                "`data: [DONE]`.", {**_content(_ref(response)), **_content(
                    _events(f"{response}Chunk"), "text/event-stream")})}
    return _op(summary, ok, INFERENCE_ERRORS, BEARER_IF_CONFIGURED,
               ("application/json", _ref(request)))


def _open(summary: str, ok: dict[int, tuple[str, dict]], errors: tuple[int, ...] = ()) -> dict:
    return _op(summary, ok, errors, [], tag="operations")


HEALTH = _open("200 while serving; 503 while draining or if the engine died.",
               {200: ("Serving.", {})}, (503,))


def _paths() -> dict[str, dict]:
    json_body = "application/json"
    return {
        "/v1/completions": {"post": _generation_op("Text completion", "CompletionRequest",
                                                   "Completion")},
        "/v1/chat/completions": {"post": _generation_op("Chat completion", "ChatRequest",
                                                        "ChatCompletion")},
        "/v1/models": {"get": _op("The base model and the adapters the caller may use",
                                  {200: _json_ok("ModelList")}, (401,), BEARER_IF_CONFIGURED)},
        "/v1/adapters": {
            "post": _admin("Upload an adapter (replaces one of the same name)", "Adapter", 201,
                           ("multipart/form-data", _ref("UploadRequest")), stores=True),
            "get": _admin("Every adapter", "AdapterList")},
        "/v1/adapters/{name}": {"get": _admin("One adapter", "Adapter", named=True),
                                "delete": _admin("Delete an adapter", "AdapterDeleted",
                                                 named=True)},
        "/v1/adapters/{name}/pin": {"post": _admin("Keep an adapter in a device slot",
                                                   "Adapter", named=True)},
        "/v1/adapters/{name}/unpin": {"post": _admin("Let an adapter be evicted", "Adapter",
                                                     named=True)},
        "/v1/adapters/{name}/merge": {"post": _merge_op(
            "Merge an adapter into the base whenever its requests are the only ones "
            "(202 until it is)", named=True)},
        "/v1/adapters/{name}/compose": {"post": _admin(
            "Build a new adapter from served ones (PEFT's add_weighted_adapter methods, SLERP)",
            "Adapter", 201, (json_body, _ref("ComposeRequest")), named=True, stores=True)},
        "/v1/unmerge": {"post": _merge_op("Unmerge, and merge nothing until asked again "
                                          "(202 until done)")},
        "/v1/merge": {"get": _admin("What is merged, and the merge's progress", "MergeStatus")},
        "/v1/load_lora_adapter": {"post": _admin("vLLM's: load an adapter from a directory",
                                                 "AdapterLoaded",
                                                 body=(json_body, _ref("LoadRequest")))},
        "/v1/unload_lora_adapter": {"post": _admin("vLLM's: unload an adapter",
                                                   "AdapterUnloaded",
                                                   body=(json_body, _ref("UnloadRequest")))},
        "/health": {"get": HEALTH},
        "/ping": {"get": HEALTH, "post": HEALTH},
        "/version": {"get": _open("The server's version", {200: ("OK", _content(_obj(
            {"version": {"type": "string"}}, ("version",))))})},
        "/metrics": {"get": _op("Prometheus metrics (vLLM's names). With --metrics-key only that "
                                "key or the admin key reads them; otherwise open, without "
                                "adapter or tenant names where tenants are configured",
                                {200: ("OK", _content({"type": "string"}, "text/plain"))},
                                (401,), BEARER_IF_CONFIGURED, tag="operations")},
        "/openapi.json": {"get": _open("This document", {200: ("OK", _content(
            {"type": "object"}))})},
    }


def _version() -> str:
    try:
        return version("loraplex")
    except PackageNotFoundError:
        return "unknown"


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document. Cached: callers that change it must copy it first."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraplex", "version": _version(),
                 "description": __doc__.split("\n\n", 1)[1].strip()},
        "paths": _paths(),
        "components": {"schemas": COMPONENTS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_json(request: Request) -> Response:
    return JSONResponse(document())


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
