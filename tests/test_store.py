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


def test_a_damaged_record_is_quarantined_and_the_rest_still_opens(tmp_path, caplog):
    store = AdapterStore(tmp_path / "store")
    w = tmp_path / "w"
    w.write_bytes(b"weights" * 100)
    good = store.put("good", b"{}", w)
    store.put("torn", b"{}", w)
    torn = store.names / "torn.json"
    torn.write_bytes(torn.read_bytes() + b'"}extra')  # half-overwritten: JSONDecodeError
    (store.names / "nowhere.json").write_text(
        '{"name": "nowhere", "sha256": "' + "0" * 64 + '", "created": 1}')
    reopened = AdapterStore(tmp_path / "store")
    assert [s.name for s in reopened.list()] == ["good"] and reopened.get("good") == good
    assert sorted(p.name.split(".json")[0] for p in reopened.quarantine_dir.iterdir()) == [
        "nowhere", "torn"]
    assert "quarantined" in caplog.text


def test_recovery_keeps_a_live_writers_staging_and_removes_a_dead_ones(tmp_path):
    store = AdapterStore(tmp_path / "store")
    dead = store.staging_root / "dead"
    dead.mkdir()  # no writer holds its lock: a crash left it
    (dead / WEIGHTS_FILE).write_bytes(b"x")
    with store.staging() as live:
        (live / WEIGHTS_FILE).write_bytes(b"half an upload")
        AdapterStore(tmp_path / "store")  # another process opening the store meanwhile
        assert (live / WEIGHTS_FILE).exists() and not dead.exists()
    assert not live.exists()


def test_a_staging_directory_recovered_before_its_writer_opened_it_is_replaced(tmp_path,
                                                                                monkeypatch):
    """Found by the long F7 run (1 in about 100,000 operations): another process's recovery
    removed a new staging directory between mkdtemp and the writer's open, and the upload
    failed with FileNotFoundError."""
    import shutil
    import tempfile

    store = AdapterStore(tmp_path / "store")
    real, made = tempfile.mkdtemp, []

    def taken_at_once(*args, **kwargs):
        path = real(*args, **kwargs)
        made.append(path)
        if len(made) == 1:
            shutil.rmtree(path)  # what the other process's recovery does
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", taken_at_once)
    w = tmp_path / "w"
    w.write_bytes(b"weights")
    assert store.put("a", b"{}", w).name == "a" and len(made) == 2


def test_disk_full_while_naming_leaves_no_orphan_object(tmp_path, monkeypatch):
    import errno

    import loraplex.adapters.store as store_module
    import pytest

    store = AdapterStore(tmp_path / "store")
    w = tmp_path / "w"
    w.write_bytes(b"weights" * 100)
    kept = store.put("kept", b"{}", w)
    w.write_bytes(b"other weights" * 100)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.AdapterStore, "_write_record", full)
    with pytest.raises(store_module.StoreFullError):
        store.put("new", b"{}", w)
    assert [s.name for s in store.list()] == ["kept"]
    assert [p.name for p in store.objects.iterdir()] == [kept.sha256]
    assert not list(store.staging_root.iterdir())


def test_objects_in_use_survive_a_delete_until_collected(tmp_path):
    store = AdapterStore(tmp_path / "store")
    w = tmp_path / "w"
    w.write_bytes(b"weights" * 100)
    old = store.put("x", b"{}", w)
    assert store.delete("x", keep=[old.path])  # a running request still reads it
    assert old.path.is_dir() and store.get("x") is None
    assert store.collect() == 1 and not old.path.exists()


def test_recovery_skips_a_staging_directory_gone_since_it_was_listed(tmp_path, monkeypatch):
    """Found by CI's F7 race test: another process's writer finished (or its recovery removed
    the directory) between listing staging/ and opening the entry; start-up must go on."""
    from pathlib import Path

    gone = tmp_path / "staging-gone"
    monkeypatch.setattr(Path, "is_dir", lambda self: self == gone or Path.exists(self))
    AdapterStore._remove_if_abandoned(gone)  # no FileNotFoundError
    assert not gone.exists()


def test_a_shared_store_never_removes_objects_another_server_may_read(tmp_path):
    store = AdapterStore(tmp_path / "store", shared=True)
    w = tmp_path / "w"
    w.write_bytes(b"weights" * 100)
    old = store.put("x", b"{}", w)
    w.write_bytes(b"other weights" * 100)
    assert store.put("x", b"{}", w).sha256 != old.sha256 and old.path.is_dir()
    assert store.delete("x") and store.collect() == 0 and old.path.is_dir()
    AdapterStore(tmp_path / "store", shared=True)  # a replica's start-up recovery
    assert old.path.is_dir()
    AdapterStore(tmp_path / "store")  # a server alone on the store collects it
    assert not old.path.exists()
