"""The paged decode kernels, Triton (in the interpreter off the GPU) and C (the CPU), against
the torch path they replace, over GQA groups, head sizes, block sizes, context lengths,
windows and dtypes.

Cache positions that no sequence may read (other sequences' blocks, slots past a context's
end, positions before a window) hold NaN in the kernel's copy of the cache: a read of any of
them would turn its output NaN. The reference runs on the clean cache."""

from __future__ import annotations

import json
import random

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytest.importorskip("triton")
from loraplex.kernels.paged_attention import (  # noqa: E402
    load_cpu,
    paged_decode,
    paged_decode_cpu,
    paged_decode_ref,
    tables_fit,
)

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def case(heads: int, kv_heads: int, head_dim: int, block_size: int, lens: list[int],
         window: int | None, dtype: torch.dtype, seed: int = 0, splits: int | None = None,
         kernel: str = "triton"):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = len(lens) * max_blocks + 3
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, readable = [], torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for n in lens:
        own = [free.pop() for _ in range(-(-n // block_size))]
        tables.append(own + [0] * (max_blocks - len(own)))  # padded with block 0, as the runner does
        first = max(n - window, 0) if window else 0
        for p in range(first, n):
            readable[own[p // block_size], p % block_size] = True
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[~readable] = float("nan")
    v_poisoned[~readable] = float("nan")
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    to = dict(device=DEVICE)
    bt = torch.tensor(tables, dtype=torch.long, **to)
    cl = torch.tensor(lens, dtype=torch.long, **to)
    scale = head_dim ** -0.5
    want = paged_decode_ref(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), bt, cl, scale, window)
    if kernel == "cpu":
        got = paged_decode_cpu(q, k_poisoned, v_poisoned, bt.cpu(), cl.cpu(), scale, window)
        want = want.cpu()
    else:
        got = paged_decode(q.to(DEVICE), k_poisoned.to(DEVICE), v_poisoned.to(DEVICE), bt, cl,
                           scale, window, splits)
    assert got.dtype == dtype and got.shape == q.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (6, 2)],
                         ids=["mha", "gqa2", "gqa4", "gqa3"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_gqa_groups_and_block_sizes(heads, kv_heads, block_size):
    case(heads, kv_heads, 16, block_size, [1, 5, 16, 17, 40], None, torch.float32)


@pytest.mark.parametrize("head_dim", [8, 80])
def test_head_dims(head_dim):
    case(4, 2, head_dim, 4, [3, 9, 12], None, torch.float32)


@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_sliding_window(window):
    case(4, 2, 16, 4, [1, 4, 7, 13, 30], window, torch.float32)


@pytest.mark.parametrize("splits,window", [(2, None), (3, 6), (8, None), (8, 6)])
def test_pages_split_over_programs_and_merged(splits, window):
    """Each sequence's pages shared among `splits` programs, then merged; with 8 splits most
    sequences have fewer pages than splits (empty shares must weigh nothing)."""
    case(4, 2, 16, 4, [1, 3, 8, 9, 30], window, torch.float32, splits=splits)


def test_bf16_cache():
    case(4, 2, 16, 8, [2, 11, 33], None, torch.bfloat16)


def test_split_count_grows_as_the_grid_shrinks():
    from loraplex.kernels.paged_attention import MAX_SPLITS, num_splits

    assert num_splits(1, 8) == MAX_SPLITS and num_splits(256, 8) == 1
    assert [num_splits(b, 8) for b in (1, 2, 4, 8, 16, 32)] == [16, 16, 8, 4, 2, 1]


def test_empty_batch():
    q = torch.zeros(0, 4, 16, device=DEVICE)
    cache = torch.zeros(2, 4, 2, 16, device=DEVICE)
    table = torch.zeros(0, 1, dtype=torch.long, device=DEVICE)
    assert paged_decode(q, cache, cache, table, table[:, 0], 0.25).shape == (0, 4, 16)


# ---- the C kernel (CPU) --------------------------------------------------------------------

needs_c = pytest.mark.skipif(load_cpu() is None, reason="no C compiler")


@needs_c
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3), (16, 1)],
                         ids=["mha", "gqa2", "gqa3", "gqa16"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_cpu_gqa_groups_and_block_sizes(heads, kv_heads, block_size):
    case(heads, kv_heads, 16, block_size, [1, 5, 16, 17, 40], None, torch.float32,
         kernel="cpu")


@needs_c
@pytest.mark.parametrize("head_dim", [16, 64, 80, 256])
def test_cpu_head_dims(head_dim):
    case(4, 2, head_dim, 4, [3, 9, 12], None, torch.float32, kernel="cpu")


@needs_c
@pytest.mark.parametrize("window", [1, 3, 4, 8, 100])
def test_cpu_sliding_window(window):
    case(4, 2, 16, 4, [1, 4, 7, 13, 30], window, torch.float32, kernel="cpu")


@needs_c
@pytest.mark.parametrize("window", [None, 5])
def test_cpu_bf16_cache(window):
    case(9, 3, 64, 16, [2, 11, 33, 200], window, torch.bfloat16, kernel="cpu")


@needs_c
def test_cpu_long_contexts_and_many_sequences():
    case(9, 3, 64, 16, [random.Random(1).randrange(1, 700) for _ in range(33)], None,
         torch.float32, kernel="cpu")


@needs_c
def test_cpu_refuses_what_its_arrays_do_not_hold():
    q = torch.zeros(2, 4, 8)  # head_dim 8: not a multiple of 16
    cache = torch.zeros(3, 4, 2, 8)
    table = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="paged_decode_cpu"):
        paged_decode_cpu(q, cache, cache, table, table[:, 0] + 1, 0.25)
    q, cache = torch.zeros(2, 4, 16), torch.zeros(3, 4, 2, 16)
    with pytest.raises(ValueError, match="paged_decode_cpu"):  # a block past the cache
        paged_decode_cpu(q, cache, cache, table + 3, table[:, 0] + 1, 0.25)
    with pytest.raises(ValueError, match="paged_decode_cpu"):  # a context past its table
        paged_decode_cpu(q, cache, cache, table, table[:, 0] + 5, 0.25)
    assert paged_decode_cpu(q[:0], cache, cache, table[:0], table[:0, 0], 0.25).shape == (0, 4, 16)
    # A step's metadata checks its tables once for every layer, with the same verdicts.
    lens = table[:, 0] + 1
    assert tables_fit(table, lens, 3, 4) and tables_fit(table[:0], lens[:0], 3, 4)
    assert not tables_fit(table + 3, lens, 3, 4) and not tables_fit(table, lens + 4, 3, 4)
    assert not tables_fit(table - 1, lens, 3, 4) and not tables_fit(table, lens[:1], 3, 4)


@needs_c
def test_cpu_benchmark_runs_and_checks_the_kernel_against_torch(tmp_path, capsys):
    from loraplex.kernels import bench_paged_attention

    bench_paged_attention.main(["--cpu", "--batches", "1,3", "--contexts", "5,40", "--repeats",
                                "1", "--out", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["c_s"] > 0 and r["torch_s"] > 0 for r in rows)
    assert "| torch.bfloat16 | 3 | 40 |" in capsys.readouterr().out
