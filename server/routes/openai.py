"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.engine import RequestOutput
from ..engine.request import RequestError
from ..protocol import APIError, GenerationRequest, new_id, now, parse_chat, parse_completion, usage
from ..state import ServerState
from .compose import mixture, note_use


@dataclass
class Job:
    """One call's choices, ready to submit: prompts are token ids, already length-checked."""

    state: ServerState
    gen: GenerationRequest
    prompts: list[list[int]]
    adapter: str | None
    request_id: str
    created: int
    model: str
    tenant: str | None = None

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.gen.n


@dataclass
class Choice:
    index: int
    text: str = ""
    outputs: list[RequestOutput] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(o.new_token_ids) for o in self.outputs)


def _resolve_model(state: ServerState, request: Request, model: str | None) -> str | None:
    """The adapter a request names, or None for the base model; 404 for anything the
    caller cannot see, exactly as for a name that does not exist."""
    if model in (None, "", state.served_model_name):
        return None
    if model not in state.engine.engine.adapters or not state.may_use(request, model):
        raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
    return model


async def _outputs(job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run every choice concurrently; yield (choice index, output delta) as they come.
    Leaving early (a client went away) aborts every choice still running."""
    state, n = job.state, job.gen.n
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt: list[int]) -> None:
        try:
            async for out in state.engine.generate(prompt, job.gen.params, job.adapter,
                                                   request_id=f"{job.request_id}-{index}"):
                await queue.put((index, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer below
            await queue.put((index, e))

    state.in_flight += job.num_choices
    tasks = [asyncio.create_task(pump(i, job.prompts[i // n])) for i in range(job.num_choices)]
    generated = 0
    try:
        remaining = job.num_choices
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            remaining -= item.finished
            generated += len(item.new_token_ids)
            yield index, item
    finally:
        state.in_flight -= job.num_choices
        state.metrics.observe_request(job.adapter, job.tenant,
                                      sum(len(p) for p in job.prompts), generated)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(job: Job, request: Request) -> list[Choice]:
    """Run a non-streaming call to the end; a client that disconnects aborts it."""
    choices = [Choice(i) for i in range(job.num_choices)]

    async def collect() -> None:
        async for i, out in _outputs(job):
            if out.error:
                raise APIError(500, out.error)
            choices[i].text += out.new_text
            choices[i].outputs.append(out)
            choices[i].finish_reason = out.finish_reason or choices[i].finish_reason

    task = asyncio.create_task(collect())
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
    await task
    return choices


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.outputs[-1].num_prompt_tokens for c in choices[::n])  # each prompt once
    return usage(prompt, sum(c.num_tokens for c in choices))


def _sse(data) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse_stream(job: Job, events) -> AsyncIterator[bytes]:
    """Frame a call's events as SSE; an error mid-stream is one data event, then [DONE]."""
    try:
        async for data in events:
            yield _sse(data)
    except RequestError as e:
        yield _sse(APIError.from_request_error(e).body())
    except APIError as e:
        yield _sse(e.body())
    yield b"data: [DONE]\n\n"


async def _prepare(state: ServerState, request: Request, body: dict, gen: GenerationRequest,
                   prompts: list, prefix: str, default_max_tokens: bool = False) -> Job:
    state.check_capacity(len(prompts) * gen.n)  # before building a mixture or tokenizing
    adapter = await mixture(state, request, body) or _resolve_model(state, request, gen.model)
    note_use(state, adapter)
    param = "messages" if prefix == "chatcmpl" else "prompt"
    # Tokenizing is CPU work of up to a second per prompt: on a thread, so that every other
    # request and /health go on meanwhile.
    ids = [await run_in_threadpool(state.prompt_ids, p, param) for p in prompts]
    if default_max_tokens:  # vLLM's chat default: whatever the context leaves
        gen = dataclasses.replace(gen, params=dataclasses.replace(
            gen.params, max_tokens=state.max_model_len - max(len(p) for p in ids)))
    for p in ids:
        state.check_length(len(p), gen.params.max_tokens)
    state.check_capacity(len(ids) * gen.n)
    state.check_rate(request, gen.n * sum(len(p) + gen.params.max_tokens for p in ids))
    return Job(state, gen, ids, adapter, new_id(prefix), now(),
               adapter or gen.model or state.served_model_name, state.principal(request).tenant)


# ---- /v1/completions ------------------------------------------------------------------

def _completion_logprobs(state: ServerState, outs: list[RequestOutput], offset: int = 0) -> dict:
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for out in outs:
        for tok, entry in zip(out.new_token_ids, out.new_logprobs):
            text = state.token_text(tok)
            lp["tokens"].append(text)
            lp["token_logprobs"].append(entry.logprob)
            lp["top_logprobs"].append({state.token_text(t): v for t, v in entry.top})
            lp["text_offset"].append(offset)
            offset += len(text)
    return lp


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    body = await state.read_json(request)
    gen = parse_completion(body)
    if gen.echo:
        raise APIError(400, "echo is not supported", "echo")
    job = await _prepare(state, request, body, gen, gen.prompts, "cmpl")
    if gen.stream:
        return StreamingResponse(_sse_stream(job, _completion_events(job)),
                                 media_type="text/event-stream")
    choices = await _collect(job, request)
    return JSONResponse({
        "id": job.request_id, "object": "text_completion", "created": job.created,
        "model": job.model, "usage": _usage(choices, gen.n),
        "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                     "logprobs": (_completion_logprobs(state, c.outputs)
                                  if gen.params.logprobs is not None else None)}
                    for c in choices]})


async def _completion_events(job: Job) -> AsyncIterator[dict]:
    offsets = [0] * job.num_choices
    tokens, prompt_tokens = [0] * job.num_choices, [0] * job.num_choices

    def chunk(choices, use=None):
        return {"id": job.request_id, "object": "text_completion", "created": job.created,
                "model": job.model, "choices": choices, "usage": use}
    async for i, out in _outputs(job):
        if out.error:
            raise APIError(500, out.error)
        tokens[i] += len(out.new_token_ids)
        prompt_tokens[i] = out.num_prompt_tokens
        lp = None
        if job.gen.params.logprobs is not None:
            lp = _completion_logprobs(job.state, [out], offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
        if out.new_text or out.new_token_ids or out.finished:
            yield chunk([{"index": i, "text": out.new_text, "logprobs": lp,
                          "finish_reason": out.finish_reason}])
    if job.gen.include_usage:
        yield chunk([], usage(sum(prompt_tokens[::job.gen.n]), sum(tokens)))


# ---- /v1/chat/completions -------------------------------------------------------------

def _chat_logprobs(state: ServerState, outs: list[RequestOutput]) -> list[dict]:
    def entry(tok: int, logprob: float) -> dict:
        text = state.token_text(tok)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return [dict(entry(tok, e.logprob), top_logprobs=[entry(t, v) for t, v in e.top])
            for out in outs for tok, e in zip(out.new_token_ids, out.new_logprobs)]


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    body = await state.read_json(request)
    gen, messages = parse_chat(body)
    explicit = isinstance(body, dict) and (body.get("max_tokens") is not None
                                           or body.get("max_completion_tokens") is not None)
    prompt = await run_in_threadpool(state.render_chat, messages)
    job = await _prepare(state, request, body, gen, [prompt], "chatcmpl",
                         default_max_tokens=not explicit)
    if gen.stream:
        return StreamingResponse(_sse_stream(job, _chat_events(job)),
                                 media_type="text/event-stream")
    choices = await _collect(job, request)
    with_lp = gen.params.logprobs is not None
    return JSONResponse({
        "id": job.request_id, "object": "chat.completion", "created": job.created,
        "model": job.model, "usage": _usage(choices, gen.n),
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": {"content": _chat_logprobs(state, c.outputs)} if with_lp else None,
                     "finish_reason": c.finish_reason} for c in choices]})


async def _chat_events(job: Job) -> AsyncIterator[dict]:
    tokens, prompt_tokens = [0] * job.num_choices, 0

    def chunk(choices, use=None):
        return {"id": job.request_id, "object": "chat.completion.chunk", "created": job.created,
                "model": job.model, "choices": choices, "usage": use}
    for i in range(job.num_choices):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
    async for i, out in _outputs(job):
        if out.error:
            raise APIError(500, out.error)
        tokens[i] += len(out.new_token_ids)
        prompt_tokens = out.num_prompt_tokens
        lp = ({"content": _chat_logprobs(job.state, [out])}
              if job.gen.params.logprobs is not None else None)
        if out.new_text or lp:
            yield chunk([{"index": i, "delta": {"content": out.new_text}, "logprobs": lp,
                          "finish_reason": None}])
        if out.finished:
            yield chunk([{"index": i, "delta": {}, "logprobs": None,
                          "finish_reason": out.finish_reason}])
    if job.gen.include_usage:
        yield chunk([], usage(prompt_tokens, sum(tokens)))


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    return JSONResponse({"object": "list", "data": state.model_cards(request)})


routes = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
