"""F7: same-name upload / replace / delete / read races on the store, from many threads and
many processes at once: no error, one winner per name, and a store that reopens cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from loraplex.adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore

from .conftest import scale

# One worker process: `threads` threads, each doing random put/delete/get/list of two names
# for `seconds`; prints {"ops": N, "errors": [...]} at the end.
WORKER = """
import json, random, sys, threading, time, traceback, pathlib
from loraplex.adapters.store import AdapterStore, _parse_record, _record_name
root, sources, seconds, threads, seed = sys.argv[1:6]
sources = sorted(pathlib.Path(sources).iterdir())
store = AdapterStore(root)
ops, errors, lock = [0], [], threading.Lock()
def run(k):
    rng = random.Random(int(seed) * 100 + k)
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        name = rng.choice(["x", "acme/y"])
        try:
            op = rng.random()
            if op < 0.45:
                src = rng.choice(sources)
                store.put(name, src.name.encode(), src)
            elif op < 0.7:
                store.delete(name)
            elif op < 0.9:
                stored = store.get(name)
                if stored is not None:
                    try:
                        stored.path.joinpath("adapter_model.safetensors").stat()
                    except FileNotFoundError:
                        # Read outside the lock: a later delete or replace may have collected
                        # it (the server keeps what its requests use), and a put of the same
                        # bytes may have written it again since. Stranded is a record that,
                        # under the lock, names an object that is not there.
                        with store._locked(exclusive=False):
                            record = store.names / _record_name(name)
                            if record.exists():
                                sha = _parse_record(record)[1]
                                assert (store.objects / sha).is_dir(), "stranded name"
            else:
                store.list()
        except Exception:
            with lock:
                errors.append(traceback.format_exc(limit=3))
        with lock:
            ops[0] += 1
ts = [threading.Thread(target=run, args=(k,)) for k in range(int(threads))]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"ops": ops[0], "errors": errors[:5], "num_errors": len(errors)}))
"""


def sha_of(obj: Path) -> str:
    digest = hashlib.sha256((obj / CONFIG_FILE).read_bytes())
    digest.update((obj / WEIGHTS_FILE).read_bytes())
    return digest.hexdigest()


def check_consistent(root: Path) -> AdapterStore:
    store = AdapterStore(root)  # must open: recovery runs here
    assert not list(store.quarantine_dir.iterdir()), "a record was damaged"
    assert not list(store.staging_root.iterdir())
    named = set()
    # list() leaves out a record whose object is missing: count the records themselves.
    records = [p for p in store.names.iterdir() if not p.name.startswith(".")]
    assert len(records) == len(store.list()), "a record names no object"
    for stored in store.list():
        assert sha_of(stored.path) == stored.sha256, stored.name
        named.add(stored.sha256)
    assert {p.name for p in store.objects.iterdir()} == named, "orphan objects"
    return store


def test_f7_store_races_between_threads_and_processes(tmp_path, figures):
    sources = tmp_path / "sources"
    sources.mkdir()
    rng = random.Random(7)
    for i in range(3):  # two sizes of the same name; the first two share their bytes
        data = rng.randbytes(256 << 10) if i < 2 else rng.randbytes(1 << 20)
        (sources / f"w{i}").write_bytes(data)
    root = tmp_path / "store"
    AdapterStore(root)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    processes, threads, seconds = 4, 4, scale(5, 60)
    rounds = scale(2, 10)
    total_ops = total_errors = 0
    samples = []
    for r in range(rounds):
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(sources),
                                   str(seconds), str(threads), str(r * 10 + p)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for p in range(processes)]
        for p in procs:
            out, err = p.communicate(timeout=seconds + 120)
            assert p.returncode == 0, err
            result = json.loads(out)
            total_ops += result["ops"]
            total_errors += result["num_errors"]
            samples += result["errors"]
        check_consistent(root)
    figures.record("F7", "store operations (4 processes x 4 threads, two names)", total_ops)
    figures.record("F7", "store errors", total_errors)
    figures.record("F7", "store reopened cleanly", f"{rounds}/{rounds}")
    assert total_errors == 0, samples


def test_f7_one_winner_among_concurrent_writers(tmp_path, figures):
    """Writers of one name that all finish: the record names exactly one writer's bytes,
    and every other version is collected."""
    root = tmp_path / "store"
    store = AdapterStore(root)
    weights = []
    for i in range(16):
        w = tmp_path / f"w{i}"
        w.write_bytes(bytes([i]) * (64 << 10))
        weights.append(w)
    rounds = scale(5, 50)
    for _ in range(rounds):
        barrier = threading.Barrier(len(weights))

        def write(w: Path) -> None:
            barrier.wait()
            store.put("x", b"{}", w)

        workers = [threading.Thread(target=write, args=(w,)) for w in weights]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        reopened = check_consistent(root)
        [winner] = reopened.list()
        content = (winner.path / WEIGHTS_FILE).read_bytes()
        assert content in {w.read_bytes() for w in weights}
        assert len(list(reopened.objects.iterdir())) == 1
    figures.record("F7", "rounds of 16 same-name writers with exactly one winner",
                   f"{rounds}/{rounds}")


def test_f7_delete_never_strands_a_name_written_with_the_same_bytes(tmp_path):
    """The old race: a delete collected an object while a concurrent upload of the same bytes
    skipped writing it, leaving a name that pointed at nothing."""
    root = tmp_path / "store"
    store = AdapterStore(root)
    w = tmp_path / "w"
    w.write_bytes(b"same bytes" * 1000)
    deadline = time.monotonic() + scale(3, 30)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            store.put("a", b"{}", w)
            store.delete("a")

    t = threading.Thread(target=churn)
    t.start()
    try:
        while time.monotonic() < deadline:
            stored = store.put("b", b"{}", w)
            assert (stored.path / WEIGHTS_FILE).is_file()
            assert store.get("b") is not None and store.get("b").path.is_dir()
    finally:
        stop.set()
        t.join()
    check_consistent(root)
