"""C++ CPU chunk-table kernels (chunk_mean_table_fwd/bwd, chunk_route_table_fwd/bwd), called through torch.ops,
against the eager table references: the case grid of chunk_tables.py in every dtype, odd and wide heads, strided
and expanded inputs, NaN-poisoned outputs, uniform tables against the integer-chunk kernels (bit for bit), chunks
long enough to be split across threads (1000x skew), thread-count independence and bad input."""
from __future__ import annotations

import pytest
import torch

from chunk_tables import TABLE_CASES, TABLE_IDS, make_table
from routing_kernels._ext import has_kernel
from routing_kernels.ops.chunk_mean.reference import chunk_mean_table_backward_ref, chunk_mean_table_ref
from routing_kernels.ops.chunk_route.reference import chunk_route_table_backward_ref, chunk_route_table_ref
from tolerance import assert_close_scaled

pytestmark = pytest.mark.skipif(not has_kernel("chunk_route_table_fwd", "cpu"),
                                reason="routing_kernels._C not built")

ops = torch.ops.routing_kernels
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SCALE = 0.7

# Cases beyond chunk_tables.py whose chunks are longer than the kernels' split size (chunk_geometry.h:
# 4 * 32768 / (H * D) tokens, 256 at H * D = 512): those chunks are cut into pieces summed by different threads.
LONG_CASES = [
    ("skewed_split", [1003, 4, 0, 300], ("skewed",), 8, 64),    # a 1000-token chunk in 4 pieces among 1-token ones
    ("whole_split", [1100, 0, 300], ("whole",), 4, 128),         # whole sequences of 5 and 2 pieces
    ("random_wide", [400, 700], ("random", 200), 8, 128),       # sizes in [1, 400], split size 128
]


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _query(shared, num_seqs, heads, dim, dtype):
    return _randn((heads, dim) if shared else (num_seqs, heads, dim), dtype, 3)


def _close(got, want, dtype, name, truth=None):
    """got against the same-dtype reference `want`; with `truth` (the reference on float64 copies of the inputs),
    against the error budget instead: within 2x the reference's own error (plus one rounding of the output's
    magnitude). Sums over chunks long enough to be split are added in another order than the reference's, and
    dquery cancels (the softmax gradient sums to 0), so elementwise closeness to another fp32 rounding is not
    the right question there; closeness to the truth is."""
    if truth is None:
        assert_close_scaled(got, want, dtype, name=name)
        return
    eps = torch.finfo(dtype).eps
    for i, (a, b, t) in enumerate(zip(got, want, truth)):
        err, ref_err = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        floor = eps * t.abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}[{i}]: error {err:.3g} vs the reference's {ref_err:.3g}"


def _check_all(x, query, cu_chunks, seq_chunks, m, dtype, budget=False):
    """The four ops against the references; returns the kernels' outputs. budget: compare as _close does with
    `truth` (the references also run in float64)."""
    s, h, d = seq_chunks.numel() - 1, x.shape[1], x.shape[2]
    f64 = lambda *ts: [t.double() for t in ts] if budget else None  # noqa: E731
    mean = ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, m)
    assert mean.shape == (s, m, h, d) and mean.dtype == x.dtype
    truth = budget and [chunk_mean_table_ref(x.double(), cu_chunks, seq_chunks, m)]
    _close([mean], [chunk_mean_table_ref(x, cu_chunks, seq_chunks, m)], dtype, "mean", truth or None)

    grad_mean = _randn((s, m, h, d), x.dtype, 4)
    dx_mean = ops.chunk_mean_table_bwd(grad_mean, x, cu_chunks, seq_chunks, m)
    assert dx_mean.shape == x.shape and dx_mean.is_contiguous()
    # One division in the accumulation type, rounded once, as the reference does: equal bit for bit.
    assert torch.equal(dx_mean, chunk_mean_table_backward_ref(grad_mean, x, cu_chunks, seq_chunks, m))

    y, w, summary = ops.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, m, SCALE)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and w.shape == (s, h, m)
    want = chunk_route_table_ref(x, query, cu_chunks, seq_chunks, m, SCALE)
    truth = budget and chunk_route_table_ref(*f64(x, query), cu_chunks, seq_chunks, m, SCALE)
    _close((y, w, summary), want, dtype, "route fwd", truth or None)

    dy, dw, dsum = _randn(x.shape, x.dtype, 5), _randn(w.shape, w.dtype, 6), _randn(summary.shape, x.dtype, 7)
    dx, dq = ops.chunk_route_table_bwd(dy, dw, dsum, x, query, w, cu_chunks, seq_chunks, m, SCALE)
    assert dx.shape == x.shape and dq.shape == query.shape and dq.dtype == query.dtype
    want = chunk_route_table_backward_ref(dy, dw, dsum, x, query, w, cu_chunks, seq_chunks, m, SCALE)
    truth = budget and chunk_route_table_backward_ref(*f64(dy, dw, dsum, x, query, w), cu_chunks, seq_chunks, m,
                                                      SCALE)
    _close((dx, dq), want, dtype, "route bwd", truth or None)
    return mean, dx_mean, (y, w, summary), (dx, dq)


@pytest.mark.parametrize("shared", [True, False], ids=["query_shared", "query_per_seq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TABLE_CASES, ids=TABLE_IDS)
def test_table_grid(case, dtype, shared, poison):
    _, lengths, rule = case
    x, _, cu_chunks, seq_chunks, m = make_table(lengths, rule, heads=3, dim=5, dtype=dtype)
    _check_all(x, _query(shared, len(lengths), 3, 5, dtype), cu_chunks, seq_chunks, m, dtype)


@pytest.mark.parametrize("heads,dim", [(1, 1), (2, 64), (3, 128)], ids=["H1_D1", "H2_D64", "H3_D128"])
@pytest.mark.parametrize("case", [TABLE_CASES[1], TABLE_CASES[7]], ids=[TABLE_IDS[1], TABLE_IDS[7]])
def test_table_head_dims(case, heads, dim, poison):
    _, lengths, rule = case
    x, _, cu_chunks, seq_chunks, m = make_table(lengths, rule, heads=heads, dim=dim)
    _check_all(x, _query(False, len(lengths), heads, dim, x.dtype), cu_chunks, seq_chunks, m, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LONG_CASES, ids=[c[0] for c in LONG_CASES])
def test_table_split_chunks(case, dtype, poison):
    _, lengths, rule, heads, dim = case
    x, _, cu_chunks, seq_chunks, m = make_table(lengths, rule, heads=heads, dim=dim, dtype=dtype)
    sizes = cu_chunks.diff()
    assert sizes.max() > 4 * 32768 // (heads * dim)  # at least one chunk is split
    _check_all(x, _query(True, len(lengths), heads, dim, dtype), cu_chunks, seq_chunks, m, dtype,
               budget=dtype != torch.float64)


def test_table_same_numbers_on_one_thread(poison):
    # Pieces of split chunks are added in token order after the parallel pass, and every other sum runs over
    # one chunk in one thread: the thread count does not change a bit of any output.
    _, lengths, rule, heads, dim = LONG_CASES[0]
    x, _, cu_chunks, seq_chunks, m = make_table(lengths, rule, heads=heads, dim=dim)
    query = _query(False, len(lengths), heads, dim, x.dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _check_all(x, query, cu_chunks, seq_chunks, m, torch.float32, budget=True)
    finally:
        torch.set_num_threads(threads)
    many = _check_all(x, query, cu_chunks, seq_chunks, m, torch.float32, budget=True)
    for a, b in zip(torch.utils._pytree.tree_leaves(one), torch.utils._pytree.tree_leaves(many)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths,chunk,heads,dim", [
    ([300, 0, 129, 1000], 128, 8, 64),  # the benchmark's chunk and row (H * D = 512): no chunk split
    ([37, 5, 0, 64], 7, 3, 5),          # ragged last chunks, an empty sequence
], ids=["cs128_H8_D64", "cs7_H3_D5"])
def test_uniform_table_matches_integer_kernels_bit_for_bit(lengths, chunk, heads, dim, dtype, poison):
    x, cu, cu_chunks, seq_chunks, m = make_table(lengths, ("size", chunk), heads=heads, dim=dim, dtype=dtype)
    ms = max(lengths)
    query = _query(True, len(lengths), heads, dim, dtype)
    assert torch.equal(ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, m), ops.chunk_mean_fwd(x, chunk, cu, ms))
    g = _randn((len(lengths), m, heads, dim), dtype, 4)
    assert torch.equal(ops.chunk_mean_table_bwd(g, x, cu_chunks, seq_chunks, m),
                       ops.chunk_mean_bwd(g, x, chunk, cu, ms))
    fwd = ops.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, m, SCALE)
    for a, b in zip(fwd, ops.chunk_route_fwd(x, query, chunk, cu, ms, SCALE)):
        assert torch.equal(a, b)
    dy, dw, dsum = _randn(x.shape, dtype, 5), _randn(fwd[1].shape, fwd[1].dtype, 6), _randn(fwd[2].shape, dtype, 7)
    bwd = ops.chunk_route_table_bwd(dy, dw, dsum, x, query, fwd[1], cu_chunks, seq_chunks, m, SCALE)
    for a, b in zip(bwd, ops.chunk_route_bwd(dy, dw, dsum, x, query, fwd[1], chunk, cu, ms, SCALE)):
        assert torch.equal(a, b)


def test_uniform_table_with_split_chunks_matches_integer_kernels(poison):
    # Chunks of 1000 tokens at H * D = 512 are cut into 4 pieces in the table path only: the same numbers up to
    # fp32 rounding of the summation order.
    x, cu, cu_chunks, seq_chunks, m = make_table([2100, 999], ("size", 1000), heads=8, dim=64)
    query = _query(False, 2, 8, 64, x.dtype)
    assert_close_scaled(ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, m), ops.chunk_mean_fwd(x, 1000, cu, 2100),
                        torch.float32)
    assert_close_scaled(ops.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, m, SCALE),
                        ops.chunk_route_fwd(x, query, 1000, cu, 2100, SCALE), torch.float32)


def test_table_strided_and_expanded_inputs(poison):
    # Non-contiguous x (a stepped slice and a transposed view), query, gradients (a .sum() backward gives a
    # stride-0 grad_mean / dy), against the same ops on contiguous copies.
    _, lengths, rule = TABLE_CASES[0]
    base, _, cu_chunks, seq_chunks, m = make_table(lengths, rule, heads=3, dim=10)
    stepped = base[:, :, ::2]
    transposed = base[:, :, :5].transpose(1, 2).contiguous().transpose(1, 2)
    query = torch.randn(5, 3).t()
    for x in (stepped, transposed):
        assert not x.is_contiguous()
        _check_all(x, query, cu_chunks, seq_chunks, m, torch.float32)
        s = len(lengths)
        expanded = torch.ones(1, 1, 1, 1).expand(s, m, 3, 5)
        assert torch.equal(ops.chunk_mean_table_bwd(expanded, x, cu_chunks, seq_chunks, m),
                           chunk_mean_table_backward_ref(expanded, x, cu_chunks, seq_chunks, m))
        _, w, summary = ops.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, m, SCALE)
        dy, dw = torch.ones(1, 1, 1).expand(x.shape), torch.zeros(1, 1, 1).expand(w.shape)
        dsum = torch.ones_like(summary)
        assert_close_scaled(ops.chunk_route_table_bwd(dy, dw, dsum, x, query, w, cu_chunks, seq_chunks, m, SCALE),
                            chunk_route_table_backward_ref(dy, dw, dsum, x, query, w, cu_chunks, seq_chunks, m, SCALE),
                            torch.float32)
    # Offsets that are views into larger tensors.
    cu_view = torch.stack([cu_chunks, cu_chunks], 1)[:, 0]
    assert not cu_view.is_contiguous()
    assert torch.equal(ops.chunk_mean_table_fwd(base, cu_view, seq_chunks, m),
                       ops.chunk_mean_table_fwd(base, cu_chunks, seq_chunks, m))


def _bad_input_cases():
    x, _, cu, seq, m = make_table([7, 0, 5], ("size", 3), heads=2, dim=4)  # K = 5 chunks, S = 3, m = 3
    q = torch.randn(2, 4)
    y, w, summary = ops.chunk_route_table_fwd(x, q, cu, seq, m, 1.0)
    g = torch.randn(3, m, 2, 4)
    mean = lambda *a: ops.chunk_mean_table_fwd(*a)  # noqa: E731
    t = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return [
        ("x must be float", lambda: mean(x.int(), cu, seq, m)),
        ("x must have 3 dimensions", lambda: mean(x[None], cu, seq, m)),
        ("cu_chunks must be int32", lambda: mean(x, cu.long(), seq, m)),
        ("cu_chunks must have 1 dimensions", lambda: mean(x, cu[None], seq, m)),
        ("cu_chunks must hold at least one offset", lambda: mean(x, cu[:0], seq, m)),
        ("seq_chunks must be int32", lambda: mean(x, cu, seq.float(), m)),
        ("seq_chunks must have 1 dimensions", lambda: mean(x, cu, seq[None], m)),
        ("max_chunks must be >= 0", lambda: mean(x, cu, seq, -1)),
        ("cu_chunks\\[0\\] must be 0", lambda: mean(x, cu + 1, seq, m)),
        ("cu_chunks must be strictly increasing", lambda: mean(x, t([0, 3, 3, 7, 10, 12]), seq, m)),
        ("cu_chunks\\[-1\\] must equal the number of tokens", lambda: mean(x, t([0, 3, 6, 7, 10, 11]), seq, m)),
        ("seq_chunks\\[0\\] must be 0", lambda: mean(x, cu, t([1, 3, 3, 5]), m)),
        ("seq_chunks must be non-decreasing", lambda: mean(x, cu, t([0, 3, 2, 5]), m)),
        ("max_chunks \\(2\\) is below the 3 chunks of sequence 0", lambda: mean(x, cu, seq, 2)),
        ("seq_chunks\\[-1\\] must equal the number of chunks", lambda: mean(x, cu, t([0, 3, 3, 4]), m)),
        ("cu_chunks\\[-1\\] must equal the number of tokens", lambda: mean(x, cu[:-1], seq, m)),
        ("query must be", lambda: ops.chunk_route_table_fwd(x, torch.randn(2, 2, 4), cu, seq, m, 1.0)),
        ("query must have x's dtype", lambda: ops.chunk_route_table_fwd(x, q.double(), cu, seq, m, 1.0)),
        ("grad_mean must be \\(S, M, H, D\\)", lambda: ops.chunk_mean_table_bwd(g[:2], x, cu, seq, m)),
        ("grad_mean must be \\(S, M, H, D\\)", lambda: ops.chunk_mean_table_bwd(g[:, :2], x, cu, seq, m)),
        ("weights must be \\(S, H, M\\)",
         lambda: ops.chunk_route_table_bwd(y, w, summary, x, q, w[:2], cu, seq, m, 1.0)),
        ("dsummary must be", lambda: ops.chunk_route_table_bwd(y, w, summary[:2], x, q, w, cu, seq, m, 1.0)),
        ("dy must match x", lambda: ops.chunk_route_table_bwd(y[:-1], w, summary, x, q, w, cu, seq, m, 1.0)),
        ("query must be", lambda: ops.chunk_route_table_bwd(y, w, summary, x, q[None].expand(2, 2, 4), w, cu, seq, m,
                                                            1.0)),
    ]


def test_table_bad_inputs_name_the_argument():
    for message, call in _bad_input_cases():
        with pytest.raises(RuntimeError, match=message):
            call()
