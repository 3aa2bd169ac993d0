"""Every refusal of an adapter, table-driven: each names its field and changes nothing."""

from __future__ import annotations

import copy
import json
import shutil
import struct

import pytest
import torch
from loraplex.adapters.peft_format import AdapterError
from loraplex.adapters.validate import Limits, check_name, check_safetensors
from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig
from loraplex.server.engine.engine import LLMEngine
from loraplex.server.runner.attention import ATTN_IMPLEMENTATION
from loraplex.server.runner.loader import LoadedModel
from peft_fixtures import ADAPTER_SPECS, make_adapters, tiny_model
from safetensors.torch import load_file, save, save_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid adapter directory (rank 8 on q/k/v/o) for the tiny Llama."""
    root = tmp_path_factory.mktemp("good")
    return make_adapters(lambda: tiny_model("llama"), root, {"ok": ADAPTER_SPECS["r8_attn"]})["ok"]


@pytest.fixture(scope="module")
def engine():
    model = tiny_model("llama")
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    loaded = LoadedModel(model, None, torch.device("cpu"), torch.float32, "none", 256,
                         "tiny-llama")
    return LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=16),
                                  lora=LoRAConfig(max_loras=2, max_lora_rank=16)), loaded)


def with_config(**changes):
    def mutate(config, tensors):
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
    return mutate


def with_tensors(fn):
    def mutate(config, tensors):
        fn(tensors)
    return mutate


def _first(tensors, ab="A"):
    return next(k for k in sorted(tensors) if f"lora_{ab}" in k)


def _set_nan(tensors):
    tensors[_first(tensors)][0, 0] = float("nan")


def _set_inf(tensors):
    tensors[_first(tensors, "B")][0, 0] = float("inf")


def _to_f64(tensors):
    key = _first(tensors)
    tensors[key] = tensors[key].double()


def _drop_b(tensors):
    del tensors[_first(tensors, "B")]


def _rank_4(tensors):
    for k in list(tensors):
        tensors[k] = tensors[k][:4] if "lora_A" in k else tensors[k][:, :4].contiguous()


def _extra_tensor(tensors):
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(128, 8)


def _embedding(tensors):
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(8, 256)


def _odd_key(tensors):
    tensors["something.else"] = torch.zeros(2)


REFUSALS = {
    # name: (mutation, the text the message must contain)
    "peft_type": (with_config(peft_type="PREFIX_TUNING"), "peft_type"),
    "r zero": (with_config(r=0), "r: must be a positive integer"),
    "r not int": (with_config(r="8"), "r: must be a positive integer"),
    "r above max": (with_config(r=32), "exceeds the server's max_lora_rank 16"),
    "rank_pattern above max": (with_config(rank_pattern={"q_proj": 64}), "max_lora_rank"),
    "rank_pattern not numeric": (with_config(rank_pattern={"q_proj": "x"}), "rank_pattern"),
    "lora_alpha": (with_config(lora_alpha=-1), "lora_alpha"),
    "use_rslora": (with_config(use_rslora="yes"), "use_rslora"),
    "dora": (with_config(use_dora=True), "use_dora: DoRA"),
    "modules_to_save": (with_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (with_config(bias="all"), "bias"),
    "lora_bias": (with_config(lora_bias=True), "lora_bias"),
    "target_parameters": (with_config(target_parameters=["mlp.experts"]), "target_parameters"),
    "layer_replication": (with_config(layer_replication=[[0, 2]]), "layer_replication"),
    "no targets": (with_config(target_modules=[]), "target_modules"),
    "unknown targets": (with_config(target_modules=["zz_proj"]), "matches no"),
    "bad regex": (with_config(target_modules="(q_proj"), "invalid regex"),
    "slow regex": (with_config(target_modules=r"(.|\w)*(.|\w)*(.|\w)*_(.|\w)*\.(m)"),
                   "takes too long"),
    "other base": (with_config(base_model_name_or_path="meta-llama/Llama-3-8B"),
                   "base_model_name_or_path"),
    "config lies about rank": (with_tensors(_rank_4), "do not match rank 8"),
    "config lies about targets": (with_tensors(_extra_tensor), "does not target"),
    "missing lora_B": (with_tensors(_drop_b), "missing"),
    "embedding LoRA": (with_tensors(_embedding), "not supported"),
    "unexpected tensor": (with_tensors(_odd_key), "unexpected tensor"),
    "nan": (with_tensors(_set_nan), "NaN"),
    "inf": (with_tensors(_set_inf), "Inf"),
    "f64": (with_tensors(_to_f64), "F16/BF16/F32"),
}


def write_variant(good, tmp_path, mutate):
    config = json.loads((good / CONFIG).read_text())
    tensors = load_file(good / WEIGHTS)
    mutate(config, tensors)
    out = tmp_path / "variant"
    out.mkdir()
    (out / CONFIG).write_text(json.dumps(config))
    save_file(tensors, out / WEIGHTS)
    return out


def test_the_good_adapter_is_accepted(engine, good):
    adapter = engine.parse_adapter("ok", str(good))
    assert adapter.max_rank == 8 and len(adapter.modules) == 12


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal(engine, good, tmp_path, case):
    mutate, needle = REFUSALS[case]
    variant = write_variant(good, tmp_path, mutate)
    before = copy.copy(engine.adapters)
    with pytest.raises(AdapterError) as e:
        engine.register_adapter("x", str(variant))
    assert needle in str(e.value), str(e.value)
    assert engine.adapters == before


def test_base_mismatch_can_be_allowed(good, tmp_path):
    model = tiny_model("llama")
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    loaded = LoadedModel(model, None, torch.device("cpu"), torch.float32, "none", 256, "t")
    lenient = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=16),
                                     lora=LoRAConfig(max_loras=1, allow_base_mismatch=True)),
                        loaded)
    variant = write_variant(good, tmp_path, with_config(base_model_name_or_path="other/model"))
    assert lenient.register_adapter("x", str(variant)).name == "x"


def test_files_refused(engine, good, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(good / CONFIG, pickled / CONFIG)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(AdapterError, match="pickled checkpoints are never opened"):
        engine.register_adapter("x", str(pickled))
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(good / WEIGHTS, broken / WEIGHTS)
    (broken / CONFIG).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        engine.register_adapter("x", str(broken))
    (broken / CONFIG).unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        engine.register_adapter("x", str(broken))


def _safetensors_bytes(good):
    return (good / WEIGHTS).read_bytes()


def _header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n])


def _rewrite_header(data: bytes, header: dict) -> bytes:
    raw = json.dumps(header).encode()
    n, _ = _header(data)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


STRUCTURE = {
    "pickle": (lambda d: b"\x80\x04\x95" + d[3:], Limits(), "pickled"),
    "zip pickle": (lambda d: b"PK\x03\x04" + d[4:], Limits(), "pickled"),
    "too short": (lambda d: d[:5], Limits(), "shorter than its header"),
    "header too large": (lambda d: d, Limits(max_header_bytes=64), "header of"),
    "header past the end": (lambda d: struct.pack("<Q", len(d)) + d[8:], Limits(), "truncated"),
    "header not json": (lambda d: d[:8] + b"!" + d[9:], Limits(), "not valid JSON"),
    "too many tensors": (lambda d: d, Limits(max_tensors=3), "exceed the limit 3"),
    "too many bytes": (lambda d: d, Limits(max_weights_bytes=1000), "exceed the limit 1000"),
    "truncated data": (lambda d: d[:-100], Limits(), "truncated or padded"),
    "padded data": (lambda d: d + b"\0" * 64, Limits(), "truncated or padded"),
    "lying offsets": (lambda d: _rewrite_header(d, {
        k: (dict(v, data_offsets=[v["data_offsets"][0] + 4, v["data_offsets"][1] + 4])
            if isinstance(v, dict) and v.get("data_offsets", [1])[0] == 0 else v)
        for k, v in _header(d)[1].items()}), Limits(), "overlaps or leaves gaps"),
    "shape does not match bytes": (lambda d: _rewrite_header(d, {
        k: (dict(v, shape=[v["shape"][0] + 1, v["shape"][1]]) if isinstance(v, dict)
            and "shape" in v else v) for k, v in _header(d)[1].items()}), Limits(),
        "do not match its shape"),
    "f64 dtype": (lambda d: save({"a": torch.zeros(2, dtype=torch.float64)}), Limits(),
                  "only F16, BF16 and F32"),
}


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_safetensors_structure_refusal(good, tmp_path, case):
    transform, limits, needle = STRUCTURE[case]
    path = tmp_path / WEIGHTS
    path.write_bytes(transform(_safetensors_bytes(good)))
    with pytest.raises(AdapterError) as e:
        check_safetensors(path, limits)
    assert needle in str(e.value), str(e.value)


def test_good_safetensors_pass_the_structure_check(good):
    check_safetensors(good / WEIGHTS, Limits())


@pytest.mark.parametrize("name,ok", [
    ("acme", True), ("acme/sql-v2.1", True), ("a" * 64, True), ("0start", True),
    ("", False), ("UPPER", False), ("a" * 65, False), ("../etc", False), ("a/b/c", False),
    ("/abs", False), ("x/..", False), ("space name", False), ("tiny-llama", False),
    ("mix-sql", True), ("mix-0123456789abcdef", False), ("acme/mix-0123456789abcdef", False),
])
def test_names(name, ok):
    if ok:
        check_name(name, reserved="tiny-llama")
    else:
        with pytest.raises(AdapterError, match="name"):
            check_name(name, reserved="tiny-llama")


def test_mixture_names_are_kept_for_mixtures():
    check_name("acme/mix-0123456789abcdef", reserved="tiny-llama", mixture=True)
    with pytest.raises(AdapterError, match="mixtures"):
        check_name("acme/sql", reserved="tiny-llama", mixture=True)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]},
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": None, "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": ["a", 2**63], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0]},
    "not an object",
])
def test_malformed_safetensors_entries_are_adapter_errors(tmp_path, entry):
    """Found by hypothesis: each of these raised TypeError, OverflowError or passed the check
    and failed in safetensors, all 500s over HTTP."""
    raw = json.dumps({"w": entry}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(AdapterError):
        check_safetensors(path, Limits())


@pytest.mark.parametrize("header", [b"[" * 100_000, b'{"w": ' + b"9" * 5000 + b"}",
                                    b'{"__metadata__": false}', b'{"__metadata__": {"a": 1}}',
                                    b'{"w": NaN}'])
def test_hostile_safetensors_headers_are_adapter_errors(tmp_path, header):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(AdapterError):
        check_safetensors(path, Limits())


@pytest.mark.parametrize("change", [{"layers_to_transform": ""}, {"layers_to_transform": 0.5},
                                    {"layers_to_transform": [True]}, {"layers_pattern": 5},
                                    {"target_modules": [1, 2]}])
def test_config_fields_of_the_wrong_type_are_adapter_errors(engine, good, tmp_path, change):
    bad = write_variant(good, tmp_path, with_config(**change))
    with pytest.raises(AdapterError):
        engine.parse_adapter("x", str(bad))
