"""Triton chunk-table kernels (dynamic chunking, issue 10) against the table references, called directly:
chunk_mean_table_fwd/bwd (ops/chunk_mean/triton_table.py), chunk_route_table_fwd/bwd (ops/chunk_route/
triton_table.py). On CPU they run under TRITON_INTERPRET=1 (fp32/fp16: the interpreter cannot do bf16
arithmetic); on a GPU the same tests add bf16.

The interpreter runs one (piece, head) program at a time (~10-50 ms each here), so the shapes are small and the
piece length SPLIT is lowered per test: most chunks then span several pieces, whose shares are combined by
atomic adds (a chunk of <= SPLIT tokens is one program, as with the default SPLIT = 1024)."""
from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

from chunk_tables import TABLE_CASES, TABLE_IDS, make_table
from routing_kernels._triton.layout import chunk_work
from routing_kernels.ops.chunk_mean import triton_table as cm_table
from routing_kernels.ops.chunk_mean.reference import chunk_mean_table_backward_ref, chunk_mean_table_ref
from routing_kernels.ops.chunk_mean.triton import chunk_mean_bwd, chunk_mean_fwd
from routing_kernels.ops.chunk_route.reference import chunk_route_table_backward_ref, chunk_route_table_ref
from routing_kernels.ops.chunk_route.triton import chunk_route_bwd, chunk_route_fwd
from routing_kernels.ops.chunk_route.triton_table import chunk_route_table_bwd, chunk_route_table_fwd
from tolerance import assert_close_scaled

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poison")]  # every output from torch.empty is NaN
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
CASES = dict((c[0], c) for c in TABLE_CASES)
# Pieces of 4 tokens split every chunk longer than 4 (uniform4 is one piece per chunk, random/whole get 2-4);
# the 1000x-skewed case uses 256, still 4 pieces for its 1000-token chunk (250 x 3 heads programs would take
# minutes in the interpreter).
SPLITS = {"skewed_1000x": 256}


@pytest.fixture
def split(monkeypatch):
    def set_split(value):
        monkeypatch.setattr(cm_table, "SPLIT", value)
    return set_split


def _table(case_id, heads, dim, dtype=torch.float32, seed=0):
    _, lengths, rule = CASES[case_id]
    x, _, cu_chunks, seq_chunks, max_chunks = make_table(lengths, rule, heads, dim, dtype, seed, DEVICE)
    return x, (cu_chunks, seq_chunks, max_chunks)


def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE, dtype)


def check_mean(x, table, dtype, grad=None):
    got = cm_table.chunk_mean_table_fwd(x, *table)
    assert_close_scaled(got, chunk_mean_table_ref(x, *table), dtype, name="mean")
    grad = _randn(got.shape, dtype, 5) if grad is None else grad
    dx = cm_table.chunk_mean_table_bwd(grad, x, *table)
    assert dx.is_contiguous() and dx.shape == x.shape
    assert_close_scaled(dx, chunk_mean_table_backward_ref(grad, x, *table), dtype, name="mean dx")


def check_route(x, query, table, dtype, scale=0.7, cotangents=None):
    got = chunk_route_table_fwd(x, query, *table, scale)
    ref = chunk_route_table_ref(x, query, *table, scale)
    assert got[1].dtype == torch.float32 and got[0].shape == x.shape
    assert_close_scaled(got, ref, dtype, name="route")
    if cotangents is None:
        cotangents = [_randn(t.shape, t.dtype, 6 + i) for i, t in enumerate(ref)]
    want = chunk_route_table_backward_ref(*cotangents, x, query, ref[1], *table, scale)
    dx, dq = chunk_route_table_bwd(*cotangents, x, query, ref[1], *table, scale)  # the same weights as the ref
    assert dx.is_contiguous() and dq.shape == query.shape and dq.dtype == query.dtype
    assert_close_scaled((dx, dq), want, dtype, name="route dx, dquery")


@pytest.mark.parametrize("case_id", TABLE_IDS)
def test_table_cases(case_id, split):
    """Every case of the grid, fp32, H = 3, D = 5, per-sequence query: chunk_mean and chunk_route fwd + bwd."""
    split(SPLITS.get(case_id, 4))
    x, table = _table(case_id, 3, 5)
    check_mean(x, table, torch.float32)
    check_route(x, _randn((table[1].numel() - 1, 3, 5), torch.float32, 1), table, torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case_id", ["random_mean3", "whole_seq", "empty_ends"])
def test_low_precision_shared_query(case_id, dtype, split):
    """fp16 (bf16 on a GPU) with a shared (H, D) query: dquery sums over the sequences."""
    split(3)
    x, table = _table(case_id, 2, 7, dtype)
    check_mean(x, table, dtype)
    check_route(x, _randn((2, 7), dtype, 2), table, dtype, scale=0.4)


@pytest.mark.parametrize("dim", [64, 128], ids=lambda d: f"D{d}")
def test_head_dims(dim, split):
    split(8)
    x, table = _table("random_mean3", 1, dim)
    check_route(x, _randn((3, 1, dim), torch.float32, 3), table, torch.float32, scale=dim ** -0.5)


def test_strided_inputs_and_expanded_grads(split):
    """x strided three ways: x[:, :, ::2] (copied: the kernels need a unit last stride), a slice of a wider head
    dim and a (H, T, D) tensor transposed to (T, H, D) (both passed by strides); query x[..., ::2]; the gradients
    stride-0 expanded, as a .sum() backward gives them."""
    split(3)
    wide, table = _table("uniform4_empty_mid", 2, 10)
    t, s = wide.shape[0], table[1].numel() - 1
    heads_first = _randn((2, t, 5), torch.float32, 14)
    for x in (wide[:, :, ::2], wide.view(t, 2, 2, 5)[:, :, 1], heads_first.transpose(0, 1)):
        assert not x.is_contiguous() and x.shape == (t, 2, 5)
        g = torch.randn(1, 1, 1, 5, device=DEVICE).expand(s, table[2], 2, 5)
        check_mean(x, table, torch.float32, grad=g)
        query = _randn((s, 2, 10), torch.float32, 4)[:, :, ::2]
        cot = (torch.ones(1, 1, 1, device=DEVICE).expand(*x.shape),  # y.sum()
               torch.ones(1, 1, 1, device=DEVICE).expand(s, x.shape[1], table[2]),
               _randn((x.shape[1], 5), torch.float32, 8).expand(s, x.shape[1], 5))
        check_route(x, query, table, torch.float32, cotangents=cot)


@pytest.mark.parametrize("pieces", [False, True], ids=["one_piece", "pieces_of_3"])
def test_uniform_table_matches_integer_path(pieces, split):
    """A uniform table (chunks of 4, the last of each sequence shorter) is the integer chunk_size = 4 path: the
    same numbers, bit for bit while a chunk is one piece (one program sums it in the integer path's order); to
    fp32 rounding when pieces of 3 + 1 tokens combine by atomic adds."""
    split(3 if pieces else 1024)
    x, cu_seqlens, cu_chunks, seq_chunks, max_chunks = make_table([7, 0, 16, 3], ("size", 4), 2, 6, device=DEVICE)
    table = (cu_chunks, seq_chunks, max_chunks)
    query = _randn((4, 2, 6), torch.float32, 9)
    exact = dict(rtol=0, atol=0) if not pieces else dict(rtol=1e-6, atol=1e-6)
    ints = dict(cu_seqlens=cu_seqlens, max_seqlen=16)
    torch.testing.assert_close(cm_table.chunk_mean_table_fwd(x, *table), chunk_mean_fwd(x, 4, **ints)[0], **exact)
    grad = _randn((4, max_chunks, 2, 6), torch.float32, 10)
    torch.testing.assert_close(cm_table.chunk_mean_table_bwd(grad, x, *table),
                               chunk_mean_bwd(grad, x, 4, **ints), **exact)
    got = chunk_route_table_fwd(x, query, *table, 0.5)
    want = chunk_route_fwd(x, query, 4, cu_seqlens, 16, 0.5)
    torch.testing.assert_close(got, want, **exact)
    cot = [_randn(t.shape, t.dtype, 11 + i) for i, t in enumerate(want)]
    torch.testing.assert_close(chunk_route_table_bwd(*cot, x, query, want[1], *table, 0.5),
                               chunk_route_bwd(*cot, x, query, want[1], 4, cu_seqlens, 16, 0.5), **exact)


@triton.jit
def _pieces_kernel(cu_chunks, seq_chunks, out, split, num_chunks, num_seqs, num_tokens):
    """Writes what chunk_work gives each program of a table grid (one head): 6 int64 per program."""
    i_s, i_c, _, tok0, tokens, count, is_first = chunk_work(cu_chunks, split, 1, 1, seq_chunks, num_chunks, num_seqs,
                                                            num_tokens, IS_TABLE=True)
    p_out = out + tl.program_id(0).to(tl.int64) * 6
    tl.store(p_out, i_s)
    tl.store(p_out + 1, i_c)
    tl.store(p_out + 2, tok0)
    tl.store(p_out + 3, tokens)
    tl.store(p_out + 4, count)
    tl.store(p_out + 5, is_first.to(tl.int64))


def _skewed_table(sizes_pool, seed=0):
    """Three sequences: short chunks and chunks up to 1000x longer drawn from sizes_pool, an empty one between."""
    rng = random.Random(seed)
    sizes = [[rng.choice(sizes_pool) for _ in range(8)], [], [1] * 3 + [max(sizes_pool)]]
    bounds, firsts = [0], [0]
    for seq in sizes:
        for n in seq:
            bounds.append(bounds[-1] + n)
        firsts.append(len(bounds) - 1)
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return as_i32(bounds), as_i32(firsts)


@pytest.mark.parametrize("pool, split_len", [([1, 2, 3, 30, 100], 1), ([1, 2, 3, 30, 100], 3),
                                             ([1, 2, 1000, 3000], 256), ([1, 2, 1000, 3000], 1024)],
                         ids=["100x_split1", "100x_split3", "3000x_split256", "3000x_split1024"])
def test_pieces_cover_each_token_once(pool, split_len):
    """The table grid's pieces (layout.py chunk_work): every token in exactly one piece, none longer than
    `split` (so the 1000x-3000x longer chunks spread over many programs), K + ceil(T / split) programs from
    shapes, each piece labelled with its chunk's sequence, local index and length, one first piece per chunk."""
    cu_chunks, seq_chunks = _skewed_table(pool)
    t, k, s = int(cu_chunks[-1]), cu_chunks.numel() - 1, seq_chunks.numel() - 1
    num = k + triton.cdiv(t, split_len)
    out = torch.full((num, 6), -1, dtype=torch.int64, device=DEVICE)
    _pieces_kernel[(num,)](cu_chunks, seq_chunks, out, split_len, k, s, t)
    i_s, i_c, tok0, tokens, count, first = out.cpu().unbind(1)
    assert bool((tokens >= 0).all() and (tokens <= split_len).all())
    covered = torch.zeros(t, dtype=torch.int64)
    for a, n in zip(tok0.tolist(), tokens.tolist()):
        covered[a:a + n] += 1
    assert bool((covered == 1).all())
    real = tokens > 0
    cu, sc = cu_chunks.cpu().long(), seq_chunks.cpu().long()
    g = torch.searchsorted(cu, tok0[real], right=True) - 1  # the chunk of each piece's first token
    assert torch.equal(sc[i_s[real]] + i_c[real], g) and torch.equal(count[real], cu[g + 1] - cu[g])
    assert bool((i_c[real] < sc[i_s[real] + 1] - sc[i_s[real]]).all())
    assert torch.equal(torch.sort(g[first[real] == 1]).values, torch.arange(k))  # one first piece per chunk
    longest = int((cu[1:] - cu[:-1]).max())
    assert int((g == int(torch.argmax(cu[1:] - cu[:-1]))).sum()) == triton.cdiv(longest, split_len)


def test_skewed_chunks_through_the_kernels(split):
    """Chunks of 1 and 512 tokens in one batch, the long ones cut into 8 pieces of 64 (the full 1000x case would
    take ~1000 programs per kernel in the interpreter; test_pieces_cover_each_token_once covers that geometry)."""
    split(64)
    sizes = [[1, 512, 1, 1], [2, 1, 512]]
    bounds, firsts = [0], [0]
    for seq in sizes:
        for n in seq:
            bounds.append(bounds[-1] + n)
        firsts.append(len(bounds) - 1)
    table = (torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
             torch.tensor(firsts, dtype=torch.int32, device=DEVICE), 4)
    x = _randn((bounds[-1], 1, 3), torch.float32, 12)
    check_route(x, _randn((2, 1, 3), torch.float32, 13), table, torch.float32)


@pytest.mark.gpu
def test_large_offsets_bf16():
    # 2^31 + 2^22 elements (4.3 GB in bf16): token offsets * H * D pass 2^31, so an int32 offset anywhere in the
    # table kernels reads or writes the wrong rows. Sequences of 1, 40000, 0 and ~1M tokens; the last one holds a
    # 1M-token chunk (~1000 pieces at SPLIT = 1024) beside single tokens, the second 40 chunks of 1000.
    x = torch.randn((2**31 + 2**22) // (16 * 128), 16, 128, device="cuda", dtype=torch.bfloat16)
    t = x.shape[0]
    bounds = [0, 1] + [1 + 1000 * k for k in range(1, 41)] + [40002, 40003, t]
    table = (torch.tensor(bounds, dtype=torch.int32, device="cuda"),
             torch.tensor([0, 1, 41, 41, 44], dtype=torch.int32, device="cuda"), 40)
    query = torch.randn(4, 16, 128, device="cuda", dtype=torch.bfloat16)
    got = chunk_route_table_fwd(x, query, *table, 0.1)
    ref = chunk_route_table_ref(x, query, *table, 0.1)
    assert_close_scaled(got, ref, torch.bfloat16, name="route")
    del got
    cot = (x, torch.randn_like(ref[1]), torch.randn_like(ref[2]))  # dy = x: one more 4 GB tensor saved
    want = chunk_route_table_backward_ref(*cot, x, query, ref[1], *table, 0.1)
    assert_close_scaled(chunk_route_table_bwd(*cot, x, query, ref[1], *table, 0.1), want, torch.bfloat16,
                        name="route dx, dquery")
