"""The engine's mixed-adapter batches against transformers + PEFT, greedy, token for token.

Each case first proves every adapter changes the base model's greedy output (so equality
cannot be trivial), then runs all adapters together with base-only requests through the
engine and compares every request with `PeftModel.generate` for that request alone.
Scenarios: everything submitted at once; requests arriving while others are mid-generation;
a KV cache small enough to force preemption; fewer adapter slots than adapters; a token
budget small enough to chunk every prefill.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from loraplex.kernels import layers_cpu, sgmv_cpu
from loraplex.server.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
)
from loraplex.server.engine.engine import LLMEngine
from loraplex.server.engine.request import SamplingParams
from loraplex.server.runner.loader import load_model
from peft_fixtures import (
    ADAPTER_SPECS,
    PeftReference,
    assert_tokens_match,
    make_adapters,
    save_tiny_model,
)
from transformers import AutoTokenizer


@dataclass(frozen=True)
class Case:
    rid: str
    prompt: list[int]
    adapter: str | None
    max_tokens: int


def make_cases(prompt_pool: list[list[int]], adapters: list[str], seed: int = 0,
               max_tokens: tuple[int, int] = (4, 12)) -> list[Case]:
    """Every adapter once or twice, plus base-only requests, with varied lengths (each request's
    new tokens drawn from the `max_tokens` range, inclusive)."""
    rng = random.Random(seed)
    names: list[str | None] = [*adapters, *adapters[:4], None, None, None]
    rng.shuffle(names)
    return [Case(f"r{i}", rng.choice(prompt_pool), name, rng.randint(*max_tokens))
            for i, name in enumerate(names)]


def run(engine: LLMEngine, cases: list[Case], arrive_every: int = 0):
    """Submit the cases (all at once, or one every `arrive_every` steps) and run to the end.
    Returns ({rid: tokens}, total preemptions, steps with more than one adapter)."""
    tokens: dict[str, list[int]] = {c.rid: [] for c in cases}
    requests, pending, mixed_steps = [], list(cases), 0

    def submit(case: Case):
        params = SamplingParams(max_tokens=case.max_tokens, temperature=0.0, ignore_eos=True)
        requests.append(engine.add_request(
            case.rid, case.prompt, params, case.adapter,
            callback=lambda out: tokens[out.request_id].extend(out.new_token_ids)))

    step = 0
    while pending or engine.has_unfinished():
        if pending and (arrive_every == 0 or step % arrive_every == 0):
            for case in (pending if arrive_every == 0 else pending[:1]):
                submit(case)
            pending = [] if arrive_every == 0 else pending[1:]
        slots = {r.lora_slot for r in engine.scheduler.running}
        mixed_steps += len(slots) > 1
        engine.step()
        step += 1
    return tokens, sum(r.num_preemptions for r in requests), mixed_steps


SCENARIOS = {
    # name: (engine overrides, arrive_every)
    "all_at_once": (dict(), 0),
    "staggered_arrivals": (dict(), 3),
    "preemption": (dict(num_blocks=16, block_size=4), 0),
    "few_slots_chunked": (dict(max_loras=4, budget=16), 0),
}


def engine_config(model: ModelConfig, num_blocks=512, block_size=16, max_loras=16, budget=2048,
                  max_seqs=256, backend="auto", fuse=True, decode_attention="auto",
                  cuda_graphs=None, lora_dtype="auto"):
    return EngineConfig(model=replace(model, cuda_graphs=cuda_graphs), cache=CacheConfig(num_blocks=num_blocks, block_size=block_size,
                                                       decode_attention=decode_attention),
                        scheduler=SchedulerConfig(max_num_batched_tokens=budget,
                                                  max_num_seqs=max_seqs),
                        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=64, backend=backend,
                                        fuse=fuse, dtype=lora_dtype))


class Setup:
    """A base model, its adapters, the PEFT oracle and its answers for every case."""

    def __init__(self, model_cfg: ModelConfig, adapter_dir, prompt_pool, adapter_specs,
                 max_tokens: tuple[int, int] = (4, 12)):
        dense = load_model(ModelConfig(model=model_cfg.model, quantization="none",
                                       cache_dir=model_cfg.cache_dir)).model

        def fresh_dense():  # PEFT wraps the model it is given: a copy each time
            return copy.deepcopy(dense)

        def fresh():  # a never-run model each time: bitsandbytes repacks at the first forward
            return load_model(model_cfg).model

        self.model_cfg = model_cfg
        self.adapters = make_adapters(fresh_dense, adapter_dir, adapter_specs)
        self.reference = PeftReference(fresh, self.adapters)
        # The engine warms its model up before serving; so does the oracle, so that no
        # compared forward is a layer's first (bitsandbytes computes those differently).
        self.reference.greedy([1, 2, 3], None, 1)
        self.cases = make_cases(prompt_pool, list(self.adapters), max_tokens=max_tokens)
        self.expected = {c.rid: self.reference.greedy(c.prompt, c.adapter, c.max_tokens)
                         for c in self.cases}

    def engine(self, **overrides) -> LLMEngine:
        engine = LLMEngine(engine_config(self.model_cfg, **overrides))
        for name, path in self.adapters.items():
            engine.register_adapter(name, str(path))
        return engine

    def check(self, got: dict[str, list[int]], scenario: str, engine: LLMEngine) -> None:
        """Every request token-exact against the oracle.

        NF4 on the CPU is the one exception, and a bounded one: bitsandbytes' CPU kernel
        rounds activations to bf16, so the oracle's own logits differ between two valid
        evaluation orders (its incremental decode and a full forward) by up to a few logits
        on these adapters (in fp32 the two are bit-identical). There a first
        divergence passes only if our token trails the oracle's choice by less than the
        oracle's own disagreement at that position and our whole top-20 distribution lies
        within twice that disagreement; tokens after it are not comparable, and such ties
        are capped at a quarter of the requests.
        """
        # bf16 rounds like bitsandbytes' CPU kernels do: the same bounded tie rule.
        noisy = self.model_cfg.quantization == "nf4" or self.model_cfg.dtype == "bfloat16"
        ties = []
        for c in self.cases:
            context = f"{scenario}: {c.rid} adapter={c.adapter}"
            expected, tokens = self.expected[c.rid], got[c.rid]
            if not noisy or tokens == expected:
                assert_tokens_match(expected, tokens, self.reference.logits_fn(c.prompt, c.adapter),
                                    context=context)
                continue
            pos = next(i for i, (a, b) in enumerate(zip(expected, tokens)) if a != b)
            self._check_tie(engine, c, pos, tokens[pos], context)
            ties.append(f"{c.rid}@{pos}")
        assert len(ties) <= len(self.cases) // 4, f"{scenario}: too many divergences: {ties}"

    def _check_tie(self, engine: LLMEngine, case: Case, pos: int, got_token: int,
                   context: str) -> None:
        prefix = self.expected[case.rid][:pos]
        inc = self.reference.incremental_logits(case.prompt, case.adapter, pos + 1)[pos]
        full = self.reference.step_logits(case.prompt, case.adapter, prefix)
        noise = (inc - full).abs().max().item()
        if self.model_cfg.dtype == "bfloat16":
            # bf16 logits: two evaluation orders may round a sum to neighbouring bf16 values,
            # so one step of bf16 at the two logits' magnitude is a tie even where the
            # oracle's own two orders happen to agree.
            noise = max(noise, _bf16_step(max(abs(inc.max().item()),
                                              abs(inc[got_token].item()))))
        margin = (inc.max() - inc[got_token]).item()
        assert margin <= noise, (
            f"{context}: REAL MISMATCH at {pos}: our token {got_token} is {margin:.3f} below the "
            f"oracle's choice, beyond the oracle's own disagreement {noise:.3f}")
        ref_lp = torch.log_softmax(inc, -1)
        spread = max((ref_lp - torch.log_softmax(full, -1)).abs().max().item(),
                     noise if self.model_cfg.dtype == "bfloat16" else 0.0)
        top: list = []
        engine.add_request(f"{case.rid}-probe", case.prompt + prefix,
                           SamplingParams(max_tokens=1, temperature=0.0, logprobs=20),
                           case.adapter, callback=lambda out: top.extend(out.new_logprobs))
        while engine.has_unfinished():
            engine.step()
        for token, logprob in top[0].top:
            assert abs(ref_lp[token].item() - logprob) <= 2 * spread, (
                f"{context}: our log-prob of token {token} at {pos} is {logprob:.3f}, the "
                f"oracle's {ref_lp[token].item():.3f}: beyond twice its own spread {spread:.3f}")


def _bf16_step(value: float) -> float:
    """The gap between neighbouring bf16 numbers at `value` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(value, 1e-30))) - 7)


def _adapters_change_output(setup: Setup, prompts: list[list[int]], n: int = 16) -> None:
    """Each adapter's greedy output differs from the base model's: on one of the adapter's
    own cases (the oracle's answers the engine is held to), or else on one of `prompts`, tried
    in order up to the first that differs (PEFT's decode is most of the time here)."""
    base: dict[tuple[int, ...], list[int]] = {}  # prompt -> the base's greedy tokens

    def base_greedy(prompt: list[int], k: int) -> list[int]:
        if len(base.get(tuple(prompt), ())) < k:  # greedy: a longer run extends a shorter one
            base[tuple(prompt)] = setup.reference.greedy(prompt, None, k)
        return base[tuple(prompt)][:k]

    longest: dict[tuple[int, ...], int] = {}
    for c in setup.cases:
        if c.adapter is not None:
            longest[tuple(c.prompt)] = max(longest.get(tuple(c.prompt), 0), c.max_tokens)
    for prompt, k in longest.items():
        base_greedy(list(prompt), k)
    for name in setup.adapters:
        if any(setup.expected[c.rid] != base_greedy(c.prompt, c.max_tokens)
               for c in setup.cases if c.adapter == name):
            continue
        assert any(setup.reference.greedy(p, name, n) != base_greedy(p, n) for p in prompts), (
            f"{name} leaves the output as is")


def _run_scenarios(setup: Setup, **engine_args) -> None:
    for scenario, (overrides, arrive_every) in SCENARIOS.items():
        engine = setup.engine(**overrides, **engine_args)
        got, preemptions, mixed = run(engine, setup.cases, arrive_every)
        setup.check(got, scenario, engine)
        assert mixed > 0, "no step mixed several adapters"
        if scenario == "preemption":
            assert preemptions > 0, "the KV budget was meant to force preemption"
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


# ---- tiny random models: every architecture, dense and NF4 ---------------------------------

TINY_PROMPTS = [[random.Random(i).randrange(3, 256) for _ in range(n)]
                for i, n in enumerate([3, 5, 9, 17, 30, 41])]


@pytest.mark.parametrize("arch,quantization,gemm", [
    ("llama", "none", "auto"), ("qwen2", "none", "auto"), ("mistral", "none", "auto"),
    ("llama", "nf4", "auto"), ("llama", "none", "torch"), ("llama", "none", "onednn"),
])
def test_tiny_mixed_batches_match_peft(tmp_path, monkeypatch, dense_rows_64, arch, quantization,
                                       gemm):
    model_dir = save_tiny_model(arch, tmp_path / "model")
    setup = Setup(ModelConfig(model=str(model_dir), quantization=quantization, cpu_gemm=gemm),
                  tmp_path / "adapters", TINY_PROMPTS, ADAPTER_SPECS)
    assert len(setup.adapters) >= 8
    _adapters_change_output(setup, TINY_PROMPTS)
    # Dense fp32 bases on the CPU multiply through oneDNN-packed weights, and through the C
    # kernel's copies at steps of up to 64 rows (decode), unless told otherwise.
    want = {"auto": "onednn+c" if sgmv_cpu.load() is not None else "onednn",
            "onednn": "onednn", "torch": "torch"}[gemm] if quantization == "none" else "torch"
    runner = setup.engine().runner
    assert runner.cpu_gemm == want
    # fp32 bases run RMSNorm and the rotary embedding in C (cpu_layers.py)
    assert runner.cpu_layers == (quantization == "none" and layers_cpu.load() is not None)
    fused = []  # decode steps' projections run as one C call with their adapters
    real = sgmv_cpu.linear_lora_cpu
    monkeypatch.setattr(sgmv_cpu, "linear_lora_cpu",
                        lambda *a: (lambda y: y if y is None else fused.append(1) or y)(real(*a)))
    _run_scenarios(setup)
    assert bool(fused) == (want == "onednn+c")


@pytest.mark.skipif(sgmv_cpu.load() is None, reason="no C compiler: the kernel was not built")
def test_tiny_bf16_mixed_batches_match_peft_with_the_cpu_kernel(tmp_path):
    """A bf16 base on the CPU: the C kernel computes the LoRA in fp32 and rounds base + delta
    once, as PEFT does with its adapters in fp32 (its default)."""
    model_dir = save_tiny_model("llama", tmp_path / "model")
    setup = Setup(ModelConfig(model=str(model_dir), quantization="none", dtype="bfloat16"),
                  tmp_path / "adapters", TINY_PROMPTS, ADAPTER_SPECS)
    _adapters_change_output(setup, TINY_PROMPTS)
    engine = setup.engine()
    assert engine.runner.lora.backend == engine.runner.decode_attention == "cpu-kernel"
    name, path = next(iter(setup.adapters.items()))
    assert {w.lora_a.dtype for w in engine.parse_adapter(name, str(path)).modules.values()} \
        == {torch.float32}
    _run_scenarios(setup)


@pytest.mark.skipif(sgmv_cpu.load(torch.bfloat16) is None, reason="no C compiler")
def test_tiny_adapters_saved_in_bf16_match_peft_from_bf16_slots(tmp_path, monkeypatch,
                                                                 dense_rows_64):
    """--lora-dtype bfloat16 on an fp32 base: adapters saved in bf16 (their values bf16
    already) are served from bf16 slots, half the bytes, with PEFT's results (which widens
    them to fp32)."""
    from safetensors.torch import load_file, save_file

    saved_fp32 = make_adapters

    def saved_bf16(*args):
        adapters = saved_fp32(*args)
        for path in adapters.values():
            weights = Path(path) / "adapter_model.safetensors"
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()},
                      weights)
        return adapters

    monkeypatch.setitem(globals(), "make_adapters", saved_bf16)
    model_dir = save_tiny_model("llama", tmp_path / "model")
    setup = Setup(ModelConfig(model=str(model_dir), quantization="none"),
                  tmp_path / "adapters", TINY_PROMPTS, ADAPTER_SPECS)
    _adapters_change_output(setup, TINY_PROMPTS)
    engine = setup.engine(lora_dtype="bfloat16")
    assert engine.runner.lora.backend == "cpu-kernel"
    assert {s.packed.data.dtype for s in engine.runner.lora.modules.values()} == {torch.bfloat16}
    fused = []  # decode steps: the fp32 base's copy and the bf16 slots in one C call
    real = sgmv_cpu.linear_lora_cpu
    monkeypatch.setattr(sgmv_cpu, "linear_lora_cpu",
                        lambda *a: (lambda y: y if y is None else fused.append(1) or y)(real(*a)))
    _run_scenarios(setup, lora_dtype="bfloat16")
    assert fused


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_mixed_batches_match_peft_on_cuda(tmp_path, monkeypatch):
    """The engine's CUDA path, where LoRA runs in the Triton SGMV kernels. In fp32 those and
    PEFT's cuBLAS calls differ only in summation order, so every request must match PEFT
    token for token, up to the near-ties that assert_tokens_match explains."""
    from loraplex.kernels import sgmv as sgmv_module

    launches = []
    triton_path = sgmv_module.sgmv_triton
    monkeypatch.setattr(sgmv_module, "sgmv_triton",
                        lambda *args, **kw: launches.append(1) or triton_path(*args, **kw))
    model_dir = save_tiny_model("llama", tmp_path / "model")
    setup = Setup(ModelConfig(model=str(model_dir), quantization="none", dtype="float32",
                              device="cuda"),
                  tmp_path / "adapters", TINY_PROMPTS, ADAPTER_SPECS)
    _run_scenarios(setup)
    assert launches, "the engine never took the Triton path"


# ---- the Triton backend on CPU tensors, in Triton's interpreter -----------------------------

# Mixed ranks and target sets, every rank at most 16 (one rank block per launch: the
# interpreter runs each program in Python, about 20 ms each): q/v only (k's slice of the
# fused q/k/v group has rank 0), per-module ranks and alphas, a rank-2 k with rsLoRA, and
# gate/up on the first two layers only.
TRITON_SPECS = ("r1_qv", "patterns", "rslora_patterns", "regex_mlp01")


# The long form (scripts/long_tests.sh) adds the unfused Qwen2 case and the fused Llama one at
# full size: CI runs the fused Llama one, the path CUDA takes by default, on one layer and
# requests of 2-6 new tokens (each condition asserted below still occurs; a quarter of the
# interpreter's time), and the unfused path in test_tiny_mixed_batches_match_peft.
@pytest.mark.parametrize("arch,fuse,decode,layers,max_tokens", [
    pytest.param("llama", True, "triton", 1, (2, 6), id="llama-fused-paged-static"),
    pytest.param("llama", True, "triton", 2, (4, 12), id="llama-fused-paged-static-full",
                 marks=pytest.mark.long),
    pytest.param("qwen2", False, "torch", 2, (4, 12), id="qwen2-unfused",
                 marks=pytest.mark.long)])
def test_tiny_mixed_batches_match_peft_triton_backend(tmp_path, monkeypatch, arch, fuse, decode,
                                                      layers, max_tokens):
    """The engine's CUDA path, run on the CPU: LoRA through the Triton SGMV kernels in the
    interpreter, fused (one launch pair per q/k/v and per gate/up) or one pair per projection;
    decode attention by the Triton paged kernel or the torch gather. With both Triton paths,
    plain decode steps go through the CUDA-graph runner's static buffers (padded to a graph
    size, scratch block, fixed segment table), uncaptured on the CPU.
    One run has it all at once: two slots for four adapters (slot reloads), a 16-token budget
    (chunked prefill), a KV cache that forces preemption, staggered arrivals (mixed steps of
    decodes and prefill chunks); every request token-exact against PEFT. (Qwen2's q/k/v carry
    biases; about a minute and a half of interpreter per case on two cores.)"""
    from loraplex.kernels import sgmv as sgmv_module
    from loraplex.server.runner import lora_layers

    launches = []  # output slices of each Triton launch pair
    triton_path = sgmv_module.sgmv_triton

    def counted(y, x, lora_a, *args, **kw):
        launches.append(lora_a.shape[0])
        return triton_path(y, x, lora_a, *args, **kw)

    monkeypatch.setattr(sgmv_module, "sgmv_triton", counted)
    monkeypatch.setattr(lora_layers, "sgmv_triton", counted)
    model_dir = save_tiny_model(arch, tmp_path / "model", num_hidden_layers=layers)
    # fp32 on a GPU too (bf16 rounds differently from PEFT's calls: not token-exact).
    setup = Setup(ModelConfig(model=str(model_dir), quantization="none", dtype="float32"),
                  tmp_path / "adapters", TINY_PROMPTS,
                  {name: ADAPTER_SPECS[name] for name in TRITON_SPECS}, max_tokens=max_tokens)
    _adapters_change_output(setup, TINY_PROMPTS[:3])
    static = decode == "triton"
    engine = setup.engine(num_blocks=21 if static else 20, block_size=4, max_loras=2, budget=16,
                          backend="triton", fuse=fuse, decode_attention=decode,
                          cuda_graphs=static or None)
    assert engine.runner.lora.backend == "triton" and engine.runner.decode_attention == decode
    graphs = engine.runner.graphs
    assert (graphs is not None) is static and engine.blocks.num_blocks == 20
    static_steps = []
    if static:
        graph_run = graphs.run
        monkeypatch.setattr(graphs, "run", lambda s, size: static_steps.append((len(s), size))
                            or graph_run(s, size))
    assert len(engine.runner.lora.groups) == (2 * layers if fuse else 0)  # q/k/v, gate/up
    loads = []
    load = engine.runner.lora.load
    monkeypatch.setattr(engine.runner.lora, "load", lambda slot, a: loads.append(a.name) or load(slot, a))
    got, preemptions, mixed = run(engine, setup.cases, arrive_every=2)
    setup.check(got, f"triton {arch} fuse={fuse}", engine)
    assert mixed > 0 and preemptions > 0
    assert len(loads) > len(setup.adapters), f"no slot was reloaded: {loads}"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert launches and set(launches) == ({3, 2, 1} if fuse else {1}), set(launches)
    if static:  # some decode steps ran static, some of them padded
        assert static_steps and any(n < size for n, size in static_steps), static_steps


def test_lora_backend_is_chosen_once_and_refused_where_it_cannot_run(monkeypatch):
    import loraplex.kernels.sgmv_cpu as sgmv_cpu
    from loraplex.server.cli import build_parser, config_from_args
    from loraplex.server.config import ConfigError
    from loraplex.server.runner.lora_layers import resolve_backend

    lora = config_from_args(build_parser().parse_args(["serve"])).engine.lora
    assert (lora.backend, lora.fuse) == ("auto", True)
    lora = config_from_args(build_parser().parse_args(
        ["serve", "--lora-backend", "triton", "--no-lora-fuse"])).engine.lora
    assert (lora.backend, lora.fuse) == ("triton", False)
    for flags, graphs in ([], None), (["--cuda-graphs"], True), (["--enforce-eager"], False):
        assert config_from_args(build_parser().parse_args(
            ["serve", *flags])).engine.model.cuda_graphs is graphs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.bfloat16, quantized=True) == "triton"
    assert resolve_backend("auto", cpu, torch.float32, quantized=True) == "torch"
    assert resolve_backend("auto", cpu, torch.bfloat16, quantized=False) == "cpu-kernel"
    assert resolve_backend("torch", cuda, torch.bfloat16, quantized=False) == "torch"
    with pytest.raises(ConfigError, match="on the CPU only"):
        resolve_backend("cpu-kernel", cuda, torch.float32, quantized=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu, torch.float32, quantized=False)
    monkeypatch.setattr(sgmv_cpu, "load", lambda: None)  # no C compiler
    assert resolve_backend("auto", cpu, torch.float32, quantized=False) == "torch"
    with pytest.raises(ConfigError, match="C compiler"):
        resolve_backend("cpu-kernel", cpu, torch.float32, quantized=False)


def test_lora_dtype_is_the_c_kernels_alone():
    from loraplex.server.cli import build_parser, config_from_args
    from loraplex.server.config import ConfigError
    from loraplex.server.runner.lora_layers import lora_weight_dtype

    assert config_from_args(build_parser().parse_args(["serve"])).engine.lora.dtype == "auto"
    assert config_from_args(build_parser().parse_args(
        ["serve", "--lora-dtype", "bfloat16"])).engine.lora.dtype == "bfloat16"
    fp32, bf16 = torch.float32, torch.bfloat16
    assert lora_weight_dtype("auto", "cpu-kernel", bf16) == fp32  # PEFT's adapters: fp32
    assert lora_weight_dtype("bfloat16", "cpu-kernel", fp32) == bf16
    assert lora_weight_dtype("auto", "triton", bf16) == bf16
    assert lora_weight_dtype("bfloat16", "torch", bf16) == bf16  # the model's: nothing to do
    for backend in ("torch", "triton"):
        with pytest.raises(ConfigError, match="needs the C kernel"):
            lora_weight_dtype("bfloat16", backend, fp32)


@pytest.mark.parametrize("decode", ["torch", "triton", "cpu-kernel"])
def test_tiny_sliding_window_matches_transformers(tmp_path, decode):
    """Mistral with a sliding window shorter than the prompts: the mask must follow it, in
    the torch decode path and in the paged kernels (Triton interpreted off the GPU, and C)."""
    model_dir = save_tiny_model("mistral", tmp_path / "model", sliding_window=8)
    specs = {k: ADAPTER_SPECS[k] for k in ("r8_attn", "r16_all")}
    setup = Setup(ModelConfig(model=str(model_dir), quantization="none"),
                  tmp_path / "adapters", TINY_PROMPTS, specs)
    engine = setup.engine(budget=16, decode_attention=decode)
    assert engine.runner.decode_attention == decode
    got, _, _ = run(engine, setup.cases, arrive_every=2)
    setup.check(got, "sliding_window", engine)


def test_tiny_int8_matches_peft_one_sequence_per_step(tmp_path):
    """LLM.int8 (bitsandbytes' int8, outlier threshold 6.0) computes the columns where any
    row of the batch has an outlier in higher precision, for every row: a sequence's output
    depends on its batch-mates (next test). So int8 is compared one sequence per forward,
    where the engine must match PEFT exactly; mixed batches must still complete."""
    model_dir = save_tiny_model("qwen2", tmp_path / "model")
    setup = Setup(ModelConfig(model=str(model_dir), quantization="int8"),
                  tmp_path / "adapters", TINY_PROMPTS, ADAPTER_SPECS)
    _adapters_change_output(setup, TINY_PROMPTS)
    got, _, _ = run(setup.engine(max_seqs=1), setup.cases, arrive_every=2)
    setup.check(got, "one_sequence_per_step", None)
    got, _, mixed = run(setup.engine(), setup.cases)
    assert mixed > 0 and all(len(got[c.rid]) == c.max_tokens for c in setup.cases)


def test_llm_int8_rows_depend_on_their_batch(tmp_path):
    linear = load_model(ModelConfig(model=str(save_tiny_model("llama", tmp_path)),
                                    quantization="int8")).model.model.layers[0].mlp.down_proj
    x = torch.randn(8, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = linear(x[1:2])
        x[0, 3] = 20.0  # an outlier in another row of the batch
        together = linear(x)[1:2]
    assert not torch.equal(alone, together)


# ---- the embedded SmolLM2-135M-Instruct: fp32 and NF4 --------------------------------------

SENTENCES = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime, briefly.",
    "Translate to German: the weather is nice today.",
    "Once upon a time",
    "def fibonacci(n):",
]


# NF4 on the embedded model is the long form (three minutes here): CI runs NF4 on the tiny
# models (test_tiny_mixed_batches_match_peft) and the embedded model dense.
@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=pytest.mark.long)])
def test_embedded_mixed_batches_match_peft(tmp_path, embedded_dir, quantization):
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    prompts = [tokenizer.encode(s) for s in SENTENCES]
    # Adapters are made on the dense model and served on a dense or an NF4 base alike.
    setup = Setup(ModelConfig(model=str(embedded_dir), quantization=quantization),
                  tmp_path / "adapters", prompts, ADAPTER_SPECS)
    _adapters_change_output(setup, prompts[:3])
    for scenario in ("staggered_arrivals", "preemption"):
        overrides, arrive_every = SCENARIOS[scenario]
        engine = setup.engine(**overrides)
        got, preemptions, _ = run(engine, setup.cases, arrive_every)
        setup.check(got, scenario, engine)
        assert scenario != "preemption" or preemptions > 0
