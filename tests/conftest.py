"""Shared fixtures: the embedded model's cached directory, adapters for it, a live server."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

# Without CUDA the SGMV kernel tests run in Triton's interpreter. Triton reads the variable
# whenever a function is decorated, its own library's too (tl.cumsum), and transformers and
# peft import Triton: so it is set here, before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def dense_rows_64(monkeypatch) -> int:
    """The C kernel takes the base's calls of up to 64 rows, and so the one-call path of base
    and adapters, as with AVX-512, on any CPU (with AVX2 only, up to 16): the tests of
    those paths then run the same steps everywhere."""
    from loraplex.server.runner import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "DENSE_ROWS", 64)
    return 64


@pytest.fixture(scope="session")
def embedded_dir():
    from loraplex.server.runner.loader import convert_gguf, embedded_gguf_path

    return convert_gguf(embedded_gguf_path())


@pytest.fixture(scope="session")
def embedded_adapters(tmp_path_factory, embedded_dir):
    """Two small PEFT adapters for the embedded model: {name: directory}."""
    from loraplex.loadtest.fixtures import make_adapter
    from loraplex.server.config import ModelConfig
    from loraplex.server.runner.loader import load_model

    out = tmp_path_factory.mktemp("http-adapters")
    specs = {"sql": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
             "poet": {"r": 4, "lora_alpha": 8, "target_modules": ["o_proj", "down_proj"]}}
    return {name: make_adapter(load_model(ModelConfig(model=str(embedded_dir))).model,
                               out / name, spec, name)
            for name, spec in specs.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, port: int | None = None):
    """uvicorn serving `app` on a loopback port in a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
