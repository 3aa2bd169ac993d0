"""Reference fixtures: tiny random base models, PEFT LoRA adapters, and a transformers + PEFT
greedy-decoding oracle to prove the engine token-exact against.

This is a helper module (no tests in it); pytest does not collect it. Import it from tests as
``from peft_fixtures import ...`` (``tests/`` is on sys.path under pytest's default rootdir
import mode, since ``tests`` has no ``__init__.py``).

Pieces:

* :func:`tiny_config` / :func:`tiny_model` / :func:`save_tiny_model`: small random llama,
  qwen2 and mistral models (GQA, untied embeddings, qwen2 keeps its q/k/v biases).
* :data:`ADAPTER_SPECS` and :func:`make_adapters`: named ``LoraConfig`` kwargs covering every
  field of ``adapter_config.json`` that changes the math, saved as real PEFT directories
  (``adapter_config.json`` + ``adapter_model.safetensors``).
* :class:`PeftReference`: ONE ``PeftModel`` with all adapters loaded, greedy-decoding a single
  request at a time with plain ``generate``; the oracle.
* :func:`explain_mismatch` / :func:`diagnose_mismatch` / :func:`assert_tokens_match`: tell a
  floating-point near-tie from a real bug when two greedy outputs differ.

Numerical choices (measured, see the self-tests in ``test_peft_fixtures.py``):

* ``initializer_range`` = :data:`TINY_INITIALIZER_RANGE` (0.2, not transformers' 0.02). With
  0.02 a random 3-layer model gives near-uniform logits (max |logit| ~ 0.8) and greedy
  continuations collapse to one or two repeated tokens for many prompts (0.05-0.1: median 7-16
  distinct tokens out of 32). At 0.2 the median greedy continuation has 27 distinct tokens out
  of 32, max |logit| ~ 7, and fp32 rounding noise on the top-1 minus top-2 logit gap (measured
  against a float64 copy of the same model) is ~4e-7 (median) / ~5e-6 (worst) relative to
  max |logit|, while the top-2 gap itself is ~8e-2 (median) and ~2e-4 (0.1th percentile)
  relative. Larger ranges (0.3-0.5) make attention softmaxes sharper, which raises the fp32
  noise roughly in proportion (2e-5 relative at 0.5) without widening the gaps, so 0.2 is the
  sweet spot. Near-ties are a property of the top of 256 random logits and cannot be designed
  away; :func:`explain_mismatch` exists for the rare one.
* LoRA magnitude: ``init_lora_weights=False`` leaves A and B with ``nn.Linear``'s default
  (kaiming-uniform) init, which makes ``scale * B @ A`` anywhere from ~0.3x to >10x the base
  weight depending on rank, alpha and width: far too large for low ranks with big alphas
  (logits blow up) and model-size dependent. :func:`make_adapters` therefore rescales every
  ``lora_B`` so that ``||scale * B @ A||_F = rel_norm * ||W_base||_F`` per module (default
  :data:`DEFAULT_LORA_REL_NORM` = 0.3). For a random input x, ``E||ΔW x||^2 / E||W x||^2`` is
  then rel_norm^2 whatever the rank or width, so the same adapters perturb a 64-wide tiny model
  and the 576-wide SmolLM2-135M comparably: every adapter moves the greedy output within a few
  tokens, and logits stay in the base model's range. ``scale`` (alpha/r, alpha/sqrt(r) for
  rsLoRA, rank/alpha patterns) is NOT normalised away: it is baked in at save time, so an engine
  that gets the scale wrong is off by that factor and produces different tokens.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from loraplex.loadtest.fixtures import make_adapter

__all__ = [
    "ARCHS",
    "TINY_INITIALIZER_RANGE",
    "DEFAULT_LORA_REL_NORM",
    "NEAR_TIE_REL_GAP",
    "tiny_config",
    "tiny_model",
    "save_tiny_model",
    "ADAPTER_SPECS",
    "make_adapters",
    "PeftReference",
    "Mismatch",
    "diagnose_mismatch",
    "explain_mismatch",
    "assert_tokens_match",
]

ARCHS = ("llama", "qwen2", "mistral")

# See the module docstring for the measurements behind these numbers.
TINY_INITIALIZER_RANGE = 0.2
DEFAULT_LORA_REL_NORM = 0.3
# A top-1/top-2 logit gap below this fraction of max |logit| is a floating-point near-tie:
# ~20x the worst fp32 rounding noise measured on the tiny models, ~100x the typical one.
NEAR_TIE_REL_GAP = 1e-4

_TINY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per KV head
    vocab_size=256,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    initializer_range=TINY_INITIALIZER_RANGE,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    # No pad_token_id: it would make embed_tokens zero that row (padding_idx). Generation
    # passes its own pad id; nothing here ever pads.
    pad_token_id=None,
)
_ARCH_DEFAULTS = {
    "llama": {},
    # Qwen2 always has q/k/v biases (its attention hard-codes bias=True); keep them.
    "qwen2": {"use_sliding_window": False},
    # MistralConfig defaults sliding_window to 4096; None = full attention (override to test
    # sliding windows, e.g. sliding_window=24).
    "mistral": {"sliding_window": None},
}


def tiny_config(arch: str, **overrides):
    """A small random-model config for `arch` ("llama", "qwen2", "mistral").

    hidden 64, intermediate 128, 3 layers, 4 heads / 2 KV heads (head_dim 16), vocab 256,
    max_position_embeddings 256, untied embeddings, initializer_range 0.2, bos 1 / eos 2.
    Any config field can be overridden by keyword.
    """
    from transformers import AutoConfig

    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    kwargs = {**_TINY_DEFAULTS, **_ARCH_DEFAULTS[arch], **overrides}
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A fresh random fp32 model in eval mode with SDPA attention; deterministic in `seed`.

    Nothing is run through it, so it is safe to wrap with PEFT straight away.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            cfg, attn_implementation="sdpa", dtype=torch.float32)
    # A neutral generation config that still names the special tokens (transformers copies
    # bos/eos from the model config; keep them visible to anything reading generation_config).
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    return model.eval()


def save_tiny_model(arch: str, path, seed: int = 0, **overrides) -> Path:
    """Save `tiny_model(arch, seed, **overrides)` to directory `path` as safetensors
    (config.json, generation_config.json, model.safetensors; no tokenizer). Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(arch, seed=seed, **overrides).save_pretrained(path)
    if not any(path.glob("*.safetensors")):  # pragma: no cover - transformers always does this
        raise RuntimeError(f"save_pretrained wrote no safetensors into {path}")
    return path


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------

_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_ALL_LINEAR = [*_ATTN, "gate_proj", "up_proj", "down_proj"]
_COMMON = dict(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", init_lora_weights=False)

# Named LoraConfig kwargs. Every spec is valid for llama/qwen2/mistral of any size with at
# least 3 layers (SmolLM2-135M included): module names are the shared *_proj names.
ADAPTER_SPECS: dict[str, dict] = {
    # rank 1, the two classic targets
    "r1_qv": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"], **_COMMON),
    # rank 8, all attention projections, alpha != r
    "r8_attn": dict(r=8, lora_alpha=16, target_modules=_ATTN, **_COMMON),
    # rank 16, every linear layer, alpha < r (scale 0.5)
    "r16_all": dict(r=16, lora_alpha=8, target_modules=_ALL_LINEAR, **_COMMON),
    # rank 64, every linear layer (rank wider than the tiny model's hidden size: still valid)
    "r64_all": dict(r=64, lora_alpha=128, target_modules=_ALL_LINEAR, **_COMMON),
    # rsLoRA: scale alpha/sqrt(r) = 16/sqrt(32) instead of alpha/r
    "rslora_r32": dict(r=32, lora_alpha=16, use_rslora=True, target_modules=_ALL_LINEAR,
                       **_COMMON),
    # per-module rank and alpha (patterns match a suffix of the module name)
    "patterns": dict(r=8, lora_alpha=8, target_modules=_ALL_LINEAR,
                     rank_pattern={"q_proj": 4, "down_proj": 16},
                     alpha_pattern={"v_proj": 32}, **_COMMON),
    # rsLoRA together with patterns: PEFT accepts it (it only warns for PiSSA/OLoRA-style
    # inits); the scale is alpha_pattern / sqrt(rank_pattern) per module.
    "rslora_patterns": dict(r=8, lora_alpha=12, use_rslora=True, target_modules=_ATTN,
                            rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 4}, **_COMMON),
    # only layers 0 and 2 (layers_pattern None: PEFT finds the layer index itself)
    "layers_02": dict(r=4, lora_alpha=8, target_modules=_ALL_LINEAR, layers_to_transform=[0, 2],
                      layers_pattern=None, **_COMMON),
    # a single int layer with an explicit layers_pattern
    "layer1_pattern": dict(r=4, lora_alpha=4, target_modules=["o_proj", "up_proj", "down_proj"],
                           layers_to_transform=1, layers_pattern="layers", **_COMMON),
    # regex target_modules: full match on the whole module name, only q/k of every layer
    "regex_qk": dict(r=4, lora_alpha=16, target_modules=r".*\.(q|k)_proj", **_COMMON),
    # regex restricted to some layers' MLP
    "regex_mlp01": dict(r=8, lora_alpha=8,
                        target_modules=r"model\.layers\.[01]\.mlp\.(gate|up)_proj", **_COMMON),
    # fan_in_fan_out=True on nn.Linear: PEFT warns and treats it as False (the flag only
    # transposes GPT-2-style Conv1D bases). make_adapters writes the flag back into the saved
    # adapter_config.json (PEFT's save records the reset value), as such adapters ship in the
    # wild; PEFT resets it again on load, and the engine must ignore it the same way.
    "fan_in_fan_out": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           fan_in_fan_out=True, **_COMMON),
}


@contextlib.contextmanager
def _quiet_peft():
    """Silence the expected warnings of building/loading our adapters: the fan_in_fan_out reset
    on nn.Linear, and transformers' deprecation notice that PEFT itself triggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=".*is_gradient_checkpointing.*")
        yield


def make_adapters(
    model_factory: Callable[[], torch.nn.Module],
    out_dir,
    specs: Mapping[str, Mapping] = ADAPTER_SPECS,
    seed: int = 0,
    rel_norm: float = DEFAULT_LORA_REL_NORM,
) -> dict[str, Path]:
    """Create and save one PEFT LoRA adapter per spec under `out_dir/<name>`.

    Each adapter is made on a fresh base from `model_factory()` (give it an unquantized factory:
    the adapter depends only on module shapes and base weight norms), with A/B drawn under a
    per-name seed and lora_B rescaled to `rel_norm` of the base weight (see module docstring).
    Saved with safetensors: `adapter_config.json` + `adapter_model.safetensors`.
    Returns {name: directory}, in `specs` order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, spec in specs.items():
        path = out_dir / name
        with _quiet_peft():
            make_adapter(model_factory(), path, dict(spec), name, seed, rel_norm)
        if spec.get("fan_in_fan_out"):
            # PEFT mutated the config to False for nn.Linear before saving; record what the
            # user asked for, as a real adapter made this way would carry it.
            cfg_file = path / "adapter_config.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["fan_in_fan_out"] = True
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if not (path / "adapter_model.safetensors").is_file():  # pragma: no cover
            raise RuntimeError(f"{path}: PEFT wrote no adapter_model.safetensors")
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


class PeftReference:
    """One PeftModel with every adapter loaded: transformers + PEFT greedy decoding, one
    request at a time (batch of 1, no padding), as the ground truth for the engine.

    `model_factory` must return a FRESH base model on every call that has never run a forward:
    bitsandbytes on the CPU repacks 4-bit weights in place at the first forward, and PEFT must
    wrap the model before that happens. The reference owns the model it builds.
    `adapters` maps adapter name -> PEFT directory (e.g. the result of make_adapters).
    """

    def __init__(self, model_factory: Callable[[], torch.nn.Module],
                 adapters: Mapping[str, str | Path]):
        from peft import PeftModel
        from transformers import GenerationConfig

        if not adapters:
            raise ValueError("PeftReference needs at least one adapter")
        base = model_factory()
        eos = getattr(base.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(base.config, "eos_token_id", None)
        self.eos_token_id = eos  # informational only: generation never stops on it
        pad = getattr(base.config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else 0
        # generate() fills every None field of the generation config it is given from
        # model.generation_config (transformers 5: `update(..., defaults_only=True)`), so an
        # `eos_token_id=None` would silently become the model's EOS, and a hub
        # generation_config.json could add repetition penalties, forced/suppressed tokens,
        # etc. Make the model's own generation config neutral so greedy() controls everything.
        base.generation_config = GenerationConfig()
        items = list(adapters.items())
        with _quiet_peft():
            first_name, first_path = items[0]
            model = PeftModel.from_pretrained(base, str(first_path), adapter_name=first_name)
            for name, path in items[1:]:
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.eval()
        self.adapter_names = [name for name, _ in items]

    def _select(self, adapter: str | None):
        """A context manager with `adapter` active (None: the base model)."""
        if adapter is None:
            return self.model.disable_adapter()
        if adapter not in self.adapter_names:
            raise KeyError(f"unknown adapter {adapter!r}; loaded: {self.adapter_names}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @torch.no_grad()
    def greedy(self, prompt_ids: Sequence[int], adapter: str | None,
               max_new_tokens: int) -> list[int]:
        """Greedy-decode exactly `max_new_tokens` new tokens after `prompt_ids` (returned
        without the prompt). EOS is an ordinary token: never stopped on, never suppressed."""
        if max_new_tokens < 1:
            return []
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self._device())
        with self._select(adapter):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                # Explicit kwargs override everything, None included: no stopping on EOS.
                # (Not min_new_tokens: that works by masking EOS logits to -inf.)
                eos_token_id=None,
                pad_token_id=self.pad_token_id,
            )
        new = out[0, ids.shape[1]:].tolist()
        if len(new) != max_new_tokens:  # pragma: no cover - a transformers behaviour change
            raise RuntimeError(f"generate returned {len(new)} tokens, wanted {max_new_tokens}")
        return new

    @torch.no_grad()
    def step_logits(self, prompt_ids: Sequence[int], adapter: str | None,
                    generated: Sequence[int] = ()) -> torch.Tensor:
        """fp32 logits [vocab] at the last position of prompt_ids + generated (one forward,
        no cache): the distribution the next greedy token is taken from."""
        ids = torch.tensor([[*prompt_ids, *generated]], dtype=torch.long, device=self._device())
        with self._select(adapter):
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return logits[0, -1].float().cpu()

    @torch.no_grad()
    def incremental_logits(self, prompt_ids: Sequence[int], adapter: str | None,
                           max_new_tokens: int) -> list[torch.Tensor]:
        """fp32 logits [vocab] of each greedy step as `generate` (with its KV cache) saw them:
        the same decode as `greedy`, for comparing with `step_logits`' full forwards."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self._device())
        with self._select(adapter):
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=None,
                pad_token_id=self.pad_token_id, output_logits=True, return_dict_in_generate=True)
        return [step[0].float().cpu() for step in out.logits]

    def logits_fn(self, prompt_ids: Sequence[int], adapter: str | None):
        """`generated -> step_logits(prompt_ids, adapter, generated)`, for explain_mismatch."""
        prompt = list(prompt_ids)
        return lambda generated: self.step_logits(prompt, adapter, generated)


# ---------------------------------------------------------------------------------------------
# Mismatch analysis
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    position: int  # index into the generated tokens of the first difference
    ref_token: int | None  # None: the reference ran out (length mismatch)
    got_token: int | None
    top2: tuple[tuple[int, float], tuple[int, float]] | None  # reference (token, logit) x 2
    gap: float | None  # top-1 minus top-2 logit
    rel_gap: float | None  # gap / max |logit|
    got_gap: float | None  # reference logit of ref_token minus that of got_token
    got_rank: int | None  # rank of got_token in the reference logits (0 = argmax)
    tie_tol: float = NEAR_TIE_REL_GAP

    @property
    def near_tie(self) -> bool:
        """True if the reference's own choice was a floating-point coin flip."""
        return self.rel_gap is not None and self.rel_gap < self.tie_tol

    def __str__(self) -> str:
        if self.top2 is None:
            return (f"length mismatch at generated position {self.position}: "
                    f"reference token {self.ref_token}, got {self.got_token}")
        (t1, l1), (t2, l2) = self.top2
        verdict = (
            f"NEAR-TIE (relative gap {self.rel_gap:.2e} < {self.tie_tol:.0e}): floating-point "
            f"summation order can flip this argmax; not evidence of a bug"
            if self.near_tie else
            f"REAL MISMATCH (relative gap {self.rel_gap:.2e} >= {self.tie_tol:.0e}): far beyond "
            f"fp32 rounding noise")
        return (
            f"first mismatch at generated position {self.position}: reference {self.ref_token}, "
            f"got {self.got_token}. Reference top-2: {t1} ({l1:.6f}), {t2} ({l2:.6f}); "
            f"gap {self.gap:.3e} abs, {self.rel_gap:.3e} relative to max|logit|. "
            f"Got token {self.got_token} is rank {self.got_rank} in the reference, "
            f"{self.got_gap:.3e} below its choice. {verdict}")


def diagnose_mismatch(ref_tokens: Sequence[int], got_tokens: Sequence[int],
                      logits_fn: Callable[[list[int]], torch.Tensor],
                      tie_tol: float = NEAR_TIE_REL_GAP) -> Mismatch | None:
    """The first difference between two greedy outputs, analysed on the reference's logits.

    `logits_fn(generated_prefix)` returns the reference's next-token logits after the prompt
    plus `generated_prefix` (e.g. `PeftReference.logits_fn(prompt, adapter)`). None if equal.
    """
    ref, got = list(ref_tokens), list(got_tokens)
    pos = next((i for i, (r, g) in enumerate(zip(ref, got)) if r != g), None)
    if pos is None:
        if len(ref) == len(got):
            return None
        pos = min(len(ref), len(got))
        return Mismatch(pos, ref[pos] if pos < len(ref) else None,
                        got[pos] if pos < len(got) else None,
                        None, None, None, None, None, tie_tol)
    logits = logits_fn(ref[:pos]).detach().double().cpu().flatten()
    vals, idx = torch.topk(logits, 2)
    gap = (vals[0] - vals[1]).item()
    scale = logits.abs().max().item()
    rel = gap / scale if scale > 0 else 0.0
    got_tok, ref_tok = got[pos], ref[pos]
    if 0 <= got_tok < logits.numel():
        got_gap = (logits[ref_tok] - logits[got_tok]).item()
        got_rank = int((logits > logits[got_tok]).sum().item())
    else:
        got_gap, got_rank = float("inf"), -1
    return Mismatch(pos, ref_tok, got_tok,
                    ((int(idx[0]), vals[0].item()), (int(idx[1]), vals[1].item())),
                    gap, rel, got_gap, got_rank, tie_tol)


def explain_mismatch(ref_tokens: Sequence[int], got_tokens: Sequence[int],
                     logits_fn: Callable[[list[int]], torch.Tensor],
                     tie_tol: float = NEAR_TIE_REL_GAP) -> str:
    """A one-paragraph explanation for a test failure message: where the outputs first differ,
    the reference's top-2 tokens and gap there, and NEAR-TIE vs REAL MISMATCH."""
    m = diagnose_mismatch(ref_tokens, got_tokens, logits_fn, tie_tol)
    return "outputs are identical" if m is None else str(m)


def assert_tokens_match(ref_tokens: Sequence[int], got_tokens: Sequence[int],
                        logits_fn: Callable[[list[int]], torch.Tensor], *,
                        allow_near_tie: bool = False, tie_tol: float = NEAR_TIE_REL_GAP,
                        context: str = "") -> Mismatch | None:
    """Assert two greedy outputs are identical, with explain_mismatch in the message.

    With `allow_near_tie`, a first difference that is a reference near-tie passes (tokens after
    it are not comparable) and its Mismatch is returned so the caller can count them.
    """
    m = diagnose_mismatch(ref_tokens, got_tokens, logits_fn, tie_tol)
    if m is None or (allow_near_tie and m.near_tie):
        return m
    prefix = f"{context}: " if context else ""
    raise AssertionError(
        f"{prefix}{m}\n  reference: {list(ref_tokens)}\n  got:       {list(got_tokens)}")
