"""The Triton SGMV kernels against plain fp32 loops, over a grid of ranks, widths, batch sizes,
adapter popularity patterns and dtypes, plus the per-step metadata they read.

On a machine with CUDA the kernels run compiled; elsewhere in Triton's interpreter, which
`tests/conftest.py` selects for the whole session (TRITON_INTERPRET must be set before
Triton's first import, and the engine's CPU path never calls Triton).

Every case stores NaN in the slot padding of A and B (past each slot's rank), so a product
that takes in padding turns NaN, and fills the fp32 scratch h with +inf before the shrink: an
entry the shrink should write but does not, or writes where it should not, shows; so does an
expand that reads an entry never written. Whatever the contract leaves alone in y must stay
bit-identical.
"""

from __future__ import annotations

import random

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytest.importorskip("triton")
from loraplex.kernels.segments import Segments, SGMVMeta
from loraplex.kernels.sgmv import sgmv_ref, sgmv_triton
from loraplex.kernels.sgmv_expand import sgmv_expand, sgmv_expand_ref
from loraplex.kernels.sgmv_shrink import _shrink_kernel, sgmv_shrink, sgmv_shrink_ref

assert DEVICE.type == "cuda" or type(_shrink_kernel).__name__ == "InterpretedFunction", (
    "without CUDA these tests need TRITON_INTERPRET=1 before Triton's first import "
    "(tests/conftest.py sets it)")

NUM_SLOTS = 6
MAX_RANK = 64
# fp32 products and sums on both sides: only the summation order differs. fp16/bf16: the
# kernel rounds h to the weights' dtype before the expand (PEFT does too) and rounds y once;
# the reference keeps both in fp32. Values are O(1) by construction.
TOLERANCE = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
}
RANKS = {
    "r1": [1] * NUM_SLOTS,
    "r8": [8] * NUM_SLOTS,
    "r16": [16] * NUM_SLOTS,
    "r64": [64] * NUM_SLOTS,
    "mixed": [1, 4, 8, 16, 64, 0],  # slot 5's adapter does not target this projection
}


def token_slots(pattern: str, num_tokens: int, rng: random.Random) -> list[int]:
    """Each token's slot (-1: no adapter), grouped by slot as the model runner groups them."""
    if pattern == "distinct":  # as many adapters as the slots allow, in equal shares
        slots = [i % NUM_SLOTS for i in range(num_tokens)]
    elif pattern == "uniform":
        slots = [rng.randrange(-1, NUM_SLOTS) for _ in range(num_tokens)]
    elif pattern == "zipf":
        weights = [1 / (k + 1) for k in range(NUM_SLOTS + 1)]
        slots = rng.choices(range(-1, NUM_SLOTS), weights, k=num_tokens)
    elif pattern == "identical":
        slots = [2] * num_tokens
    elif pattern == "skewed":  # one hot adapter, a long tail, some base-only tokens
        slots = [0 if rng.random() < 0.8 else rng.randrange(-1, NUM_SLOTS)
                 for _ in range(num_tokens)]
    else:
        raise ValueError(pattern)
    return sorted(slots)


def run_case(slots: list[int], ranks: list[list[int]], widths: tuple[int, ...], in_features: int,
             dtype: torch.dtype, seed: int = 0, split_k: int | None = 1,
             segments: Segments | None = None) -> None:
    """Shrink then expand on fresh random inputs, checked against the fp32 loops."""
    gen = torch.Generator().manual_seed(seed)
    segments = segments or Segments.from_token_slots(slots)
    num_tokens, num_slices, out = len(slots), len(widths), sum(widths)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
    lora_a = torch.randn(num_slices, NUM_SLOTS, MAX_RANK, in_features, generator=gen)
    lora_a /= in_features ** 0.5
    lora_b = torch.randn(NUM_SLOTS, out, MAX_RANK, generator=gen) / 4
    col = 0
    for p, width in enumerate(widths):
        for s in range(NUM_SLOTS):
            lora_a[p, s, ranks[p][s]:] = float("nan")
            lora_b[s, col:col + width, ranks[p][s]:] = float("nan")
        col += width
    lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
    scales = (torch.rand(num_slices, NUM_SLOTS, generator=gen) * 1.75 + 0.25).tolist()
    y0 = torch.randn(num_tokens, out, generator=gen).to(dtype)

    meta = SGMVMeta.build(segments, NUM_SLOTS, DEVICE)
    ranks_dev = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    scales_dev = torch.tensor(scales, dtype=torch.float32, device=DEVICE)
    h = torch.full((num_tokens, num_slices * MAX_RANK), float("inf"), device=DEVICE)
    sgmv_shrink(h, x.to(DEVICE), lora_a.to(DEVICE), meta, ranks_dev, split_k=split_k)
    y = sgmv_expand(y0.clone().to(DEVICE), h, lora_b.to(DEVICE), meta, ranks_dev, scales_dev,
                    widths)
    h, y = h.cpu(), y.cpu()

    h_ref = sgmv_shrink_ref(x, lora_a, segments, ranks)
    y_ref = sgmv_expand_ref(y0.float(), h_ref, lora_b, segments, ranks, scales, widths)
    written = torch.zeros_like(h, dtype=torch.bool)
    touched = torch.zeros_like(y, dtype=torch.bool)
    for t, s in enumerate(slots):
        col = 0
        for p, width in enumerate(widths):
            r = ranks[p][s] if s >= 0 else 0
            written[t, p * MAX_RANK:p * MAX_RANK + r] = True
            touched[t, col:col + width] = r > 0
            col += width
    torch.testing.assert_close(h[written], h_ref[written], atol=1e-4, rtol=1e-4)
    if split_k == 1:  # otherwise the launcher zeroes h for the atomic adds
        assert (h[~written] == float("inf")).all(), "the shrink wrote outside the ranks"
    assert torch.equal(y[~touched], y0[~touched]), "entries without an adapter changed"
    torch.testing.assert_close(y.float(), y_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("batch", [1, 3, 7, 37])
@pytest.mark.parametrize("pattern", ["distinct", "uniform", "zipf", "identical", "skewed"])
def test_popularity_and_batch_size(pattern, batch):
    slots = token_slots(pattern, batch, random.Random(f"{pattern}{batch}"))
    run_case(slots, [RANKS["mixed"]], (129,), 33, torch.bfloat16, seed=batch)


@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_dtype_and_rank(dtype, rank):
    slots = token_slots("uniform", 9, random.Random(rank))
    run_case(slots, [RANKS[rank]], (40,), 64, dtype)


@pytest.mark.parametrize("in_features,out", [(16, 16), (33, 129), (129, 33), (200, 72)])
def test_hidden_sizes(in_features, out):
    slots = token_slots("zipf", 7, random.Random(in_features))
    run_case(slots, [RANKS["mixed"]], (out,), in_features, torch.float32)


@pytest.mark.parametrize("widths", [(48, 16, 16), (40, 40)], ids=["qkv_gqa", "gate_up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slices_of_unequal_width_and_rank(dtype, widths):
    """One launch for q/k/v (GQA: k and v narrower) or gate/up, each slice with its own rank
    per slot (PEFT's rank_pattern), including slices an adapter does not target."""
    per_slice = [[8, 64, 1, 16, 4, 0], [8, 0, 16, 16, 2, 64], [3, 16, 0, 1, 4, 8]]
    slots = token_slots("uniform", 11, random.Random(len(widths)))
    run_case(slots, per_slice[:len(widths)], widths, 48, dtype)


@pytest.mark.parametrize("split_k", [None, 1, 2, 3], ids=["heuristic", "1", "2", "3"])
def test_split_k(split_k):
    """The reduction over `in` split across programs that meet by atomic adds, by the
    launcher's choice (2 here) or forced."""
    slots = token_slots("skewed", 7, random.Random(split_k))
    run_case(slots, [RANKS["mixed"]], (24,), 300, torch.float32, split_k=split_k)


def test_segments_in_any_order_and_of_length_zero():
    """The kernels follow runs of tokens, not slots: a slot may own several runs, and a run
    may be empty."""
    slots = [1, 1, -1, 3, 3, 1, 4]
    segments = Segments((0, 2, 3, 3, 5, 6, 7), (1, -1, 2, 3, 1, 4))
    run_case(slots, [RANKS["mixed"]], (24,), 33, torch.float32, segments=segments)


def test_no_adapter_tokens_only():
    run_case([-1, -1, -1], [RANKS["r8"]], (24,), 33, torch.float16)


def test_empty_batch_launches_nothing():
    meta = SGMVMeta.build(Segments((0,), ()), NUM_SLOTS, DEVICE)
    ranks = torch.ones(1, NUM_SLOTS, dtype=torch.int32, device=DEVICE)
    x = torch.empty(0, 16, device=DEVICE)
    y = torch.empty(0, 8, device=DEVICE)
    lora_a = torch.zeros(1, NUM_SLOTS, 8, 16, device=DEVICE)
    lora_b = torch.zeros(NUM_SLOTS, 8, 8, device=DEVICE)
    out = sgmv_triton(y, x, lora_a, lora_b, meta, ranks, ranks.float())
    assert out is y and out.shape == (0, 8)


def test_one_launch_matches_the_engine_reference():
    """sgmv_triton, the engine's CUDA path, against sgmv_ref, its CPU path, on one
    projection: the same contract whichever device runs it."""
    gen = torch.Generator().manual_seed(0)
    slots = token_slots("zipf", 13, random.Random(0))
    segments = Segments.from_token_slots(slots)
    ranks, scales = RANKS["mixed"], [0.5, 1.0, 2.0, 0.25, 1.5, 3.0]
    x = torch.randn(len(slots), 33, generator=gen)
    lora_a = torch.randn(NUM_SLOTS, MAX_RANK, 33, generator=gen) / 6
    lora_b = torch.randn(NUM_SLOTS, 24, MAX_RANK, generator=gen) / 4
    y0 = torch.randn(len(slots), 24, generator=gen)
    expected = sgmv_ref(y0.clone(), x, lora_a, lora_b, segments, ranks, scales)
    got = sgmv_triton(y0.clone().to(DEVICE), x.to(DEVICE), lora_a[None].to(DEVICE), lora_b.to(DEVICE),
                      SGMVMeta.build(segments, NUM_SLOTS, DEVICE),
                      torch.tensor([ranks], dtype=torch.int32, device=DEVICE),
                      torch.tensor([scales], dtype=torch.float32, device=DEVICE))
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE[torch.float32])


# ---- per-step metadata -----------------------------------------------------------------------

@pytest.mark.parametrize("slots,capacity,rows", [
    ([], 0, [[], [], []]),
    ([], 2, [[0, 0], [0, 0], [-1, -1]]),
    ([-1], 1, [[0], [0], [-1]]),
    ([4], 1, [[0], [1], [4]]),
    ([-1, -1, 0, 0, 0, 3], 3, [[2, 5, 0], [3, 1, 0], [0, 3, -1]]),
    ([2, 2, -1, 5], 2, [[0, 3], [2, 1], [2, 5]]),
], ids=["empty", "empty_padded", "one_base_token", "one_adapter_token", "grouped", "runs"])
def test_meta_rows(slots, capacity, rows):
    meta = SGMVMeta.build(Segments.from_token_slots(slots), capacity, "cpu")
    assert meta.table.tolist() == rows
    assert meta.capacity == capacity and meta.num_tokens == len(slots)
    assert meta.seg_start.tolist() == rows[0] and meta.seg_len.tolist() == rows[1]
    assert meta.seg_slot.tolist() == rows[2]


def test_meta_refuses_more_segments_than_capacity():
    with pytest.raises(AssertionError, match="exceed the capacity"):
        SGMVMeta.rows(Segments.from_token_slots([1, 2, 1]), 2)


@pytest.mark.parametrize("slots,starts,seg_slots", [
    ([], (0,), ()),
    ([7], (0, 1), (7,)),
    ([-1, -1], (0, 2), (-1,)),
    ([3, 3, -1, 5, 5], (0, 2, 3, 5), (3, -1, 5)),
])
def test_segments_from_token_slots(slots, starts, seg_slots):
    segments = Segments.from_token_slots(slots)
    assert (segments.starts, segments.slots) == (starts, seg_slots)
    assert segments.num_tokens == len(slots)
