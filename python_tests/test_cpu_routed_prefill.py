"""C++ CPU kernels of the inference layouts (csrc/cpu/routed_layout.cpp, routed_attention_{fwd,bwd}.cpp):
route_chunks_inference_fwd / routed_attention_inference_fwd / routed_attention_inference_bwd, queries shorter than
keys (dense Nq < Nk, cu_seqlens_q + cu_seqlens_k, a dense cache with seqused_k) and a caller's block_indices.

Ground truth: the eager references, themselves tested against a float64 brute force for Nq < Nk
(test_inference_reference.py). Selections exactly; o / lse / dq / dk / dv within the per-dtype table below (the
one test_cpu_routed_attention.py uses for the training layout). Outputs are NaN-poisoned (the `poison` fixture).
"""
from __future__ import annotations

import pytest
import torch

import routing_kernels as rk
from routing_kernels._ext import has_kernel
from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.routed_attention import op as attn_op
from routing_kernels.ops.routed_attention.reference import routed_attention_backward_ref, routed_attention_ref

pytestmark = pytest.mark.skipif(not has_kernel("routed_attention_inference_fwd", "cpu"),
                                reason="routing_kernels._C without the inference kernels")

ops = torch.ops.routing_kernels
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
DTYPES = [pytest.param(t, id=str(t)[6:]) for t in TOL]
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="full")]
D, DV = 16, 24


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)


def _op_args(keys, cu, ms):
    """The C++ ops' (cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)."""
    return (cu, keys.get("cu_seqlens_k"), keys.get("seqused_k"), ms or 0, keys.get("max_seqlen_k") or 0)


def _check(q, k, v, chunk, top_k, causal, cu, ms, keys, dtype, block_indices=None, grads=True):
    """Kernel vs reference: selection (gate only), o, lse, and (grads) dq, dk, dv."""
    scale = q.shape[-1] ** -0.5
    args = _op_args(keys, cu, ms)
    if block_indices is None:
        sel = ops.route_chunks_inference_fwd(q, k, chunk, top_k, causal, *args)
        assert torch.equal(sel, route_chunks_ref(q, k, chunk, top_k, causal, cu, ms, **keys))
    o, lse = ops.routed_attention_inference_fwd(q, k, v, chunk, top_k, causal, *args, scale, block_indices)
    want = routed_attention_ref(q, k, v, chunk, top_k, causal, cu, ms, scale, **keys, block_indices=block_indices)
    torch.testing.assert_close((o, lse), want, **TOL[dtype])
    if not grads:
        return o, lse
    g = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    dlse = torch.where(torch.isinf(lse), 0, dlse)  # rows with no key: lse = -inf, no gradient through it
    got = ops.routed_attention_inference_bwd(do, dlse, q, k, v, o, lse, chunk, top_k, causal, *args, scale,
                                             block_indices)
    want = routed_attention_backward_ref(do, dlse, q, k, v, o, chunk, top_k, causal, cu, ms, scale, **keys,
                                         block_indices=block_indices)
    torch.testing.assert_close(got, want, **TOL[dtype])
    return o, lse


def _dense_cases():
    """Nk in {13, 40} x Nq in {1, 5, 12} x chunk in {1, 4, 8}; top_k (1, 2, 99 > M) and GQA cycle over the cases."""
    cases = []
    for nk in (13, 40):
        for nq in (1, 5, 12):
            for chunk in (1, 4, 8):
                i = len(cases)
                top_k = (1, 2, 99)[(i + i // 3) % 3]
                hq, hkv = ((4, 2), (4, 1), (2, 2))[i % 3]
                cases.append(pytest.param(nq, nk, chunk, top_k, hq, hkv,
                                          id=f"q{nq}-k{nk}-c{chunk}-top{top_k}-h{hq}:{hkv}"))
    return cases


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("nq, nk, chunk, top_k, hq, hkv", _dense_cases())
def test_dense_fp32_grid(nq, nk, chunk, top_k, hq, hkv, causal, poison):
    q, k, v = _rand(2, nq, hq, D, seed=1), _rand(2, nk, hkv, D, seed=2), _rand(2, nk, hkv, DV, seed=3)
    _check(q, k, v, chunk, top_k, causal, None, None, {}, torch.float32)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(dtype, causal, poison):
    q, k, v = _rand(2, 6, 4, D, dtype=dtype, seed=4), _rand(2, 29, 2, D, dtype=dtype, seed=5), \
        _rand(2, 29, 2, DV, dtype=dtype, seed=6)
    _check(q, k, v, 4, 3, causal, None, None, {}, dtype)


# q lengths vs k lengths: equal, shorter, Lq = 0 with keys, an empty sequence, decode-like rows, a long one.
VARLEN = {"mixed": ([3, 7, 0, 5, 0], [3, 12, 6, 5, 0]), "single": ([1, 1, 1], [1, 4, 13]),
          "long": ([0, 70], [9, 150])}


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("chunk, top_k, hq, hkv", [(1, 2, 4, 2), (4, 99, 4, 1), (8, 1, 2, 2), (4, 3, 4, 1)],
                         ids=["c1-top2-h4:2", "c4-top99-h4:1", "c8-top1-h2:2", "c4-top3-h4:1"])
@pytest.mark.parametrize("lengths", list(VARLEN))
def test_varlen(lengths, chunk, top_k, hq, hkv, causal, poison):
    lq, lk = VARLEN[lengths]
    q, k, v = _rand(sum(lq), hq, D, seed=7), _rand(sum(lk), hkv, D, seed=8), _rand(sum(lk), hkv, DV, seed=9)
    keys = dict(cu_seqlens_k=_cu(lk), max_seqlen_k=max(lk))
    _check(q, k, v, chunk, top_k, causal, _cu(lq), max(lq), keys, torch.float32)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16])
def test_gqa_groups(group, poison):
    q, k, v = _rand(1, 9, group * 2, D, seed=10), _rand(1, 37, 2, D, seed=11), _rand(1, 37, 2, DV, seed=12)
    _check(q, k, v, 4, 3, True, None, None, {}, torch.float32)


@pytest.mark.parametrize("q_layout", ["dense", "packed"])
def test_cache_layout(q_layout, poison):
    # A dense cache (B, capacity, ..) with seqused_k, more queries than the decode path takes (17 > 16) or packed
    # ones: dk / dv rows past seqused_k are 0 (NaN-poisoned memory would show).
    used = torch.tensor([40, 17, 33], dtype=torch.int32)
    k, v = _rand(3, 48, 2, D, seed=13), _rand(3, 48, 2, DV, seed=14)
    if q_layout == "dense":
        q, cu, ms = _rand(3, 17, 4, D, seed=15), None, None
    else:
        lq = [17, 0, 20]
        q, cu, ms = _rand(sum(lq), 4, D, seed=15), _cu(lq), max(lq)
    _, _ = _check(q, k, v, 8, 3, True, cu, ms, dict(seqused_k=used), torch.float32)


def _messy_selection(sel, seed):
    """The same chunks as `sel`, shuffled per row, with repeats in place of some -1 and a -1 in front."""
    g = torch.Generator().manual_seed(seed)
    out = torch.cat([sel, sel[..., :1], torch.full_like(sel[..., :1], -1)], -1)
    perm = torch.rand(out.shape, generator=g).argsort(-1)
    return out.gather(-1, perm).contiguous()


@pytest.mark.parametrize("causal", CAUSAL)
def test_block_indices(causal, poison):
    # route_chunks' output passed straight in reproduces the gate's op; shuffled with repeats and -1 it is the same
    # selection (top_k + 2 slots); rows of -1 only get o = 0, lse = -inf, dq = 0.
    lq, lk = [5, 0, 9], [21, 3, 9]
    q, k, v = _rand(sum(lq), 4, D, seed=16), _rand(sum(lk), 2, D, seed=17), _rand(sum(lk), 2, DV, seed=18)
    cu, ms, keys = _cu(lq), max(lq), dict(cu_seqlens_k=_cu(lk), max_seqlen_k=max(lk))
    sel = ops.route_chunks_inference_fwd(q, k, 4, 2, causal, *_op_args(keys, cu, ms))
    o, lse = _check(q, k, v, 4, 2, causal, cu, ms, keys, torch.float32, block_indices=sel)
    gate_o, gate_lse = ops.routed_attention_inference_fwd(q, k, v, 4, 2, causal, *_op_args(keys, cu, ms), D ** -0.5,
                                                          None)
    assert torch.equal(o, gate_o) and torch.equal(lse, gate_lse)
    messy = _messy_selection(sel, seed=19)
    messy[3] = -1  # query 3 of sequence 0: nothing
    o, lse = _check(q, k, v, 4, 4, causal, cu, ms, keys, torch.float32, block_indices=messy)
    assert (o[3] == 0).all() and torch.isneginf(lse[3]).all()


def test_block_indices_dense_grads_of_empty_rows(poison):
    q, k, v = _rand(1, 4, 2, D, seed=20), _rand(1, 12, 1, D, seed=21), _rand(1, 12, 1, DV, seed=22)
    sel = torch.full((1, 4, 2, 2), -1, dtype=torch.int32)
    sel[0, 1:, :, 0] = 2  # rows 1..3 (positions 9..11, own chunk 2); row 0 nothing
    o, lse = ops.routed_attention_inference_fwd(q, k, v, 4, 2, True, None, None, None, 0, 0, 0.25, sel)
    do, dlse = torch.ones_like(o), torch.zeros_like(lse)
    dq, dk, dv = ops.routed_attention_inference_bwd(do, dlse, q, k, v, o, lse, 4, 2, True, None, None, None, 0, 0,
                                                    0.25, sel)
    assert (dq[0, 0] == 0).all() and (dk[0, :8] == 0).all() and (dv[0, :8] == 0).all()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("layout", ["dense", "varlen"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_pieces_equal_one_shot(layout, dtype, poison):
    # Causal chunked prefill in pieces of 1, 7 and 64 queries against the growing key prefix gives the one-shot
    # rows of the training-layout kernels: selections exactly; o, lse and the gradients of the piece's q (and of
    # the keys, summed over pieces) to rounding. Public API, backend="cpu" (no reference anywhere).
    chunk, top_k, hq, hkv, n = 8, 3, 4, 2, 72
    q, k, v = _rand(1, n, hq, D, dtype=dtype, seed=23), _rand(1, n, hkv, D, dtype=dtype, seed=24), \
        _rand(1, n, hkv, DV, dtype=dtype, seed=25)
    do = _rand(1, n, hq, DV, dtype=dtype, seed=26)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = rk.routed_attention(*leaves, chunk, top_k, return_lse=True, backend="cpu")
    torch.autograd.backward([o, lse], [do, torch.ones_like(lse)])
    sel = rk.select_chunks(q, k, chunk, top_k, backend="cpu")
    start, grads_k, grads_v = 0, torch.zeros(n, hkv, D, dtype=torch.float64), torch.zeros(n, hkv, DV,
                                                                                           dtype=torch.float64)
    for size in (1, 7, 64):
        end = start + size
        qs = q[0, start:end].clone().requires_grad_()
        ks, vs = k[0, :end].clone().requires_grad_(), v[0, :end].clone().requires_grad_()
        if layout == "dense":
            args, kw = (qs[None], ks[None], vs[None]), {}
        else:  # beside an empty sequence, keys with their own offsets
            args = (qs, ks, vs)
            kw = dict(cu_seqlens_q=torch.tensor([0, size, size], dtype=torch.int32), max_seqlen_q=size,
                      cu_seqlens_k=torch.tensor([0, end, end], dtype=torch.int32), max_seqlen_k=end)
        sel_p = rk.select_chunks(*args[:2], chunk, top_k, backend="cpu", **kw)
        assert torch.equal(sel_p.reshape(size, hq, top_k), sel[0, start:end]), (layout, size)
        o_p, lse_p = rk.routed_attention(*args, chunk, top_k, return_lse=True, backend="cpu", **kw)
        tol = TOL[dtype]
        torch.testing.assert_close(o_p.reshape(size, hq, DV), o[0, start:end].detach(), **tol)
        torch.testing.assert_close(lse_p.reshape(size, hq), lse[0, start:end].detach(), **tol)
        torch.autograd.backward([o_p, lse_p], [do[0, start:end].reshape(o_p.shape), torch.ones_like(lse_p)])
        torch.testing.assert_close(qs.grad, leaves[0].grad[0, start:end], **tol)
        grads_k[:end] += ks.grad.double()
        grads_v[:end] += vs.grad.double()
        start = end
    # The one-shot key gradients are the sums of the pieces' (each piece's queries see the keys up to its end).
    torch.testing.assert_close(grads_k.to(dtype), leaves[1].grad[0], **TOL[dtype])
    torch.testing.assert_close(grads_v.to(dtype), leaves[2].grad[0], **TOL[dtype])


@pytest.mark.parametrize("needs", ["q", "v", "kv"])
def test_public_api_runs_the_cpu_kernels(needs, monkeypatch, poison):
    # backend=None on CPU picks the C++ kernels for the prefill layout, forward and backward (the reference's
    # entries are wrapped to fail); only some inputs require grad.
    def forbidden(*a, **kw):
        raise AssertionError("the reference ran")
    monkeypatch.setitem(attn_op.KERNELS, "reference", forbidden)
    monkeypatch.setitem(attn_op.BACKWARD_KERNELS, "reference", forbidden)
    q, k, v = _rand(2, 5, 4, D, seed=27), _rand(2, 19, 2, D, seed=28), _rand(2, 19, 2, DV, seed=29)
    leaves = {name: t.clone().requires_grad_(name in needs) for name, t in zip("qkv", (q, k, v))}
    o = rk.routed_attention(leaves["q"], leaves["k"], leaves["v"], 4, 2)
    o.sum().backward()
    monkeypatch.undo()
    want = {name: t.clone().requires_grad_(name in needs) for name, t in zip("qkv", (q, k, v))}
    rk.routed_attention(want["q"], want["k"], want["v"], 4, 2, backend="reference").sum().backward()
    for name in "qkv":
        if name in needs:
            torch.testing.assert_close(leaves[name].grad, want[name].grad, **TOL[torch.float32])
        else:
            assert leaves[name].grad is None


def test_strided_inputs(poison):
    # Non-contiguous q, k, v (a transposed buffer, a slice) and a stride-0 expanded output gradient.
    q = _rand(2, 4, 6, D, seed=30).transpose(1, 2)  # (2, 6, 4, D), strided
    k = _rand(2, 2, 30, D, seed=31).transpose(1, 2)
    v = _rand(2, 30, 2, 2 * DV, seed=32)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, 4, 3, True, None, None, {}, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    rk.routed_attention(*leaves, 4, 3, backend="cpu").sum().backward()  # do is an expanded stride-0 tensor
    want = [t.clone().requires_grad_() for t in (q, k, v)]
    rk.routed_attention(*want, 4, 3, backend="reference").sum().backward()
    for a, b in zip(leaves, want):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32])


def test_opcheck():
    q, k, v = _rand(2, 3, 4, D, seed=33), _rand(2, 11, 2, D, seed=34), _rand(2, 11, 2, DV, seed=35)
    lq, lk = [2, 0, 3], [7, 2, 3]
    qp, kp, vp = _rand(5, 4, D, seed=36), _rand(12, 2, D, seed=37), _rand(12, 2, DV, seed=38)
    packed = (_cu(lq), _cu(lk), None, 3, 7)
    sel = ops.route_chunks_inference_fwd(q, k, 4, 2, True, None, None, None, 0, 0)
    for args in ((q, k, 4, 2, True, None, None, None, 0, 0), (qp, kp, 4, 2, True, *packed)):
        torch.library.opcheck(ops.route_chunks_inference_fwd, args, test_utils=("test_schema", "test_faketensor"))
    for qq, kk, vv, rest, bi in ((q, k, v, (None, None, None, 0, 0), None), (q, k, v, (None, None, None, 0, 0), sel),
                                 (qp, kp, vp, packed, None)):
        fwd_args = (qq.requires_grad_(), kk.requires_grad_(), vv.requires_grad_(), 4, 2, True, *rest, 0.3, bi)
        torch.library.opcheck(ops.routed_attention_inference_fwd, fwd_args)
        o, lse = ops.routed_attention_inference_fwd(*fwd_args)
        bwd_args = (torch.ones_like(o), torch.zeros_like(lse), qq.detach(), kk.detach(), vv.detach(), o.detach(),
                    lse.detach(), 4, 2, True, *rest, 0.3, bi)
        torch.library.opcheck(ops.routed_attention_inference_bwd, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


# Dense cases: q (1, 3) against k (1, 6), chunk 2: query 0 sits at position 3 (own chunk 1; chunk 2 lies past it).
BAD = {
    "more queries than keys": (dict(nq=7), "q_len <= k_len"),
    "cu_seqlens_k count": (dict(cu_k=[0, 3]), "cu_seqlens_k has 1 sequences but cu_seqlens_q has 2"),
    "cu_seqlens_k non-monotone": (dict(cu_k=[0, 5, 3]), "cu_seqlens_k must be non-decreasing"),
    "packed Lq > Lk": (dict(cu_k=[0, 1, 3]), "sequence 0 has 2 queries but only 1 keys"),
    "seqused_k too long": (dict(used=[3, 99]), "seqused_k\\[1\\] must lie in \\[0, capacity = 8\\]"),
    "seqused_k negative": (dict(used=[-1, 3]), "seqused_k\\[0\\] must lie in"),
    "seqused_k Lq > Lk": (dict(used=[3, 1]), "sequence 1 has 2 queries but only 1 keys"),
    "seqused_k dtype": (dict(used=[3, 4], used_dtype=torch.int64), "seqused_k must be int32"),
    "k dtype": (dict(k_dtype=torch.float64), "k must have q's dtype"),
    "k heads": (dict(hkv=3), "must be a multiple of the heads of k"),
    "block_indices out of range": (dict(bi=5), "block_indices\\[0, 0, 0\\] = 5 is not a chunk"),
    "block_indices not causal": (dict(bi=2), "block_indices\\[0, 0, 0\\] = 2 is not a chunk .*position 3"),
    "block_indices below -1": (dict(bi=-2), "block_indices\\[0, 0, 0\\] = -2 is not a chunk"),
    "block_indices dtype": (dict(bi=0, bi_dtype=torch.int64), "block_indices must be int32"),
    "block_indices shape": (dict(bi=0, bi_slots=3), "block_indices must have shape"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_name_the_argument(case):
    kw, message = BAD[case]
    hkv = kw.get("hkv", 2)
    if "used" in kw:  # dense q (2, 2) against a cache of capacity 8
        q, k, v = _rand(2, 2, 4, D, seed=1), _rand(2, 8, hkv, D, seed=2), _rand(2, 8, hkv, DV, seed=3)
        args = (None, None, torch.tensor(kw["used"], dtype=kw.get("used_dtype", torch.int32)), 0, 0)
    elif "cu_k" in kw:  # packed q [2, 1] against packed keys
        nk = kw["cu_k"][-1]
        q, k, v = _rand(3, 4, D, seed=1), _rand(nk, hkv, D, seed=2), _rand(nk, hkv, DV, seed=3)
        args = (_cu([2, 1]), torch.tensor(kw["cu_k"], dtype=torch.int32), None, 2, 5)
    else:
        q, k, v = _rand(1, kw.get("nq", 3), 4, D, seed=1), _rand(1, 6, hkv, D, seed=2), _rand(1, 6, hkv, DV, seed=3)
        k = k.to(kw.get("k_dtype", torch.float32))
        args = (None, None, None, 0, 0)
    bi = None
    if "bi" in kw:
        bi = torch.full((*q.shape[:-1], kw.get("bi_slots", 2)), -1, dtype=kw.get("bi_dtype", torch.int32))
        bi[0, 0, 0, 0] = kw["bi"]
    with pytest.raises(RuntimeError, match=message):
        ops.routed_attention_inference_fwd(q, k, v, 2, 2, True, *args, 0.25, bi)
    if bi is None and "k_dtype" not in kw and "hkv" not in kw:  # the gate's op checks its layout the same way
        with pytest.raises(RuntimeError, match=message):
            ops.route_chunks_inference_fwd(q, k, 2, 2, True, *args)
