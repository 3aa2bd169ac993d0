"""On-disk adapter store: content-addressed, written so a crash leaves all or nothing.

    root/objects/<sha256>/adapter_config.json, adapter_model.safetensors
    root/names/<name, '/' as '%2F'>.json  ->  {"name", "sha256", "created"}

An object is written into a temporary directory, every file and the directory fsynced, then
renamed into place; a name record is written the same way and renamed over the old one, so
replacing an adapter is atomic and the old object stays until nothing names it. `recover()`
(run on open) deletes temporaries a crash left behind and objects no name refers to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    sha256: str
    path: Path  # the object directory, a PEFT adapter directory
    size: int  # bytes of config + weights
    created: float


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.names = self.root / "names"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.names.mkdir(parents=True, exist_ok=True)
        self.recover()

    @staticmethod
    def _record_file(names: Path, name: str) -> Path:
        return names / (name.replace("/", "%2F") + ".json")

    def recover(self) -> None:
        for leftover in self.root.glob("tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.names.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        named = {r.sha256 for r in self.list()}
        for obj in self.objects.iterdir():
            if obj.name not in named:
                shutil.rmtree(obj, ignore_errors=True)

    def put(self, name: str, config: bytes, weights: Path) -> StoredAdapter:
        """Store `config` and the weights file under `name`, replacing any earlier version."""
        digest = hashlib.sha256(config)
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        sha = digest.hexdigest()
        obj = self.objects / sha
        if not obj.exists():
            tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.root))
            (tmp / CONFIG_FILE).write_bytes(config)
            shutil.copyfile(weights, tmp / WEIGHTS_FILE)
            for f in (tmp / CONFIG_FILE, tmp / WEIGHTS_FILE, tmp):
                _fsync(f)
            try:
                os.rename(tmp, obj)
            except OSError:  # the same content landed meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
            _fsync(self.objects)
        created = time.time()
        self._write_record(name, sha, created)
        return self._stored(name, sha, created)

    def _write_record(self, name: str, sha: str, created: float) -> None:
        record = self._record_file(self.names, name)
        tmp_record = record.with_suffix(".tmp")
        tmp_record.write_text(json.dumps({"name": name, "sha256": sha, "created": created}))
        _fsync(tmp_record)
        os.replace(tmp_record, record)
        _fsync(self.names)

    def _stored(self, name: str, sha: str, created: float) -> StoredAdapter:
        obj = self.objects / sha
        size = sum(f.stat().st_size for f in obj.iterdir())
        return StoredAdapter(name, sha, obj, size, created)

    def get(self, name: str) -> StoredAdapter | None:
        try:
            record = json.loads(self._record_file(self.names, name).read_text())
        except FileNotFoundError:
            return None
        return self._stored(record["name"], record["sha256"], record["created"])

    def list(self) -> list[StoredAdapter]:
        stored = []
        for f in sorted(self.names.glob("*.json")):
            record = json.loads(f.read_text())
            if (self.objects / record["sha256"]).is_dir():
                stored.append(self._stored(record["name"], record["sha256"], record["created"]))
        return stored

    def delete(self, name: str) -> bool:
        """Forget `name`; its object goes too once no other name refers to it."""
        stored = self.get(name)
        if stored is None:
            return False
        self._record_file(self.names, name).unlink()
        _fsync(self.names)
        if all(r.sha256 != stored.sha256 for r in self.list()):
            shutil.rmtree(stored.path, ignore_errors=True)
        return True
