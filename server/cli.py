"""`loraplex serve [MODEL]`: the command line, with vLLM's flag names where they exist."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    LORA_DTYPES,
    LoRAConfig,
    MergeConfig,
    ModelConfig,
    RayOptions,
    SchedulerConfig,
    ServerConfig,
)


def _lora_modules(values: list[str]) -> tuple[tuple[str, str], ...]:
    """vLLM's forms: `name=path`, or JSON `{"name": ..., "path": ...}`."""
    pairs = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
                pairs.append((spec["name"], spec["path"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise argparse.ArgumentTypeError(
                    f"--lora-modules: {value!r} is not JSON with 'name' and 'path'") from None
        elif "=" in value:
            name, path = value.split("=", 1)
            pairs.append((name, path))
        else:
            raise argparse.ArgumentTypeError(f"--lora-modules: expected name=path, got {value!r}")
    return tuple(pairs)


def _key_from_env(flag: str) -> str | None:
    """A key flag's default: `LORAPLEX_<FLAG>`, or the first line of the file named by
    `LORAPLEX_<FLAG>_FILE` (containers' secrets), so keys stay out of the command line."""
    var = "LORAPLEX_" + flag.upper().replace("-", "_")
    if os.environ.get(var):
        return os.environ[var]
    path = os.environ.get(var + "_FILE")
    if path:
        try:
            with open(path) as f:
                return f.readline().strip() or None
        except OSError as e:
            raise SystemExit(f"loraplex: error: {var}_FILE: {e}") from None
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex", description="Multi-LoRA inference server with an OpenAI-compatible API.")
    sub = parser.add_subparsers(dest="command", required=True)
    # Parsed by the load-test tool itself: `loraplex bench --help` lists its commands.
    sub.add_parser("bench", add_help=False,
                   help="load tests and the side-by-side comparison with transformers + PEFT")
    _plan_parser(sub)
    _serve_args(sub.add_parser(
        "serve", help="serve a base model and its LoRA adapters over HTTP",
        description="Serve a base model and LoRA adapters with an OpenAI-compatible API. "
                    "Without MODEL, the embedded SmolLM2-135M-Instruct is served."))
    ray = sub.add_parser(
        "serve-ray", help="the same server as N Ray Serve replicas behind one endpoint",
        description="Serve as `loraplex serve` does, from N replicas on a Ray cluster (a local "
                    "one unless --ray-address), each adapter routed to the replicas holding "
                    "it. The replicas share --adapter-store, which must be a path they all see.")
    _serve_args(ray)
    group = ray.add_argument_group("ray")
    group.add_argument("--num-replicas", type=int, default=RayOptions.num_replicas)
    group.add_argument("--cpus-per-replica", type=float,
                       default=RayOptions.cpus_per_replica,
                       help="Ray CPUs each replica reserves (its torch threads on the CPU)")
    group.add_argument("--gpus-per-replica", type=float,
                       default=RayOptions.gpus_per_replica)
    group.add_argument("--ray-address", default=None,
                       help="an existing cluster (auto, or ray://HOST:10001); default: start "
                            "a local one")
    group.add_argument("--affinity", action=argparse.BooleanOptionalAction,
                       default=RayOptions.affinity,
                       help="route each adapter's requests to the replicas holding it "
                            "(default: on; off only to measure what it saves)")
    return parser


def _serve_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("model", nargs="?", default=None,
                       help="a transformers directory (safetensors) or a .gguf file")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients use for the base model")
    serve.add_argument("--api-key", default=_key_from_env("api-key"),
                       help="require this bearer key on /v1 routes (or LORAPLEX_API_KEY, "
                            "or a file named by LORAPLEX_API_KEY_FILE)")
    serve.add_argument("--admin-key", default=_key_from_env("admin-key"),
                       help="bearer key for the adapter admin API, off without it (or "
                            "LORAPLEX_ADMIN_KEY / LORAPLEX_ADMIN_KEY_FILE)")
    serve.add_argument("--metrics-key", default=_key_from_env("metrics-key"),
                       help="bearer key /metrics requires (the admin key works too); without "
                            "it /metrics is open, and with --tenant-keys its open view names "
                            "no adapter or tenant (or LORAPLEX_METRICS_KEY / "
                            "LORAPLEX_METRICS_KEY_FILE)")
    serve.add_argument("--tenant-keys", default=os.environ.get("LORAPLEX_TENANT_KEYS_FILE"),
                       metavar="FILE",
                       help="JSON file mapping tenant keys to adapter patterns and rates (or "
                            "LORAPLEX_TENANT_KEYS_FILE)")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="adapters to load at start-up: name=path or JSON {name, path}")
    serve.add_argument("--adapter-store", default=None, metavar="DIR",
                       help="where uploaded adapters are kept (default: ~/.cache/loraplex/adapters)")
    serve.add_argument("--allowed-lora-dirs", nargs="+", default=[], metavar="DIR",
                       help="directories /v1/load_lora_adapter may load from")
    serve.add_argument("--max-adapter-mb", type=float, default=ServerConfig.max_adapter_mb,
                       help="largest adapter upload accepted")
    serve.add_argument("--drain-timeout", type=float, default=ServerConfig.drain_timeout,
                       help="seconds in-flight requests get to finish after SIGTERM")
    serve.add_argument("--header-timeout", type=float, default=ServerConfig.header_timeout,
                       help="seconds a connection gets to send complete request headers "
                            "(slow-header clients are closed)")
    serve.add_argument("--max-in-flight", type=int, default=ServerConfig.max_in_flight,
                       help="requests queued or running before new ones get 503 in OpenAI's "
                            "error shape (load shedding)")
    serve.add_argument("--max-mixes", type=int, default=ServerConfig.max_mixes,
                       help="per-request mixtures of adapters ('adapters' in a completions "
                            "body) kept built per tenant, least recently used deleted first; "
                            "0 refuses them")
    serve.add_argument("--max-body-mb", type=float, default=ServerConfig.max_body_mb,
                       help="largest request body, in MB (413 above it)")
    serve.add_argument("--max-connections", type=int, default=ServerConfig.max_connections,
                       help="open connections before requests get a plain 503 from uvicorn; "
                            "keep it above --max-in-flight, which gets OpenAI's 503")
    model = serve.add_argument_group("model")
    model.add_argument("--quantization", choices=["nf4", "int8", "none"], default=None,
                       help="default: nf4 on CUDA, none on the CPU")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       default="auto")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    model.add_argument("--max-model-len", type=int, default=None)
    model.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay decode steps from CUDA graphs (default: on with CUDA and "
                            "both Triton paths; falls back to eager if capture fails)")
    model.add_argument("--enforce-eager", action="store_true",
                       help="vLLM's name for --no-cuda-graphs")
    model.add_argument("--cpu-gemm", choices=["auto", "onednn", "torch"], default="auto",
                       help="the dense base's linear layers on the CPU: weights packed once "
                            "for oneDNN (1.3-4.7x faster fp32 matmuls here; their bytes once "
                            "more in memory) or torch's F.linear. auto: onednn where it runs, "
                            "and with fp32 weights loraplex's C kernel at steps of up to 64 "
                            "rows (decode: 1.1-1.7x faster; the bytes once more again)")
    model.add_argument("--cpu-layers", choices=["auto", "torch"], default="auto",
                       help="the decoder layers' RMSNorm and rotary embedding on the CPU: auto "
                            "runs each as one C call in fp32 models, torch as transformers' "
                            "torch ops")
    model.add_argument("--model-cache", default=None,
                       help="where GGUF conversions are cached (default ~/.cache/loraplex)")
    lora = serve.add_argument_group("adapters")
    lora.add_argument("--max-loras", type=int, default=LoRAConfig.max_loras,
                      help="adapters resident next to the model at once")
    lora.add_argument("--max-lora-rank", type=int, default=LoRAConfig.max_lora_rank)
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept parsed in host memory (default: --max-loras); the "
                           "rest are re-read from disk when requested")
    lora.add_argument("--allow-base-mismatch", action="store_true",
                      help="serve adapters whose base_model_name_or_path names another model")
    lora.add_argument("--lora-backend", choices=["auto", "triton", "cpu-kernel", "torch"],
                      default="auto",
                      help="how a mixed batch's LoRA runs: the Triton SGMV kernels (CUDA, or "
                           "the CPU with TRITON_INTERPRET=1), the C kernel (the CPU; in fp32 "
                           "whatever the model's dtype), or PEFT's own torch calls; auto: "
                           "triton on CUDA, else the C kernel for a dense model, else torch")
    lora.add_argument("--lora-dtype", choices=LORA_DTYPES, default="auto",
                      help="what the C kernel's slots store adapters in: auto is float32 (PEFT "
                           "computes adapters in fp32); bfloat16 streams half the bytes per "
                           "step, exact for adapters saved in bf16 and rounded for others; "
                           "other backends keep the model's dtype")
    lora.add_argument("--lora-fuse", action=argparse.BooleanOptionalAction, default=True,
                      help="with the triton backend, one launch pair for each layer's q/k/v "
                           "and one for gate/up; with the CPU kernel, each projection's base "
                           "and adapters in one call at decode steps (default: on)")
    merge = serve.add_argument_group("merging an adapter into the base (single-tenant speed)")
    merge.add_argument("--merge", default=None, metavar="NAME",
                       help="merge this adapter into the base weights (with --merge-others "
                            "drain: whenever its requests are the only ones)")
    merge.add_argument("--auto-merge", action="store_true",
                       help="merge whichever adapter computes at least --merge-threshold of the "
                            "tokens over --merge-window seconds (with --merge-others drain: "
                            "while it is alone)")
    merge.add_argument("--merge-threshold", type=float, default=MergeConfig.threshold,
                       help="share of the tokens computed (default: %(default)s)")
    merge.add_argument("--merge-window", type=float, default=MergeConfig.window_s,
                       metavar="SECONDS",
                       help="observation window, and the least time between two switches "
                            "(default: %(default)s)")
    merge.add_argument("--merge-dense", action="store_true",
                       help="nf4/int8 bases: keep merged layers dense instead of quantizing the "
                            "sum again (exact sum, a dense layer's memory)")
    merge.add_argument("--merge-others", choices=["correct", "drain"],
                       default=MergeConfig.others,
                       help="while an adapter is merged, other requests run with its delta "
                            "subtracted (correct: one more LoRA pass for their tokens, one "
                            "slot's memory) or wait for an unmerge (drain); requantized "
                            "nf4/int8 merges always drain (default: %(default)s)")
    engine = serve.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    engine.add_argument("--max-num-batched-tokens", type=int,
                        default=SchedulerConfig.max_num_batched_tokens)
    engine.add_argument("--max-overtakes", type=int, default=SchedulerConfig.max_overtakes,
                        help="later requests (base model, or adapter already in a slot) that "
                             "may be admitted before one waiting for an adapter slot; 0 for "
                             "strict first come, first served")
    engine.add_argument("--block-size", type=int, default=CacheConfig.block_size)
    engine.add_argument("--num-kv-blocks", type=int, default=None,
                        help="exact KV cache size in blocks (default: from memory)")
    engine.add_argument("--kv-cache-memory-gb", type=float, default=CacheConfig.kv_cache_memory_gb,
                        help="KV cache size on the CPU")
    engine.add_argument("--gpu-memory-utilization", type=float,
                        default=CacheConfig.gpu_memory_utilization)
    engine.add_argument("--decode-attention", choices=["auto", "triton", "cpu-kernel", "torch"],
                        default="auto",
                        help="decode attention over the paged KV cache: the Triton kernel "
                             "or the C kernel (CPU) reading blocks in place, or a padded "
                             "gather and SDPA (auto: triton on CUDA, cpu-kernel on the CPU "
                             "where it builds, torch elsewhere)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])


def _plan_parser(sub) -> None:
    from .plan import KNOWN_SHAPES, PROJECTIONS

    plan = sub.add_parser(
        "plan", help="what fits in memory: weights, KV blocks, sequences, adapter slots",
        description="Print the memory arithmetic of one replica: weights, adapter slots, KV "
                    "blocks and concurrent sequences at a context length, host cache. The "
                    "server sizes its KV cache with the same functions at start-up.")
    plan.add_argument("model", nargs="?", default="smollm2-135m",
                      help="a model directory (its config.json) or one of: "
                           + ", ".join(KNOWN_SHAPES) + " (default: the embedded model)")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    plan.add_argument("--quantization", choices=["nf4", "int8", "none"], default=None,
                      help="default: nf4 on CUDA, none on the CPU (as serve)")
    plan.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="default: bfloat16 on CUDA, float32 on the CPU (as serve)")
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="the GPU's memory")
    plan.add_argument("--gpu-memory-utilization", type=float,
                      default=CacheConfig.gpu_memory_utilization)
    plan.add_argument("--kv-cache-memory-gb", type=float, default=CacheConfig.kv_cache_memory_gb,
                      help="the KV budget on the CPU")
    plan.add_argument("--max-loras", type=int, default=LoRAConfig.max_loras)
    plan.add_argument("--max-lora-rank", type=int, default=LoRAConfig.max_lora_rank)
    plan.add_argument("--max-cpu-loras", type=int, default=None)
    plan.add_argument("--lora-backend", choices=["auto", "triton", "cpu-kernel", "torch"],
                      default="auto")
    plan.add_argument("--lora-dtype", choices=LORA_DTYPES, default="auto",
                      help="as serve's: bfloat16 halves the C kernel's slots")
    plan.add_argument("--merge-others", choices=["correct", "drain"], default=MergeConfig.others,
                      help="as serve's: correct keeps one more adapter slot")
    plan.add_argument("--cpu-gemm", choices=["auto", "onednn", "torch"], default="auto",
                      help="as serve's: on the CPU, onednn keeps a packed copy of the linear "
                           "layers' weights, auto in fp32 a second one for the C kernel")
    plan.add_argument("--adapter-rank", type=int, default=16,
                      help="a typical adapter's rank, for the host cache")
    plan.add_argument("--adapter-targets", default=",".join(PROJECTIONS),
                      help="a typical adapter's target modules, comma-separated")
    plan.add_argument("--block-size", type=int, default=CacheConfig.block_size)
    plan.add_argument("--max-model-len", type=int, default=None,
                      help="the context length sequences are counted at (default: the model's)")
    plan.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    plan.add_argument("--json", action="store_true", help="the figures as JSON")


def plan_main(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .plan import KNOWN_SHAPES, PROJECTIONS, ModelShape, PlanInputs, plan

    if args.model in KNOWN_SHAPES:
        shape = KNOWN_SHAPES[args.model]
    else:
        try:
            shape = ModelShape.from_directory(args.model)
        except (OSError, KeyError, ValueError) as e:
            print(f"loraplex: error: {args.model}: not a known shape or a model directory "
                  f"with a config.json ({e})", file=sys.stderr)
            return 2
    targets = tuple(t.strip() for t in args.adapter_targets.split(",") if t.strip())
    if not targets or set(targets) - set(PROJECTIONS):
        print(f"loraplex: error: --adapter-targets: choose among {', '.join(PROJECTIONS)}",
              file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    result = plan(PlanInputs(
        shape, args.quantization or ("nf4" if cuda else "none"),
        args.dtype or ("bfloat16" if cuda else "float32"), args.device, args.gpu_memory_gb,
        args.gpu_memory_utilization, args.kv_cache_memory_gb, args.max_loras,
        args.max_lora_rank, args.max_cpu_loras, args.adapter_rank, targets, args.block_size,
        args.max_model_len, args.max_num_seqs, args.lora_backend, args.merge_others,
        args.cpu_gemm, args.lora_dtype))
    if args.json:
        figures = {k: v for k, v in asdict(result).items() if k not in ("inputs", "lines")}
        print(json.dumps({"model": shape.name, **figures}, indent=2))
    else:
        print("\n".join(result.lines))
    return 0 if result.kv_budget > 0 else 1


def ray_options(args: argparse.Namespace) -> RayOptions:
    return RayOptions(num_replicas=args.num_replicas, cpus_per_replica=args.cpus_per_replica,
                      gpus_per_replica=args.gpus_per_replica, affinity=args.affinity,
                      address=args.ray_address)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(
            model=ModelConfig(model=args.model, quantization=args.quantization, dtype=args.dtype,
                              device=args.device, max_model_len=args.max_model_len,
                              cache_dir=args.model_cache,
                              cuda_graphs=False if args.enforce_eager else args.cuda_graphs,
                              cpu_gemm=args.cpu_gemm, cpu_layers=args.cpu_layers),
            cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                              kv_cache_memory_gb=args.kv_cache_memory_gb,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              decode_attention=args.decode_attention),
            scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=args.max_num_batched_tokens,
                                      max_overtakes=args.max_overtakes),
            lora=LoRAConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                            max_cpu_loras=args.max_cpu_loras,
                            allow_base_mismatch=args.allow_base_mismatch,
                            backend=args.lora_backend, fuse=args.lora_fuse,
                            dtype=args.lora_dtype),
            merge=MergeConfig(adapter=args.merge, auto=args.auto_merge,
                              threshold=args.merge_threshold, window_s=args.merge_window,
                              dense=args.merge_dense, others=args.merge_others),
        ),
        host=args.host, port=args.port, served_model_name=args.served_model_name,
        api_key=args.api_key, admin_key=args.admin_key, tenant_keys=args.tenant_keys,
        metrics_key=args.metrics_key,
        lora_modules=_lora_modules(args.lora_modules), adapter_store=args.adapter_store,
        allowed_lora_dirs=tuple(args.allowed_lora_dirs), max_adapter_mb=args.max_adapter_mb,
        drain_timeout=args.drain_timeout, max_in_flight=args.max_in_flight,
        max_mixes=args.max_mixes, max_body_mb=args.max_body_mb,
        header_timeout=args.header_timeout, max_connections=args.max_connections,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from loraplex.loadtest.cli import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return plan_main(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        ray = ray_options(args) if args.command == "serve-ray" else None
    except (argparse.ArgumentTypeError, AssertionError, ConfigError) as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2
    try:
        if ray is not None:
            from .ray_serve import serve_ray

            return serve_ray(config, ray)
        from .serve import serve  # the model stack loads only once arguments are good

        return serve(config)
    except ConfigError as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
