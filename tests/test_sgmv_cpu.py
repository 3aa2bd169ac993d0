"""The C SGMV kernel for the CPU against fp64 loops and the torch reference, over ranks, widths,
batch sizes and adapter popularity; its dispatch; and its build.

Slot padding past each rank holds NaN, so a product that takes it in turns NaN; rows of
tokens without an adapter must stay bit-identical.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import random
import shutil

import pytest
import torch
from loraplex.kernels import cpu_build, sgmv_cpu
from loraplex.kernels.segments import Segments
from loraplex.kernels.sgmv import sgmv, sgmv_ref

LIB = sgmv_cpu.load()
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler: the kernel was not built")

NUM_SLOTS = 6


def token_slots(pattern: str, num_tokens: int, rng: random.Random) -> list[int]:
    """Each token's slot (-1: no adapter), grouped by slot as the model runner groups them."""
    if pattern == "distinct":
        slots = [i % NUM_SLOTS for i in range(num_tokens)]
    elif pattern == "zipf":
        weights = [1 / (k + 1) for k in range(NUM_SLOTS + 1)]
        slots = rng.choices(range(-1, NUM_SLOTS), weights, k=num_tokens)
    elif pattern == "identical":
        slots = [2] * num_tokens
    elif pattern == "skewed":
        slots = [0 if rng.random() < 0.8 else rng.randrange(-1, NUM_SLOTS)
                 for _ in range(num_tokens)]
    else:
        raise ValueError(pattern)
    return sorted(slots)


class Case:
    """Random weights with NaN past each slot's rank, in the reference's layout and packed for
    the kernel (whose storage is NaN wherever no write reached), inputs and the expected y."""

    def __init__(self, slots: list[int], ranks: list[int], in_features: int, out: int,
                 rank_cap: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.segments = Segments.from_token_slots(slots)
        self.ranks = ranks
        self.scales = [0.25 * (s + 1) for s in range(NUM_SLOTS)]
        self.lora_a = (torch.randn(NUM_SLOTS, rank_cap, in_features, generator=gen)
                       / in_features ** 0.5)  # [slots, rank_cap, in]
        self.lora_b = torch.randn(NUM_SLOTS, out, rank_cap, generator=gen)  # [slots, out, cap]
        self.packed = sgmv_cpu.PackedSlots(LIB, NUM_SLOTS, rank_cap, in_features, out,
                                           torch.tensor(ranks, dtype=torch.int32),
                                           torch.tensor(self.scales))
        self.packed.data.fill_(float("nan"))
        for s, r in enumerate(ranks):
            self.lora_a[s, r:] = float("nan")
            self.lora_b[s, :, r:] = float("nan")
            if r:
                self.packed.write(s, self.lora_a[s, :r], self.lora_b[s, :, :r])
        self.x = torch.randn(len(slots), in_features, generator=gen)
        self.y = torch.randn(len(slots), out, generator=gen)
        self.fresh_y = self.y.clone  # the y each run updates

    def strided_rows(self) -> Case:
        """x and y as column slices of wider tensors: rows further apart than their width."""
        wide_x = torch.full((self.x.shape[0], self.x.shape[1] + 5), float("nan"))
        wide_y = torch.full((self.y.shape[0], self.y.shape[1] + 3), float("nan"))
        wide_x[:, 2:-3] = self.x
        wide_y[:, 1:-2] = self.y
        self.x, self.y = wide_x[:, 2:-3], wide_y[:, 1:-2]
        self.fresh_y = lambda: wide_y.clone()[:, 1:-2]
        return self

    def expected(self) -> torch.Tensor:  # fp64 loops over tokens
        y = self.y.double().clone()
        for i, slot in enumerate(self.segments.slots):
            r = self.ranks[slot] if slot >= 0 else 0
            for t in range(self.segments.starts[i], self.segments.starts[i + 1]):
                if r:
                    h = self.lora_a[slot, :r].double() @ self.x[t].double()
                    y[t] += self.scales[slot] * (self.lora_b[slot, :, :r].double() @ h)
        return y

    def run(self) -> torch.Tensor:
        return sgmv_cpu.sgmv_cpu(self.fresh_y(), self.x, self.packed,
                                 sgmv_cpu.SegmentTable(self.segments))

    def check(self) -> None:
        got = self.run()
        torch.testing.assert_close(got.double(), self.expected(), atol=1e-4, rtol=1e-4)
        untouched = [t for i, slot in enumerate(self.segments.slots)
                     if slot < 0 or self.ranks[slot] == 0
                     for t in range(self.segments.starts[i], self.segments.starts[i + 1])]
        assert torch.equal(got[untouched], self.y[untouched])


@pytest.mark.parametrize("pattern", ["distinct", "zipf", "identical", "skewed"])
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 33, 200])
def test_popularity_and_batch_size(pattern, batch):
    slots = token_slots(pattern, batch, random.Random(batch))
    Case(slots, [8, 16, 32, 64, 4, 0], 96, 160).check()


@pytest.mark.parametrize("ranks", [[1] * 6, [16] * 6, [64] * 6, [1, 15, 17, 33, 48, 0],
                                   [20, 3, 0, 0, 7, 9]])
def test_ranks_including_partial_vectors(ranks):
    Case(token_slots("distinct", 24, random.Random(0)), ranks, 64, 128).check()


@pytest.mark.parametrize("in_features,out", [(1, 1), (7, 63), (64, 64), (130, 65), (576, 1536),
                                             (1536, 192)])
def test_widths_off_the_tile(in_features, out):
    Case(token_slots("zipf", 19, random.Random(1)), [8, 16, 32, 64, 5, 0], in_features,
         out).check()


@pytest.mark.parametrize("rank_cap,ranks", [(8, [8, 1, 5, 8, 0, 3]), (20, [20, 17, 1, 0, 16, 4]),
                                            (128, [128, 65, 80, 64, 1, 0])])
def test_rank_caps_not_a_multiple_of_the_tile(rank_cap, ranks):
    Case(token_slots("distinct", 18, random.Random(2)), ranks, 72, 100, rank_cap).check()


def test_rows_further_apart_than_their_width():
    case = Case(token_slots("zipf", 23, random.Random(5)), [8, 16, 32, 64, 5, 0], 70, 90)
    case.strided_rows()
    assert case.x.stride(0) == 75 and case.fresh_y().stride(0) == 93
    case.check()


def test_shapes_that_disagree_raise_instead_of_reaching_c():
    case = Case(token_slots("distinct", 12, random.Random(6)), [8] * 6, 64, 96)
    table = sgmv_cpu.SegmentTable(case.segments)
    three = sgmv_cpu.PackedSlots(LIB, 3, 64, 64, 96, torch.zeros(3, dtype=torch.int32),
                                 torch.zeros(3))
    for x, y, packed in [
        (case.x[:, :32], case.y, case.packed),  # x narrower than A
        (case.x, case.y[:, :50], case.packed),  # y narrower than B
        (case.x[:5], case.y[:5], case.packed),  # fewer rows than the table
        (case.x, case.y, three),  # slots beyond the storage
        (case.x.bfloat16(), case.y, case.packed),  # dtypes that differ
        (case.x.double(), case.y.double(), case.packed),  # neither fp32, bf16 nor fp16
        (case.x.T.contiguous().T, case.y, case.packed),  # columns apart
        (case.x, case.y[:1].expand_as(case.y), case.packed),  # rows of y overlapping
        (case.x, case.y.T, case.packed),  # y transposed: rows not `out` wide
        (case.x.view(3, 4, 64), torch.zeros(3, 5, 96)[:, :4], case.packed),  # y's rows in
        # blocks that no view makes one [T, out] (its update would land in a copy)
    ]:
        with pytest.raises(ValueError):
            sgmv_cpu.sgmv_cpu(y, x, packed, table)  # raises before C touches y
    with pytest.raises(ValueError):  # ranks the kernel cannot read
        sgmv_cpu.PackedSlots(LIB, 3, 64, 64, 96, torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError):  # a rank above the slot's capacity
        case.packed.write(0, torch.zeros(65, 64), torch.zeros(96, 65))
    with pytest.raises(ValueError):  # A and B of different ranks
        case.packed.write(0, torch.zeros(8, 64), torch.zeros(96, 4))
    for slot in (-1, NUM_SLOTS):
        with pytest.raises(ValueError):
            case.packed.write(slot, torch.zeros(8, 64), torch.zeros(96, 8))
    # Segments check themselves with asserts only; the table checks again for python -O.
    bad = Segments.__new__(Segments)
    object.__setattr__(bad, "starts", (0, 5, 3))
    object.__setattr__(bad, "slots", (0, 1))
    with pytest.raises(ValueError, match="malformed"):
        sgmv_cpu.SegmentTable(bad)


def test_packed_storage_is_fp32_on_the_cpu_and_write_records_the_rank():
    ranks, scales = torch.zeros(3, dtype=torch.int32), torch.zeros(3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        packed = sgmv_cpu.PackedSlots(LIB, 3, 16, 8, 70, ranks, scales)
    finally:
        torch.set_default_dtype(default)
    assert packed.data.dtype == torch.float32 and packed.data.device.type == "cpu"
    packed.write(1, torch.ones(5, 8), torch.ones(70, 5))
    packed.write(2, torch.ones(16, 8), torch.ones(70, 16))
    packed.write(2, torch.ones(3, 8), torch.ones(70, 3))  # reloaded at a smaller rank
    assert ranks.tolist() == [0, 5, 3]


@pytest.mark.parametrize("in_features,out", [(7, 63), (130, 65), (576, 1536)])
def test_bf16_slots_give_the_fp32_slots_results_for_bf16_weights(in_features, out):
    """--lora-dtype bfloat16: weights that are bf16 already (an adapter saved in bf16) give
    the same bits as from fp32 slots; others are rounded to nearest once, when written."""
    lib16 = sgmv_cpu.load(torch.bfloat16)
    case = Case(token_slots("zipf", 19, random.Random(4)), [8, 16, 33, 64, 5, 0], in_features,
                out)
    ranks, scales = torch.tensor(case.ranks, dtype=torch.int32), torch.tensor(case.scales)
    half = sgmv_cpu.PackedSlots(lib16, NUM_SLOTS, 64, in_features, out, ranks, scales)
    assert half.data.dtype == torch.bfloat16 and half.data.nbytes * 2 == case.packed.data.nbytes
    for slot, r in enumerate(case.ranks):
        if r:
            a, b = case.lora_a[slot, :r].bfloat16().float(), case.lora_b[slot, :, :r].bfloat16()
            case.packed.write(slot, a, b.float())
            half.write(slot, a, b.float())
    table = sgmv_cpu.SegmentTable(case.segments)
    want = sgmv_cpu.sgmv_cpu(case.y.clone(), case.x, case.packed, table)
    assert torch.equal(sgmv_cpu.sgmv_cpu(case.y.clone(), case.x, half, table), want)
    for slot, r in enumerate(case.ranks):  # fp32 weights: rounded to nearest when written
        if r:
            a, b = case.lora_a[slot, :r] * 1.001, case.lora_b[slot, :, :r] * 1.001
            half.write(slot, a, b)
            case.packed.write(slot, a.bfloat16().float(), b.bfloat16().float())
    want = sgmv_cpu.sgmv_cpu(case.y.clone(), case.x, case.packed, table)
    assert torch.equal(sgmv_cpu.sgmv_cpu(case.y.clone(), case.x, half, table), want)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        sgmv_cpu.load(torch.float16)


def test_close_to_the_torch_reference():
    """The engine switched from the reference to this kernel: same results within fp32
    rounding on a decode-shaped step."""
    case = Case(token_slots("distinct", 32, random.Random(3)), [8, 16, 32, 64, 8, 16], 576, 1536)
    want = sgmv_ref(case.y.clone(), case.x, case.lora_a, case.lora_b, case.segments, case.ranks,
                    case.scales)
    torch.testing.assert_close(case.run(), want, atol=1e-4, rtol=1e-5)


class Weights:
    def __init__(self, case: Case, packed: bool):
        self.packed = case.packed if packed else None
        self.lora_a, self.lora_b = (None, None) if packed else (case.lora_a, case.lora_b)
        self.ranks, self.scales = case.ranks, case.scales


def test_dispatch_uses_the_kernel_for_packed_weights_and_the_reference_otherwise(monkeypatch):
    case = Case(token_slots("zipf", 40, random.Random(4)), [8, 16, 32, 64, 4, 0], 64, 96)
    table = sgmv_cpu.SegmentTable(case.segments)
    by_kernel = case.run()
    calls = []
    real = sgmv_cpu.sgmv_cpu
    monkeypatch.setattr(sgmv_cpu, "sgmv_cpu", lambda *a: calls.append(1) or real(*a))

    got = sgmv(case.y.clone(), case.x, Weights(case, packed=True), case.segments, None, table)
    assert calls == [1]
    assert torch.equal(got, by_kernel)
    with pytest.raises(ValueError, match="SegmentTable"):
        sgmv(case.y.clone(), case.x, Weights(case, packed=True), case.segments, None, None)

    # weights in the reference's own layout (bf16 ones among them): the reference
    for dtype in (torch.float32, torch.bfloat16):
        y = case.y.to(dtype)
        plain = sgmv(y.clone(), case.x.to(dtype), Weights(case, packed=False), case.segments,
                     None, table)
        assert plain.dtype == dtype
        assert torch.equal(plain, sgmv_ref(y.clone(), case.x.to(dtype), case.lora_a,
                                           case.lora_b, case.segments, case.ranks,
                                           case.scales))
    assert calls == [1]


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])
def test_without_a_working_compiler_the_engine_keeps_the_reference(monkeypatch, tmp_path,
                                                                   compiler):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / compiler) if compiler.startswith("no-") else compiler)
    sgmv_cpu.load.cache_clear()
    try:
        assert sgmv_cpu.load() is None
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        sgmv_cpu.load.cache_clear()


def test_build_is_cached_per_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    compiler = os.environ.get("CC") or shutil.which("cc")
    first = cpu_build.build(sgmv_cpu.SOURCE, compiler, cpu_build.flags())
    stamp = first.stat().st_mtime_ns
    assert cpu_build.build(sgmv_cpu.SOURCE, compiler, cpu_build.flags()) == first
    assert first.stat().st_mtime_ns == stamp
    other = cpu_build.build(sgmv_cpu.SOURCE, compiler, [*cpu_build.flags(), "-O2"])
    assert other != first and other.exists()


def test_entry_points_get_their_signatures_and_optional_ones_may_be_missing(tmp_path):
    """Each entry point's argument types as declared; a name ending in "?" is skipped where
    the library lacks it (an older source), any other missing name is an error."""
    source = tmp_path / "tiny.c"
    source.write_text("#include <stdint.h>\nvoid f(float *y, int64_t n, float s) "
                      "{ for (int64_t i = 0; i < n; i++) y[i] *= s; }\n")
    lib = cpu_build.build_and_load(source, "nothing", {"f": "pif", "g?": "p"})
    assert lib.f.argtypes == [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
    assert lib.f.restype is None
    y = torch.ones(3)
    lib.f(y.data_ptr(), 3, 2.5)  # the float reaches C as a float
    assert y.tolist() == [2.5, 2.5, 2.5]
    with pytest.raises(AttributeError, match="no entry point g"):
        cpu_build.build_and_load(source, "nothing", {"g": "p"})
    # every kernel library declares what its sources define
    assert sgmv_cpu.load().lp_dense_f32.argtypes is not None


def test_benchmark_runs_and_checks_its_two_paths_agree(capsys):
    from loraplex.kernels import bench_sgmv_cpu

    assert bench_sgmv_cpu.main(["--adapters", "3", "--tokens", "7", "--layers", "1",
                                "--repeats", "1", "--with-base"]) == 0
    out = capsys.readouterr().out
    assert "7 projections, 3 adapters (ranks 8/16/32)" in out
    assert "| torch reference |" in out and "kernel speed-up:" in out
    # --with-base: the fused call checked against the two calls, and all three paths timed
    assert all(f"| {path} |" in out for path in ("base alone", "base, then adapters",
                                                  "one call"))
    assert "the adapters' cost, one call against two:" in out


def test_benchmark_times_another_version_of_the_kernel_beside_this_one(capsys, tmp_path):
    """`--against`: another source with the same entry points, its results checked against
    this one's (one token per adapter: the tail's one-row tiles)."""
    from loraplex.kernels import bench_sgmv_cpu

    other = tmp_path / "other.c"
    other.write_text(sgmv_cpu.SOURCE.read_text() + "\n/* another version */\n")
    assert bench_sgmv_cpu.main(["--adapters", "3", "--tokens", "2", "--layers", "1",
                                "--ranks", "4,64", "--repeats", "1", "--against",
                                str(other)]) == 0
    out = capsys.readouterr().out
    assert "7 projections, 3 adapters (ranks 4/64), 2 tokens" in out
    assert f"| C kernel from {other} |" in out
    assert f"this kernel against {other}:" in out


def test_lora_model_runs_the_kernel_for_its_backend_and_peft_calls_for_torch(monkeypatch):
    """The cpu-kernel backend stores slots in the kernel's layout, the torch backend (used for
    bitsandbytes bases) in the reference's; slots loaded, reloaded with a smaller rank and
    cleared give the right deltas either way."""
    from loraplex.adapters.peft_format import LoRAAdapter, LoRAWeights
    from loraplex.server.runner.lora_layers import LoRAModel
    from torch import nn

    gen = torch.Generator().manual_seed(7)

    def adapter(rank: int) -> LoRAAdapter:
        weights = LoRAWeights(torch.randn(rank, 40, generator=gen),
                              torch.randn(24, rank, generator=gen), 0.5)
        return LoRAAdapter(f"r{rank}", "unused", {}, {"layer.q_proj": weights})

    calls = []
    real = sgmv_cpu.sgmv_cpu
    monkeypatch.setattr(sgmv_cpu, "sgmv_cpu", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 6, 40, generator=gen)
    segments = Segments.from_token_slots([-1, 1, 1, 1, 1, 1])
    for backend in ("cpu-kernel", "torch"):
        model = nn.Module()
        model.layer = nn.Module()
        model.layer.q_proj = nn.Linear(40, 24, bias=False)
        base = model.layer.q_proj.weight.detach().clone()
        lora = LoRAModel(model, 3, 16, torch.float32, torch.device("cpu"), backend)
        slots = lora.modules["layer.q_proj"]
        assert (slots.packed is not None) is (slots.lora_a is None) is (backend == "cpu-kernel")
        lora.prepare(segments)
        for a in (adapter(16), adapter(4), None):
            if a is None:
                slots.clear(1)
            else:
                lora.load(1, a)
            calls.clear()
            with torch.no_grad():
                got = model.layer.q_proj(x)[0]
            want = x[0] @ base.T
            if a is not None:
                w = a.modules["layer.q_proj"]
                want[1:] += w.scale * (x[0, 1:] @ w.lora_a.T) @ w.lora_b.T
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert len(calls) == (backend == "cpu-kernel")


def test_a_bf16_step_computes_the_delta_in_fp32_and_rounds_once_as_peft_does():
    """bf16 x and y with packed (fp32) weights: y = bf16(fp32(y) + fp32 delta), PEFT's
    arithmetic with its adapters in fp32; not the result of bf16-rounded adapter weights."""
    case = Case(token_slots("zipf", 24, random.Random(5)), [8, 16, 32, 64, 4, 16], 96, 160)
    table = sgmv_cpu.SegmentTable(case.segments)
    x, y = case.x.bfloat16(), case.y.bfloat16()  # [T, in], [T, out]
    got = sgmv(y.clone(), x, Weights(case, packed=True), case.segments, None, table)
    assert got.dtype == torch.bfloat16
    # In C, rows widened tile by tile: bit for bit what widening the whole step gives.
    widened = sgmv_cpu.sgmv_cpu(y.float(), x.float(), case.packed, table)
    assert torch.equal(got, widened.bfloat16())
    fp32 = sgmv_ref(y.float(), x.float(), case.lora_a, case.lora_b, case.segments, case.ranks,
                    case.scales)
    one_step = 2.0 ** (torch.floor(torch.log2(fp32.abs().clamp_min(1e-30))) - 7)
    assert ((got.float() - fp32).abs() <= one_step).all()  # one rounding of the fp32 sum
    bf16_weights = sgmv_ref(y.clone(), x, case.lora_a.bfloat16(), case.lora_b.bfloat16(),
                            case.segments, case.ranks, case.scales)
    assert not torch.equal(got, bf16_weights)


def test_bf16_rows_round_ties_to_even_overflow_and_keep_nan_as_torch_does():
    """The bf16 path widens and rounds rows VW lanes at a time, with a scalar tail: widths
    off the vector (37 columns, 21 inputs), ties, a sum past bf16's largest value, NaN and
    infinities, each against torch's float -> bfloat16; a token without an adapter keeps its
    row's bits."""
    case = Case([0, 0, -1], [1, 0, 0, 0, 0, 0], 21, 37)
    a = torch.zeros(1, 21)
    a[0, 0] = 1.0
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(37, generator=gen)  # the delta of each column, for x[t, 0] = 1
    y = torch.randn(3, 37, generator=gen).bfloat16()
    ulp_1 = 2.0 ** -7  # bf16's step at 1.0
    for col, (y0, d) in enumerate([(1.0, ulp_1 / 2), (1.0 + ulp_1, ulp_1 / 2),  # ties
                                   (-1.0, -ulp_1 / 2), (3.3895e38, 2.0 ** 119),  # to inf
                                   (float("nan"), 1.0), (float("inf"), -1.0),
                                   (float("-inf"), 5.0), (0.0, -0.0)]):
        for c in (col, 32 + col % 5):  # in the vectors and in the tail
            y[:, c], delta[c] = y0, d
    case.packed.write(0, a, (delta / case.scales[0])[:, None])  # B: [out, rank 1]
    x = torch.zeros(3, 21, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    got = sgmv_cpu.sgmv_cpu(y.clone(), x, case.packed, sgmv_cpu.SegmentTable(case.segments))
    want = (y[:2].float() + delta).bfloat16()
    assert (want[0, 3] == float("inf")) and want[0, 0] == 1.0 and want[0, 1] == 1.0 + 2 * ulp_1
    assert torch.equal(got[:2].isnan(), want.isnan())
    assert torch.equal(got[:2].nan_to_num(), want.nan_to_num())
    assert torch.equal(got[2].view(torch.int16), y[2].view(torch.int16))


def test_fp16_rows_take_the_delta_in_fp32_and_one_rounding():
    """An fp16 model: the delta computed in fp32 from widened rows, added to the widened y and
    rounded once, as PEFT computes with its adapters in fp32; 3-D [1, T, width] rows too."""
    case = Case(token_slots("zipf", 21, random.Random(8)), [8, 16, 32, 64, 4, 0], 96, 160)
    table = sgmv_cpu.SegmentTable(case.segments)
    x, y = case.x.half()[None], case.y.half()[None]  # [1, T, in], [1, T, out]
    got = sgmv_cpu.sgmv_cpu(y.clone(), x, case.packed, table)
    want = sgmv_cpu.sgmv_cpu(y.float(), x.float(), case.packed, table).half()
    assert got.dtype == torch.float16 and got.shape == y.shape
    assert torch.equal(got, want)


def test_slot_arena_hands_out_zeroed_cache_line_aligned_regions_and_refuses_past_its_size():
    sizes = [(100, torch.float32), (7, torch.bfloat16), (33, torch.float32)]
    arena = sgmv_cpu.SlotArena(sgmv_cpu.SlotArena.size(sizes))
    regions = [arena.take(n, dtype) for n, dtype in sizes]
    for (n, dtype), region in zip(sizes, regions):
        assert region.dtype == dtype and region.numel() == n and region.data_ptr() % 64 == 0
        assert not region.any()
    ends = [(r.data_ptr(), r.data_ptr() + r.numel() * r.element_size()) for r in regions]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ends, ends[1:]))
    with pytest.raises(ValueError, match="arena full"):
        arena.take(1, torch.float32)


def _anon_huge_kb(address: int) -> int | None:
    """AnonHugePages of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return None


def test_the_engines_slots_share_one_arena_in_huge_pages_where_linux_gives_them():
    from loraplex.server.runner.lora_layers import LoRAModel
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(576, 576, bias=False)
            self.down_proj = nn.Linear(1536, 576, bias=False)

    model = nn.Sequential(*(Layer() for _ in range(4)))
    lora = LoRAModel(model, num_slots=8, max_rank=64, dtype=torch.float32,
                     device=torch.device("cpu"), backend="cpu-kernel")
    data = [slots.packed.data for slots in lora.modules.values()]
    starts = [d.data_ptr() for d in data]
    assert starts == sorted(starts)  # in the order a forward reads them
    assert all(d.untyped_storage().data_ptr() == data[0].untyped_storage().data_ptr()
               for d in data)
    mode = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (mode.exists() and ("[madvise]" in mode.read_text() or "[always]" in mode.read_text())):
        pytest.skip("this kernel gives no transparent huge pages on request")
    for d in data:
        d.fill_(1.0)  # fault the pages in
    assert _anon_huge_kb(starts[0]) > 0


# ---- the dense product for a base model's linear layers at steps of few rows -----------------

@pytest.mark.parametrize("in_features,out", [(1, 1), (7, 63), (64, 64), (130, 65), (576, 960),
                                             (1536, 576)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_product_against_fp64(in_features, out, bias, threads):
    """Every row count up to the engine's 16 and past it (tiles of 1-4 rows), widths off the
    64-column panel and the 16-float vector, with and without a bias, on one thread and two."""
    gen = torch.Generator().manual_seed(in_features * out)
    w = torch.randn(out, in_features, generator=gen)
    b = torch.randn(out, generator=gen) if bias else None
    weights = sgmv_cpu.DenseWeights(LIB, w, b)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 2, 3, 4, 5, 8, 15, 16, 17):
            x = torch.randn(1, rows, in_features, generator=gen)
            got = sgmv_cpu.dense_cpu(x, weights)
            want = torch.nn.functional.linear(x.double(), w.double(),
                                              None if b is None else b.double())
            assert got.shape == (1, rows, out) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_dense_weights_follow_a_repack_and_refuse_what_c_cannot_read():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(100, 40, generator=gen)
    weights = sgmv_cpu.DenseWeights(LIB, w, None)
    x = torch.randn(3, 40, generator=gen)
    w.add_(1.0)  # in place, as a merge changes a weight: the copy keeps the old one ...
    assert not torch.allclose(sgmv_cpu.dense_cpu(x, weights), x @ w.T, atol=1e-3)
    weights.pack(w)  # ... until packed again
    torch.testing.assert_close(sgmv_cpu.dense_cpu(x, weights), x @ w.T, atol=1e-4, rtol=1e-5)
    for bad in (x.to(torch.bfloat16), torch.randn(40, 3).T, torch.randn(3, 41)):
        with pytest.raises(ValueError, match="dense_cpu needs"):
            sgmv_cpu.dense_cpu(bad, weights)
    with pytest.raises(ValueError, match="fp32"):
        sgmv_cpu.DenseWeights(LIB, w.to(torch.bfloat16), None)


# ---- a projection's base and adapters in one call (decode steps) ---------------------------

@pytest.mark.parametrize("in_features,out", [(7, 63), (64, 64), (130, 65), (576, 960)])
@pytest.mark.parametrize("pattern", ["distinct", "zipf", "identical", "skewed"])
@pytest.mark.parametrize("threads", [1, 2, 3])  # 3: more than CI's cores
def test_fused_call_gives_the_two_calls_bits(in_features, out, pattern, threads):
    """`linear_lora_cpu` against `dense_cpu` then `sgmv_cpu`, bit for bit, and against fp64:
    batches of one token to the engine's 64, one segment to many, tokens without an adapter,
    ranks off the 4-rank block, NaN past every rank (never read). Its expands wait for the
    shrinks and base panels they read, with no barrier: with the waits taken out, 17 of these
    48 cases failed on a 2-core VM."""
    rng = random.Random(in_features * out + threads)
    gen = torch.Generator().manual_seed(in_features + out)
    w = torch.randn(out, in_features, generator=gen)
    dense = sgmv_cpu.DenseWeights(LIB, w, torch.randn(out, generator=gen))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 2, 3, 5, 17, 64):
            case = Case(token_slots(pattern, batch, rng), [1, 15, 17, 33, 64, 0], in_features,
                        out, seed=batch)
            x = case.x.unsqueeze(0)  # [1, T, in], as the model calls it
            got = sgmv_cpu.linear_lora_cpu(
                x, dense, case.packed, sgmv_cpu.SegmentTable(case.segments, 64, 64))
            two = sgmv_cpu.sgmv_cpu(sgmv_cpu.dense_cpu(x, dense), x, case.packed,
                                    sgmv_cpu.SegmentTable(case.segments))
            assert got.shape == (1, batch, out) and torch.equal(got, two)
            case.y = dense.bias.expand(batch, out) + case.x.double() @ w.double().T
            torch.testing.assert_close(got[0].double(), case.expected(), atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_either_prefetch_hint_builds_and_gives_the_same_bits(monkeypatch, tmp_path):
    """sgmv_cpu.c prefetches weights with the non-temporal hint on AMD's cores only (cpu_build
    defines LP_PREFETCH_NTA there): the other vendor's build compiles here too and computes the
    same bits, base and adapters, at one tile and at many tiles of a panel."""
    other_vendor = "GenuineIntel" if cpu_build.vendor() == "AuthenticAMD" else "AuthenticAMD"
    monkeypatch.setattr(cpu_build, "vendor", lambda: other_vendor)
    assert ("-DLP_PREFETCH_NTA" in cpu_build.flags()) == (other_vendor == "AuthenticAMD")
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    other = sgmv_cpu.load_source(sgmv_cpu.SOURCE)
    assert other is not None and other._name != LIB._name
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(960, 576, generator=gen), torch.randn(960, generator=gen)
    for batch in (1, 5, 17, 64):
        case = Case(token_slots("zipf", batch, rng), [1, 15, 17, 33, 64, 0], 576, 960,
                    seed=batch)
        packed = sgmv_cpu.PackedSlots(other, NUM_SLOTS, 64, 576, 960,
                                      torch.tensor(case.ranks, dtype=torch.int32),
                                      torch.tensor(case.scales))
        packed.data.copy_(case.packed.data)
        x = case.x.unsqueeze(0)  # [1, T, in]
        ours, theirs = (sgmv_cpu.linear_lora_cpu(x, sgmv_cpu.DenseWeights(lib, w, bias), slots,
                                                 sgmv_cpu.SegmentTable(case.segments, 64, 64))
                        for lib, slots in ((LIB, case.packed), (other, packed)))
        assert torch.equal(ours, theirs)
        assert torch.equal(case.run(), sgmv_cpu.sgmv_cpu(
            case.fresh_y(), case.x, packed, sgmv_cpu.SegmentTable(case.segments)))


def test_fused_call_declines_what_it_cannot_take():
    """None (the caller then makes the two calls) for a table without scratch or too many
    tokens for it, other dtypes, rows apart, other widths, and slots past the weights'."""
    case = Case([0, 1, 1, 2], [4, 8, 20, 0, 0, 0], 40, 24, rank_cap=20)
    dense = sgmv_cpu.DenseWeights(LIB, torch.randn(24, 40), None)
    table = sgmv_cpu.SegmentTable(case.segments, 20, 64)
    x = case.x.unsqueeze(0)
    assert sgmv_cpu.linear_lora_cpu(x, dense, case.packed, table) is not None
    for t in (sgmv_cpu.SegmentTable(case.segments), sgmv_cpu.SegmentTable(case.segments, 20, 3),
              sgmv_cpu.SegmentTable(case.segments, 16, 64)):  # scratch for rank 16 only
        assert sgmv_cpu.linear_lora_cpu(x, dense, case.packed, t) is None
    wide = torch.randn(1, 4, 41)[..., :40]
    for bad in (x.to(torch.bfloat16), wide, torch.randn(1, 4, 41), torch.randn(1, 5, 40)):
        assert sgmv_cpu.linear_lora_cpu(bad, dense, case.packed, table) is None
    other = sgmv_cpu.DenseWeights(LIB, torch.randn(25, 40), None)
    assert sgmv_cpu.linear_lora_cpu(x, other, case.packed, table) is None
    far = sgmv_cpu.SegmentTable(Segments.from_token_slots([0, 1, 1, NUM_SLOTS]), 16, 64)
    assert sgmv_cpu.linear_lora_cpu(x, dense, case.packed, far) is None


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_call_with_bf16_slots_gives_the_two_calls_bits(threads):
    """`--lora-dtype bfloat16` on an fp32 model: the slots in bf16, the base's copy in fp32,
    in one call, bit for bit as the two calls."""
    bf16 = sgmv_cpu.load(torch.bfloat16)
    assert bf16 is not None
    gen = torch.Generator().manual_seed(5)
    ranks, scales = [1, 15, 17, 33, 64, 0], [0.25 * (s + 1) for s in range(NUM_SLOTS)]
    dense = sgmv_cpu.DenseWeights(LIB, torch.randn(130, 96, generator=gen),
                                  torch.randn(130, generator=gen))
    slots = sgmv_cpu.PackedSlots(bf16, NUM_SLOTS, 64, 96, 130,
                                 torch.tensor(ranks, dtype=torch.int32), torch.tensor(scales))
    for s, r in enumerate(ranks):
        if r:
            slots.write(s, torch.randn(r, 96, generator=gen).bfloat16(),
                        torch.randn(130, r, generator=gen).bfloat16())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 3, 9, 64):
            segments = Segments.from_token_slots(sorted(random.Random(batch).choices(
                range(-1, NUM_SLOTS), k=batch)))
            x = torch.randn(1, batch, 96, generator=gen)
            got = sgmv_cpu.linear_lora_cpu(x, dense, slots,
                                           sgmv_cpu.SegmentTable(segments, 64, 64))
            two = sgmv_cpu.sgmv_cpu(sgmv_cpu.dense_cpu(x, dense), x, slots,
                                    sgmv_cpu.SegmentTable(segments))
            assert torch.equal(got, two)
    finally:
        torch.set_num_threads(before)


def test_lora_model_fuses_base_and_adapters_at_decode_steps_unless_told_not_to(monkeypatch,
                                                                            dense_rows_64):
    """A projection whose base is a PackedLinear with the C kernel's copy runs as one call at
    steps of few rows (with a merged adapter's correction pass as a second call), and as the
    two calls at longer steps or with `fuse` off: right, and the same bits either way."""
    from loraplex.adapters.peft_format import LoRAAdapter, LoRAWeights
    from loraplex.server.runner.cpu_gemm import PackedLinear
    from loraplex.server.runner.lora_layers import LoRAModel
    from torch import nn

    gen = torch.Generator().manual_seed(3)
    fused = []
    real = sgmv_cpu.linear_lora_cpu
    monkeypatch.setattr(sgmv_cpu, "linear_lora_cpu",
                        lambda *a: (lambda y: y if y is None else fused.append(1) or y)(real(*a)))
    plain = nn.Linear(40, 24)
    # slots 0 and 1 the adapters', 3 the shadow slot a merge's correction pass reads
    weights = {slot: LoRAWeights(torch.randn(r, 40, generator=gen),
                                 torch.randn(24, r, generator=gen), 0.5)
               for slot, r in ((0, 16), (1, 4), (3, 8))}
    models = {}
    for fuse in (True, False):
        model = nn.Module()
        model.layer = nn.Module()
        model.layer.q_proj = PackedLinear.of(plain, LIB)
        lora = LoRAModel(model, 3, 16, torch.float32, torch.device("cpu"), "cpu-kernel",
                         fuse=fuse, shadow=True)
        for slot, w in weights.items():
            lora.load(slot, LoRAAdapter(f"a{slot}", "unused", {}, {"layer.q_proj": w}))
        models[fuse] = model, lora
    for rows, correction in ((1, None), (5, None), (5, [3, 3, -1, -1, -1]),
                             (dense_rows_64 + 3, None)):
        token_slots = sorted((i + 1) % 3 - 1 for i in range(rows))
        x = torch.randn(1, rows, 40, generator=gen)
        with torch.no_grad():
            want = plain(x)[0]
        for t, s in enumerate(token_slots):
            passes = [s] + [correction[t]] if correction else [s]
            for w in (weights[p] for p in passes if p >= 0):
                want[t] += w.scale * (x[0, t] @ w.lora_a.T) @ w.lora_b.T
        got = {}
        for fuse, (model, lora) in models.items():
            lora.prepare(Segments.from_token_slots(token_slots),
                         None if correction is None else Segments.from_token_slots(correction))
            fused.clear()
            with torch.no_grad():
                got[fuse] = model.layer.q_proj(x)
            assert len(fused) == (fuse and rows <= dense_rows_64)
            torch.testing.assert_close(got[fuse][0], want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got[True], got[False])
