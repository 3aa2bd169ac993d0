"""Start-up: load the model, the adapters and the engine thread, then run uvicorn."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import uvicorn
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validate import MIX_NAME, Limits

from .app import build_app
from .auth import Keyring
from .config import ConfigError, ServerConfig
from .engine.async_engine import AsyncEngine, EngineDeadError
from .engine.engine import LLMEngine
from .http_protocol import HeaderTimeoutProtocol
from .metrics import Metrics
from .state import AdapterInfo, ServerState

log = logging.getLogger("loraplex.server")


def _say(message: str) -> None:
    print(f"[loraplex] {message}", file=sys.stderr, flush=True)


def build_state(config: ServerConfig) -> ServerState:
    """Everything the app needs, loaded with progress on stderr."""
    t0 = time.monotonic()
    _say(f"loading {config.engine.model.model or 'the embedded SmolLM2-135M-Instruct'} ...")
    engine = LLMEngine(config.engine)
    _say(f"model ready in {time.monotonic() - t0:.1f}s: {engine.loaded.quantization} on "
         f"{engine.loaded.device}, {engine.blocks.num_blocks} KV blocks, "
         f"max_model_len {engine.max_model_len}")
    store = AdapterStore(config.adapter_store or _default_store(config), config.shared_store)
    info = {}
    stored = store.list()
    for i, s in enumerate(stored, 1):  # uploads survive restarts
        try:
            engine.register_adapter(s.name, str(s.path))
        except Exception as e:  # noqa: BLE001 - damaged on disk: the rest is still served
            store.quarantine(s.name, str(e))
            _say(f"stored adapter {i}/{len(stored)}: {s.name} quarantined: {e}")
            continue
        info[s.name] = AdapterInfo.of_stored(s)
        _say(f"stored adapter {i}/{len(stored)}: {s.name}")
    for i, (name, path) in enumerate(config.lora_modules, 1):
        if MIX_NAME.match(name):
            raise ConfigError(f"--lora-modules {name}: names of the shape [tenant/]mix-<16 hex "
                              f"digits> are kept for per-request mixtures")
        engine.register_adapter(name, path)
        info[name] = AdapterInfo.of_dir(Path(path), "path")
        _say(f"adapter {i}/{len(config.lora_modules)}: {name} <- {path}")
    wanted = config.engine.merge.adapter
    if wanted is not None and wanted not in engine.adapters:
        raise ConfigError(f"--merge {wanted}: no such adapter (name one given with "
                          f"--lora-modules or stored in the adapter store)")
    served_name = config.served_model_name or engine.loaded.name
    metrics = Metrics(served_name)
    metrics.describe_cache(config.engine.cache.block_size, engine.blocks.num_blocks)
    engine.stat_loggers.append(metrics)  # before the engine thread starts
    state = ServerState(
        engine=AsyncEngine(engine),
        served_model_name=served_name,
        max_model_len=engine.max_model_len,
        metrics=metrics,
        keyring=Keyring.load(config.admin_key, config.api_key, config.tenant_keys,
                             config.metrics_key),
        store=store,
        upload_limits=Limits(max_weights_bytes=int(config.max_adapter_mb * 2**20)),
        allowed_lora_dirs=config.allowed_lora_dirs,
        adapter_info=info,
        max_body_bytes=int(config.max_body_mb * 2**20),
        max_in_flight=config.max_in_flight,
        max_mixes=config.max_mixes,
    )
    engine.adapter_manager.on_dropped = state.collect_soon
    return state


def _default_store(config: ServerConfig) -> Path:
    root = config.engine.model.cache_dir or os.environ.get("LORAPLEX_CACHE")
    return Path(root or Path.home() / ".cache" / "loraplex") / "adapters"


# Once the drain has ended, uvicorn waits this long for the last responses to go out, then
# cancels their tasks (by default it waits for open connections without limit).
CLOSE_GRACE_S = 3
# A process still alive this long after the drain ended (a thread that will not stop) is
# ended with os._exit(1): the drain deadline is a promise to whoever sent the signal. Room
# for uvicorn's grace, the engine's last step and the interpreter's own exit.
FORCE_EXIT_S = 15.0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new work with 503 and let requests in flight finish, for at
    most `drain_timeout` seconds; then end those still running with finish_reason "abort"
    (their clients get a proper last chunk or response) and stop. A second signal stops at
    once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:
            self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True
        _say(f"draining: {self.state.in_flight} requests in flight, new ones get 503")
        threading.Thread(target=self._drain, name="loraplex-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.state.in_flight:
            try:
                aborted = self.state.engine.call(lambda e: e.abort_all()).result(CLOSE_GRACE_S)
                _say(f"drain timeout: aborted the {aborted} requests still running")
            except (FutureTimeout, EngineDeadError) as e:  # the force exit below still holds
                _say(f"drain timeout: could not abort the {self.state.in_flight} requests in "
                     f"flight: {e!r}")
        # uvicorn now closes idle connections and gives the rest CLOSE_GRACE_S to send their
        # last chunk, the abort's included.
        self.should_exit = True
        time.sleep(FORCE_EXIT_S)  # a daemon thread: a normal exit ends it first
        _say(f"still running {FORCE_EXIT_S:g}s after the drain ended: forcing exit")
        os._exit(1)


def serve(config: ServerConfig) -> int:
    state = build_state(config)
    app = build_app(state)
    host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    _say(f"serving {state.served_model_name} at http://{host}:{config.port}/v1")
    names = sorted(state.engine.engine.adapters)
    _say(f"adapters: {', '.join(names) if names else '(none yet)'}")
    server = DrainingServer(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="warning",
        http=HeaderTimeoutProtocol.with_timeout(config.header_timeout),
        limit_concurrency=config.max_connections, timeout_graceful_shutdown=CLOSE_GRACE_S),
        state, config.drain_timeout)
    try:
        server.run()
    finally:
        state.engine.shutdown()
    _say("stopped")
    return 0
