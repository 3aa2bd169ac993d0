"""Operator routes: upload, list, inspect, delete, pin adapters; vLLM's load/unload; merge
an adapter into the base and back (composing new adapters: compose.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import shutil
from pathlib import Path

from loraplex.adapters.peft_format import AdapterError
from loraplex.adapters.store import CONFIG_FILE, WEIGHTS_FILE, StoreFullError
from loraplex.adapters.validate import check_config_bytes, check_name, check_safetensors
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engine.request import RequestError
from ..protocol import APIError
from ..state import AdapterInfo, ServerState


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def refuse(e: Exception) -> APIError:
    if isinstance(e, RequestError):
        status = 404 if e.code == "model_not_found" else 409 if e.code == "adapter_busy" else 400
        return APIError(status, str(e), e.param, e.code)
    return APIError(400, str(e), None, "invalid_adapter")


def _limited(request: Request, limit: int) -> Request:
    """The same request, whose body stream raises 413 as soon as it passes `limit`."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise APIError(413, f"the upload exceeds {limit} bytes")
        return message

    return Request(request.scope, receive)


async def engine_call(state: ServerState, fn):
    try:
        return await asyncio.wrap_future(state.engine.call(fn))
    except RequestError as e:
        raise refuse(e) from None


async def upload(request: Request) -> Response:
    """multipart/form-data: `name`, `config` (adapter_config.json), `weights`
    (adapter_model.safetensors). Checked whole before anything is stored or served."""
    state = _state(request)
    limits = state.upload_limits
    limit = limits.max_weights_bytes + limits.max_config_bytes + (1 << 20)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the upload exceeds {limit} bytes")
    form = await _limited(request, limit).form(max_files=2, max_fields=3,
                                                max_part_size=limits.max_config_bytes)
    try:
        name, config, weights = form.get("name"), form.get("config"), form.get("weights")
        if not isinstance(name, str):
            raise APIError(400, "the form needs a 'name' field", "name")
        if not isinstance(weights, UploadFile):
            raise APIError(400, "the form needs a 'weights' file (adapter_model.safetensors)",
                           "weights")
        if config is None:
            raise APIError(400, "the form needs a 'config' field (adapter_config.json)", "config")
        config_bytes = await config.read() if isinstance(config, UploadFile) else config.encode()
        with state.store.staging() as staged:
            try:
                await run_in_threadpool(_stage, weights.file, config_bytes, staged)
            except AdapterError as e:
                raise refuse(e) from None
            await check_store_serve(state, name, staged, "upload")
    finally:
        await form.close()
    return JSONResponse(await describe(state, name), status_code=201)


async def check_store_serve(state: ServerState, name: str, staged: Path, source: str) -> None:
    """An adapter written into a staging directory: checked whole, then stored and served
    under `name` (replacing a previous version), or refused with nothing changed."""
    try:
        check_name(name, state.served_model_name, mixture=source == "mix")
        check_config_bytes((staged / CONFIG_FILE).read_bytes(), state.upload_limits)
        await run_in_threadpool(check_safetensors, staged / WEIGHTS_FILE, state.upload_limits)
        adapter = await run_in_threadpool(state.engine.engine.parse_adapter, name, str(staged))
    except AdapterError as e:
        raise refuse(e) from None
    # Store and engine change together: a concurrent upload, delete or unload of the same
    # name cannot interleave between them.
    async with state.admin_lock:
        stored = await store_call(state, state.store.put_staged, name, staged, state.paths_in_use)
        # A new version: requests running on the old one finish on its weights.
        adapter = dataclasses.replace(adapter, path=str(stored.path))
        await engine_call(state, lambda e: e.install_adapter(adapter))
        state.adapter_info[name] = AdapterInfo(stored.sha256, stored.size, stored.created,
                                               source)


def _stage(source, config: bytes, staged: Path) -> None:
    with store_full():
        (staged / CONFIG_FILE).write_bytes(config)
        with open(staged / WEIGHTS_FILE, "wb") as f:
            shutil.copyfileobj(source, f)


@contextlib.contextmanager
def store_full():
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, StoreFullError):
            raise APIError(507, "the adapter store is out of disk space; nothing was stored",
                           None, "insufficient_storage") from None
        raise


async def store_call(state: ServerState, fn, *args):
    with store_full():
        return await run_in_threadpool(fn, *args)


async def describe(state: ServerState, name: str) -> dict:
    adapter = state.engine.engine.adapters.get(name)
    if adapter is None:
        raise APIError(404, f"adapter {name!r} not found", "name", "model_not_found")
    slot, pinned, host = await engine_call(state, lambda e: (
        e.adapter_manager.slot_of(name), e.adapter_manager.is_pinned(name),
        e.adapter_manager.in_host(name)))
    info = state.adapter_info.get(name)
    return {
        "id": name, "object": "adapter", "parent": state.served_model_name,
        "rank": adapter.max_rank, "ranks": list(adapter.ranks), "targets": list(adapter.targets),
        "modules": adapter.num_modules,
        "size": info.size if info else None, "sha256": info.sha256 if info else None,
        "created": int(info.created) if info else None, "source": info.source if info else None,
        "residency": "device" if slot is not None else "host" if host else "disk",
        "pinned": pinned,
    }


async def list_adapters(request: Request) -> Response:
    state = _state(request)
    names = sorted(state.engine.engine.adapters)
    return JSONResponse({"object": "list", "data": [await describe(state, n) for n in names]})


async def get_adapter(request: Request) -> Response:
    return JSONResponse(await describe(_state(request), request.path_params["name"]))


async def remove(state: ServerState, name: str) -> None:
    """Stop serving `name` and delete it from the store; its requests in flight finish first."""
    async with state.admin_lock:
        await engine_call(state, lambda e: e.unregister_adapter(name))
        await store_call(state, state.store.delete, name, state.paths_in_use)
        state.adapter_info.pop(name, None)


async def delete_adapter(request: Request) -> Response:
    state, name = _state(request), request.path_params["name"]
    await remove(state, name)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True})


async def pin(request: Request) -> Response:
    state, name = _state(request), request.path_params["name"]
    await engine_call(state, lambda e: e.adapter_manager.pin(name))
    return JSONResponse(await describe(state, name))


async def unpin(request: Request) -> Response:
    state, name = _state(request), request.path_params["name"]
    if name not in state.engine.engine.adapters:
        raise APIError(404, f"adapter {name!r} not found", "name", "model_not_found")
    await engine_call(state, lambda e: e.adapter_manager.unpin(name))
    return JSONResponse(await describe(state, name))


async def merge(request: Request) -> Response:
    """Merge `name` into the base whenever its requests are the only ones in the engine (at
    once if it is idle); 202 until it is merged."""
    state, name = _state(request), request.path_params["name"]
    status = await engine_call(state, lambda e: (e.merger.request(name), e.merger.status())[1])
    done = status["state"] == "merged" and status["adapter"] == name
    return JSONResponse(status, status_code=200 if done else 202)


async def unmerge(request: Request) -> Response:
    """Unmerge, and merge nothing until asked (--auto-merge may still merge by traffic)."""
    state = _state(request)
    status = await engine_call(state, lambda e: (e.merger.request(None), e.merger.status())[1])
    return JSONResponse(status, status_code=200 if status["state"] == "unmerged" else 202)


async def merge_status(request: Request) -> Response:
    return JSONResponse(await engine_call(_state(request), lambda e: e.merger.status()))


async def json_body(request: Request, state: ServerState) -> dict:
    body = await state.read_json(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def load_lora_adapter(request: Request) -> Response:
    """vLLM's `{"lora_name", "lora_path"}`: a directory on this machine, inside one of the
    directories the operator allowed (--allowed-lora-dirs)."""
    state = _state(request)
    body = await json_body(request, state)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(path, str) or not path:
        raise APIError(400, "lora_path must be a directory path", "lora_path")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(d).resolve()) for d in state.allowed_lora_dirs):
        raise APIError(403, "lora_path is outside the directories this server may load from "
                            "(--allowed-lora-dirs)", "lora_path", "path_not_allowed")
    try:
        check_name(name, state.served_model_name)
        if not (resolved / WEIGHTS_FILE).is_file():
            raise AdapterError(f"lora_path: no {WEIGHTS_FILE} in {path} (pickled checkpoints "
                               f"are not loaded)")
        await run_in_threadpool(check_safetensors, resolved / WEIGHTS_FILE, state.upload_limits)
        adapter = await run_in_threadpool(state.engine.engine.parse_adapter, name, str(resolved))
    except AdapterError as e:
        raise refuse(e) from None
    info = await run_in_threadpool(AdapterInfo.of_dir, resolved, "path")
    async with state.admin_lock:
        await engine_call(state, lambda e: e.install_adapter(adapter))
        state.adapter_info[name] = info
    return JSONResponse({"id": name, "object": "adapter", "loaded": True})


async def unload_lora_adapter(request: Request) -> Response:
    state = _state(request)
    name = (await json_body(request, state)).get("lora_name")
    if not isinstance(name, str):
        raise APIError(400, "lora_name must be a string", "lora_name")
    await remove(state, name)
    return JSONResponse({"id": name, "object": "adapter", "unloaded": True})


routes = [
    Route("/v1/adapters", upload, methods=["POST"]),
    Route("/v1/adapters", list_adapters, methods=["GET"]),
    Route("/v1/adapters/{name:path}/pin", pin, methods=["POST"]),
    Route("/v1/adapters/{name:path}/unpin", unpin, methods=["POST"]),
    Route("/v1/adapters/{name:path}/merge", merge, methods=["POST"]),
    Route("/v1/unmerge", unmerge, methods=["POST"]),
    Route("/v1/merge", merge_status, methods=["GET"]),
    Route("/v1/adapters/{name:path}", get_adapter, methods=["GET"]),
    Route("/v1/adapters/{name:path}", delete_adapter, methods=["DELETE"]),
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]
