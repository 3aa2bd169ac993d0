"""The load-test tool: workload generator, report arithmetic, and a small live run."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections import Counter

import numpy as np
import pytest
import torch
from loraplex.loadtest.client import Record, check_target
from loraplex.loadtest.report import SLO, Run, percentile, summarize, write_report
from loraplex.loadtest.workload import (
    ClosedLoop,
    Distinct,
    Fixed,
    GammaArrivals,
    Identical,
    LogNormal,
    Skewed,
    Uniform,
    UniformLengths,
    WorkloadSpec,
    Zipf,
    parse_arrivals,
    parse_lengths,
    parse_popularity,
)

ADAPTERS = tuple(f"a{i}" for i in range(8))


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_arrivals_have_the_rate_and_exponential_spread(rate):
    g = gaps(GammaArrivals(rate).times(random.Random(1), 20_000))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(g) / mean == pytest.approx(1.0, rel=0.05)  # CV of an exponential


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_changes_spread_not_rate(burstiness):
    g = gaps(GammaArrivals(2.0, burstiness).times(random.Random(2), 20_000))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.5, rel=0.05)
    # A gamma of shape k has CV 1/sqrt(k): burstier below 1, steadier above.
    assert statistics.pstdev(g) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_infinite_rate_sends_everything_at_once_and_closed_loop_has_no_times():
    assert GammaArrivals(math.inf).times(random.Random(0), 5) == [0.0] * 5
    assert ClosedLoop(4).times(random.Random(0), 5) is None


def shares(picks: list[int], k: int) -> list[float]:
    counts = Counter(picks)
    return [counts[i] / len(picks) for i in range(k)]


def test_popularity_distributions():
    rng = random.Random(3)
    n, k = 40_000, 8
    assert Distinct().pick(rng, 5, k) == [0, 1, 2, 3, 4]
    assert Distinct().pick(rng, 10, 4) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert set(Identical().pick(rng, 100, k)) == {0}
    assert all(s == pytest.approx(1 / k, rel=0.08) for s in shares(Uniform().pick(rng, n, k), k))
    z = shares(Zipf(1.2).pick(rng, n, k), k)
    norm = sum(1 / (i + 1) ** 1.2 for i in range(k))
    assert all(s == pytest.approx(1 / (i + 1) ** 1.2 / norm, rel=0.1) for i, s in enumerate(z))
    assert z == sorted(z, reverse=True)
    sk = shares(Skewed(0.7).pick(rng, n, k), k)
    assert sk[0] == pytest.approx(0.7, abs=0.01)
    assert all(s == pytest.approx(0.3 / 7, rel=0.12) for s in sk[1:])
    assert Skewed(0.7).pick(rng, 3, 1) == [0, 0, 0]


def test_length_distributions():
    rng = random.Random(4)
    assert {Fixed(7).sample(rng) for _ in range(10)} == {7}
    u = [UniformLengths(3, 9).sample(rng) for _ in range(2000)]
    assert min(u) == 3 and max(u) == 9
    ln = [LogNormal(64, 0.5, cap=10_000).sample(rng) for _ in range(20_000)]
    assert statistics.median(ln) == pytest.approx(64, rel=0.05)
    assert max(LogNormal(64, 2.0, cap=100).sample(rng) for _ in range(1000)) == 100


@pytest.mark.parametrize("form, expected", [
    ("fixed:5", Fixed(5)), ("uniform:2:9", UniformLengths(2, 9)),
    ("lognormal:48:0.6", LogNormal(48, 0.6)), ("lognormal:48:0.6:512", LogNormal(48, 0.6, 512)),
])
def test_parse_lengths(form, expected):
    assert parse_lengths(form) == expected


@pytest.mark.parametrize("parse, form", [
    (parse_lengths, "fixed"), (parse_lengths, "uniform:9:2"), (parse_lengths, "normal:3"),
    (parse_lengths, "fixed:x"), (parse_popularity, "zipfian"), (parse_popularity, "uniform:2"),
])
def test_bad_forms_are_refused(parse, form):
    with pytest.raises((ValueError, AssertionError)):
        parse(form)


def test_parse_arrivals_and_popularity():
    assert parse_arrivals("poisson", 3.0, None) == GammaArrivals(3.0)
    assert parse_arrivals("gamma:0.5", 3.0, None) == GammaArrivals(3.0, 0.5)
    assert parse_arrivals("closed", 3.0, 16) == ClosedLoop(16)
    assert parse_popularity("zipf:1.5") == Zipf(1.5)
    assert parse_popularity("skewed") == Skewed(0.5)
    with pytest.raises(ValueError):
        parse_arrivals("uniform", 1.0, None)


def spec(**kw) -> WorkloadSpec:
    base = {"adapters": ADAPTERS, "num_requests": 200, "arrivals": GammaArrivals(5.0),
                "popularity": Zipf(1.0), "prompt_len": UniformLengths(4, 40),
                "output_len": LogNormal(32, 0.5, 128), "seed": 7}
    return WorkloadSpec(**{**base, **kw})


def test_a_seed_repeats_the_workload_exactly_and_another_seed_does_not():
    assert spec().items() == spec().items()
    other = spec(seed=8).items()
    assert other != spec().items()
    assert [i.adapter for i in other] != [i.adapter for i in spec().items()]


def test_changing_one_knob_leaves_the_others_alone():
    a, b = spec().items(), spec(popularity=Uniform()).items()
    assert [(i.send_at, i.prompt, i.max_tokens) for i in a] == [
        (i.send_at, i.prompt, i.max_tokens) for i in b]


def test_items_are_bounded_and_well_formed():
    items = spec(duration_s=10.0).items()
    assert 30 < len(items) < 70  # ~5 req/s for 10 s
    assert all(i.send_at <= 10.0 for i in items)
    assert [i.index for i in items] == list(range(len(items)))
    assert all(4 <= len(i.prompt.split()) <= 40 and 1 <= i.max_tokens <= 128 for i in items)
    assert {i.adapter for i in spec(adapters=()).items()} == {None}
    closed = spec(arrivals=ClosedLoop(4)).items()
    assert len(closed) == 200 and {i.send_at for i in closed} == {None}


def test_prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there", "max_tokens": 3}\n\n{"prompt": "bye"}\n')
    items = spec(prompts_file=str(path), num_requests=6).items()
    assert sorted({i.prompt for i in items}) == ["bye", "hello there"]
    assert all(i.max_tokens == 3 for i in items if i.prompt == "hello there")
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        spec(prompts_file=str(path)).items()


def test_only_loopback_unless_allowed():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"):
        check_target(url, allow_remote=False)
    with pytest.raises(ValueError, match="allow-remote"):
        check_target("http://10.0.0.5:8000", allow_remote=False)
    check_target("http://10.0.0.5:8000", allow_remote=True)


def test_percentiles_on_known_data():
    data = [float(x) for x in range(1, 101)]
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 90) == pytest.approx(90.1)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))
    rng = np.random.default_rng(0)
    sample = rng.lognormal(size=999).tolist()
    for p in (1, 50, 90, 99, 100):
        assert percentile(sample, p) == pytest.approx(float(np.percentile(sample, p)))


def rec(i: int, ttft: float, e2e: float, tokens: int, status: int = 200, adapter="a") -> Record:
    gap = (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0
    return Record(i, adapter, start=float(i), ttft=ttft, e2e=e2e, output_tokens=tokens,
                  prompt_tokens=10, itl=[gap] * (tokens - 1), status=status,
                  error=None if status == 200 else "refused")


def test_summary_counts_throughput_latency_errors_and_slo():
    records = [rec(0, 0.1, 1.0, 10), rec(1, 0.3, 2.1, 10), rec(2, 0.2, 0.2, 1),
               rec(3, 0.0, 0.0, 0, status=404), rec(4, 0.0, 0.0, 0, status=503),
               rec(5, 0.0, 0.0, 0, status=503)]
    s = summarize(Run("x", records, wall_s=4.0), SLO(ttft_ms=250, tpot_ms=150))
    assert s["completed"] == 3 and s["requests"] == 6
    assert s["output_tok_per_s"] == pytest.approx(21 / 4.0)
    assert s["request_per_s"] == pytest.approx(3 / 4.0)
    assert s["errors"] == {404: 1, 503: 2}
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(150.0)  # (100, 200): one-token request has none
    assert s["itl_ms"]["p50"] == pytest.approx(150.0)
    # Met: request 0 (TTFT 100, TPOT 100) and 2 (TTFT 200, one token). Missed: request 1
    # (TTFT 300) and every failed one.
    assert s["slo"]["attained"] == pytest.approx(2 / 6)


def test_report_writes_json_markdown_and_plots(tmp_path):
    runs = [Run("fast", [rec(i, 0.1, 1.0, 10, adapter=f"a{i % 3}") for i in range(6)], 3.0),
            Run("slow", [rec(i, 0.4, 3.0, 10, adapter=f"a{i % 3}") for i in range(6)], 9.0)]
    md = write_report(tmp_path, runs, "t", {"requests": 6}, baseline="slow")
    text = md.read_text()
    assert "| fast | 2.00 | 20.0 |" in text and "| fast | 3.00x | 0.25x | 0.25x |" in text
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["fast", "slow"]
    assert len(data["runs"][0]["records"]) == 6 and data["runs"][0]["records"][0]["ttft"] == 0.1
    for name in ("latency_cdf.png", "throughput.png", "per_adapter_ttft.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


@pytest.fixture(scope="module")
def live_server(embedded_dir, embedded_adapters, tmp_path_factory):
    from conftest import running_server
    from loraplex.server.app import build_app
    from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
    from loraplex.server.serve import build_state

    config = ServerConfig(
        adapter_store=str(tmp_path_factory.mktemp("store")), served_model_name="smol",
        engine=EngineConfig(model=ModelConfig(model=str(embedded_dir), quantization="none"),
                            cache=CacheConfig(num_blocks=256)),
        lora_modules=tuple((name, str(path)) for name, path in embedded_adapters.items()))
    state = build_state(config)
    with running_server(build_app(state)) as url:
        yield url
    state.engine.shutdown()


def test_run_command_against_a_live_server(live_server, tmp_path, capsys):
    from loraplex.loadtest.cli import main

    out = tmp_path / "report"
    # "ghost" is not on the server: its requests must be recorded as 404s, not crash the run.
    assert main(["run", "--url", live_server, "--adapter-names", "sql,poet,ghost",
                 "--num-requests", "6", "--popularity", "distinct", "--rate", "20",
                 "--prompt-len", "uniform:4:12", "--output-len", "fixed:4", "--out", str(out),
                 "--slo-ttft-ms", "60000"]) == 0
    runs = json.loads((out / "report.json").read_text())["runs"]
    records = runs[0]["records"]
    assert [r["adapter"] for r in records] == ["sql", "poet", "ghost"] * 2
    for r in records:
        if r["adapter"] == "ghost":
            assert r["status"] == 404 and "ghost" in r["error"]
        else:
            assert r["status"] == 200 and r["error"] is None and r["output_tokens"] == 4
            assert 0 < r["ttft"] <= r["e2e"] and len(r["itl"]) >= 1 and r["prompt_tokens"] >= 4
    assert runs[0]["summary"]["errors"] == {"404": 2}
    assert runs[0]["summary"]["slo"]["attained"] == pytest.approx(4 / 6)
    assert "| loraplex |" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_command_end_to_end(tmp_path, capsys):
    """The one-run comparison: fixtures, a `loraplex serve` child process, base-only run,
    PEFT baseline, report. Greedy text must match PEFT's request for request."""
    from loraplex.loadtest.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--adapters", "2", "--ranks", "8,16", "--num-requests", "4",
                 "--popularity", "distinct", "--rate", "inf", "--prompt-len", "uniform:6:16",
                 "--output-len", "fixed:6", "--out", str(out)]) == 0
    runs = {r["name"]: r for r in json.loads((out / "report.json").read_text())["runs"]}
    assert set(runs) == {"loraplex", "loraplex base only", "transformers + PEFT"}
    lora, base, peft = (runs[n]["records"] for n in ("loraplex", "loraplex base only",
                                                     "transformers + PEFT"))
    assert all(r["status"] == 200 and r["output_tokens"] == 6 for r in lora + base + peft)
    assert [r["text"] for r in lora] != [r["text"] for r in base]  # the adapters matter
    assert [r["text"] for r in lora] == [r["text"] for r in peft]
    printed = capsys.readouterr().out
    assert "loraplex / PEFT output tok/s" in printed and "identical greedy text to PEFT: 4/4" in printed


def test_random_model_fixture_is_servable(tmp_path, embedded_dir):
    """`bench random-model` (here the tiny shape): a Llama checkpoint sized to the embedded
    tokenizer, which the engine loads and runs on text prompts like any other model."""
    from loraplex.loadtest.fixtures import make_random_model
    from loraplex.server.config import CacheConfig, EngineConfig, ModelConfig
    from loraplex.server.engine.engine import LLMEngine
    from loraplex.server.engine.request import SamplingParams

    path = make_random_model(tmp_path / "m", "tiny", embedded_dir, say=lambda _: None)
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(path), quantization="none"),
                                    cache=CacheConfig(num_blocks=32)))
    assert engine.loaded.model.config.hidden_size == 64
    assert engine.vocab_size >= len(engine.tokenizer)
    out: list[int] = []
    engine.add_request("r", "hello there", SamplingParams(max_tokens=3, temperature=0.0,
                                                          ignore_eos=True),
                       callback=lambda o: out.extend(o.new_token_ids))
    while engine.has_unfinished():
        engine.step()
    assert len(out) == 3


def test_adapters_written_from_a_config_are_valid_peft_and_change_the_output(tmp_path,
                                                                            embedded_dir):
    from loraplex.loadtest.fixtures import make_random_model, write_random_adapters
    from loraplex.server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
    from loraplex.server.engine.engine import LLMEngine
    from loraplex.server.engine.request import SamplingParams
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = make_random_model(tmp_path / "m", "tiny", embedded_dir, dtype=torch.float32,
                                  say=lambda _: None)
    paths = write_random_adapters(model_dir, tmp_path / "a", 2, ranks=(4, 8),
                                  dtype=torch.float32, rel_norm=1.0)
    assert sorted(paths) == ["bench-000", "bench-001"]
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir), quantization="none"),
                                    cache=CacheConfig(num_blocks=32), lora=LoRAConfig(max_loras=2)))
    for name, path in paths.items():
        engine.register_adapter(name, str(path))
    prompt = engine.tokenizer.encode("the water is cold and", add_special_tokens=False)
    outs: dict[str, list[int]] = {}
    for adapter in (None, *paths):
        key = adapter or "base"
        outs[key] = []
        engine.add_request(key, prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                       ignore_eos=True), adapter,
                           callback=lambda o: outs[o.request_id].extend(o.new_token_ids))
    while engine.has_unfinished():
        engine.step()
    assert outs["bench-000"] != outs["base"] and outs["bench-001"] != outs["base"]
    # PEFT reads the same files and agrees, token for token.
    for name, path in paths.items():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), path)
        ids = torch.tensor([prompt])
        got = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=6, min_new_tokens=6)[0, len(prompt):].tolist()
        assert got == outs[name], name


def test_merge_bench_smoke_runs_every_part(tmp_path, capsys):
    """loadtest/merge_bench.py at tiny sizes: the parts run and report their figures (the
    figures themselves come from full runs, in docs/benchmarks.md)."""
    from loraplex.loadtest import merge_bench

    assert merge_bench.main(["--smoke", "--parts", "single,trace,others", "--out",
                             str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    single = results["single_tenant"]
    assert set(single["tok_s"]) == {"unmerged", "merged", "base"}
    assert single["identical_outputs_merged_vs_unmerged"] == "2/2"
    assert len(single["merge_s"]) == len(single["unmerge_s"]) == 1
    assert [t["auto_merge"] for t in results["trace"]] == [False, True]
    assert all(t["total_tokens"] > 0 for t in results["trace"])
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert [r["mode"] for r in results["others"]] == ["unmerged", "drain", "correct"]
    assert all(r["tok_s"] > 0 for r in results["others"])


def test_llama_cpp_requests_name_every_adapter_scale():
    """llama.cpp's server takes an empty `lora` list as "its own defaults" (every loaded
    adapter at scale 1 unless started with --lora-init-without-apply), so each request gives
    every scale: 1 for its adapter, 0 for the others, all 0 for the base model."""
    from loraplex.loadtest.peers import llama_lora_field

    field = llama_lora_field(["a", "b", "c"])
    assert field("b") == {"lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0},
                                   {"id": 2, "scale": 0.0}]}
    assert field(None) == {"lora": [{"id": i, "scale": 0.0} for i in range(3)]}


def test_peers_ratios_take_each_systems_median_over_rounds():
    """`bench peers --rounds 3`: per system, the median rate of each kind over its rounds, its
    LoRA overhead from those, and loraplex's mixed rate against the fastest peer's base only."""
    from loraplex.loadtest.peers import ratio_lines

    def run(name: str, tok_per_s: float) -> Run:  # 10 requests of 10 tokens
        return Run(name, [rec(i, 0.1, 1.0, 10) for i in range(10)], 100 / tok_per_s)

    runs = []
    for system, mixed, base in (("loraplex fp32", (150, 180, 90), (200, 190, 210)),
                                ("llama.cpp F32", (60, 70, 65), (140, 160, 150))):
        for k in range(3):
            runs += [run(f"{system}, 8 adapters mixed #{k + 1}", mixed[k]),
                     run(f"{system}, base only #{k + 1}", base[k])]
    runs.append(Run("vLLM CPU fp32, base only", [rec(0, 0.1, 1.0, 10), rec(1, 0, 0, 0, 503)],
                    10 / 90))
    lines = ratio_lines(runs)
    assert lines[0] == ("loraplex fp32: 8 adapters mixed 150.0 tok/s (rounds: 150.0, 180.0, "
                        "90.0); base only 200.0 tok/s (rounds: 200.0, 190.0, 210.0), LoRA "
                        "overhead 33.3%")
    assert lines[1].startswith("llama.cpp F32: 8 adapters mixed 65.0 tok/s") and \
        lines[1].endswith("LoRA overhead 130.8%")
    assert lines[2] == "vLLM CPU fp32: base only 90.0 tok/s"
    # The fastest peer's base-only median: llama.cpp's 150 (vLLM's 90 is slower).
    assert lines[3] == "loraplex fp32 mixed / llama.cpp F32 base only: 1.00x"
    assert lines[4] == "vLLM CPU fp32, base only: 1/2 completed"


def test_cpu_variants_help_names_every_variant_and_peers_its_systems(capsys):
    from loraplex.loadtest.cli import build_parser
    from loraplex.loadtest.cpu_variants import VARIANTS
    from loraplex.loadtest.engine_overhead import VARIANTS as ENGINE_VARIANTS
    from loraplex.loadtest.peers import SYSTEMS

    for command, names in (("cpu-variants", VARIANTS), ("peers", SYSTEMS),
                           ("engine-overhead", ENGINE_VARIANTS)):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = "".join(capsys.readouterr().out.split())  # help wraps lines, even at hyphens
        assert all(name in text for name in names), (command, text)


def test_engine_overhead_runs_every_variant_and_counts_the_kernels_bytes(tmp_path, embedded_dir,
                                                                          dense_rows_64,
                                                                          capsys):
    """In process, one round: both slot dtypes, the base and adapters as two calls, oneDNN's
    base and torch's layers mixed, then the base only each of three ways; then a run of each
    variant with the kernel's calls timed and its bytes counted."""
    from loraplex.loadtest.cli import main

    out = tmp_path / "overhead"
    assert main(["engine-overhead", "--model", str(embedded_dir), "--adapters", "2",
                 "--ranks", "4,8", "--num-requests", "4", "--popularity", "distinct",
                 "--prompt-len", "uniform:4:8", "--output-len", "fixed:3", "--rounds", "1",
                 "--variants", "fp32-slots,unfused,bf16-slots,onednn-gemm,torch-layers",
                 "--kernel-stats", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    runs = report["runs"]
    assert list(runs) == ["fp32-slots, mixed", "unfused, mixed", "bf16-slots, mixed",
                          "onednn-gemm, mixed", "torch-layers, mixed", "base only",
                          "base only, --cpu-gemm onednn", "base only, --cpu-layers torch"]
    fused, fp32, bf16, onednn, layers, base, onednn_base, layers_base = runs.values()
    # every step has at most 64 tokens: each projection's base and adapters ran as one call,
    # which the adapters' own count leaves out
    assert fused["kernel_calls"] == 0 and fused["fused_calls"] > 0 and fp32["fused_calls"] == 0
    assert fused["lora_overhead_paired"] == pytest.approx(
        fused["seconds"][0] / base["seconds"][0] - 1, abs=1e-4)
    assert layers["lora_overhead_paired"] == pytest.approx(
        layers["seconds"][0] / layers_base["seconds"][0] - 1, abs=1e-4)
    assert onednn["lora_overhead_paired"] == pytest.approx(
        onednn["seconds"][0] / onednn_base["seconds"][0] - 1, abs=1e-4)
    assert onednn_base["lora_overhead"] == 0 and onednn["kernel_calls"] > 0
    assert report["output_tokens"] == 12 and len(fp32["seconds"]) == 1
    assert fp32["kernel_calls"] > 0 and fp32["kernel_gb"] > 0
    # calls split by step size: one step prefills 4 prompts of 4-8 tokens, then decodes of 4
    steps = fp32["kernel_by_step"]
    assert sum(b["calls"] for b in steps.values()) == fp32["kernel_calls"]
    assert fp32["kernel_gb"] == pytest.approx(sum(b["bytes"] for b in steps.values()) / 1e9,
                                              abs=0.01)
    assert set(steps) <= {"1-2", "3-8", "9-16", "17-32", "33-64", "65+"} and "3-8" in steps
    assert 0 < fp32["kernel_share"] < 1
    # bf16 slots take the one call too (their base's copy is fp32)
    assert bf16["kernel_calls"] == 0 and bf16["fused_calls"] == fused["fused_calls"]
    assert "kernel_calls" not in base and base["lora_overhead"] == 0
    assert base["lora_overhead_paired"] == 0
    assert fp32["lora_overhead_paired"] == pytest.approx(
        fp32["seconds"][0] / base["seconds"][0] - 1, abs=1e-4)
    assert report["read_gb_per_s"][0] > 0
    # CPU time, all threads: a fair share of the run's wall time, whatever the thread count
    assert fp32["cpu_seconds"][0] > 0.2 * fp32["seconds"][0]
    assert fp32["cpu_overhead_paired"] == pytest.approx(
        fp32["cpu_seconds"][0] / base["cpu_seconds"][0] - 1, abs=2e-3)
    assert base["cpu_overhead"] == 0 and 0 <= fp32["stolen_share"] < 1
    printed = capsys.readouterr().out
    assert "| unfused, mixed |" in printed and "overhead floor" in printed
    assert "fp32-slots, mixed: " in printed and "adapters together" in printed
    assert "## unfused, mixed: the C kernel's calls by step size" in (
        out / "report.md").read_text()
    assert "base only, --cpu-gemm onednn: " in printed and "first base-only run" in printed
