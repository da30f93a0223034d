"""The CUDA C++ chunk-table kernels (csrc/cuda/chunk_table*.cuh: chunk_mean_table_fwd / _bwd, chunk_route_table_fwd /
_bwd) executed on the CPU through the host CUDA emulation (python_tests/cuda_emu.py), against the eager table
references: every case of chunk_tables.TABLE_CASES (uniform, random, size-1, whole-sequence, empty sequences, no
tokens, 1000x-skewed chunks), fp32 / fp16 / bf16 / fp64, shared and per-sequence queries, odd H and D and D = 64 /
128, strided inputs, grids sized for 1 and 132 SMs, forward and backward. Outputs and scratch buffers come back
NaN-poisoned where a kernel skipped them (the emulator poisons every allocation and shared memory before each
block). A uniform table must give the integer kernels' numbers; schedules must agree bit for bit."""
from __future__ import annotations

import pytest
import torch

import cuda_emu
from chunk_tables import TABLE_CASES, make_table
from routing_kernels.ops.chunk_mean.reference import chunk_mean_table_backward_ref, chunk_mean_table_ref
from routing_kernels.ops.chunk_route.reference import chunk_route_table_backward_ref, chunk_route_table_ref
from tolerance import assert_close_scaled

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NAMES = ("y", "weights", "summary", "dx", "dquery")
H100_SMS = 132

# Cases added here (chunk_tables.py is shared): chunks crossing the 256-token pieces of the reduce pass several
# times, next to single tokens, in three sequences (one empty); and a chunk of 2000 tokens beside chunks of 2.
EXTRA_CASES = [
    ("random_mean300", [900, 0, 611, 5], ("random", 300)),
    ("skewed_2000_vs_2", [2, 2000, 2, 2], ("whole",)),
]
CASES = TABLE_CASES + EXTRA_CASES
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def ops():
    return cuda_emu.load()


def _query(heads, dim, dtype, num_seqs=None, seed=2):
    shape = (heads, dim) if num_seqs is None else (num_seqs, heads, dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _grads(x, weights, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, h, _ = weights.shape
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    dweights = torch.randn(weights.shape, generator=g, dtype=torch.float64).to(weights.dtype)
    dsummary = torch.randn((s, h, x.shape[-1]), generator=g, dtype=torch.float64).to(x.dtype)
    return dy, dweights, dsummary


def _route(ops, x, query, table, scale, *, sms=H100_SMS, schedule=0, seed=0, grads=None):
    """(y, weights, summary, dx, dquery) from the emulated table ops, and the backward's inputs. The backward gets
    the reference forward's weights, so both backward passes see identical inputs."""
    cu_chunks, seq_chunks, max_chunks = table
    w_ref = chunk_route_table_ref(x, query, cu_chunks, seq_chunks, max_chunks, scale)[1]
    dy, dweights, dsummary = grads or _grads(x, w_ref)
    fwd = ops.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, max_chunks, scale, sms, schedule, seed)
    bwd = ops.chunk_route_table_bwd(dy, dweights, dsummary, x, query, w_ref, cu_chunks, seq_chunks, max_chunks,
                                    scale, sms, schedule, seed)
    return (*fwd, *bwd), (dy, dweights, dsummary, w_ref)


def _check_route(got, inputs, x, query, table, scale, dtype):
    dy, dweights, dsummary, w_ref = inputs
    want = (*chunk_route_table_ref(x, query, *table, scale),
            *chunk_route_table_backward_ref(dy, dweights, dsummary, x, query, w_ref, *table, scale))
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close_scaled(a, b, dtype, name=name)


def _check_mean(ops, x, table, dtype, sms=H100_SMS):
    mean = ops.chunk_mean_table_fwd(x, *table, sms, 0, 0)
    want = chunk_mean_table_ref(x, *table)
    assert mean.dtype == want.dtype and mean.shape == want.shape
    assert_close_scaled(mean, want, dtype, name="chunk_mean")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    dx = ops.chunk_mean_table_bwd(grad, x, *table, sms, 0, 0)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close_scaled(dx, chunk_mean_table_backward_ref(grad, x, *table), dtype, name="chunk_mean dx")


# (H, D, per-sequence query): odd H and D (scalar path, vectors straddling heads), D = 64 (16-byte vectors)
SHAPES = [(3, 5, True), (2, 64, False)]


@pytest.mark.parametrize("heads,dim,per_seq", SHAPES, ids=["H3_D5_query_per_seq", "H2_D64_query_shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_emulated_table_kernels_match_reference(ops, case, dtype, heads, dim, per_seq):
    _, lengths, rule = case
    x, _, cu_chunks, seq_chunks, max_chunks = make_table(lengths, rule, heads, dim, dtype=dtype)
    table = (cu_chunks, seq_chunks, max_chunks)
    query = _query(heads, dim, dtype, len(lengths) if per_seq else None)
    got, inputs = _route(ops, x, query, table, dim ** -0.5)
    _check_route(got, inputs, x, query, table, dim ** -0.5, dtype)
    _check_mean(ops, x, table, dtype)


# Grid shapes: 1 SM keeps the widest head tiles; 132 SMs narrow them and add token groups. D = 128 and the
# largest head the kernels take (1024: one 1024-thread scalar block).
@pytest.mark.parametrize("sms", [1, H100_SMS], ids=lambda s: f"sms{s}")
@pytest.mark.parametrize("case,heads,dim", [(CASES[-1], 4, 128), (CASES[1], 1, 1024), (CASES[-2], 2, 100)],
                         ids=["skewed_D128", "random_D1024", "mean300_D100"])
def test_emulated_table_grid_shapes(ops, case, heads, dim, sms):
    _, lengths, rule = case
    x, _, cu_chunks, seq_chunks, max_chunks = make_table(lengths, rule, heads, dim)
    table = (cu_chunks, seq_chunks, max_chunks)
    query = _query(heads, dim, torch.float32)
    got, inputs = _route(ops, x, query, table, 0.3, sms=sms)
    _check_route(got, inputs, x, query, table, 0.3, torch.float32)
    _check_mean(ops, x, table, torch.float32, sms=sms)


# Strided x (every other value of D, and a (H, T, D) tensor seen as (T, H, D)), stride-0 gradients (a .sum()
# backward), a max_chunks larger than any sequence needs (padded columns must be zero weights / zero means).
def test_emulated_table_strided_inputs_and_expanded_grads(ops):
    x, _, cu_chunks, seq_chunks, max_chunks = make_table([13, 2, 17], ("random", 3), 4, 12)
    table = (cu_chunks, seq_chunks, max_chunks + 3)
    query = _query(4, 6, torch.float32, 3)
    for view in (x[:, :, ::2], x[:, :, :6].transpose(0, 1).contiguous().transpose(0, 1)):
        assert not view.is_contiguous()
        got, inputs = _route(ops, view, query, table, 0.5)
        _check_route(got, inputs, view, query, table, 0.5, torch.float32)
        _check_mean(ops, view, table, torch.float32)
    view = x[:, :, ::2]
    grads = (torch.ones(()).expand(view.shape), torch.zeros(()).expand(3, 4, max_chunks + 3),
             torch.randn(6).expand(3, 4, 6))
    got, inputs = _route(ops, view, query, table, 0.5, grads=grads)
    _check_route(got, inputs, view, query, table, 0.5, torch.float32)
    grad_mean = torch.randn(6).expand(3, max_chunks + 3, 4, 6)
    dx = ops.chunk_mean_table_bwd(grad_mean, view, *table, H100_SMS, 0, 0)
    assert_close_scaled(dx, chunk_mean_table_backward_ref(grad_mean, view, *table), torch.float32)


def _uniform_table(lengths, cs):
    """The chunk table of the integer chunks: every chunk cs long, a sequence's last one shorter."""
    bounds, firsts, start = [0], [], 0
    for length in lengths:
        firsts.append(len(bounds) - 1)
        bounds += [start + min(a + cs, length) for a in range(0, length, cs)]
        start += length
    firsts.append(len(bounds) - 1)
    return torch.tensor(bounds, dtype=torch.int32), torch.tensor(firsts, dtype=torch.int32)


# A uniform table gives the integer kernels' numbers (to fp32 rounding: long chunks are summed in pieces).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths,cs", [([300, 0, 77, 600], 128), ([40, 9], 4)], ids=["cs128", "cs4"])
def test_emulated_uniform_table_matches_integer_kernels(ops, lengths, cs, dtype):
    cu_seqlens = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    cu_chunks, seq_chunks = _uniform_table(lengths, cs)
    max_len = max(lengths)
    m = -(-max_len // cs)
    heads, dim = 2, 64
    x = torch.randn(sum(lengths), heads, dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    query = _query(heads, dim, dtype)
    table = ops.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, m, 0.2, H100_SMS, 0, 0)
    integer = ops.chunk_route_fwd(x, query, cs, cu_seqlens, max_len, 0.2, H100_SMS, 0, 0)
    dy, dweights, dsummary = _grads(x, integer[1])
    table += ops.chunk_route_table_bwd(dy, dweights, dsummary, x, query, integer[1], cu_chunks, seq_chunks, m, 0.2,
                                       H100_SMS, 0, 0)
    integer += ops.chunk_route_bwd(dy, dweights, dsummary, x, query, integer[1], cs, cu_seqlens, max_len, 0.2,
                                   H100_SMS, 0, 0)
    for name, a, b in zip(NAMES, table, integer):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close_scaled(a, b, torch.float32 if dtype == torch.float32 else dtype, name=name)
    assert_close_scaled(ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, m, H100_SMS, 0, 0),
                        ops.chunk_mean_fwd(x, cs, cu_seqlens, max_len, H100_SMS, 0, 0), dtype, name="chunk_mean")


# Every fiber order the emulator offers, blocks reversed, and one OS thread per CUDA thread (small): a missing
# barrier or a read of another thread's unwritten slot gives results that depend on the order.
SCHEDULES = [cuda_emu.REVERSE, cuda_emu.RACE_AHEAD, cuda_emu.RANDOM, cuda_emu.ROUND_ROBIN | cuda_emu.BLOCKS_REVERSED]


@pytest.mark.parametrize("dtype,heads,dim", [(torch.float32, 4, 64), (torch.float64, 3, 33)], ids=["fp32_vec",
                                                                                                 "fp64_D33"])
def test_emulated_table_schedules_agree_bitwise(ops, dtype, heads, dim):
    x, _, cu_chunks, seq_chunks, max_chunks = make_table([600, 0, 7, 40], ("random", 150), heads, dim, dtype=dtype)
    table = (cu_chunks, seq_chunks, max_chunks)
    query = _query(heads, dim, dtype)
    base, inputs = _route(ops, x, query, table, 0.2)
    _check_route(base, inputs, x, query, table, 0.2, dtype)
    base += (ops.chunk_mean_table_fwd(x, *table, H100_SMS, 0, 0),)
    for schedule in SCHEDULES:
        got, _ = _route(ops, x, query, table, 0.2, schedule=schedule, seed=7, grads=inputs[:3])
        got += (ops.chunk_mean_table_fwd(x, *table, H100_SMS, schedule, 7),)
        for name, a, b in zip(NAMES + ("mean",), got, base):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name} differs under schedule {schedule}"


def test_emulated_table_threads_agree_with_fibers(ops):
    x, _, cu_chunks, seq_chunks, max_chunks = make_table([20, 0, 9], ("random", 4), 2, 16)
    table = (cu_chunks, seq_chunks, max_chunks)
    query = _query(2, 16, torch.float32)
    base, inputs = _route(ops, x, query, table, 0.2)
    got, _ = _route(ops, x, query, table, 0.2, schedule=cuda_emu.THREADS, grads=inputs[:3])
    for name, a, b in zip(NAMES, got, base):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


# max_chunks below a sequence's chunk count would leave chunks out (unwritten y / dx on a GPU): the kernels check
# it on the device, with no host synchronisation.
def test_emulated_table_reports_max_chunks_too_small(ops):
    x, _, cu_chunks, seq_chunks, max_chunks = make_table([7, 0, 16, 3], ("size", 4), 2, 8)
    with pytest.raises(RuntimeError, match="more than max_chunks"):
        ops.chunk_route_table_fwd(x, torch.randn(2, 8), cu_chunks, seq_chunks, max_chunks - 1, 0.5, 1, 0, 0)
    with pytest.raises(RuntimeError, match="more than max_chunks"):
        ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, max_chunks - 1, 1, 0, 0)


def test_emulated_table_bad_arguments_are_named(ops):
    x, _, cu_chunks, seq_chunks, max_chunks = make_table([7, 3], ("size", 4), 2, 8)
    with pytest.raises(RuntimeError, match="cu_chunks must be int32"):
        ops.chunk_mean_table_fwd(x, cu_chunks.long(), seq_chunks, max_chunks, 1, 0, 0)
    with pytest.raises(RuntimeError, match="seq_chunks must have 1 dimensions"):
        ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks[None], max_chunks, 1, 0, 0)
    with pytest.raises(RuntimeError, match="max_chunks must be >= 0"):
        ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, -1, 1, 0, 0)
    with pytest.raises(RuntimeError, match="x must have 3 dimensions"):
        ops.chunk_route_table_fwd(x[None], torch.randn(2, 8), cu_chunks, seq_chunks, max_chunks, 0.5, 1, 0, 0)
    with pytest.raises(RuntimeError, match="query must be"):
        ops.chunk_route_table_fwd(x, torch.randn(3, 8), cu_chunks, seq_chunks, max_chunks, 0.5, 1, 0, 0)
    with pytest.raises(RuntimeError, match="max_chunks must be >= 1 when x has tokens"):
        ops.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, 0, 1, 0, 0)
    with pytest.raises(RuntimeError, match="cu_chunks must hold K"):
        ops.chunk_mean_table_fwd(x[:0], cu_chunks, seq_chunks, max_chunks, 1, 0, 0)
