"""B3: an atheris (libFuzzer) fuzzer of the adapter parser.

Each input becomes an adapter directory, `adapter_model.safetensors` plus
`adapter_config.json`, which goes through what the server runs on an upload:
`check_safetensors`, then `load_adapter` against a tiny model's module shapes. Either may
refuse the adapter with `AdapterError`; any other exception is a crash.

    .venv/bin/python tests/reliability/fuzz_adapter.py -runs=100000 [CORPUS_DIR ...]
    .venv/bin/python tests/reliability/fuzz_adapter.py crash-<sha1>   # replay one input

Without a corpus directory it uses (and grows) `$TMPDIR/loraplex-fuzz-adapter`, seeded with a
valid adapter; a crashing input is written to `./crash-<sha1>` (or `-artifact_prefix=`). The input's last byte picks how the rest is read: the raw weights file (the
seeds make mutation start from a valid one), or a valid adapter altered field by field
(dtype, shape, offsets, header length, data, config) from the remaining bytes.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["loraplex.adapters"]):
    from loraplex.adapters.peft_format import AdapterError, load_adapter
    from loraplex.adapters.store import CONFIG_FILE, WEIGHTS_FILE
    from loraplex.adapters.validate import Limits, check_safetensors

RANK = 2
# A tiny model's LoRA-capable modules: name -> (in_features, out_features).
MODULE_SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8),
                 "model.layers.0.self_attn.v_proj": (8, 4),
                 "model.layers.1.mlp.down_proj": (16, 8)}
CONFIG = {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, "bias": "none",
          "target_modules": ["q_proj", "v_proj", "down_proj"]}
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}
LIMITS = Limits(max_header_bytes=64 << 10, max_tensors=64, max_weights_bytes=1 << 20)


def valid_tensors() -> dict[str, tuple[str, list[int]]]:
    """The tiny adapter's tensors: key -> (dtype, shape)."""
    out = {}
    for module, (fan_in, fan_out) in MODULE_SHAPES.items():
        out[f"base_model.model.{module}.lora_A.weight"] = ("F32", [RANK, fan_in])
        out[f"base_model.model.{module}.lora_B.weight"] = ("F32", [fan_out, RANK])
    return out


def valid_header() -> tuple[dict, int]:
    """A safetensors header for `valid_tensors()`, and its data size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (dtype, shape) in valid_tensors().items():
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def encode(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, JSON header, data. The length
    may lie (`header_len`); a bytes header is written as given."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    return struct.pack("<Q", length % 2**64) + raw + data


def valid_file() -> bytes:
    header, size = valid_header()
    return encode(header, struct.pack(f"<{size // 4}f", *[0.01] * (size // 4)))


def parse(weights: bytes, config: bytes) -> str:
    """What an upload does with these files: 'accepted' or 'refused'. Raises anything that is
    not an AdapterError (a crash)."""
    # A directory per input: libFuzzer ends the process without unwinding, so nothing
    # outlives an input.
    with tempfile.TemporaryDirectory(prefix="fuzz-adapter-") as workdir:
        (Path(workdir) / WEIGHTS_FILE).write_bytes(weights)
        (Path(workdir) / CONFIG_FILE).write_bytes(config)
        try:
            check_safetensors(Path(workdir) / WEIGHTS_FILE, LIMITS)
            load_adapter(workdir, "fuzz", MODULE_SHAPES, max_rank=8)
        except AdapterError:
            return "refused"
    return "accepted"


# ---- structured mode: a valid adapter with fields replaced --------------------------------

def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    """A JSON value a lying header might carry."""
    kind = fdp.ConsumeIntInRange(0, 11 if depth < 2 else 8)
    if kind == 0:
        return fdp.ConsumeInt(8)
    if kind == 1:
        return (-1) ** fdp.ConsumeIntInRange(0, 1) * 2 ** fdp.ConsumeIntInRange(0, 200)
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return fdp.PickValueInList([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5])
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 16))
    if kind == 5:
        return fdp.PickValueInList([True, False, None])
    if kind in (6, 7, 8):
        return fdp.PickValueInList([*DTYPE_BYTES, "F64", "I8", "BOOL", "F8_E4M3", "f32", ""])
    if kind in (9, 10):
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {fdp.ConsumeUnicodeNoSurrogates(4): _value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 3))}


def _mutated_header(fdp: atheris.FuzzedDataProvider) -> tuple[dict, int]:
    header, size = valid_header()
    keys = list(header)
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        key = fdp.PickValueInList(keys)
        where = fdp.ConsumeIntInRange(0, 6)
        if where == 0:  # the whole entry
            header[key] = _value(fdp)
        elif where == 1:  # a new tensor or metadata key
            header[fdp.ConsumeUnicodeNoSurrogates(48)] = _value(fdp)
        elif isinstance(header[key], dict):
            entry = header[key]
            field = fdp.PickValueInList(["dtype", "shape", "data_offsets", "extra"])
            if field in ("shape", "data_offsets") and isinstance(entry.get(field), list) \
                    and entry[field] and fdp.ConsumeBool():
                entry[field][fdp.ConsumeIntInRange(0, len(entry[field]) - 1)] = _value(fdp)
            elif field in entry and fdp.ConsumeIntInRange(0, 5) == 0:
                del entry[field]
            else:
                entry[field] = _value(fdp)
    return header, size


def _weights(fdp: atheris.FuzzedDataProvider) -> bytes:
    header, size = _mutated_header(fdp)
    try:
        raw = json.dumps(header).encode()  # NaN and Infinity as JS spells them: invalid JSON
    except (ValueError, OverflowError):
        raw = b"{}"
    header_len = None
    if fdp.ConsumeIntInRange(0, 7) == 0:
        header_len = fdp.PickValueInList([len(raw) + 1, len(raw) - 1, 0, 2**63, 2**64 - 1,
                                          fdp.ConsumeIntInRange(0, 2 * len(raw))])
    data_size = size
    if fdp.ConsumeIntInRange(0, 5) == 0:
        data_size = max(0, size + fdp.ConsumeIntInRange(-8, 8))
    data = fdp.ConsumeBytes(data_size)
    data += bytes(data_size - len(data))
    if fdp.ConsumeIntInRange(0, 7) == 0:  # NaN and Inf in the weights
        data = struct.pack("<f", fdp.PickValueInList([math.nan, math.inf])) * (data_size // 4)
    return encode(raw, data, header_len)


def _config(fdp: atheris.FuzzedDataProvider) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return json.dumps(CONFIG).encode()
    if kind == 1:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
    config = dict(CONFIG)
    fields = [*CONFIG, "rank_pattern", "alpha_pattern", "layers_to_transform",
              "layers_pattern", "use_rslora", "use_dora", "modules_to_save", "fan_in_fan_out",
              "base_model_name_or_path"]
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        config[fdp.PickValueInList(fields)] = _value(fdp)
    try:
        return json.dumps(config).encode()
    except (ValueError, OverflowError):
        return b"{}"


def fuzz_one_input(data: bytes) -> None:
    """The libFuzzer entry point."""
    fdp = atheris.FuzzedDataProvider(data)
    raw = fdp.ConsumeIntInRange(0, 1) == 0
    config = _config(fdp)
    parse(fdp.ConsumeBytes(fdp.remaining_bytes()) if raw else _weights(fdp), config)


def seed_corpus(directory: Path) -> None:
    """Seeds: the valid adapter, raw and structured. The provider takes integers from the end
    of the input: the last byte picks the mode, the one before it the config."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "seed-valid").write_bytes(valid_file() + b"\x00\x00")
    (directory / "seed-structured").write_bytes(bytes(64) + b"\x00\x01")


def main(argv: list[str]) -> None:
    args = list(argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = Path(tempfile.gettempdir()) / "loraplex-fuzz-adapter"
        args.append(str(corpus))
    for a in args[1:]:
        if not a.startswith("-") and not Path(a).is_file():  # a file: reproduce that input
            seed_corpus(Path(a))
    atheris.Setup(args, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
