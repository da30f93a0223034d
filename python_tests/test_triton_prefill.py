"""Triton forward kernels of route_chunks and routed_attention with queries shorter than keys (chunked prefill).

The Lq queries of a sequence with Lk keys are its last positions (query i at Lk - Lq + i). Ground truth: the
references with cu_seqlens_k / dense k longer than q. Selections must match exactly; outputs within the
per-dtype table of tolerance.py. Outputs are NaN-poisoned (the `poison` fixture), so an unwritten row fails.
"""
from __future__ import annotations

import pytest
import torch

from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.route_chunks.triton import route_chunks_triton
from routing_kernels.ops.routed_attention.reference import routed_attention_ref
from routing_kernels.ops.routed_attention.triton import routed_attention_fwd_triton
from tolerance import assert_close_scaled

pytestmark = pytest.mark.triton
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="full")]
D, DV = 16, 24  # Dv != D


def _dense_cases():
    """Nk in {13, 23} x Nq in {1, 5, Nk} x chunk in {1, 4, 8}; top_k (1, 2, 99 > M) and GQA (2:1, 4:1) cycle
    over the cases so that each value meets every Nq and chunk size without the full product."""
    cases = []
    for nk in (13, 23):
        for nq in (1, 5, nk):
            for chunk in (1, 4, 8):
                i = len(cases)
                top_k = (1, 2, 99)[(i + i // 3) % 3]
                hq, hkv = ((4, 2), (4, 1))[i % 2]
                cases.append(pytest.param(nq, nk, chunk, top_k, hq, hkv,
                                          id=f"q{nq}-k{nk}-c{chunk}-top{top_k}-h{hq}:{hkv}"))
    return cases


# [3, 7, 0, 5] vs [3, 12, 6, 5]: equal, shorter, empty-q (6 keys) and equal; [1, 1, 1] vs [1, 4, 13]: decode-like
VARLEN = {"mixed": ([3, 7, 0, 5], [3, 12, 6, 5]), "single": ([1, 1, 1], [1, 4, 13])}


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check(q, k, v, chunk, top_k, causal, cu, ms, cu_k, ms_k, dtype):
    keys = dict(cu_seqlens_k=cu_k, max_seqlen_k=ms_k)
    want_sel = route_chunks_ref(q, k, chunk, top_k, causal, cu, ms, **keys)
    want = routed_attention_ref(q, k, v, chunk, top_k, causal, cu, ms, **keys)
    sel = route_chunks_triton(q, k, chunk, top_k, causal, cu, ms, **keys)
    assert torch.equal(sel, want_sel), (sel - want_sel).abs().max()
    got = routed_attention_fwd_triton(q, k, v, chunk, top_k, causal, cu, ms, None, **keys)
    assert_close_scaled(got, want, dtype, name="o, lse")


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("nq, nk, chunk, top_k, hq, hkv", _dense_cases())
def test_prefill_dense(nq, nk, chunk, top_k, hq, hkv, causal, dtype):
    q = _rand(2, nq, hq, D, dtype=dtype, seed=1)
    k = _rand(2, nk, hkv, D, dtype=dtype, seed=2)
    v = _rand(2, nk, hkv, DV, dtype=dtype, seed=3)
    _check(q, k, v, chunk, top_k, causal, None, None, None, None, dtype)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("chunk, top_k, hq, hkv", [(1, 2, 4, 2), (4, 99, 4, 1), (8, 1, 4, 2), (4, 2, 4, 1)],
                         ids=["c1-top2-h4:2", "c4-top99-h4:1", "c8-top1-h4:2", "c4-top2-h4:1"])
@pytest.mark.parametrize("lengths", list(VARLEN))
def test_prefill_varlen(lengths, chunk, top_k, hq, hkv, causal, dtype):
    lq, lk = VARLEN[lengths]
    q = _rand(sum(lq), hq, D, dtype=dtype, seed=4)
    k = _rand(sum(lk), hkv, D, dtype=dtype, seed=5)
    v = _rand(sum(lk), hkv, DV, dtype=dtype, seed=6)
    _check(q, k, v, chunk, top_k, causal, _cu(lq), max(lq), _cu(lk), max(lk), dtype)


@pytest.mark.usefixtures("poison")
def test_prefill_default_max_seqlen_k():
    # max_seqlen_k omitted: the launchers use k.shape[0], an upper bound from shapes (no sync); same result
    lq, lk = VARLEN["mixed"]
    q, k, v = _rand(sum(lq), 4, D, dtype=torch.float32, seed=7), _rand(sum(lk), 2, D, dtype=torch.float32, seed=8), \
        _rand(sum(lk), 2, DV, dtype=torch.float32, seed=9)
    cu, cu_k = _cu(lq), _cu(lk)
    want = routed_attention_fwd_triton(q, k, v, 4, 2, True, cu, max(lq), None, cu_seqlens_k=cu_k, max_seqlen_k=max(lk))
    got = routed_attention_fwd_triton(q, k, v, 4, 2, True, cu, max(lq), None, cu_seqlens_k=cu_k)
    assert torch.equal(route_chunks_triton(q, k, 4, 2, True, cu, max(lq), cu_seqlens_k=cu_k),
                       route_chunks_triton(q, k, 4, 2, True, cu, max(lq), cu_seqlens_k=cu_k, max_seqlen_k=max(lk)))
    assert_close_scaled(got, want, torch.float32)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_prefill_in_pieces_equals_one_shot(layout):
    # Causal: pieces of 1, 7 and 64 queries, each against the growing key prefix, give the one-shot rows (the
    # training layout's kernels): selections exactly, outputs to fp32 rounding.
    chunk, top_k, hq, hkv, n = 8, 3, 2, 1, 72
    q = _rand(1, n, hq, D, dtype=torch.float32, seed=10)
    k = _rand(1, n, hkv, D, dtype=torch.float32, seed=11)
    v = _rand(1, n, hkv, DV, dtype=torch.float32, seed=12)
    sel = route_chunks_triton(q, k, chunk, top_k, True)
    o, lse = routed_attention_fwd_triton(q, k, v, chunk, top_k, True)
    start = 0
    for size in (1, 7, 64):
        end = start + size
        if layout == "dense":
            qs, ks, vs = q[:, start:end], k[:, :end], v[:, :end]
            args = (None, None)
            keys = {}
        else:  # one packed sequence beside an empty one, keys with their own offsets
            qs, ks, vs = q[0, start:end], k[0, :end], v[0, :end]
            args = (torch.tensor([0, size, size], dtype=torch.int32), size)
            keys = dict(cu_seqlens_k=torch.tensor([0, end, end], dtype=torch.int64), max_seqlen_k=end)
        sel_p = route_chunks_triton(qs, ks, chunk, top_k, True, *args, **keys)
        o_p, lse_p = routed_attention_fwd_triton(qs, ks, vs, chunk, top_k, True, *args, None, **keys)
        assert torch.equal(sel_p.reshape(size, hq, top_k), sel[0, start:end]), (layout, size)
        assert_close_scaled((o_p.reshape(size, hq, DV), lse_p.reshape(size, hq)),
                            (o[0, start:end], lse[0, start:end]), torch.float32, name=f"{layout} piece {size}")
        start = end
