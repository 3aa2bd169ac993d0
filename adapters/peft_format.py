"""Reading a PEFT LoRA adapter directory into per-module weights and scales.

The base model is known here only as data: a map from module name to (in_features,
out_features). Everything in `adapter_config.json` that changes the math is honoured the way
PEFT applies it: `r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`,
`target_modules` (list or regex), `layers_to_transform`/`layers_pattern`, `fan_in_fan_out`.
Weights are read with safetensors only; pickled checkpoints are refused unopened.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from safetensors import safe_open

from .store import CONFIG_FILE, WEIGHTS_FILE

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter we refuse; the message names the field and the reason."""


# Patterns come from operators' (or tenants') files, so each match gets a time limit: a
# catastrophically backtracking regex is refused instead of stalling the server.
MATCH_SECONDS = 0.05
MAX_PATTERN_CHARS = 1024


def _match(pattern: str, key: str, field: str, full: bool):
    """`regex` (re-compatible) match with a time limit; the Match or None."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(f"adapter_config.json: {field}: pattern longer than "
                           f"{MAX_PATTERN_CHARS} characters")
    try:
        compiled = regex.compile(pattern)
        return (compiled.fullmatch if full else compiled.match)(key, timeout=MATCH_SECONDS)
    except regex.error as e:
        raise AdapterError(f"adapter_config.json: {field}: invalid regex: {e}") from None
    except TimeoutError:
        raise AdapterError(f"adapter_config.json: {field}: regex {pattern!r} takes too long "
                           f"to match (catastrophic backtracking?)") from None


@dataclass(frozen=True)
class LoRAWeights:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoRAAdapter:
    name: str
    path: str
    config: Mapping
    modules: Mapping[str, LoRAWeights]  # base-model module name -> weights

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())


def _pattern_value(patterns: Mapping[str, float], key: str, default: float,
                   field: str) -> float:
    # PEFT's get_pattern_key: the first pattern that matches a suffix of the module name.
    for pattern, value in patterns.items():
        if _match(rf"(.*\.)?({pattern})$", key, field, full=False) is not None:
            return value
    return default


def _layer_index(config: Mapping, key: str) -> int | None:
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = _match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, "layers_pattern",
                           full=False)
            # A pattern with its own alternatives ("d|") can match without the index group.
            if match and match.group("idx") is not None:
                break
            match = None
    return int(match.group("idx")) if match else None


def is_targeted(config: Mapping, key: str) -> bool:
    """PEFT's check_target_module_exists for the fields we honour."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        # A regex target ignores layers_to_transform, as in PEFT.
        return _match(targets, key, "target_modules", full=True) is not None
    targets = targets or []
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(config, key)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def rank_and_scale(config: Mapping, key: str) -> tuple[int, float]:
    r = int(_pattern_value(config.get("rank_pattern") or {}, key, config["r"], "rank_pattern"))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, key, config.get("lora_alpha", 8),
                           "alpha_pattern")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scale


def _check_config(config: Mapping, max_rank: int) -> None:
    def refuse(field: str, reason: str) -> None:
        raise AdapterError(f"adapter_config.json: {field}: {reason}")

    if config.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", f"only LORA adapters are supported, got {config.get('peft_type')!r}")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        refuse("r", f"must be a positive integer, got {r!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(
                isinstance(v, (int, float)) and v > 0 for v in patterns.values()):
            refuse(field, "must map module patterns to positive numbers")
    ranks = [r, *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        refuse("r", f"rank {max(ranks)} exceeds the server's max_lora_rank {max_rank}")
    if config.get("use_dora"):
        refuse("use_dora", "DoRA adapters are not supported")
    if config.get("modules_to_save"):
        refuse("modules_to_save", "fully fine-tuned modules are not supported")
    if config.get("bias", "none") != "none":
        refuse("bias", f"only bias='none' is supported, got {config.get('bias')!r}")
    if config.get("lora_bias"):
        refuse("lora_bias", "LoRA bias terms are not supported")
    if config.get("target_parameters"):
        refuse("target_parameters", "parameter-targeted LoRA is not supported")
    if config.get("layer_replication"):
        refuse("layer_replication", "layer replication is not supported")
    targets = config.get("target_modules")
    if not targets or not (isinstance(targets, str) or (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        refuse("target_modules", "must be a non-empty list of names or a regex string")
    layers = config.get("layers_to_transform")
    if layers is not None and not (_is_index(layers) or (
            isinstance(layers, list) and all(_is_index(i) for i in layers))):
        refuse("layers_to_transform", "must be a layer index or a list of them")
    pattern = config.get("layers_pattern")
    if pattern is not None and not (isinstance(pattern, str) or (
            isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))):
        refuse("layers_pattern", "must be a string or a list of strings")
    if config.get("use_rslora") not in (None, False, True):
        refuse("use_rslora", "must be true or false")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        refuse("lora_alpha", f"must be a positive number, got {alpha!r}")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _same_base(claimed: str, base_names: Collection[str]) -> bool:
    """PEFT records the base model as a hub id or a local path; either may name ours."""
    def last(name: str) -> str:
        return name.rstrip("/").rsplit("/", 1)[-1].lower()

    return claimed in base_names or last(claimed) in {last(n) for n in base_names if n}


def load_adapter(
    path: str | Path,
    name: str,
    module_shapes: Mapping[str, tuple[int, int]],  # module name -> (in_features, out_features)
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    base_names: Collection[str] | None = None,  # None: any base_model_name_or_path is accepted
) -> LoRAAdapter:
    """Parse and check a PEFT adapter directory against the base model's LoRA-capable modules.
    With `base_names`, an adapter that says it was trained on another base is refused."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled[0]}: pickled checkpoints are never opened)" if pickled else ""
        raise AdapterError(f"{WEIGHTS_FILE}: missing in {path}{hint}")
    try:
        config = json.loads((path / CONFIG_FILE).read_bytes())
    except FileNotFoundError:
        raise AdapterError(f"{CONFIG_FILE}: missing in {path}") from None
    except (ValueError, RecursionError) as e:  # bad JSON or encoding, the digit limit, depth
        raise AdapterError(f"{CONFIG_FILE}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE}: must be a JSON object")
    _check_config(config, max_rank)
    claimed = config.get("base_model_name_or_path")
    if base_names is not None and claimed and not _same_base(str(claimed), base_names):
        raise AdapterError(
            f"adapter_config.json: base_model_name_or_path: the adapter was trained on "
            f"{claimed!r}, not on the served model ({', '.join(sorted(base_names))}); start "
            f"the server with --allow-base-mismatch to serve it anyway")

    targeted = {key for key in module_shapes if is_targeted(config, key)}
    if not targeted:
        raise AdapterError(
            f"adapter_config.json: target_modules: {config['target_modules']!r} matches no "
            f"LoRA-capable module of the base model")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        for tensor_key in f.keys():
            match = _KEY.match(tensor_key)
            if match is None:
                raise AdapterError(f"{WEIGHTS_FILE}: unexpected tensor {tensor_key!r}")
            module = match["module"]
            if module not in module_shapes:
                raise AdapterError(
                    f"{WEIGHTS_FILE}: LoRA on {module!r} is not supported (only the attention "
                    f"and MLP projections of the base model take LoRA)")
            if module not in targeted:
                raise AdapterError(
                    f"{WEIGHTS_FILE}: tensor {tensor_key!r} is for a module that "
                    f"adapter_config.json does not target")
            tensors.setdefault(module, {})[match["ab"]] = f.get_tensor(tensor_key)

    modules = {}
    for module in sorted(targeted):
        pair = tensors.get(module, {})
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{WEIGHTS_FILE}: lora_A/lora_B weights missing for {module}")
        a, b = pair["A"], pair["B"]
        if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise AdapterError(f"{WEIGHTS_FILE}: {module}: dtype {a.dtype} is not F16/BF16/F32")
        r, scale = rank_and_scale(config, module)
        fan_in, fan_out = module_shapes[module]
        # fan_in_fan_out only transposes Conv1D bases; PEFT resets it for nn.Linear, and
        # LoRA's own A/B keep the [r, in] / [out, r] layout either way.
        if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
            raise AdapterError(
                f"{WEIGHTS_FILE}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                f"do not match rank {r} and the base module ({fan_in} -> {fan_out})")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{WEIGHTS_FILE}: {module}: contains NaN or Inf")
        modules[module] = LoRAWeights(a.to(dtype), b.to(dtype), scale)
    return LoRAAdapter(name=name, path=str(path), config=config, modules=modules)
