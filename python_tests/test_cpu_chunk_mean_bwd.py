"""C++ CPU chunk_mean_bwd (routing_kernels._C) through torch.ops: dx against a float64 brute force and bit for bit
against the eager reference backward, over the awkward-shape grid, every dtype, strided and expanded grad_mean,
NaN-poisoned outputs, the fake kernel (opcheck) and bad inputs."""
from __future__ import annotations

import pytest
import torch

import bruteforce as bf
from routing_kernels._ext import has_kernel
from routing_kernels.ops.chunk_mean.reference import chunk_mean_backward_ref
from shapes import LAYOUT_IDS, LAYOUTS, make, num_seqs

pytestmark = pytest.mark.skipif(not has_kernel("chunk_mean_bwd", "cpu"), reason="routing_kernels._C not built")

ops = torch.ops.routing_kernels
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# One rounding of grad_mean / count to the dtype: within one ulp (eps relative); atol covers fp16 subnormals only.
TOL = {torch.float64: dict(rtol=2.3e-16, atol=0), torch.float32: dict(rtol=1.2e-7, atol=0),
       torch.float16: dict(rtol=9.8e-4, atol=6e-8), torch.bfloat16: dict(rtol=7.9e-3, atol=0)}


def _grad(layout, x, cs, ms, dtype, seed=1):
    m = -(-(x.shape[1] if ms is None else ms) // cs)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_seqs(layout), m, *x.shape[-2:], generator=g, dtype=torch.float64).to(dtype)


def _check(grad_mean, x, cs, cu, ms):
    dx = ops.chunk_mean_bwd(grad_mean, x, cs, cu, 0 if ms is None else ms)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.is_contiguous()
    torch.testing.assert_close(dx.double(), bf.chunk_mean_backward(grad_mean, x, cs, cu), check_dtype=False,
                               **TOL[x.dtype])
    # Same arithmetic as the reference (divide in the accumulation type, round once): equal bit for bit.
    assert torch.equal(dx, chunk_mean_backward_ref(grad_mean, x, cs, cu, ms))
    return dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_mean_bwd_grid(case, dtype, poison):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=3, dim=5, dtype=dtype)
    _check(_grad(layout, x, cs, ms, dtype), x, cs, cu, ms)


@pytest.mark.parametrize("case", [
    ("chunk_plus1", {"B": 2, "N": 129}, 128),           # one full chunk + a 1-token chunk
    ("prime_chunk", {"B": 1, "N": 1009}, 97),           # prime length and chunk size
    ("varlen_empty", {"lengths": [0, 300, 0, 0, 129, 1]}, 128),
    ("bench_like", {"B": 2, "N": 1024}, 128),           # several parallel work items
], ids=lambda c: c[0])
def test_chunk_mean_bwd_larger(case, poison):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=8, dim=64)
    _check(_grad(layout, x, cs, ms, torch.float32), x, cs, cu, ms)


@pytest.mark.parametrize("case", [
    ("aligned_rows", {"B": 2, "N": 8200}, 8, 64, torch.float32, 128),          # 34 MB, 2 KB rows
    ("odd_rows", {"lengths": [300001, 0, 299999]}, 3, 5, torch.float16, 127),  # 18 MB, 30-byte rows
], ids=lambda c: c[0])
def test_chunk_mean_bwd_streaming_stores(case, poison):
    # dx of 16 MB and more is written with streaming stores (16-byte aligned, head and tail of a row plain): every
    # element of dx still written, and exactly, against the eager reference (itself checked against the brute force).
    _, layout, heads, dim, dtype, cs = case
    x, cu, ms = make(layout, heads, dim, dtype=dtype)
    assert x.nbytes >= 16 << 20
    g = _grad(layout, x, cs, ms, dtype)
    assert torch.equal(ops.chunk_mean_bwd(g, x, cs, cu, 0 if ms is None else ms),
                       chunk_mean_backward_ref(g, x, cs, cu, ms))


def test_chunk_mean_bwd_strided_and_expanded_grad(poison):
    # A .sum() backward hands a stride-0 expanded grad_mean; also a permuted view and a stepped slice.
    x, cu, ms = make({"lengths": [7, 0, 16, 3]}, heads=4, dim=6)
    cs = 4
    g = _grad({"lengths": [7, 0, 16, 3]}, x, cs, ms, torch.float32)
    expanded = torch.full((1, 1, 1, 1), 3.0).expand(g.shape)
    permuted = g.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # same values, H outermost in memory
    stepped = torch.randn(g.shape[0], g.shape[1], g.shape[2], 2 * g.shape[3])[..., ::2]
    for grad in (expanded, permuted, stepped):
        assert not grad.is_contiguous()
        _check(grad, x, cs, cu, ms)
    dx = ops.chunk_mean_bwd(expanded, x, cs, cu, ms)
    assert dx[:4].eq(3.0 / 4).all() and dx[4:7].eq(1.0).all()  # sequence 0: chunks of 4 and 3 tokens


def test_chunk_mean_bwd_ignores_missing_chunks(poison):
    # Entries of chunks a sequence lacks (sequences shorter than max_seqlen) are never read: NaN there stays out.
    layout = {"lengths": [13, 2, 0, 17]}
    x, cu, ms = make(layout, heads=2, dim=3)
    g = _grad(layout, x, 6, ms, torch.float32)
    g[0, 3:] = g[1, 1:] = g[2, :] = float("nan")
    dx = _check(g, x, 6, cu, ms)
    assert not dx.isnan().any()


@pytest.mark.parametrize("layout", [{"B": 2, "N": 7}, {"lengths": [5, 0, 7]}], ids=["dense", "varlen"])
def test_chunk_mean_bwd_opcheck(layout):
    # the fake kernel is registered by routing_kernels.ops.cpp_ops at import; opcheck's fake-tensor test needs it
    x, cu, ms = make(layout, heads=2, dim=4)
    g = _grad(layout, x, 3, ms, torch.float32)
    torch.library.opcheck(ops.chunk_mean_bwd, (g, x, 3, cu, 0 if ms is None else ms))
    torch.library.opcheck(ops.chunk_mean_bwd, (torch.ones(1, 1, 1, 1).expand(g.shape), x, 3, cu,
                                               0 if ms is None else ms))


def test_chunk_mean_bwd_compiles():
    x, _, _ = make({"B": 2, "N": 10}, heads=2, dim=4)
    g = torch.randn(2, 3, 2, 4)
    fn = torch.compile(lambda g, x: ops.chunk_mean_bwd(g, x, 4, None, 0) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(g, x), ops.chunk_mean_bwd(g, x, 4, None, 0) * 2)


def test_chunk_mean_bwd_bad_inputs():
    x = torch.randn(2, 9, 2, 4)
    g = torch.randn(2, 3, 2, 4)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    cases = [
        ("grad_mean must be \\(S, M, H, D\\)", lambda: ops.chunk_mean_bwd(g[:, :2], x, 4, None, 0)),
        ("grad_mean must be \\(S, M, H, D\\)", lambda: ops.chunk_mean_bwd(g.double(), x, 4, None, 0)),
        ("chunk_size must be >= 1", lambda: ops.chunk_mean_bwd(g, x, 0, None, 0)),
        ("x must be float", lambda: ops.chunk_mean_bwd(g, x.int(), 4, None, 0)),
        ("cu_seqlens must be int32", lambda: ops.chunk_mean_bwd(g[:1], x[0], 4, cu.long(), 9)),
        ("max_seqlen", lambda: ops.chunk_mean_bwd(g[:1], x[0], 4, cu, 5)),
    ]
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
