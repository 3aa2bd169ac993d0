"""New adapters built from several: every `combination_type` of PEFT's `add_weighted_adapter`,
run by PEFT itself, and SLERP of two adapters' deltas, which PEFT lacks.

PEFT's methods run on a skeleton of the base model: one `nn.Linear` per projection the sources
target, whose weight is a zero-stride view of a single element (the combination reads adapter
weights only, never the base's), so composing for an 8B model costs no base-model memory.
The result is a plain PEFT adapter directory (`adapter_config.json`, safetensors weights) that
goes through the same checks and store as an upload.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .peft_format import AdapterError, LoRAAdapter
from .store import CONFIG_FILE, WEIGHTS_FILE

PEFT_METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
METHODS = (*PEFT_METHODS, "slerp")
NEEDS_DENSITY = {m for m in PEFT_METHODS if m.startswith(("ties", "dare", "magnitude"))}


@dataclass(frozen=True)
class Source:
    name: str
    path: Path  # a PEFT adapter directory, already validated
    weight: float


def _skeleton(module_shapes: Mapping[str, tuple[int, int]]) -> nn.Module:
    """Modules named as in the base model, each target an nn.Linear without real weights."""
    root = nn.Module()
    one = torch.zeros(1)
    for name, (in_features, out_features) in module_shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        linear = nn.Linear(1, 1, bias=False)
        linear.in_features, linear.out_features = in_features, out_features
        linear.weight = nn.Parameter(one.expand(out_features, in_features), requires_grad=False)
        parent.add_module(leaf, linear)
    return root


def compose_peft(sources: Sequence[Source], method: str, out_dir: Path,
                 module_shapes: Mapping[str, tuple[int, int]], density: float | None = None,
                 rank: int | None = None, seed: int = 0,
                 majority_sign_method: str = "total") -> None:
    """PEFT's `add_weighted_adapter(..., combination_type=method, svd_rank=rank,
    density=density)`, with the random draws of DARE seeded by `seed`; writes the new
    adapter into `out_dir`."""
    from peft import LoraConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    names = [f"source{i}" for i in range(len(sources))]
    configs = [LoraConfig.from_pretrained(str(s.path)) for s in sources]
    model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out resets and similar notices
        for name, config, source in zip(names, configs, sources):
            config.inference_mode = True
            if model is None:
                model = PeftModel(_skeleton(module_shapes), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            weights = load_file(str(source.path / WEIGHTS_FILE))
            set_peft_model_state_dict(model, weights, adapter_name=name)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model.add_weighted_adapter(names, [s.weight for s in sources], "composed",
                                           combination_type=method, svd_rank=rank,
                                           density=density,
                                           majority_sign_method=majority_sign_method)
        except (ValueError, TypeError, RuntimeError) as e:
            # PEFT's own refusals (incompatible sources), and an SVD that does not converge.
            raise AdapterError(f"{method}: {e}") from None
        config = model.peft_config["composed"]
        state = get_peft_model_state_dict(model, adapter_name="composed")
    config.base_model_name_or_path = configs[0].base_model_name_or_path
    _write(out_dir, config, state)


def _write(out_dir: Path, config, state: Mapping[str, torch.Tensor]) -> None:
    config.save_pretrained(str(out_dir))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS_FILE))
    if not (out_dir / CONFIG_FILE).is_file():  # pragma: no cover - PEFT's file name changed
        raise RuntimeError(f"PEFT wrote no {CONFIG_FILE}")


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """mergekit's spherical interpolation: along the great circle between the directions of
    `v0` and `v1`, on the unnormalized tensors; linear when they are nearly parallel."""
    n0 = v0 / max(v0.norm().item(), eps)
    n1 = v1 / max(v1.norm().item(), eps)
    dot = (n0 * n1).sum().item()
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return s0 * v0 + s1 * v1


def compose_slerp(sources: Sequence[LoRAAdapter], t: float, rank: int | None,
                  out_dir: Path, base_model: str | None) -> None:
    """SLERP of two adapters' deltas (`scale * B @ A`, fp32) module by module, then each
    result cut to `rank` by SVD (default: the larger source rank), stored with alpha = rank
    (scale 1) as PEFT's SVD methods do."""
    from peft import LoraConfig

    if len(sources) != 2:
        raise AdapterError("slerp: exactly two sources")
    first, second = sources
    rank = rank or max(first.max_rank, second.max_rank)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(first.modules) | set(second.modules)):
        deltas = []
        for adapter in sources:
            w = adapter.modules.get(name)
            deltas.append(None if w is None else (w.lora_b.float() @ w.lora_a.float()) * w.scale)
        shape = next(d.shape for d in deltas if d is not None)
        d0, d1 = (d if d is not None else torch.zeros(shape) for d in deltas)
        delta = slerp(t, d0, d1)  # [out, in]
        try:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        except RuntimeError as e:  # e.g. no convergence
            raise AdapterError(f"slerp: {name}: {e}") from None
        r = min(rank, s.numel())  # a projection narrower than `rank` keeps zero rows
        b = torch.zeros(delta.shape[0], rank)  # [out, rank]
        a = torch.zeros(rank, delta.shape[1])  # [rank, in]
        b[:, :r], a[:r] = u[:, :r] * s[:r], vh[:r]
        state[f"base_model.model.{name}.lora_B.weight"] = b
        state[f"base_model.model.{name}.lora_A.weight"] = a
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted({
        k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state}),
        task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    _write(out_dir, config, state)
