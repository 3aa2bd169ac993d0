"""On-disk adapter store: content-addressed, written so a crash leaves all or nothing, safe
for many writers (threads or processes) at once.

    root/objects/<sha256>/adapter_config.json, adapter_model.safetensors
    root/names/<name, '/' as '%2F'>.json  ->  {"name", "sha256", "created"}
    root/staging/<random>/                    an upload being written (locked by its writer)
    root/quarantine/                          damaged name records found on open
    root/lock                                 the store lock (flock)

The write protocol:
1. An upload is written into its own staging directory, outside any lock (copies are long).
   The writer holds an flock on that directory for its whole life, so recovery can tell a
   live writer's directory from one a crash left behind (the kernel drops a dead process's
   locks).
2. Files and the directory are fsynced, then, under the store lock, the directory is renamed
   to `objects/<sha256>` unless that object exists already, and the name record is written to
   a temporary file of the writer's own, fsynced, and renamed over the old record. Object
   and record change in one critical section, so a delete can never collect an object that an
   upload of the same bytes counted on, and two writers of one name never share a file.
3. Objects no name refers to are collected under the same lock, except those the caller says
   are still in use (the engine still serving an old version to running requests).

`recover()` (run on open) deletes what dead writers left, moves a damaged name record aside
to `quarantine/` (logged) so that the rest of the store still opens, and collects orphans.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger("loraplex.adapters.store")


# Object directories still in use though no name may refer to them any more; a callable is
# asked under the store lock, so that nothing that starts using an object meanwhile is missed.
Keep = Iterable[Path | str] | Callable[[], Iterable[Path | str]]


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    sha256: str
    path: Path  # the object directory, a PEFT adapter directory
    size: int  # bytes of config + weights
    created: float


class StoreFullError(OSError):
    """The store's filesystem ran out of space (or quota) while writing an upload."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record_name(name: str) -> str:
    return name.replace("/", "%2F") + ".json"


def _parse_record(file: Path) -> tuple[str, str, float]:
    """(name, sha256, created) of a name record; ValueError if it is damaged."""
    record = json.loads(file.read_bytes())  # JSONDecodeError is a ValueError
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    name, sha, created = record.get("name"), record.get("sha256"), record.get("created")
    if not isinstance(name, str) or _record_name(name) != file.name:
        raise ValueError(f"its name {name!r} does not match the file")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ValueError(f"bad sha256 {sha!r}")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise ValueError(f"bad created time {created!r}")
    return name, sha, float(created)


class AdapterStore:
    def __init__(self, root: str | Path, shared: bool = False):
        self.root = Path(root)
        # Shared by several servers (Ray replicas): none can tell which objects the others
        # still read, so unreferenced objects stay (a server run alone on the store collects
        # them).
        self.shared = shared
        self.objects = self.root / "objects"
        self.names = self.root / "names"
        self.staging_root = self.root / "staging"
        self.quarantine_dir = self.root / "quarantine"
        for d in (self.objects, self.names, self.staging_root, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_file = self.root / "lock"
        self._lock_file.touch(exist_ok=True)
        self.recover()

    # ---- locking --------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, exclusive: bool = True) -> Iterator[None]:
        # A fresh open file description per holder: flock then excludes other threads of
        # this process as well as other processes.
        fd = os.open(self._lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory in the store's filesystem to write an upload into; removed on
        exit unless `put_staged` moved it into place."""
        while True:
            path = Path(tempfile.mkdtemp(dir=self.staging_root))
            # Another process's recovery may take the directory before it is locked: before
            # it is even opened here (the open fails), or while this lock waits (then the
            # directory has no link left). Either way, make another.
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)

    # ---- writing --------------------------------------------------------------------

    def put(self, name: str, config: bytes, weights: Path, keep: Keep = ()) -> StoredAdapter:
        """Store `config` and a copy of the weights file under `name`, replacing any earlier
        version (see `put_staged`)."""
        with self.staging() as staged:
            with _full_is_store_full():
                (staged / CONFIG_FILE).write_bytes(config)
                shutil.copyfile(weights, staged / WEIGHTS_FILE)
            return self.put_staged(name, staged, keep)

    def put_staged(self, name: str, staged: Path, keep: Keep = ()) -> StoredAdapter:
        """Make the adapter files in `staged` (a `staging()` directory holding CONFIG_FILE and
        WEIGHTS_FILE) the content of `name`. Objects nobody names any more are collected,
        except those `keep` names. Raises StoreFullError when the disk fills; then nothing
        changed."""
        sha = self._digest(staged)
        with _full_is_store_full():
            for f in (staged / CONFIG_FILE, staged / WEIGHTS_FILE, staged):
                _fsync(f)
            with self._locked():
                obj = self.objects / sha
                created = time.time()
                moved = not obj.is_dir()
                try:
                    if moved:
                        # The staging directory becomes the object; an empty one replaces it
                        # so that the writer's `staging()` exit still has one to remove.
                        os.rename(staged, obj)
                        staged.mkdir()
                        _fsync(self.objects)
                    self._write_record(name, sha, created)
                except BaseException:
                    if moved:  # named by nobody: it must not outlive this failure
                        shutil.rmtree(obj, ignore_errors=True)
                    raise
                self._collect(keep)
                return self._stored(name, sha, created)

    def _write_record(self, name: str, sha: str, created: float) -> None:
        record = self.names / _record_name(name)
        fd, tmp = tempfile.mkstemp(dir=self.names, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps({"name": name, "sha256": sha, "created": created}).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, record)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(self.names)

    def delete(self, name: str, keep: Keep = ()) -> bool:
        """Forget `name`; its object goes too once no name refers to it and it is not in
        `keep`."""
        with self._locked():
            record = self.names / _record_name(name)
            try:
                record.unlink()
            except FileNotFoundError:
                return False
            _fsync(self.names)
            self._collect(keep)
            return True

    def collect(self, keep: Keep = ()) -> int:
        """Remove objects no name refers to, except those in `keep`; returns how many."""
        with self._locked():
            return self._collect(keep)

    def _collect(self, keep: Keep) -> int:
        if self.shared:
            return 0
        try:
            kept = {Path(p).name for p in (keep() if callable(keep) else keep)}
        except Exception:  # noqa: BLE001 - not knowing what is in use, remove nothing
            log.exception("adapter store: cannot tell which objects are in use; none removed")
            return 0
        named = {sha for _, sha, _ in self._records()}
        removed = 0
        for obj in self.objects.iterdir():
            if obj.name not in named and obj.name not in kept:
                shutil.rmtree(obj, ignore_errors=True)
                removed += 1
        return removed

    # ---- recovery -------------------------------------------------------------------

    def recover(self) -> None:
        """Remove what crashed writers left, quarantine damaged records, collect orphans."""
        with self._locked():
            for leftover in self.staging_root.iterdir():
                self._remove_if_abandoned(leftover)
            for leftover in self.names.glob("*.tmp"):  # writers hold the lock: all dead
                leftover.unlink(missing_ok=True)
            for leftover in self.root.glob("tmp-*"):  # staging of stores before staging/
                shutil.rmtree(leftover, ignore_errors=True)
            for record in self.names.glob("*.json"):
                try:
                    _, sha, _ = _parse_record(record)
                    obj = self.objects / sha
                    if not ((obj / CONFIG_FILE).is_file() and (obj / WEIGHTS_FILE).is_file()):
                        raise ValueError(f"its object {sha[:12]} is missing")
                except (OSError, ValueError) as e:
                    self._quarantine(record, str(e))
            self._collect(())

    @staticmethod
    def _remove_if_abandoned(path: Path) -> None:
        if not path.is_dir():
            path.unlink(missing_ok=True)
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            # Gone since it was listed: its writer finished (staging ends outside the
            # store lock) or another process's recovery removed it.
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live writer's
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)

    def quarantine(self, name: str, reason: str) -> None:
        """Move `name`'s record aside (its adapter could not be served); logged."""
        with self._locked():
            record = self.names / _record_name(name)
            if record.exists():
                self._quarantine(record, reason)
                self._collect(())

    def _quarantine(self, record: Path, reason: str) -> None:
        target = self.quarantine_dir / f"{record.name}.{time.time_ns()}"
        os.replace(record, target)
        _fsync(self.names)
        log.error("adapter store: quarantined the damaged name record %s (%s) as %s",
                  record.name, reason, target)

    # ---- reading --------------------------------------------------------------------

    def _records(self) -> Iterator[tuple[str, str, float]]:
        for file in sorted(self.names.glob("*.json")):
            try:
                yield _parse_record(file)
            except (OSError, ValueError):
                continue  # quarantined at the next open; never served meanwhile

    def _stored(self, name: str, sha: str, created: float) -> StoredAdapter:
        obj = self.objects / sha
        size = sum(f.stat().st_size for f in obj.iterdir())
        return StoredAdapter(name, sha, obj, size, created)

    def get(self, name: str) -> StoredAdapter | None:
        with self._locked(exclusive=False):
            try:
                name, sha, created = _parse_record(self.names / _record_name(name))
                return self._stored(name, sha, created)
            except (OSError, ValueError):
                return None

    def list(self) -> list[StoredAdapter]:
        with self._locked(exclusive=False):
            return [self._stored(*r) for r in self._records() if (self.objects / r[1]).is_dir()]

    @staticmethod
    def _digest(staged: Path) -> str:
        digest = hashlib.sha256((staged / CONFIG_FILE).read_bytes())
        with open(staged / WEIGHTS_FILE, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


@contextlib.contextmanager
def _full_is_store_full() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(e.errno, "the adapter store is out of disk space") from e
        raise
