"""What the HTTP handlers share: the engine front, the tokenizer, limits and model cards."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore, StoredAdapter
from loraplex.adapters.validate import MIX_NAME, Limits
from starlette.requests import Request

from .auth import Keyring, Principal, check_rate
from .engine.async_engine import AsyncEngine
from .engine.request import RequestError
from .metrics import Metrics
from .protocol import APIError, parse_json

log = logging.getLogger("loraplex.server")


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class AdapterInfo:
    """What the admin API reports about an adapter's files."""

    sha256: str
    size: int
    created: float
    # "upload", "compose" or "mix" (in the store: after a restart "upload" or "mix"), or
    # "path" (loaded from a directory)
    source: str

    @classmethod
    def of_stored(cls, stored: StoredAdapter) -> AdapterInfo:
        source = "mix" if MIX_NAME.match(stored.name) else "upload"
        return cls(stored.sha256, stored.size, stored.created, source)

    @classmethod
    def of_dir(cls, path: Path, source: str) -> AdapterInfo:
        digest, size = hashlib.sha256(), 0
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            data = (path / name).read_bytes()
            digest.update(data)
            size += len(data)
        return cls(digest.hexdigest(), size, (path / WEIGHTS_FILE).stat().st_mtime, source)


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_name: str
    max_model_len: int
    metrics: Metrics
    store: AdapterStore
    keyring: Keyring = field(default_factory=Keyring)
    upload_limits: Limits = field(default_factory=Limits)
    allowed_lora_dirs: tuple[str, ...] = ()
    adapter_info: dict[str, AdapterInfo] = field(default_factory=dict)
    max_body_bytes: int = 8 * 2**20
    max_in_flight: int = 1024  # requests queued or running before 503
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    # Held while an admin route changes the store and the engine together.
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _collector: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="loraplex-collect"))
    draining: bool = False  # SIGTERM received: finish what runs, accept nothing new
    # Store versions that failed to parse (sync_from_store): not tried again per request.
    _unservable: set[str] = field(default_factory=set)
    # Per-request mixtures (routes/compose.py): how many are kept, when each was last asked
    # for (time.monotonic), and the lock their builds and deletions take one at a time.
    max_mixes: int = 32
    mix_used: dict[str, float] = field(default_factory=dict)
    mix_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ---- the store ------------------------------------------------------------------

    def paths_in_use(self) -> set[str]:
        """Adapter directories the engine may still read (off the engine thread)."""
        return self.engine.call(lambda e: e.adapter_manager.paths_in_use()).result()

    def collect_soon(self) -> None:
        """Collect store objects nobody uses any more, on a thread of its own (called from
        the engine thread when an old version's last request ends)."""
        self._collector.submit(self._collect)

    def _collect(self) -> None:
        try:
            self.store.collect(self.paths_in_use)
        except Exception:  # noqa: BLE001 - retried at the next change or start
            log.exception("collecting unused adapter files failed")

    async def sync_from_store(self, name: str) -> None:
        """Make this server agree with the store about `name`, for servers sharing one store
        (Ray replicas): another server's upload, replacement or delete takes effect here at
        the adapter's next request. Adapters loaded here from a directory are left alone."""
        stored = await asyncio.to_thread(self.store.get, name)
        if self._in_step(name, stored) or (stored and stored.sha256 in self._unservable):
            return
        adapter = None
        if stored is not None:  # parsed outside the lock: it reads the whole file
            try:
                adapter = await asyncio.to_thread(self.engine.engine.parse_adapter, name,
                                                  str(stored.path))
            except Exception as e:  # noqa: BLE001 - damaged, or replaced and collected meanwhile
                log.warning("adapter %r: stored version %s not served: %s", name,
                            stored.sha256[:12], e)
                self._unservable.add(stored.sha256)
                return
        async with self.admin_lock:
            # Read again: an upload or delete through this server may have run meanwhile.
            if await asyncio.to_thread(self.store.get, name) != stored or \
                    self._in_step(name, stored):
                return
            try:
                if adapter is None:
                    await asyncio.wrap_future(self.engine.call(
                        lambda e: e.unregister_adapter(name)))
                    self.adapter_info.pop(name, None)
                else:
                    await asyncio.wrap_future(self.engine.call(
                        lambda e: e.install_adapter(adapter)))
                    self.adapter_info[name] = AdapterInfo.of_stored(stored)
            except RequestError as e:  # refused by the engine: tried again next request
                log.warning("adapter %r: could not follow the shared store: %s", name, e)

    def _in_step(self, name: str, stored) -> bool:
        info = self.adapter_info.get(name)
        if info is not None and info.source == "path":
            return True
        return (stored.sha256 if stored else None) == (info.sha256 if info else None)

    async def sync_all_from_store(self) -> None:
        """`sync_from_store` for every name the store or this server knows (listings)."""
        stored = {s.name for s in await asyncio.to_thread(self.store.list)}
        for name in sorted(stored | self.adapter_info.keys()):
            await self.sync_from_store(name)

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    # ---- admission ------------------------------------------------------------------

    def check_capacity(self, needed: int) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", None, "shutting_down",
                           headers={"Retry-After": "5"})
        if self.in_flight + needed > self.max_in_flight:
            raise APIError(503, "the server is at capacity; retry shortly", None,
                           "queue_full", headers={"Retry-After": "1"})

    @staticmethod
    def principal(request: Request) -> Principal:
        return request.state.principal

    def may_use(self, request: Request, adapter: str) -> bool:
        """Whether the caller may see and call `adapter`."""
        return self.principal(request).may_use(adapter)

    def check_rate(self, request: Request, tokens: int) -> None:
        check_rate(self.keyring, self.principal(request), tokens)

    async def read_json(self, request: Request) -> Any:
        """A JSON request body: size-capped (413), parsed strictly (400), and only with
        `Content-Type: application/json` (415): a web page may send text/plain or form bodies
        to any origin without a CORS preflight, so parsing those would let any site drive an
        open server from its visitors' browsers (FastAPI, hence vLLM, refuses them too)."""
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/")
                                                and media.endswith("+json")):
            raise APIError(415, "the request body must be JSON sent with 'Content-Type: "
                                f"application/json' (got {media or 'no Content-Type'!r})",
                           None, "unsupported_media_type")
        return parse_json(await self.read_body(request))

    async def read_body(self, request: Request) -> bytes:
        return await read_capped(request, self.max_body_bytes)

    # ---- prompts --------------------------------------------------------------------

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """No token spans more characters than the vocabulary's longest entry (special tokens
        included), so a longer text cannot fit the context: refused before it is tokenized,
        which takes seconds per megabyte."""
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        return self.max_model_len * max((len(t) for t in vocab), default=1)

    def check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} "
                                f"tokens. However, your prompt has {chars} characters, more "
                                f"than {self.max_model_len} tokens can hold.", param)

    def prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a prompt, refused (400, naming `param`) as the engine would refuse
        them, before anything is queued or streamed. Slow for long text: call it off the
        event loop."""
        engine = self.engine.engine
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), param)
        try:
            ids = engine.tokenize(prompt)
            engine.check_length(len(ids), 0)
        except RequestError as e:
            raise APIError(400, str(e), param) from None
        return ids

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        try:
            self.engine.engine.check_length(prompt_len, max_tokens)
        except RequestError as e:
            raise APIError(400, str(e), e.param) from None

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as the model's chat template writes it (off the event loop)."""
        self.check_prompt_chars(sum(len(m.get("content") or "") for m in messages), "messages")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           "messages")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as e:  # a template may reject a conversation (e.g. role order)
            raise APIError(400, f"the chat template rejected the messages: {e}",
                           "messages") from None

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer else str(token_id)

    # ---- models ---------------------------------------------------------------------

    def model_cards(self, request: Request) -> list[dict]:
        """vLLM's /v1/models entries: the base, then each adapter the caller may use."""
        base = {"id": self.served_model_name, "object": "model", "created": self.created,
                "owned_by": "loraplex", "root": self.served_model_name, "parent": None,
                "max_model_len": self.max_model_len}
        cards = [base]
        for name, adapter in sorted(self.engine.engine.adapters.items()):  # AdapterSummary
            if self.may_use(request, name):
                cards.append(dict(base, id=name, root=adapter.path,
                                  parent=self.served_model_name))
        return cards
