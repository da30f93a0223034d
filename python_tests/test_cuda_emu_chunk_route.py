"""The CUDA C++ chunk_route / chunk_mean kernels (csrc/cuda) executed on the CPU through the host CUDA emulation
(python_tests/cuda_emu.py), against the eager reference: the grid of test_cuda_chunk_route.py (shapes, all four
dtypes, dense and varlen with empty sequences, vector and scalar paths, misaligned inputs), grids sized for 1 and
132 SMs, M above one softmax block, D up to 1024, forward and backward. Outputs come back NaN-poisoned where a
kernel skipped them and shared memory is NaN-poisoned before each block. Schedule variations (fiber orders,
blocks reversed, one OS thread per CUDA thread) must give the same bits."""
from __future__ import annotations

import pytest
import torch

import cuda_emu
from routing_kernels.ops.chunk_mean.reference import chunk_mean_backward_ref, chunk_mean_ref
from routing_kernels.ops.chunk_route.reference import chunk_route_backward_ref, chunk_route_ref
from shapes import CUDA_CASES as CASES
from shapes import CUDA_HEADS as HEADS
from shapes import make, num_seqs
from tolerance import assert_close_scaled

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NAMES = ("y", "weights", "summary", "dx", "dquery")
H100_SMS = 132


@pytest.fixture(scope="module")
def ops():
    return cuda_emu.load()


def _grads(x, weights, seed=1):
    g = torch.Generator().manual_seed(seed)
    s, h, _ = weights.shape
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    dweights = torch.randn(weights.shape, generator=g, dtype=torch.float64).to(weights.dtype)
    dsummary = torch.randn((s, h, x.shape[-1]), generator=g, dtype=torch.float64).to(x.dtype)
    return dy, dweights, dsummary


def _run(ops, x, query, cs, cu, ms, scale, *, sms=H100_SMS, schedule=0, seed=0, prep=lambda t: t, grads=None):
    """(y, weights, summary, dx, dquery) from the emulated CUDA ops. The backward gets the reference forward's
    weights, so both backward passes see identical inputs. prep maps each float input (misaligned copies)."""
    max_len = x.shape[1] if cu is None else ms
    w_ref = chunk_route_ref(x, query, cs, cu, ms, scale)[1]
    dy, dweights, dsummary = grads or _grads(x, w_ref)
    fwd = ops.chunk_route_fwd(prep(x), prep(query), cs, cu, max_len, scale, sms, schedule, seed)
    bwd = ops.chunk_route_bwd(prep(dy), prep(dweights), prep(dsummary), prep(x), prep(query), prep(w_ref), cs, cu,
                              max_len, scale, sms, schedule, seed)
    return (*fwd, *bwd), (dy, dweights, dsummary, w_ref)


def _check(got, inputs, x, query, cs, cu, ms, scale, dtype):
    dy, dweights, dsummary, w_ref = inputs
    want = (*chunk_route_ref(x, query, cs, cu, ms, scale),
            *chunk_route_backward_ref(dy, dweights, dsummary, x, query, w_ref, cs, cu, ms, scale))
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close_scaled(a, b, dtype, name=name)


@pytest.mark.parametrize("heads,shared_query", HEADS, ids=["H2_query_shared", "H3_query_per_seq"])
@pytest.mark.parametrize("dim", [1, 64, 100, 128, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_cuda_matches_reference(ops, case, dtype, dim, heads, shared_query):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=heads, dim=dim, dtype=dtype)
    q_shape = (heads, dim) if shared_query else (num_seqs(layout), heads, dim)
    query = torch.randn(q_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    got, inputs = _run(ops, x, query, cs, cu, ms, dim ** -0.5)
    _check(got, inputs, x, query, cs, cu, ms, dim ** -0.5, dtype)


# Grid shapes: 1 SM keeps the widest head tiles; 132 SMs narrow them and add token groups for few long chunks.
# M = 300 > 256 threads of a softmax block; D = 1024 is the largest head (a 1024-thread scalar reduce block).
BIG = [
    ("long_chunks_few_items", {"B": 1, "N": 600}, 256, 8, 64),
    ("M300_above_softmax_block", {"lengths": [1200, 0, 37]}, 4, 2, 16),
    ("D1024", {"B": 1, "N": 21}, 8, 1, 1024),
    ("D1024_varlen", {"lengths": [5, 0, 17]}, 4, 2, 1024),
]


@pytest.mark.parametrize("sms", [1, H100_SMS], ids=lambda s: f"sms{s}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", BIG, ids=[c[0] for c in BIG])
def test_emulated_cuda_grid_shapes(ops, case, dtype, sms):
    _, layout, cs, heads, dim = case
    x, cu, ms = make(layout, heads=heads, dim=dim, dtype=dtype)
    query = torch.randn(heads, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    got, inputs = _run(ops, x, query, cs, cu, ms, 0.3, sms=sms)
    _check(got, inputs, x, query, cs, cu, ms, 0.3, dtype)


def _offset_by_one(t):
    """The same values in a contiguous tensor whose data pointer is one element past a 16-byte boundary."""
    if t is None or not t.is_floating_point():
        return t
    base = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = base.narrow(0, 1, t.numel()).view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# Shapes that would vectorize (H * D a multiple of 8 values) with x, dy, query and dsummary off a 16-byte
# boundary: the launch code must notice and take the scalar path (a 16-byte load there is undefined behaviour).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,cs", [({"B": 2, "N": 45}, 8), ({"lengths": [9, 0, 40]}, 16)],
                         ids=["dense", "varlen"])
def test_emulated_cuda_misaligned_inputs(ops, layout, cs, dtype):
    x, cu, ms = make(layout, heads=4, dim=64, dtype=dtype)
    query = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    got, inputs = _run(ops, x, query, cs, cu, ms, 0.125, prep=_offset_by_one)
    _check(got, inputs, x, query, cs, cu, ms, 0.125, dtype)


def test_emulated_cuda_expanded_grads(ops):
    """A .sum() backward hands in stride-0 gradients."""
    x, _, _ = make({"B": 2, "N": 19}, heads=4, dim=6)
    query = torch.randn(4, 6)
    grads = (torch.ones(()).expand(x.shape), torch.zeros(()).expand(2, 4, 3), torch.randn(6).expand(2, 4, 6))
    got, inputs = _run(ops, x, query, 7, None, None, 0.5, grads=grads)
    _check(got, inputs, x, query, 7, None, None, 0.5, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,cs", [({"B": 2, "N": 37}, 8), ({"lengths": [7, 0, 33, 1]}, 4),
                                       ({"lengths": [0, 0]}, 2)], ids=["dense", "varlen", "varlen_all_empty"])
def test_emulated_chunk_mean_matches_reference(ops, layout, cs, dtype):
    x, cu, ms = make(layout, heads=3, dim=40, dtype=dtype)
    max_len = x.shape[1] if cu is None else ms
    want = chunk_mean_ref(x, cs, cu, ms)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    for sms in (1, H100_SMS):
        got = ops.chunk_mean_fwd(x, cs, cu, max_len, sms, 0, 0)
        assert_close_scaled(got, want, dtype, name="chunk_mean")
        # the backward (chunk_route's scale pass); a stride-0 gradient as a .sum() backward hands in
        for g in (grad, torch.ones(()).to(dtype).expand(want.shape)):
            dx = ops.chunk_mean_bwd(g, x, cs, cu, max_len, sms, 0, 0)
            assert dx.shape == x.shape and dx.dtype == x.dtype and dx.is_contiguous()
            assert_close_scaled(dx, chunk_mean_backward_ref(g, x, cs, cu, ms), dtype, name="chunk_mean dx")


# Every fiber order the emulator offers, and blocks reversed. A missing barrier or a read of another thread's
# unwritten slot gives results that depend on the order.
SCHEDULES = [cuda_emu.REVERSE, cuda_emu.RACE_AHEAD, cuda_emu.RANDOM, cuda_emu.ROUND_ROBIN | cuda_emu.BLOCKS_REVERSED,
             cuda_emu.RANDOM | cuda_emu.BLOCKS_REVERSED]


@pytest.mark.parametrize("dtype,heads,dim", [(torch.float32, 4, 64), (torch.bfloat16, 3, 100),
                                             (torch.float64, 2, 33)], ids=["fp32_vec", "bf16_scalar", "fp64_D33"])
def test_emulated_cuda_schedules_agree_bitwise(ops, dtype, heads, dim):
    x, cu, ms = make({"lengths": [70, 0, 300, 5]}, heads=heads, dim=dim, dtype=dtype)
    query = torch.randn(heads, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    base, inputs = _run(ops, x, query, 16, cu, ms, 0.2)
    _check(base, inputs, x, query, 16, cu, ms, 0.2, dtype)
    for schedule in SCHEDULES:
        for seed in (1, 7) if schedule & 3 in (cuda_emu.RACE_AHEAD, cuda_emu.RANDOM) else (0,):
            got, _ = _run(ops, x, query, 16, cu, ms, 0.2, schedule=schedule, seed=seed, grads=inputs[:3])
            for name, a, b in zip(NAMES, got, base):
                assert torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b), \
                    f"{name} differs under schedule {schedule} seed {seed}"


def test_emulated_cuda_threads_agree_with_fibers(ops):
    """One OS thread per CUDA thread (the sanitizer flavours' mode; ~100x slower than fibers, so a small case):
    the OS decides the interleaving, and the bits must not change."""
    x, cu, ms = make({"lengths": [20, 0, 9]}, heads=2, dim=16, dtype=torch.float32)
    query = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    base, inputs = _run(ops, x, query, 8, cu, ms, 0.2)
    got, _ = _run(ops, x, query, 8, cu, ms, 0.2, schedule=cuda_emu.THREADS, grads=inputs[:3])
    for name, a, b in zip(NAMES, got, base):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


# max_seqlen below the longest sequence: the grids would not reach the sequence's tail (unwritten y / dx on a
# GPU). The kernels check it on the device (always in the emulation; in nvcc builds with
# -DROUTING_KERNELS_DEBUG_CHECKS), with no host synchronisation.
@pytest.mark.parametrize("lengths,cs,max_seqlen", [([40, 3], 4, 16), ([5, 3], 8, 3)],
                         ids=["past_last_chunk", "chunk_longer_than_max_seqlen"])
def test_emulated_cuda_reports_max_seqlen_too_small(ops, lengths, cs, max_seqlen):
    x, cu, _ = make({"lengths": lengths}, heads=2, dim=8)
    with pytest.raises(RuntimeError, match="longer than max_seqlen"):
        ops.chunk_route_fwd(x, torch.randn(2, 8), cs, cu, max_seqlen, 0.5, 1, 0, 0)
