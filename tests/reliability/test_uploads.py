"""F1-F3: truncated, bit-flipped and lying uploads, and a disk that fills during an upload,
against a real server: every one refused with a 4xx (or, for a flip that leaves a valid file,
stored whole), no file left behind, the adapters served before unchanged."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .conftest import ADMIN, TENANT_KEYS, auth, object_sha, scale, store_on_disk

ACME = TENANT_KEYS["acme"]


def upload(server, form: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/adapters", files=form, headers=auth(ADMIN), timeout=120)


def registry(server) -> dict:
    r = httpx.get(f"{server.url}/v1/adapters", headers=auth(ADMIN), timeout=30)
    assert r.status_code == 200
    return {a["id"]: a["sha256"] for a in r.json()["data"]}


def served(server, model: str = "acme/base") -> bool:
    r = httpx.post(f"{server.url}/v1/completions", headers=auth(ACME), timeout=60,
                   json={"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    return r.status_code == 200


def assert_clean(store: Path, registered: dict) -> None:
    disk = store_on_disk(store)
    assert disk["staging"] == [] and disk["quarantine"] == [], disk
    assert disk["names"] == registered, (disk["names"], registered)
    assert disk["objects"] == set(registered.values()), "orphan or missing objects"
    for sha in disk["objects"]:
        assert object_sha(store / "objects" / sha) == sha


def _lie(weights: bytes, how: str) -> bytes:
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    entry = header[key]
    if how == "offsets past the end":
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 4096]
    elif how == "shape that overflows":
        entry["shape"] = [2**62, 2**62]
    elif how == "negative offset":
        entry["data_offsets"] = [-8, entry["data_offsets"][1]]
    elif how == "dtype":
        entry["dtype"] = "F64"
    elif how == "header length":
        return struct.pack("<Q", len(weights) * 4) + weights[8:]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + weights[8 + n:]


LIES = ["offsets past the end", "shape that overflows", "negative offset", "dtype",
        "header length"]


def test_f1_f2_truncated_flipped_and_lying_uploads(make_server, adapter_variants, tmp_path,
                                                   figures):
    server = make_server()
    server.start()
    store = tmp_path / "store"
    good = adapter_variants[0]
    assert upload(server, good.form("acme/base")).status_code == 201
    before = registry(server)
    rng = random.Random(12)
    statuses: Counter = Counter()
    cases = []
    size = len(good.weights)
    for cut in [0, 4, 8, 100, size // 2, size - 1]:
        cases.append(("truncated", good.form("acme/new") | {
            "weights": ("adapter_model.safetensors", good.weights[:cut])}))
    for how in LIES:
        cases.append((f"lying: {how}", good.form("acme/new") | {
            "weights": ("adapter_model.safetensors", _lie(good.weights, how))}))
    config = json.loads(good.config)
    for field, value in [("r", 16), ("target_modules", ["nope"]), ("lora_alpha", "x"),
                         ("r", -1), ("use_dora", True)]:
        cases.append((f"lying config: {field}", good.form("acme/new") | {
            "config": ("adapter_config.json", json.dumps(dict(config, **{field: value})).encode())}))
    flips = scale(20, 400)
    for _ in range(flips):
        data = bytearray(good.weights)
        # Half the flips land in the header, where they break structure; half anywhere.
        at = rng.randrange(8 + 1024) if rng.random() < 0.5 else rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        cases.append(("bit flip", good.form("acme/flip") | {
            "weights": ("adapter_model.safetensors", bytes(data))}))
    accepted_flips = 0
    for kind, form in cases:
        r = upload(server, form)
        statuses[r.status_code] += 1
        assert r.status_code < 500, (kind, r.status_code, r.text[:300])
        if r.status_code == 201:
            assert kind == "bit flip", (kind, r.text[:300])  # a flip in the data is valid
            accepted_flips += 1
            assert r.json()["sha256"] == registry(server)["acme/flip"]
            assert httpx.delete(f"{server.url}/v1/adapters/acme/flip", headers=auth(ADMIN)
                                ).status_code == 200
        else:
            error = r.json()["error"]
            assert 400 <= r.status_code < 500 and error["message"], (kind, r.text[:300])
        assert registry(server) == before, kind
    assert served(server)
    assert_clean(store, before)
    figures.record("F1-F2", "bad uploads sent (truncated, lying header or config, bit flips)",
                   len(cases))
    figures.record("F1-F2", "status codes", dict(sorted(statuses.items())))
    figures.record("F1-F2", "bit flips accepted as valid files (stored whole, then deleted)",
                   accepted_flips, note=f"of {flips}")
    figures.record("F1-F2", "orphan files after all of them", 0)
    figures.record("F1-F2", "registry changed by a refused upload", 0)


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs for the store (root can mount one: CI runs as root here)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_f3_disk_full_during_an_upload(make_server, adapter_variants, small_disk, figures):
    store = small_disk / "store"
    server = make_server(store=store)
    server.start()
    small, large = adapter_variants[0], adapter_variants[-1]
    assert len(large.weights) < (5 << 20) < len(small.weights) + len(large.weights)
    assert upload(server, small.form("acme/base")).status_code == 201
    before = registry(server)
    refusals = 0
    for i in range(scale(3, 20)):
        r = upload(server, large.form(f"acme/large{i}"))
        assert r.status_code == 507, r.text[:300]
        assert r.json()["error"]["code"] == "insufficient_storage"
        refusals += 1
        assert registry(server) == before
        assert_clean(store, before)
        assert served(server)
    # Space freed, the same upload goes through.
    assert httpx.delete(f"{server.url}/v1/adapters/acme/base", headers=auth(ADMIN)
                        ).status_code == 200
    r = upload(server, large.form("acme/large"))
    assert r.status_code == 201, r.text[:300]
    assert served(server, "acme/large")
    assert_clean(store, registry(server))
    figures.record("F3", "uploads refused for a full disk (507, nothing stored)", refusals)
    figures.record("F3", "orphan files after them", 0)
