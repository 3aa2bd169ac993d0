"""PEFT LoRA adapters with non-trivial weights, for tests and benchmarks.

`init_lora_weights=False` leaves A and B at nn.Linear's default init, whose product is
anywhere from a tenth to ten times the base weight depending on rank, alpha and width. Each
lora_B is therefore rescaled so that `||scale * B @ A||_F = rel_norm * ||W_base||_F`: for a
random input every targeted layer's output moves by about `rel_norm`, whatever the rank or the
model size. The adapter's own scale (alpha/r, rsLoRA, patterns) stays baked in, so a server
that applies the wrong scale produces different tokens.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_seed(name: str, seed: int = 0) -> int:
    """Stable per name, so adding an adapter leaves the others' weights alone."""
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**31)


@torch.no_grad()
def rescale_lora_b(peft_model, adapter_name: str, rel_norm: float) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    found = 0
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        a = module.lora_A[adapter_name].weight
        b = module.lora_B[adapter_name].weight
        base = dequantize_module_weight(module.get_base_layer())
        delta = torch.linalg.matrix_norm(module.scaling[adapter_name] * (b.double() @ a.double()))
        if not (delta.item() > 0 and math.isfinite(delta.item())):
            raise RuntimeError(f"{module_name}: LoRA delta has norm {delta.item()}")
        b.mul_(rel_norm * torch.linalg.matrix_norm(base.double()).item() / delta.item())
        found += 1
    if not found:
        raise RuntimeError(f"adapter {adapter_name!r} wrapped no module")


def make_adapter(base_model, path: str | Path, lora_kwargs: dict, name: str, seed: int = 0,
                 rel_norm: float = 0.3) -> Path:
    """Wrap `base_model` (consumed) with one LoRA, draw its weights, save it as PEFT does."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none",
                           "init_lora_weights": False, **lora_kwargs})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(adapter_seed(name, seed))
        peft_model = get_peft_model(base_model, config, adapter_name="default")
    rescale_lora_b(peft_model, "default", rel_norm)
    path = Path(path)
    peft_model.save_pretrained(path, safe_serialization=True)
    return path


def make_benchmark_adapters(base_factory, out_dir: str | Path, count: int,
                            ranks: tuple[int, ...] = (8, 16, 32, 64),
                            targets: list[str] | None = None, seed: int = 0,
                            progress=None) -> dict[str, Path]:
    """`count` adapters `bench-000`... cycling through `ranks`, alpha = 2 * rank, on `targets`
    (every linear projection by default). `base_factory()` must return a fresh base."""
    out_dir = Path(out_dir)
    paths = {}
    for i in range(count):
        name = f"bench-{i:03d}"
        r = ranks[i % len(ranks)]
        paths[name] = make_adapter(base_factory(), out_dir / name,
                                   {"r": r, "lora_alpha": 2 * r,
                                    "target_modules": targets or ALL_LINEAR}, name, seed)
        if progress is not None:
            progress(i + 1, count)
    return paths


# Decoder shapes to benchmark with random weights: the LoRA and attention work depends on
# these, not on what the weights say.
SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512},
}


@torch.no_grad()
def make_random_model(out_dir: str | Path, shape: str, tokenizer_dir: str | Path | None,
                      dtype: torch.dtype = torch.bfloat16, seed: int = 0, say=print,
                      num_layers: int | None = None, vocab_size: int = 128256,
                      device: str | torch.device = "cpu") -> Path:
    """A Llama-architecture checkpoint of `shape` with random weights, saved as safetensors
    beside a copy of the tokenizer in `tokenizer_dir` (the vocabulary is sized to it, so
    text prompts work; only the embedding and lm_head differ from the named model's).
    Without a tokenizer the vocabulary has `vocab_size` entries (Llama 3's by default) and
    requests must be token ids. `num_layers` overrides the shape's layer count (each layer
    keeps its shapes); `device` is where the weights are initialised (a GPU does it in
    seconds)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    special = ({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
               if tokenizer else {"bos_token_id": 1, "eos_token_id": 2})
    layers = {} if num_layers is None else {"num_hidden_layers": num_layers}
    config = LlamaConfig(**{**SHAPES[shape], **layers},
                         vocab_size=len(tokenizer) if tokenizer else vocab_size, **special,
                         initializer_range=0.02, tie_word_embeddings=False,
                         torch_dtype=str(dtype).removeprefix("torch."))
    say(f"building {shape} ({config.num_hidden_layers} layers, hidden {config.hidden_size}) "
        f"with random {dtype} weights")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the saved dtype: half the memory of fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    say(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters; saving to {out}")
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        tokenizer.save_pretrained(out)
    return out


def write_random_adapters(model_dir: str | Path, out_dir: str | Path, count: int,
                          ranks: tuple[int, ...] = (8, 16, 32, 64),
                          targets: list[str] | None = None, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16, rel_norm: float = 0.3,
                          progress=None) -> dict[str, Path]:
    """PEFT adapter files written directly from the model's config, without loading its
    weights: the way to make hundreds of adapters for a model of billions of parameters.
    Weights are Gaussian with `scale * ||B A||` about `rel_norm` times the norm of a weight
    initialised like transformers' (std `initializer_range`), so they change the output
    without swamping it. Same names and rank cycle as `make_benchmark_adapters`."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(config)
    targets = targets or ALL_LINEAR
    shapes = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    if not shapes:
        raise ValueError(f"no module of {model_dir} matches {targets}")
    std = getattr(config, "initializer_range", 0.02)
    out_dir = Path(out_dir)
    paths = {}
    for i in range(count):
        name = f"bench-{i:04d}" if count > 1000 else f"bench-{i:03d}"
        r = ranks[i % len(ranks)]
        gen = torch.Generator().manual_seed(adapter_seed(name, seed))
        tensors = {}
        for module, (fan_in, fan_out) in shapes.items():
            # ||B A||_F ~ b_std * sqrt(fan_out * r) with A's rows of unit norm; scale = 2.
            b_std = rel_norm * std * math.sqrt(fan_in) / (2 * math.sqrt(r))
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(fan_out, r, generator=gen) * b_std).to(dtype)
        path = out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
            "target_modules": sorted(set(targets)), "lora_dropout": 0.0, "bias": "none",
            "base_model_name_or_path": None}, indent=1))
        paths[name] = path
        if progress is not None:
            progress(i + 1, count)
    return paths
