"""`loraplex bench` (or `python -m loraplex.loadtest`): load tests and the PEFT comparison.

    loraplex bench fixtures --out adapters/ --count 8 --ranks 8,16,32,64
    loraplex bench run --url http://127.0.0.1:8000 --adapters-dir adapters/ --rate 4
    loraplex bench peft --adapters-dir adapters/ --rate 4
    loraplex bench compare --adapters 8 --popularity zipf:1.0 --rate 4
    loraplex bench random-model --out llama3-8b-random   # then --model llama3-8b-random
    loraplex bench ray --adapters 8 --num-replicas 2    # one server vs Ray Serve replicas
    loraplex bench engine-overhead --adapters 8 --ranks 4,8,16,32,64 --kernel-stats

Every command takes the same workload flags, so `run`, `peft` and `compare` with the same
flags and seed send exactly the same requests.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from .client import Target, check_target
from .compare import (
    CompareOptions,
    Progress,
    ratio_lines,
    run_http,
    run_peft,
    say,
    wait_ready,
)
from .cpu_variants import VARIANTS as CPU_VARIANTS
from .report import SLO, write_report
from .workload import WorkloadSpec, parse_arrivals, parse_lengths, parse_popularity


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=64)
    g.add_argument("--rate", type=float, default=math.inf,
                   help="open loop: requests per second (default inf: all at once)")
    g.add_argument("--arrivals", default="poisson", help="poisson | gamma:BURSTINESS | closed")
    g.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: clients each with one request in flight")
    g.add_argument("--popularity", default="zipf:1.0",
                   help="distinct | uniform | identical | zipf:ALPHA | skewed:HOT_SHARE")
    g.add_argument("--prompt-len", default="lognormal:48:0.6:512",
                   help="fixed:N | uniform:LO:HI | lognormal:MEDIAN:SIGMA[:MAX] (tokens)")
    g.add_argument("--output-len", default="lognormal:48:0.6:256",
                   help="same forms, for max_tokens (EOS is ignored)")
    g.add_argument("--prompts-file", default=None,
                   help="JSONL of {\"prompt\": ..., \"max_tokens\"?: ...} instead of synthetic")
    g.add_argument("--duration", type=float, default=None,
                   help="open loop: send nothing after this many seconds")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--slo-ttft-ms", type=float, default=None)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--out", default="loadtest-report", help="directory for the report")
    g.add_argument("--no-plots", action="store_true")


def _adapter_args(p: argparse.ArgumentParser, make: bool) -> None:
    g = p.add_argument_group("adapters")
    g.add_argument("--adapters-dir", default=None,
                   help="a directory of PEFT adapters, one sub-directory each")
    if make:
        g.add_argument("--adapters", type=int, default=8,
                       help="without --adapters-dir: make this many (see `fixtures`)")
        g.add_argument("--ranks", default="8,16,32,64")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    p.add_argument("--peft-batch", type=int, default=32, help="largest PEFT static batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fx = sub.add_parser("fixtures", help="make K PEFT adapters with non-trivial weights")
    fx.add_argument("--out", required=True)
    fx.add_argument("--count", type=int, default=8)
    fx.add_argument("--ranks", default="8,16,32,64", help="cycled over the adapters")
    fx.add_argument("--targets", default="all-linear",
                    help="all-linear, attention, or a comma list like q_proj,v_proj")
    fx.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    fx.add_argument("--seed", type=int, default=0)
    fx.add_argument("--from-config", action="store_true",
                    help="write random weights from the model's config without loading the "
                         "model (fast: for large models and many adapters; needs --model)")

    rm = sub.add_parser("random-model", help="a Llama-shaped checkpoint with random weights, "
                        "for speed measurements of models too large to download here")
    rm.add_argument("--out", required=True)
    rm.add_argument("--shape", default="llama3-8b", choices=["llama3-8b", "tiny"])
    rm.add_argument("--tokenizer", default=None,
                    help="a transformers directory whose tokenizer to use (default: the "
                         "embedded SmolLM2's)")
    rm.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="load a running server over its OpenAI API")
    run.add_argument("--url", default="http://127.0.0.1:8000")
    run.add_argument("--allow-remote", action="store_true",
                     help="allow a target that is not a loopback address")
    run.add_argument("--api-key", default=None)
    run.add_argument("--base-model", default=None, help="default: the server's base model")
    run.add_argument("--adapter-names", default=None,
                     help="comma list of adapter names the server already has")
    _adapter_args(run, make=False)
    _workload_args(run)

    peft = sub.add_parser("peft", help="the same workload through transformers + PEFT")
    _model_args(peft)
    _adapter_args(peft, make=True)
    _workload_args(peft)

    cmp = sub.add_parser("compare", help="loraplex, base only and PEFT side by side, one report")
    _model_args(cmp)
    _adapter_args(cmp, make=True)
    _workload_args(cmp)
    cmp.add_argument("--port", type=int, default=0, help="default: a free loopback port")
    cmp.add_argument("--skip-peft", action="store_true")
    cmp.add_argument("--skip-base", action="store_true")
    cmp.add_argument("--server-args", default="",
                     help="extra `loraplex serve` flags, e.g. \"--max-loras 16\"")

    ray = _server_bench(sub, "ray", "one `loraplex serve` vs `loraplex serve-ray`, adapter "
                        "affinity on and off, one report")
    ray.add_argument("--num-replicas", type=int, default=2)
    peers = _server_bench(sub, "peers", "loraplex fp32 and bf16, and the CPU peers present "
                          "(vLLM's CPU build in peers/vllm-venv, llama.cpp's server in "
                          "peers/llama.cpp), 8 adapters mixed and base only")
    peers.add_argument("--systems", default="loraplex-fp32,loraplex-bf16,vllm,llama.cpp",
                       help="comma list of: loraplex-fp32, loraplex-bf16, vllm, llama.cpp")
    peers.add_argument("--rounds", type=int, default=1,
                       help="runs of mixed then base-only per system, on one warm server; "
                            "the ratios take each system's median")
    eo = _bench(sub, "engine-overhead", "the engine alone, in process: adapters mixed "
                "against the base model only, in rounds, without HTTP's noise")
    eo.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    eo.add_argument("--variants", default="fp32-slots",
                    help="comma list of: fp32-slots, bf16-slots (--lora-dtype bfloat16), "
                         "unfused (--no-lora-fuse), onednn-gemm (fp32 slots, --cpu-gemm onednn), torch-layers (fp32 "
                         "slots, --cpu-layers torch); each of the last two with its own "
                         "base-only run")
    eo.add_argument("--kernel-stats", action="store_true",
                    help="time the C kernel's calls, count the adapter bytes they read, and "
                         "measure this machine's read rate beside them")
    var = _server_bench(sub, "cpu-variants", "the server under allocators and thread "
                        "settings, 8 adapters mixed and base only each, one report")
    var.add_argument("--variants", default="glibc,tcmalloc,jemalloc,threads1",
                     help=f"comma list of: {', '.join(CPU_VARIANTS)}")
    return parser


def _bench(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command that runs the model itself on the workload, with adapters it can make."""
    p = sub.add_parser(name, help=help)
    _model_args(p)
    _adapter_args(p, make=True)
    _workload_args(p)
    return p


def _server_bench(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command that starts servers itself on the same workload."""
    p = _bench(sub, name, help)
    p.add_argument("--port", type=int, default=0, help="default: a free loopback port")
    p.add_argument("--server-args", default="",
                   help="extra `loraplex serve` flags, e.g. \"--max-loras 4\"")
    return p


def _spec(args, adapters: list[str]) -> tuple[WorkloadSpec, dict]:
    spec = WorkloadSpec(
        adapters=tuple(adapters), num_requests=args.num_requests,
        arrivals=parse_arrivals(args.arrivals, args.rate, args.concurrency),
        popularity=parse_popularity(args.popularity), prompt_len=parse_lengths(args.prompt_len),
        output_len=parse_lengths(args.output_len), prompts_file=args.prompts_file,
        duration_s=args.duration, seed=args.seed)
    desc = {"requests": args.num_requests, "adapters": len(adapters),
            "arrivals": args.arrivals if args.arrivals == "closed" else
            f"{args.arrivals} at {args.rate} req/s",
            "popularity": args.popularity, "prompt_len": args.prompts_file or args.prompt_len,
            "output_len": args.output_len, "seed": args.seed}
    if args.arrivals == "closed":
        desc["concurrency"] = args.concurrency or 1
    return spec, desc


def _concurrency(args) -> int | None:
    return (args.concurrency or 1) if args.arrivals == "closed" else None


def _adapters_from_dir(path: str) -> dict[str, str]:
    found = {d.name: str(d) for d in sorted(Path(path).iterdir())
             if (d / "adapter_config.json").is_file()}
    if not found:
        raise SystemExit(f"{path}: no PEFT adapters (sub-directories with adapter_config.json)")
    return found


def make_fixtures(out: str, count: int, ranks: list[int], targets: list[str] | None,
                  model: str | None, seed: int) -> dict[str, str]:
    from loraplex.server.config import ModelConfig
    from loraplex.server.runner.loader import load_model

    from .fixtures import make_benchmark_adapters

    say(f"making {count} adapters (ranks {ranks}) in {out}")
    progress = Progress(count, "adapters")
    try:
        paths = make_benchmark_adapters(
            lambda: load_model(ModelConfig(model=model, quantization="none")).model, out, count,
            tuple(ranks), targets, seed, progress=lambda i, n: progress.bar.update(1))
    finally:
        progress.close()
    return {name: str(p) for name, p in paths.items()}


def _targets(form: str) -> list[str] | None:
    from .fixtures import ALL_LINEAR

    if form == "all-linear":
        return list(ALL_LINEAR)
    if form == "attention":
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    return [t.strip() for t in form.split(",") if t.strip()]


def _finish(path: Path, lines: list[str]) -> int:
    print(path.read_text().split("\n![")[0])
    for line in lines:
        print(line)
    print(f"report: {path} (raw records in {path.with_name('report.json')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fixtures" and args.from_config:
            from .fixtures import write_random_adapters

            if not args.model:
                raise ValueError("--from-config needs --model DIR")
            progress = Progress(args.count, "adapters")
            try:
                write_random_adapters(args.model, args.out, args.count,
                                      tuple(int(r) for r in args.ranks.split(",")),
                                      _targets(args.targets), args.seed,
                                      progress=lambda i, n: progress.bar.update(1))
            finally:
                progress.close()
            return 0
        if args.command == "fixtures":
            make_fixtures(args.out, args.count, [int(r) for r in args.ranks.split(",")],
                          _targets(args.targets), args.model, args.seed)
            return 0
        if args.command == "random-model":
            from loraplex.server.runner.loader import convert_gguf, embedded_gguf_path

            from .fixtures import make_random_model

            make_random_model(args.out, args.shape,
                              args.tokenizer or convert_gguf(embedded_gguf_path()),
                              seed=args.seed, say=say)
            return 0
        if args.command == "run":
            return _run(args)
        with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
            adapters = (_adapters_from_dir(args.adapters_dir) if args.adapters_dir else
                        make_fixtures(tmp, args.adapters, [int(r) for r in args.ranks.split(",")],
                                      None, args.model, args.seed) if args.adapters else {})
            spec, desc = _spec(args, list(adapters))
            slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
            opts = CompareOptions(
                model=args.model, quantization=args.quantization, adapters=adapters,
                concurrency=_concurrency(args), peft_batch=args.peft_batch,
                port=getattr(args, "port", 0) or _free_port(), slo=slo,
                server_args=tuple(getattr(args, "server_args", "").split()),
                skip_peft=getattr(args, "skip_peft", False),
                skip_base=getattr(args, "skip_base", False))
            if args.command == "peft":
                run = run_peft(spec, opts)
                return _finish(write_report(args.out, [run], "transformers + PEFT", desc, slo,
                                            plots=not args.no_plots), [])
            if args.command == "peers":
                from loraplex.server.runner.loader import convert_gguf, embedded_gguf_path

                from .peers import SYSTEMS, peers

                model_dir = args.model or str(convert_gguf(embedded_gguf_path()))
                max_rank = max(int(r) for r in args.ranks.split(","))
                systems = tuple(v.strip() for v in args.systems.split(",") if v.strip())
                if not systems or set(systems) - set(SYSTEMS) or args.rounds < 1:
                    raise ValueError(f"--systems: choose among {', '.join(SYSTEMS)}; "
                                     "--rounds: at least 1")
                return _finish(*peers(spec, opts, model_dir, max_rank, args.out, desc,
                                      systems, args.rounds))
            if args.command == "engine-overhead":
                from .engine_overhead import VARIANTS, engine_overhead

                names = [v.strip() for v in args.variants.split(",") if v.strip()]
                if not names or set(names) - set(VARIANTS) or args.rounds < 1:
                    raise ValueError(f"--variants: choose among {', '.join(VARIANTS)}; "
                                     "--rounds: at least 1")
                desc["arrivals"] = "in process, every request at once"
                return _finish(*engine_overhead(spec, args.model, args.quantization, adapters,
                                                names, args.rounds, args.kernel_stats,
                                                args.out, desc))
            if args.command == "cpu-variants":
                from .cpu_variants import cpu_variants

                names = [v.strip() for v in args.variants.split(",") if v.strip()]
                if not names or set(names) - set(CPU_VARIANTS):
                    raise ValueError(f"--variants: choose among {', '.join(CPU_VARIANTS)}")
                return _finish(*cpu_variants(spec, opts, names, args.out, desc))
            if args.command == "ray":
                from .ray_bench import ray_bench

                return _finish(*ray_bench(spec, opts, args.num_replicas, args.out, desc))
            from .compare import compare

            path, runs = compare(spec, opts, args.out, desc)
            return _finish(path, ratio_lines(runs))
    except (ValueError, AssertionError, TimeoutError, RuntimeError) as e:
        print(f"loraplex bench: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import httpx

    check_target(args.url, args.allow_remote)
    url = args.url.rstrip("/").removesuffix("/v1")
    wait_ready(url, None, timeout_s=30)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).raise_for_status().json()
    base = args.base_model or next(m["id"] for m in models["data"] if not m.get("parent"))
    if args.adapter_names:
        adapters = [a.strip() for a in args.adapter_names.split(",") if a.strip()]
    elif args.adapters_dir:
        adapters = list(_adapters_from_dir(args.adapters_dir))
    else:
        adapters = [m["id"] for m in models["data"] if m.get("parent")]
    spec, desc = _spec(args, adapters)
    run = run_http(spec, Target(url, base, args.api_key), "loraplex", _concurrency(args))
    path = write_report(args.out, [run], f"load test of {url}", desc,
                        SLO(args.slo_ttft_ms, args.slo_tpot_ms), plots=not args.no_plots)
    return _finish(path, [])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
