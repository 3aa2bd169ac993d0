"""What fits: the memory arithmetic of one loraplex replica, exact for this engine.

`loraplex plan` prints it for a model (a directory, or a known shape) before anything is
loaded; the engine sizes its KV cache at start-up with the same functions (`lora_slot_bytes`,
`kv_blocks`), and tests/test_plan.py compares every figure with what a real engine allocates.

Where the bytes go, in the order the engine allocates them:
- weights: embeddings, norms and every decoder linear layer. bitsandbytes NF4 packs two
  weights in a byte and keeps one fp32 absmax per block of 64 (no double quantization, as
  the loader asks); int8 keeps one byte a weight and one fp32 scale per output row. lm_head
  stays dense (transformers never quantizes it), and shares the embedding when tied.
- adapter slots: every projection the engine wraps (q/k/v/o/gate/up/down of every layer)
  holds `max_loras` slots of `max_lora_rank` (A and B), whatever the adapters target, plus a
  rank and a scale per slot. The C kernel on the CPU pads A^T rows to 16 floats and B^T to
  panels of 64 outputs.
- KV cache: the rest of the budget, in blocks of `block_size` tokens across all layers.
- host cache: `max_cpu_loras` parsed adapters in host memory (pinned with CUDA).
Not counted: activations and the CUDA context, which live in the (1 - utilization) headroom on
a GPU, as in vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import MergeConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize for 4-bit)
CPU_LANES, CPU_RANK_BLOCK, CPU_PANEL = 16, 4, 64  # kernels/sgmv_cpu.py's layout
GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformers model, as far as memory is concerned."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2's q/k/v biases
    max_position_embeddings: int | None = None

    @classmethod
    def from_config(cls, config: dict, name: str) -> ModelShape:
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        return cls(name, config["num_hidden_layers"], config["hidden_size"],
                   config.get("intermediate_size", 0), heads,
                   config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads,
                   config["vocab_size"], bool(config.get("tie_word_embeddings", False)),
                   bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
                   config.get("max_position_embeddings"))

    @classmethod
    def from_directory(cls, path: str | Path) -> ModelShape:
        path = Path(path)
        return cls.from_config(json.loads((path / "config.json").read_text()), path.name)

    def projections(self) -> dict[str, tuple[int, int]]:
        """Projection -> (in_features, out_features), the same in every layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# Shapes for `loraplex plan --model NAME` without the files (from each model's config.json).
KNOWN_SHAPES = {
    "smollm2-135m": ModelShape("SmolLM2-135M-Instruct", 30, 576, 1536, 9, 3, 64, 49152, True,
                               max_position_embeddings=8192),
    "llama-3.1-8b": ModelShape("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128, 128256, False,
                               max_position_embeddings=131072),
    "llama-3.1-70b": ModelShape("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128, 128256, False,
                                max_position_embeddings=131072),
    "qwen2.5-7b": ModelShape("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 128, 152064, False,
                             attention_bias=True, max_position_embeddings=32768),
    "mistral-7b": ModelShape("Mistral-7B-v0.3", 32, 4096, 14336, 32, 8, 128, 32768, False,
                             max_position_embeddings=32768),
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def weight_bytes(shape: ModelShape, dtype: str, quantization: str) -> dict[str, int]:
    """Bytes of the model's weights by part, as loaded by server/runner/loader.py."""
    d = DTYPE_BYTES[dtype]
    embed = shape.vocab_size * shape.hidden_size * d
    linear = 0
    for name, (n_in, n_out) in shape.projections().items():
        numel = n_in * n_out
        if quantization == "nf4":
            # uint8 [numel/2, 1] packed weights, fp32 absmax per block, the 16-value code
            linear += _cdiv(numel, 2) + _cdiv(numel, NF4_BLOCK) * 4 + 16 * 4
        elif quantization == "int8":
            linear += numel + n_out * 4  # int8 weights, fp32 scale per output row
        else:
            linear += numel * d
        if shape.attention_bias and name in ("q_proj", "k_proj", "v_proj"):
            linear += n_out * d  # biases stay in the compute dtype
    norms = (2 * shape.num_layers + 1) * shape.hidden_size * d
    return {"embeddings": embed, "lm_head": 0 if shape.tie_word_embeddings else embed,
            "decoder linear layers": linear * shape.num_layers, "norms": norms}


def lora_slot_bytes(shape: ModelShape, max_loras: int, max_rank: int, dtype: str,
                    backend: str, lora_dtype: str = "auto") -> int:
    """Device memory of the adapter slots (server/runner/lora_layers.py's LoRAModel)."""
    cpu_bytes = DTYPE_BYTES["float32" if lora_dtype == "auto" else lora_dtype]
    total = 0
    for n_in, n_out in shape.projections().values():
        if backend == "cpu-kernel":  # A in padded blocks, B^T in 64-wide panels
            per_slot = (_cdiv(n_in, CPU_LANES) * CPU_LANES
                        * _cdiv(max_rank, CPU_RANK_BLOCK) * CPU_RANK_BLOCK
                        + _cdiv(n_out, CPU_PANEL) * max_rank * CPU_PANEL) * cpu_bytes
        else:
            per_slot = max_rank * (n_in + n_out) * DTYPE_BYTES[dtype]
        total += max_loras * (per_slot + 4 + 4)  # int32 rank and fp32 scale per slot
    return total * shape.num_layers


def adapter_bytes(shape: ModelShape, rank: int, targets: tuple[str, ...], dtype: str) -> int:
    """One parsed adapter in host memory: A [r, in] and B [out, r] per targeted module."""
    projections = shape.projections()
    return shape.num_layers * sum(rank * (projections[t][0] + projections[t][1])
                                  for t in targets) * DTYPE_BYTES[dtype]


def kv_block_bytes(shape: ModelShape, block_size: int, dtype: str) -> int:
    """Keys and values of `block_size` tokens in every layer (runner/attention.py)."""
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * \
        DTYPE_BYTES[dtype]


def kv_blocks(budget_bytes: float, block_bytes: int) -> int:
    """KV blocks that fit in what is left for the cache; at least one."""
    return max(1, int(budget_bytes // block_bytes))


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    quantization: str = "none"  # "nf4" | "int8" | "none"
    dtype: str = "bfloat16"
    device: str = "cuda"  # "cuda" | "cpu"
    gpu_memory_gb: float = 80.0
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float = 2.0  # the CPU's KV budget (--kv-cache-memory-gb)
    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    adapter_rank: int = 16
    adapter_targets: tuple[str, ...] = PROJECTIONS
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    backend: str = "auto"  # --lora-backend
    # --merge-others correct (the default) keeps one more slot on a dense base: a merged
    # adapter's delta, negated, for the other requests' correction.
    merge_others: str = "correct"
    cpu_gemm: str = "auto"  # --cpu-gemm
    lora_dtype: str = "auto"  # --lora-dtype

    @property
    def num_slots(self) -> int:
        return self.max_loras + MergeConfig(others=self.merge_others).shadow_slot(
            self.quantization)


@dataclass
class Plan:
    inputs: PlanInputs
    weights: dict[str, int]
    backend: str
    lora_slots: int
    block_bytes: int
    kv_budget: float
    num_blocks: int
    context: int
    seqs_at_context: int
    adapter: int
    host_cache: int
    lines: list[str] = field(default_factory=list)


def resolve_backend(backend: str, device: str, dtype: str, quantization: str) -> str:
    """The LoRA backend `auto` picks (server/runner/lora_layers.py's resolve_backend), for
    the slot layout; the C kernel is assumed to build."""
    if backend != "auto":
        return backend
    if device == "cuda":
        return "triton"
    return "cpu-kernel" if quantization == "none" else "torch"


def packs_linears(p: PlanInputs) -> bool:
    """Whether the server packs the linear layers' weights for oneDNN (server/runner/
    cpu_gemm.py's resolve_cpu_gemm, assuming this torch can)."""
    return (p.cpu_gemm != "torch" and p.device == "cpu" and p.quantization == "none"
            and p.dtype in ("float32", "bfloat16"))


def plan(p: PlanInputs) -> Plan:
    s = p.shape
    weights = weight_bytes(s, p.dtype, p.quantization)
    if packs_linears(p):  # a copy of every linear layer's weight (not bias), lm_head's too
        d = DTYPE_BYTES[p.dtype]
        weights["oneDNN packed copies"] = d * (
            s.num_layers * sum(i * o for i, o in s.projections().values())
            + s.vocab_size * s.hidden_size)
        if p.cpu_gemm == "auto" and p.dtype == "float32":
            # and the C kernel's for steps of few rows, each weight's rows padded to 64
            # (kernels/sgmv_cpu.py's DenseWeights; assuming the kernel builds)
            weights["C kernel copies"] = 4 * (
                s.num_layers * sum(i * _cdiv(o, 64) * 64 for i, o in s.projections().values())
                + _cdiv(s.vocab_size, 64) * 64 * s.hidden_size)
    backend = resolve_backend(p.backend, p.device, p.dtype, p.quantization)
    slots = lora_slot_bytes(s, p.num_slots, p.max_lora_rank, p.dtype, backend, p.lora_dtype)
    block = kv_block_bytes(s, p.block_size, p.dtype)
    if p.device == "cuda":
        budget = p.gpu_memory_gb * GiB * p.gpu_memory_utilization - sum(weights.values()) - slots
    else:
        budget = p.kv_cache_memory_gb * GiB
    blocks = kv_blocks(budget, block)
    context = min(x for x in (p.max_model_len, s.max_position_embeddings,
                              blocks * p.block_size) if x)
    seqs = min(p.max_num_seqs, blocks // _cdiv(context, p.block_size))
    # The C kernel reads adapters in fp32 whatever the model's dtype (engine.parse_adapter).
    one = adapter_bytes(s, p.adapter_rank, p.adapter_targets,
                        "float32" if backend == "cpu-kernel" else p.dtype)
    host = (p.max_cpu_loras or p.max_loras) * one
    out = Plan(p, weights, backend, slots, block, budget, blocks, context, seqs, one, host)
    out.lines = _explain(out)
    return out


def _gib(n: float) -> str:
    return f"{n / GiB:,.3f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:,.2f} MiB"


def _explain(pl: Plan) -> list[str]:
    p = pl.inputs
    s = p.shape
    d = DTYPE_BYTES[p.dtype]
    w = pl.weights
    lines = [f"{s.name}: {s.num_layers} layers, hidden {s.hidden_size}, intermediate "
             f"{s.intermediate_size}, {s.num_heads} heads ({s.num_kv_heads} KV) of {s.head_dim}, "
             f"vocab {s.vocab_size}; {p.quantization}, {p.dtype} on {p.device}",
             "",
             "weights",
             f"  embeddings   {s.vocab_size} x {s.hidden_size} x {d} B = {_gib(w['embeddings'])}",
             f"  lm_head      {'tied to the embeddings' if s.tie_word_embeddings else _gib(w['lm_head'])}"]
    per = {"nf4": "numel/2 + numel/64 x 4 (absmax) + 64 B (code)",
           "int8": "numel + out x 4 (row scales)"}.get(p.quantization, f"numel x {d}")
    lines += [f"  linear       {s.num_layers} layers x 7 projections, each {per}"
              f" = {_gib(w['decoder linear layers'])}",
              f"  norms        {2 * s.num_layers + 1} x {s.hidden_size} x {d} B = {_gib(w['norms'])}",
              *([f"  packed       linear layers and lm_head once more, for oneDNN (--cpu-gemm)"
                 f" = {_gib(w['oneDNN packed copies'])}"] if "oneDNN packed copies" in w else []),
              *([f"  panels       and once more for the C kernel's decode steps (--cpu-gemm "
                 f"auto, fp32) = {_gib(w['C kernel copies'])}"] if "C kernel copies" in w else []),
              f"  total        {_gib(sum(w.values()))}",
              "",
              f"adapter slots ({pl.backend} backend)"]
    if p.num_slots > p.max_loras:
        lines.append(f"  {p.max_loras} slots + 1 for merge corrections (--merge-others correct)")
    if pl.backend == "cpu-kernel":
        lines.append(f"  {p.num_slots} slots x {s.num_layers} layers x 7 projections x (in x "
                     f"pad16({p.max_lora_rank}) + ceil(out/64) x {p.max_lora_rank} x 64) x 4 B")
    else:
        lines.append(f"  {p.num_slots} slots x {s.num_layers} layers x sum over 7 projections "
                     f"of {p.max_lora_rank} x (in + out) x {d} B")
    lines += [f"  = {_gib(pl.lora_slots)}", "", "KV cache"]
    lines.append(f"  block        2 x {s.num_layers} layers x {p.block_size} tokens x "
                 f"{s.num_kv_heads} KV heads x {s.head_dim} x {d} B = {pl.block_bytes:,} B")
    if p.device == "cuda":
        lines.append(f"  budget       {p.gpu_memory_gb} GiB x {p.gpu_memory_utilization} - "
                     f"weights - slots = {_gib(pl.kv_budget)}")
    else:
        lines.append(f"  budget       --kv-cache-memory-gb {p.kv_cache_memory_gb} = "
                     f"{_gib(pl.kv_budget)}")
    lines += [f"  blocks       {pl.num_blocks:,} ({pl.num_blocks * p.block_size:,} tokens, "
              f"{_gib(pl.num_blocks * pl.block_bytes)})",
              f"  sequences    {pl.seqs_at_context} at a context of {pl.context:,} tokens "
              f"(each {_cdiv(pl.context, p.block_size)} blocks; --max-num-seqs "
              f"{p.max_num_seqs})",
              "",
              "host cache",
              f"  one adapter  rank {p.adapter_rank} on {', '.join(p.adapter_targets)}: "
              f"{s.num_layers} layers x sum of r x (in + out) x {d} B = {pl.adapter / 2**20:,.2f} MiB",
              f"  cache        {p.max_cpu_loras or p.max_loras} adapters = {_gib(pl.host_cache)}"
              f"{' (pinned)' if p.device == 'cuda' else ''}"]
    if pl.kv_budget <= 0:
        lines += ["", "DOES NOT FIT: weights and adapter slots exceed the memory budget."]
    elif p.device == "cuda":
        lines += ["", f"Activations and the CUDA context are not counted: they use the "
                      f"{1 - p.gpu_memory_utilization:.0%} left out of the budget."]
    return lines
