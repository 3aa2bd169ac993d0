"""The engine on its own thread, callable from any thread or asyncio event loop.

Everything that touches the engine (new requests, aborts, adapter changes) is queued and
run by the engine thread between steps, so the engine itself needs no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Callable, TypeVar

from .engine import LLMEngine, OutputCallback, RequestOutput
from .request import Request, SamplingParams

log = logging.getLogger("loraplex.engine")
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future]] = (
            queue.SimpleQueue())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self.error: BaseException | None = None  # set if the engine thread died
        engine.adapter_manager.on_fetched = self._wake.set
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread between steps; its result or error comes
        back through the future."""
        future: Future[T] = Future()
        if not self.alive:
            future.set_exception(EngineDeadError("the engine is not running"))
            return future
        self._inbox.put((fn, future))
        self._wake.set()
        return future

    def submit(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
               callback: OutputCallback | None = None,
               request_id: str | None = None) -> Future[Request]:
        """Queue a request; `callback` gets every output delta on the engine thread."""
        rid = request_id or f"req-{next(self._ids)}"
        return self.call(lambda e: e.add_request(rid, prompt, params, adapter, callback))

    def abort(self, request_id: str) -> Future[None]:
        return self.call(lambda e: e.abort(request_id))

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       adapter: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Raises RequestError before the first output if the
        request is refused. Leaving the iteration early (a client went away) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = request_id or f"req-{next(self._ids)}"
        finished = False
        try:
            # Inside the try: a client gone while the engine takes the request must still
            # abort it (the inbox runs in order, so the abort comes after the add).
            await asyncio.wrap_future(self.submit(
                prompt, params, adapter,
                lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out), rid))
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.engine.adapter_manager.shutdown()
        self.engine.merger.shutdown()

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if engine.has_unfinished():
                    engine.step()
                    if not engine.idle:
                        continue
                    # Requests wait on adapters being read: sleep until the loader (or a
                    # new call) wakes us, with a short timeout as a safety net.
                    self._wake.wait(0.05)
                else:
                    self._wake.wait()
                self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - recorded for /health; the thread ends
            self.error = e
            log.exception("engine thread died")
            self._fail_pending(e)

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.engine))
            except Exception as e:
                future.set_exception(e)

    def _fail_pending(self, error: BaseException) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            future.set_exception(EngineDeadError(f"the engine died: {error}"))
        self.engine.fail_all(f"the engine died: {error}")
