"""The adapter store: content addressing, replacement, and crash safety under SIGKILL."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

from loraplex.adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore

WRITER = """
import sys, pathlib
from loraplex.adapters.store import AdapterStore
store = AdapterStore(sys.argv[1])
sources = sorted(pathlib.Path(sys.argv[2]).iterdir())
i = int(sys.argv[3])
while True:
    src = sources[i % len(sources)]
    store.put(f"a{i % 7}", src.name.encode(), src)
    print(i, flush=True)
    i += 1
"""


def sha_of(obj) -> str:
    digest = hashlib.sha256((obj / CONFIG_FILE).read_bytes())
    digest.update((obj / WEIGHTS_FILE).read_bytes())
    return digest.hexdigest()


def test_put_get_replace_delete(tmp_path):
    store = AdapterStore(tmp_path / "store")
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    w1.write_bytes(b"one" * 1000)
    w2.write_bytes(b"two" * 1000)
    first = store.put("acme/x", b"{}", w1)
    assert store.get("acme/x") == first and sha_of(first.path) == first.sha256
    assert store.put("other", b"{}", w1).path == first.path  # same content, one object
    second = store.put("acme/x", b"{}", w2)  # a new version under the same name
    assert store.get("acme/x").sha256 == second.sha256 != first.sha256
    assert first.path.exists()  # still named by "other"
    assert store.delete("other") and not first.path.exists()
    assert [s.name for s in store.list()] == ["acme/x"]
    assert store.delete("acme/x") and not store.delete("acme/x") and store.list() == []


def test_sigkill_at_any_point_leaves_whole_adapters_or_nothing(tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    rng = random.Random(0)
    for i in range(5):  # 64 KiB to 3 MiB, so kills land inside copies and fsyncs too
        (sources / f"w{i}").write_bytes(rng.randbytes(rng.randint(1 << 16, 3 << 20)))
    root = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    written, kills = 0, 0
    for cycle in range(30):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(sources),
                                 str(cycle * 100)], stdout=subprocess.PIPE, env=env)
        proc.stdout.readline()  # the store is open and one put has landed
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        written += len(proc.stdout.read().splitlines()) + 1
        store = AdapterStore(root)  # recovery runs on open
        assert not list(root.glob("tmp-*")) and not list(store.names.glob("*.tmp"))
        for stored in store.list():
            assert sha_of(stored.path) == stored.sha256, (cycle, stored.name)
            assert {p.name for p in stored.path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
        named = {s.sha256 for s in store.list()}
        assert {p.name for p in store.objects.iterdir()} == named  # no orphans
    assert kills == 30 and written > 30
