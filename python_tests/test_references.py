"""The eager references against independent float64 brute-force loops, dense SDPA, and autograd."""
from __future__ import annotations

import pytest
import torch

import bruteforce as bf
from routing_kernels.ops.chunk_mean.reference import chunk_mean_backward_ref, chunk_mean_ref
from routing_kernels.ops.chunk_route.reference import chunk_route_backward_ref, chunk_route_ref
from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.routed_attention.reference import routed_attention_backward_ref, routed_attention_ref
from shapes import LAYOUT_IDS, LAYOUTS, make, num_seqs

F64 = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_mean_matches_bruteforce(case):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=3, dim=5, dtype=torch.float64)
    torch.testing.assert_close(chunk_mean_ref(x, cs, cu, ms), bf.chunk_mean(x, cs, cu, ms), **F64)


@pytest.mark.parametrize("shared_query", [True, False], ids=["query_shared", "query_per_seq"])
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_route_matches_bruteforce(case, shared_query):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=3, dim=5, dtype=torch.float64)
    q_shape = (3, 5) if shared_query else (num_seqs(layout), 3, 5)
    query = torch.randn(q_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = chunk_route_ref(x, query, cs, cu, ms, scale=0.7)
    want = bf.chunk_route(x, query, cs, cu, ms, scale=0.7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("top_k", [1, 2, 3, 50], ids=lambda k: f"top{k}")
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_route_chunks_matches_bruteforce(case, top_k, causal):
    _, layout, cs = case
    q, cu, ms = make(layout, heads=4, dim=6, dtype=torch.float64, seed=2)
    k, _, _ = make(layout, heads=2, dim=6, dtype=torch.float64, seed=3)  # GQA group of 2
    got = route_chunks_ref(q, k, cs, top_k, causal, cu, ms)
    assert got.dtype == torch.int32
    torch.testing.assert_close(got.long(), bf.route_chunks(q, k, cs, top_k, causal, cu), rtol=0, atol=0)


def test_route_chunks_ties_go_to_lower_index():
    # Every chunk of k has the same mean: all gates tie, so the lowest eligible indices win.
    q = torch.ones(1, 40, 1, 4)
    k = torch.ones(1, 40, 1, 4)
    idx = route_chunks_ref(q, k, 4, 3, causal=True)
    assert idx[0, 39, 0].tolist() == [0, 1, 9]  # own chunk 9, then chunks 0 and 1
    assert idx[0, 5, 0].tolist() == [0, 1, -1]  # chunk 0 is the only past chunk: pad
    assert idx[0, 2, 0].tolist() == [0, -1, -1]
    idx = route_chunks_ref(q, k, 4, 3, causal=False)
    assert idx[0, 2, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("top_k", [1, 2, 50], ids=lambda k: f"top{k}")
@pytest.mark.parametrize("case", [c for c in LAYOUTS if c[0] != "varlen_prime"], ids=LAYOUT_IDS[:-1])
def test_routed_attention_matches_bruteforce(case, top_k, causal):
    _, layout, cs = case
    q, cu, ms = make(layout, heads=4, dim=6, dtype=torch.float64, seed=4)
    k, _, _ = make(layout, heads=2, dim=6, dtype=torch.float64, seed=5)
    v, _, _ = make(layout, heads=2, dim=3, dtype=torch.float64, seed=6)  # Dv != D
    o, lse = routed_attention_ref(q, k, v, cs, top_k, causal, cu, ms, scale=0.5)
    o_bf, lse_bf = bf.routed_attention(q, k, v, cs, top_k, causal, cu, scale=0.5)
    torch.testing.assert_close(o, o_bf, **F64)
    torch.testing.assert_close(lse, lse_bf, **F64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("n", [1, 33, 64], ids=lambda n: f"N{n}")
def test_routed_attention_with_all_chunks_is_dense_sdpa(n, causal):
    q = torch.randn(2, n, 4, 16, dtype=torch.float64)
    k = torch.randn(2, n, 2, 16, dtype=torch.float64)
    v = torch.randn(2, n, 2, 16, dtype=torch.float64)
    o, _ = routed_attention_ref(q, k, v, 8, top_k=8, causal=causal)  # top_k >= M = ceil(64/8)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1),
        is_causal=causal).transpose(1, 2)
    torch.testing.assert_close(o, dense, **F64)


def _autograd(fn, inputs, grads):
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    if not pairs:  # empty batch: nothing depends on the inputs
        return [torch.zeros_like(t) for t in inputs]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_mean_backward_ref_matches_autograd(case):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=2, dim=3, dtype=torch.float64)
    g = torch.randn_like(chunk_mean_ref(x, cs, cu, ms))
    (want,) = _autograd(lambda x: chunk_mean_ref(x, cs, cu, ms), [x], [g])
    torch.testing.assert_close(chunk_mean_backward_ref(g, x, cs, cu, ms), want, **F64)


@pytest.mark.parametrize("shared_query", [True, False], ids=["query_shared", "query_per_seq"])
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_route_backward_ref_matches_autograd(case, shared_query):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=2, dim=3, dtype=torch.float64)
    query = torch.randn((2, 3) if shared_query else (num_seqs(layout), 2, 3), dtype=torch.float64)
    y, w, s = chunk_route_ref(x, query, cs, cu, ms, 0.9)
    dy, dw, ds = torch.randn_like(y), torch.randn_like(w), torch.randn_like(s)
    want = _autograd(lambda x, q: chunk_route_ref(x, q, cs, cu, ms, 0.9), [x, query], [dy, dw, ds])
    got = chunk_route_backward_ref(dy, dw, ds, x, query, w, cs, cu, ms, 0.9)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, **F64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_routed_attention_backward_ref_matches_autograd(case, causal):
    _, layout, cs = case
    q, cu, ms = make(layout, heads=4, dim=5, dtype=torch.float64, seed=7)
    k, _, _ = make(layout, heads=2, dim=5, dtype=torch.float64, seed=8)
    v, _, _ = make(layout, heads=2, dim=3, dtype=torch.float64, seed=9)
    o, lse = routed_attention_ref(q, k, v, cs, 2, causal, cu, ms, 0.6)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    want = _autograd(lambda q, k, v: routed_attention_ref(q, k, v, cs, 2, causal, cu, ms, 0.6), [q, k, v],
                     [do, dlse])
    got = routed_attention_backward_ref(do, dlse, q, k, v, o, cs, 2, causal, cu, ms, 0.6)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, **F64)


def test_gradcheck_references():
    x, cu, ms = make({"lengths": [5, 0, 7]}, heads=2, dim=3, dtype=torch.float64)
    query = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: chunk_mean_ref(x, 3, cu, ms), (x,))
    assert torch.autograd.gradcheck(lambda x, q: chunk_route_ref(x, q, 3, cu, ms), (x, query))
    q = torch.randn(1, 10, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 10, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 10, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: routed_attention_ref(q, k, v, 3, 2), (q, k, v))
