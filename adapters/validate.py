"""Checks on what an operator uploads, before any of it is parsed or stored: the name, and
the safetensors file's structure (a pickle is refused unopened; the header can lie)."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .peft_format import AdapterError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(/[a-z0-9][a-z0-9._-]{0,63})?$")
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_weights_bytes: int = 1 << 30
    max_config_bytes: int = 64 << 10


# Per-request mixtures' names (server/routes/compose.py): kept for them alone.
MIX_NAME = re.compile(r"^(?:[a-z0-9][a-z0-9._-]{0,63}/)?mix-[0-9a-f]{16}$")


def check_name(name: str, reserved: str, mixture: bool = False) -> None:
    """`mixture`: the name of a per-request mixture, the only adapters whose names may (and
    must) have MIX_NAME's shape."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise AdapterError(
            f"name: {name!r} is not a valid adapter name (lowercase letters, digits, '.', '_', "
            f"'-', at most 64 characters, optionally under one 'tenant/' prefix)")
    if name == reserved:
        raise AdapterError(f"name: {name!r} is the base model's name")
    if mixture != bool(MIX_NAME.match(name)):
        raise AdapterError(f"name: {name!r}: the shape [tenant/]mix-<16 hex digits> is kept "
                           f"for per-request mixtures")


def check_config_bytes(config: bytes, limits: Limits) -> None:
    if len(config) > limits.max_config_bytes:
        raise AdapterError(f"config: larger than {limits.max_config_bytes} bytes")
    try:
        parsed = json.loads(config)
    except (ValueError, RecursionError) as e:  # bad JSON or encoding, the digit limit, depth
        raise AdapterError(f"config: adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise AdapterError("config: adapter_config.json must be a JSON object")


MAX_DIMS = 8
_SIZE_LIMIT = 2**63  # safetensors reads sizes and offsets as 64-bit integers


def _size(value) -> bool:
    """A dimension or byte offset as safetensors takes it: a non-negative JSON integer."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _SIZE_LIMIT


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_safetensors(path: Path, limits: Limits) -> None:
    """Structure only: header size, JSON, dtypes, and offsets that tile the data exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise AdapterError("weights: this is a pickled (torch.save) checkpoint; only "
                               "safetensors files are accepted, and pickles are never opened")
        if len(head) < 8:
            raise AdapterError("weights: not a safetensors file (shorter than its header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > limits.max_header_bytes:
            raise AdapterError(f"weights: safetensors header of {header_len} bytes exceeds "
                               f"{limits.max_header_bytes}")
        if 8 + header_len > size:
            raise AdapterError("weights: truncated safetensors file (header runs past the end)")
        try:
            header = json.loads(f.read(header_len), parse_constant=_not_a_number)
        except (ValueError, RecursionError):
            raise AdapterError("weights: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise AdapterError("weights: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise AdapterError("weights: safetensors __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise AdapterError(f"weights: {len(header)} tensors exceed the limit {limits.max_tensors}")
    data_size = size - 8 - header_len
    if data_size > limits.max_weights_bytes:
        raise AdapterError(f"weights: {data_size} bytes exceed the limit "
                           f"{limits.max_weights_bytes}")
    spans = []
    for key, info in header.items():
        dtype, shape, offsets = ((info.get("dtype"), info.get("shape"), info.get("data_offsets"))
                                 if isinstance(info, dict) else (None, None, None))
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(map(_size, shape))
                and isinstance(offsets, list) and len(offsets) == 2
                and all(map(_size, offsets))):
            raise AdapterError(f"weights: tensor {key!r} has a malformed header entry")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise AdapterError(f"weights: tensor {key!r} has dtype {dtype!r}; only F16, BF16 "
                               f"and F32 are accepted")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterError(f"weights: tensor {key!r}: its offsets do not match its shape "
                               f"{shape} and dtype {dtype}")
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise AdapterError("weights: tensor data overlaps or leaves gaps (a lying header)")
        position = end
    if position != data_size:
        raise AdapterError(f"weights: header describes {position} bytes of data but the file "
                           f"holds {data_size} (truncated or padded)")
