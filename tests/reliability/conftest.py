"""The reliability suite: a real `loraplex serve` process (or the store itself) pushed the
way a hostile or unlucky client would, each test recording the figures it measured.

Short by default (what CI runs); `LORAPLEX_RELIABILITY=long` (scripts/reliability.sh --long)
runs the full counts. Figures go to `$LORAPLEX_RELIABILITY_OUT` (JSON lines), from which
scripts/reliability_report.py writes docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import free_port

LONG = os.environ.get("LORAPLEX_RELIABILITY") == "long"
ADMIN = "sk-admin-reliability"
TENANT_KEYS = {"acme": "sk-acme-reliability", "globex": "sk-globex-reliability"}


def scale(short: int, long: int) -> int:
    """A count for this run: `short` in CI, `long` in the full run."""
    return long if LONG else short


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.reliability)


@dataclass
class Figures:
    """Measured figures of the suite, one JSON line each: case (F7, L2, ...), what, value."""

    path: Path | None
    rows: list[dict] = field(default_factory=list)

    def record(self, case: str, what: str, value, unit: str = "", note: str = "") -> None:
        row = {"case": case, "what": what, "value": value, "unit": unit, "note": note,
               "long": LONG, "time": time.time()}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"[{case}] {what}: {value} {unit} {note}".rstrip(), file=sys.stderr)


@pytest.fixture(scope="session")
def figures() -> Figures:
    out = os.environ.get("LORAPLEX_RELIABILITY_OUT")
    return Figures(Path(out) if out else None)


class ServerProcess:
    """`loraplex serve` in a child process on a loopback port, restartable."""

    def __init__(self, args: list[str], workdir: Path):
        self.args = args
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "server.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> float:
        """Start and wait until /health answers 200; returns the seconds it took."""
        assert self.proc is None or self.proc.poll() is not None
        t0 = time.monotonic()
        with open(self.log, "a") as log:
            log.write(f"--- start {self.starts}\n")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loraplex.server.cli", "serve", *self.args,
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.starts += 1
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n"
                                     + self.log.read_text()[-4000:])
            assert time.monotonic() - t0 < timeout, "the server did not become healthy"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/status").read_text().split("\n")
        kb = next(int(line.split()[1]) for line in fields if line.startswith("VmRSS:"))
        return kb * 1024

    def open_files(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@pytest.fixture(scope="session")
def tenant_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.json"
    path.write_text(json.dumps({"tenants": {
        name: {"keys": [key], "adapters": [f"{name}/*"]} for name, key in TENANT_KEYS.items()}}))
    return path


@pytest.fixture
def make_server(embedded_dir, tenant_file, tmp_path):
    """Factory: a ServerProcess on the embedded model with an admin key, two tenants and a
    temporary store; extra flags appended. Every server it made is killed afterwards."""
    made: list[ServerProcess] = []

    def make(*extra: str, store: Path | None = None) -> ServerProcess:
        store = store or tmp_path / "store"
        server = ServerProcess([str(embedded_dir), "--admin-key", ADMIN, "--tenant-keys",
                                str(tenant_file), "--adapter-store", str(store),
                                "--num-kv-blocks", "512", *extra], tmp_path)
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload_files(adapter_dir: Path, name: str, weights: bytes | None = None,
                 config: bytes | None = None) -> dict:
    """The multipart form of POST /v1/adapters."""
    return {"name": (None, name),
            "config": ("adapter_config.json",
                       config if config is not None
                       else (adapter_dir / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors",
                        weights if weights is not None
                        else (adapter_dir / "adapter_model.safetensors").read_bytes())}


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes
    weights: bytes

    def form(self, name: str) -> dict:
        return {"name": (None, name), "config": ("adapter_config.json", self.config),
                "weights": ("adapter_model.safetensors", self.weights)}


@pytest.fixture(scope="session")
def adapter_variants(embedded_adapters) -> list[AdapterFiles]:
    """Valid PEFT adapters for the embedded model with distinct bytes: the rank-8 `sql`
    adapter with its B matrices scaled (five variants), then one of rank 16 (twice the size)."""
    import torch
    from safetensors.torch import load_file, save

    source = embedded_adapters["sql"]
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    variants = []
    for i in range(5):
        scaled = {k: (t * (1 + 0.1 * i) if "lora_B" in k else t).contiguous()
                  for k, t in tensors.items()}
        variants.append(AdapterFiles(json.dumps(config).encode(), save(scaled)))
    wide = {k: torch.cat([t, t], dim=0 if "lora_A" in k else 1).contiguous()
            for k, t in tensors.items()}
    variants.append(AdapterFiles(json.dumps(dict(config, r=16, lora_alpha=32)).encode(),
                                 save(wide)))
    return variants


def store_on_disk(root: Path) -> dict:
    """What a store directory holds, read without opening it as a store (which would run
    recovery): names -> sha256, object names, staging and quarantine entries."""
    names = {}
    for record in (root / "names").glob("*.json"):
        try:
            data = json.loads(record.read_text())
        except ValueError:  # damaged: what recovery at the next start must deal with
            continue
        names[data["name"]] = data["sha256"]
    return {"names": names,
            "objects": {p.name for p in (root / "objects").iterdir()},
            "staging": sorted(p.name for p in (root / "staging").iterdir()),
            "quarantine": sorted(p.name for p in (root / "quarantine").iterdir())}


def object_sha(obj: Path) -> str:
    import hashlib

    digest = hashlib.sha256((obj / "adapter_config.json").read_bytes())
    digest.update((obj / "adapter_model.safetensors").read_bytes())
    return digest.hexdigest()
