"""The shared Triton layout helpers (routing_kernels/_triton/layout.py) and what every launcher owes its
callers on its own: a non-contiguous cu_seqlens, and program enumerations / table sizes that bound the real
ones from shapes alone (no host sync)."""
from __future__ import annotations

import random

import pytest
import torch

from routing_kernels._triton.layout import as_packed, seq_blocks
from routing_kernels.ops.chunk_mean import triton as cm_triton
from routing_kernels.ops.chunk_route import triton as cr_triton
from routing_kernels.ops.route_chunks import triton as rc_triton
from routing_kernels.ops.routed_attention import triton as ra_triton

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LENGTH_CASES = [[0], [5], [0, 0, 3], [16, 17, 0, 1], [150, 0, 3, 0, 1, 17, 0], [64, 64, 64]]


@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("lengths", LENGTH_CASES, ids=str)
def test_seq_blocks_enumerates_the_real_blocks(lengths, block):
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    first, seq_of, num = seq_blocks(cu, sum(lengths), max(lengths), block)
    pairs = [(s, b) for s, n in enumerate(lengths) for b in range(-(-n // block))]
    assert len(pairs) <= num <= (sum(lengths) + len(lengths) * (block - 1)) // block
    assert num <= len(lengths) * -(-max(lengths) // block)
    assert seq_of.shape == (num,) and seq_of.dtype == torch.int32
    assert [(int(seq_of[g]), g - int(first[seq_of[g]])) for g in range(len(pairs))] == pairs
    for g in range(len(pairs), num):  # padding programs: a block past the end of the last sequence
        s = int(seq_of[g])
        assert s == len(lengths) - 1 and (g - int(first[s])) * block >= lengths[s]


def test_flag_table_size_bounds_the_table():
    rng = random.Random(0)
    cases = [[131072], [65536] + [100] * 100, [1] * 7, [0, 0], [17, 0, 33]]
    cases += [[rng.choice([0, 1, rng.randrange(1, 3000)]) for _ in range(rng.randrange(1, 9))] for _ in range(200)]
    for lengths in cases:
        for cs in (1, 3, 16, 64, 1024):
            real = sum(-(-n // cs) * -(-n // ra_triton.BLOCK_M) for n in lengths)
            bound = ra_triton.flag_table_size(sum(lengths), len(lengths), max(lengths), 1, cs)
            assert real <= bound, (lengths, cs)
    real = 128 * 8192  # one 128K sequence, chunk 1024: the bound is within 1%
    assert ra_triton.flag_table_size(131072, 1, 131072, 1, 1024) < 1.01 * real


def test_as_packed_makes_cu_seqlens_contiguous():
    cu = torch.tensor([0, 0, 5, 5, 10, 10], dtype=torch.int32)[::2]
    _, got, _ = as_packed(torch.zeros(10, 1, 4), cu, 5)
    assert got.is_contiguous() and got.tolist() == [0, 5, 10]


def _strided(cu):
    """The same values as cu, every other element of a buffer whose other elements are wrong on purpose."""
    buf = torch.full((2 * cu.numel(),), 7, dtype=cu.dtype, device=cu.device)
    buf[::2] = cu
    return buf[::2]


@pytest.mark.usefixtures("poison")
def test_every_launcher_honours_a_strided_cu_seqlens():
    # a strided cu_seqlens read as if contiguous would give lengths 7-0, 13-7, ... : every output would differ
    g = torch.Generator().manual_seed(0)
    lengths = [13, 0, 9]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    cus = _strided(cu)
    assert not cus.is_contiguous() and torch.equal(cus, cu)
    t, ms = sum(lengths), max(lengths)
    x = torch.randn(t, 2, 8, generator=g).to(DEVICE)
    query = torch.randn(3, 2, 8, generator=g).to(DEVICE)
    q, k, v = (torch.randn(t, h, 16, generator=g).to(DEVICE) for h in (4, 2, 2))

    def run(c):
        out = []
        means, _ = cm_triton.chunk_mean_fwd(x, 4, c, ms)
        out += [means, cm_triton.chunk_mean_bwd(torch.ones_like(means), x, 4, c, ms)]
        y, w, s = cr_triton.chunk_route_fwd(x, query, 4, c, ms, 0.5)
        out += [y, w, s, *cr_triton.chunk_route_bwd(y, w, s, x, query, w, 4, c, ms, 0.5)]
        out.append(rc_triton.route_chunks_triton(q, k, 4, 2, True, c, ms))
        o, lse = ra_triton.routed_attention_fwd_triton(q, k, v, 4, 2, True, c, ms)
        out += [o, lse, *ra_triton.routed_attention_bwd_triton(o, lse, q, k, v, o, lse, 4, 2, True, c, ms)]
        return out

    want, got = run(cu), run(cus)
    assert len(want) == 13
    for i, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True, rtol=0,
                                                                             atol=0)), i
