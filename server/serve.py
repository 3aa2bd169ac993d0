"""Start-up: load the model, the adapters and the engine thread, then run uvicorn."""

from __future__ import annotations

import logging
import sys
import time

import uvicorn

from .app import build_app
from .config import ServerConfig
from .engine.async_engine import AsyncEngine
from .engine.engine import LLMEngine
from .state import ServerState

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
    for i, (name, path) in enumerate(config.lora_modules, 1):
        engine.register_adapter(name, path)
        _say(f"adapter {i}/{len(config.lora_modules)}: {name} <- {path}")
    return ServerState(
        engine=AsyncEngine(engine),
        served_model_name=config.served_model_name or engine.loaded.name,
        max_model_len=engine.max_model_len,
        max_body_bytes=int(config.max_body_mb * 2**20),
        max_in_flight=config.max_in_flight,
    )


def serve(config: ServerConfig) -> int:
    state = build_state(config)
    app = build_app(state, api_key=config.api_key)
    host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    _say(f"serving {state.served_model_name} at http://{host}:{config.port}/v1")
    names = sorted(state.engine.engine.adapters)
    _say(f"adapters: {', '.join(names) if names else '(none yet)'}")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        state.engine.shutdown()
    return 0
