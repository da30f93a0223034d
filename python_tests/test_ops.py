"""torch.ops.routing_kernels.* and the public functions: outputs and gradients against the eager
references on CPU (every dtype), opcheck, torch.compile, and the backend switch."""
from __future__ import annotations

import pytest
import torch

import routing_kernels as rk
from routing_kernels.ops.chunk_mean.reference import chunk_mean_ref
from routing_kernels.ops.chunk_route.reference import chunk_route_ref
from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.routed_attention.reference import routed_attention_ref
from shapes import LAYOUT_IDS, LAYOUTS, make, num_seqs
from tolerance import assert_close_scaled

OPS = torch.ops.routing_kernels
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _grads(outs, inputs, seed=0):
    outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if not outs:
        return [torch.zeros_like(t) for t in inputs]
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, allow_unused=True, materialize_grads=True)


def _leaf(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_mean_op(case, dtype):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=3, dim=5, dtype=dtype)
    (xa,), (xb,) = _leaf(x), _leaf(x)
    got, want = OPS.chunk_mean(xa, cs, cu, ms), chunk_mean_ref(xb, cs, cu, ms)
    assert_close_scaled(got, want, dtype)
    assert_close_scaled(_grads([got], [xa]), _grads([want], [xb]), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_route_op(case, dtype):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=3, dim=5, dtype=dtype)
    query = torch.randn(num_seqs(layout), 3, 5).to(dtype)
    a, b = _leaf(x, query), _leaf(x, query)
    got, want = OPS.chunk_route(*a, cs, cu, ms), chunk_route_ref(*b, cs, cu, ms)
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_scaled(got, want, dtype)
    assert_close_scaled(_grads(got, a), _grads(want, b), dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_route_chunks_op_matches_reference_exactly(case, causal):
    _, layout, cs = case
    q, cu, ms = make(layout, heads=4, dim=8)
    k, _, _ = make(layout, heads=1, dim=8, seed=1)  # GQA group of 4
    got = OPS.route_chunks(q, k, cs, 3, causal, cu, ms)
    torch.testing.assert_close(got, route_chunks_ref(q, k, cs, 3, causal, cu, ms), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_routed_attention_op(case, dtype):
    _, layout, cs = case
    q, cu, ms = make(layout, heads=4, dim=8, dtype=dtype)
    k, _, _ = make(layout, heads=2, dim=8, dtype=dtype, seed=1)
    v, _, _ = make(layout, heads=2, dim=6, dtype=dtype, seed=2)
    a, b = _leaf(q, k, v), _leaf(q, k, v)
    got, want = OPS.routed_attention(*a, cs, 2, True, cu, ms), routed_attention_ref(*b, cs, 2, True, cu, ms)
    assert_close_scaled(got, want, dtype)
    assert_close_scaled(_grads(got, a), _grads(want, b), dtype)


def test_expanded_and_noncontiguous_inputs_and_grads():
    x = torch.randn(2, 10, 5, 3).transpose(2, 3)  # (2, 10, 3, 5) non-contiguous
    query = torch.randn(5).expand(3, 5)  # stride-0 query
    xa, qa = _leaf(x, query)
    y, w, s = OPS.chunk_route(xa, qa, 4)
    (y.sum() + s.sum()).backward()  # .sum() hands the backward stride-0 gradients
    xb, qb = _leaf(x.contiguous(), query.contiguous())
    y2, w2, s2 = chunk_route_ref(xb, qb, 4)
    (y2.sum() + s2.sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(qa.grad, qb.grad)


def test_public_functions_and_backends_agree():
    x, cu, ms = make({"lengths": [9, 0, 4]}, heads=2, dim=4)
    query = torch.randn(2, 4)
    for backend in (None, "reference"):
        out = rk.chunk_route(x, query, 3, cu_seqlens=cu, backend=backend)  # max_seqlen computed
        assert isinstance(out, rk.ChunkRouteOutput)
        torch.testing.assert_close(tuple(out), chunk_route_ref(x, query, 3, cu, ms))
        torch.testing.assert_close(rk.chunk_mean(x, 3, cu_seqlens=cu, backend=backend), chunk_mean_ref(x, 3, cu, ms))
        idx = rk.route_chunks(x, x, 3, 2, cu_seqlens=cu, backend=backend)
        torch.testing.assert_close(idx, route_chunks_ref(x, x, 3, 2, True, cu, ms))
        o, lse = rk.routed_attention(x, x, x, 3, 2, cu_seqlens=cu, return_lse=True, backend=backend)
        torch.testing.assert_close((o, lse), routed_attention_ref(x, x, x, 3, 2, True, cu, ms))
        assert rk.routed_attention(x, x, x, 3, 2, cu_seqlens=cu, backend=backend).shape == x.shape


def test_op_positional_defaults():
    x = torch.randn(1, 20, 2, 8)
    assert [t.shape for t in OPS.chunk_route(x, torch.randn(2, 8), 8)] == [x.shape, (1, 2, 3), (1, 2, 8)]
    assert OPS.routed_attention(x, x, x, 8, 2)[1].shape == (1, 20, 2)


def test_unavailable_backend_is_a_clear_error():
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="backend='cuda' is not available for chunk_mean on cpu"):
        rk.chunk_mean(x, 4, backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' is not available for routed_attention"):
        rk.routed_attention(x, x, x, 4, 2, backend="cuda")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        rk.chunk_mean(x, 4, backend="fast")


def test_nan_propagates_only_where_it_belongs():
    x = torch.randn(1, 12, 2, 4)
    x[0, 5, 1, 2] = float("nan")  # chunk 1 (tokens 4..7), head 1
    means = rk.chunk_mean(x, 4)
    assert means[0, 1, 1, 2].isnan() and means.isnan().sum() == 1
    y, w, s = rk.chunk_route(x, torch.randn(2, 4), 4)
    assert w[0, 1].isnan().all() and not w[0, 0].isnan().any()  # head 1's softmax is poisoned, head 0 not
    xb = torch.stack([x[0], torch.randn(12, 2, 4)])  # batch element 1 is clean
    o = rk.routed_attention(xb, xb, xb, 4, 3)
    assert o[0, 5].isnan().any() and not o[1].isnan().any()
    # Inside a sequence a NaN may reach masked-out positions (0 * NaN in the dense reference, as in
    # flash-attention tiles), so only sequence-level isolation is part of the contract.


def _opcheck_cases():
    x, cu, ms = make({"lengths": [5, 0, 7]}, heads=2, dim=4)
    xd = torch.randn(2, 7, 2, 4)
    qkv = [torch.randn(1, 9, 4, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)]
    rq = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    return [
        ("chunk_mean_dense", OPS.chunk_mean, (*rq(xd), 3)),
        ("chunk_mean_varlen", OPS.chunk_mean, (*rq(x), 3, cu, ms)),
        ("chunk_route_dense", OPS.chunk_route, (*rq(xd, torch.randn(2, 4)), 3)),
        ("chunk_route_varlen", OPS.chunk_route, (*rq(x, torch.randn(3, 2, 4)), 3, cu, ms, 0.5)),
        ("route_chunks", OPS.route_chunks, (*qkv[:2], 3, 2, True)),
        ("route_chunks_varlen", OPS.route_chunks, (x, x, 3, 2, False, cu, ms)),
        ("routed_attention", OPS.routed_attention, (*rq(*qkv), 3, 2)),
        ("routed_attention_varlen", OPS.routed_attention, (*rq(x, x, x), 3, 2, False, cu, ms, 0.3)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    x, q, w = torch.randn(2, 7, 2, 4), torch.randn(2, 4), torch.rand(2, 2, 3)
    torch.library.opcheck(OPS.chunk_mean_backward, (torch.randn(2, 3, 2, 4), x, 3, None, None))
    torch.library.opcheck(OPS.chunk_route_backward, (torch.randn_like(x), torch.randn_like(w),
                                                     torch.randn(2, 2, 4), x, q, w, 3, None, None, None))
    q4, kv = torch.randn(1, 9, 4, 8), torch.randn(1, 9, 2, 8)
    o, lse = OPS.routed_attention(q4, kv, kv, 3, 2)
    torch.library.opcheck(OPS.routed_attention_backward, (torch.randn_like(o), torch.randn_like(lse), q4, kv, kv, o,
                                                          lse, 3, 2, True, None, None, None))


def test_compile_fullgraph_forward_and_backward():
    x, cu, ms = make({"lengths": [6, 0, 9]}, heads=2, dim=4)
    query = torch.randn(2, 4)

    def loss(x, query):
        y, w, s = OPS.chunk_route(x, query, 4, cu, ms)
        means = OPS.chunk_mean(x, 4, cu, ms)
        o, lse = OPS.routed_attention(x, x, x, 4, 2, True, cu, ms)
        idx = OPS.route_chunks(x, x, 4, 2, True, cu, ms)
        return y.sum() + s.square().sum() + w.sum() + means.sum() + o.square().sum() + lse.sum() + idx.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a, b = _leaf(x, query), _leaf(x, query)
    la, lb = compiled(*a), loss(*b)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(torch.autograd.grad(la, a), torch.autograd.grad(lb, b))


def test_compile_public_functions_inductor():
    x = torch.randn(2, 16, 2, 8)

    def f(x):
        return rk.chunk_route(x, x[0, 0], 4).summary.sum() + rk.routed_attention(x, x, x, 4, 2).sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
