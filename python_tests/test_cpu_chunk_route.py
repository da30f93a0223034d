"""C++ CPU chunk_route kernels (routing_kernels._C) against the eager reference: forward and every
gradient, all four dtypes, dense and varlen, the awkward-shape grid."""
from __future__ import annotations

import pytest
import torch

import routing_kernels as rk
from routing_kernels._ext import has_kernel
from shapes import LAYOUT_IDS, LAYOUTS, make, num_seqs
from tolerance import assert_close_scaled

pytestmark = pytest.mark.skipif(not has_kernel("chunk_route_fwd", "cpu"), reason="routing_kernels._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _run(x, query, cs, cu, ms, backend, scale=None):
    xa, qa = x.detach().clone().requires_grad_(), query.detach().clone().requires_grad_()
    outs = tuple(rk.chunk_route(xa, qa, cs, cu_seqlens=cu, max_seqlen=ms, scale=scale, backend=backend))
    g = torch.Generator().manual_seed(5)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    if x.numel() == 0:
        return outs, ()
    return outs, torch.autograd.grad(outs, (xa, qa), cot)


@pytest.mark.parametrize("shared_query", [True, False], ids=["query_shared", "query_per_seq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_cpu_kernel_matches_reference(case, dtype, shared_query, poison):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=3, dim=20, dtype=dtype)
    query = torch.randn((3, 20) if shared_query else (num_seqs(layout), 3, 20), dtype=torch.float64).to(dtype)
    got, want = _run(x, query, cs, cu, ms, "cpu"), _run(x, query, cs, cu, ms, "reference")
    assert_close_scaled(got, want, dtype)


@pytest.mark.parametrize("dim", [1, 3, 64, 100, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("chunk_size", [1, 7, 100, 4096], ids=lambda c: f"cs{c}")
def test_cpu_kernel_chunk_sizes_and_head_dims(chunk_size, dim, poison):
    x, cu, ms = make({"lengths": [150, 0, 29]}, heads=2, dim=dim)
    query = torch.randn(2, dim)
    got, want = _run(x, query, chunk_size, cu, ms, "cpu", 0.2), _run(x, query, chunk_size, cu, ms, "reference", 0.2)
    assert_close_scaled(got, want, torch.float32)


def test_cpu_kernel_noncontiguous_and_expanded_grad(poison):
    x = torch.randn(2, 19, 4, 3).transpose(2, 3)
    query = torch.randn(4).expand(3, 4)
    grads = []
    for backend in ("cpu", "reference"):
        xa, qa = x.clone().requires_grad_(), query.clone().requires_grad_()
        y, w, s = rk.chunk_route(xa, qa, 5, backend=backend)
        (y.sum() + s.sum()).backward()
        grads.append((y, w, s, xa.grad, qa.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_cpu_kernel_is_the_default_on_cpu():
    from routing_kernels.ops.chunk_route.op import backend_for
    assert backend_for(torch.randn(1, 4, 1, 2), None) == "cpu"


def test_cpu_kernel_rejects_bad_input_with_named_argument():
    x = torch.randn(2, 8, 3, 4)
    with pytest.raises(RuntimeError, match="query must be"):
        torch.ops.routing_kernels.chunk_route_fwd(x, torch.randn(3, 5), 4, None, 8, 1.0)
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        torch.ops.routing_kernels.chunk_route_fwd(x, torch.randn(3, 4), 0, None, 8, 1.0)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.routing_kernels.chunk_route_fwd(x[0], torch.randn(3, 4), 4, torch.tensor([0, 9], dtype=torch.int32),
                                                  9, 1.0)


@pytest.mark.parametrize("layout", [{"lengths": [70_000, 5, 0, 3_000]}, {"B": 2, "N": 70_000}], ids=["varlen", "dense"])
def test_cpu_kernel_cache_groups_with_long_sequences(layout, poison):
    # 70K tokens x 4 heads x 16 dims in fp32 pass the kernel's 16 MB cache budget: such a sequence is a
    # group of its own, while the short ones are grouped together.
    x, cu, ms = make(layout, heads=4, dim=16)
    query = torch.randn(num_seqs(layout), 4, 16)
    got, want = _run(x, query, 100, cu, ms, "cpu"), _run(x, query, 100, cu, ms, "reference")
    assert_close_scaled(got, want, torch.float32)
