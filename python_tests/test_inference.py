"""Inference through the public API: separate q / k layouts (cu_seqlens_q/k, dense Nq < Nk, seqused_k),
block_indices, and RoutedKVCache (append, chunk sums, decode, chunked prefill, overflow)."""
from __future__ import annotations

import pytest
import torch

import bruteforce as bf
import routing_kernels as rk
from tolerance import assert_close_scaled

C = 4  # chunk size of these tests
F64 = dict(rtol=1e-10, atol=1e-10)
OPS = torch.ops.routing_kernels


def _rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)


def _pack(rows, lengths):
    """(B, N, ..) -> (sum(lengths), ..): the first lengths[b] tokens of row b."""
    return torch.cat([r[:n] for r, n in zip(rows, lengths)])


# ---- the public API in every key layout, against the float64 brute force ----

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_public_api_separate_layouts_match_bruteforce(causal):
    lq, lk = [1, 3, 0, 6], [9, 3, 5, 13]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = _rand(sum(lq), 4, 8, seed=0), _rand(sum(lk), 2, 8, seed=1), _rand(sum(lk), 2, 6, seed=2)
    want = bf.routed_attention(q, k, v, C, 2, causal, cu_q, 0.4, cu_k)
    got = rk.routed_attention(q, k, v, C, 2, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=0.4,
                              return_lse=True)  # max_seqlen_q / _k computed
    torch.testing.assert_close(got, want, **F64)
    idx = rk.select_chunks(q, k, C, 2, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.equal(idx.long(), bf.route_chunks(q, k, C, 2, causal, cu_q, cu_k))
    # the same keys as a dense cache with per-row lengths
    cap = 16
    k_cache, v_cache = torch.zeros(4, cap, 2, 8, dtype=torch.float64), torch.zeros(4, cap, 2, 6, dtype=torch.float64)
    for b, (s, e) in enumerate(zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        k_cache[b, :e - s], v_cache[b, :e - s] = k[s:e], v[s:e]
    used = torch.tensor(lk, dtype=torch.int32)
    got = rk.routed_attention(q, k_cache, v_cache, C, 2, causal=causal, cu_seqlens_q=cu_q, max_seqlen_q=6,
                              seqused_k=used, scale=0.4, return_lse=True)
    torch.testing.assert_close(got, want, **F64)


def test_dense_q_shorter_than_k():
    q, k, v = _rand(2, 3, 4, 8, seed=0), _rand(2, 11, 2, 8, seed=1), _rand(2, 11, 2, 8, seed=2)
    got = rk.routed_attention(q, k, v, C, 2, return_lse=True)
    torch.testing.assert_close(got, bf.routed_attention(q, k, v, C, 2, True), **F64)


@pytest.mark.parametrize("layout", ["cu_k", "seqused"])
def test_gradients_of_the_inference_layouts(layout):
    """The op's analytic backward (reference) against PyTorch autograd through the reference forward."""
    lq, lk = [2, 5], [7, 5]
    q = _rand(sum(lq), 4, 8, seed=0)
    if layout == "cu_k":
        k, v = _rand(sum(lk), 2, 8, seed=1), _rand(sum(lk), 2, 8, seed=2)
        kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
    else:
        k, v = _rand(2, 9, 2, 8, seed=1), _rand(2, 9, 2, 8, seed=2)
        kw = dict(cu_seqlens_q=_cu(lq), max_seqlen_q=5, seqused_k=torch.tensor(lk, dtype=torch.int32))
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    oa, la = rk.routed_attention(*a, C, 2, return_lse=True, **kw)  # the op (reference kernel + its backward)
    ob, lb = rk.routed_attention(*b, C, 2, return_lse=True, backend="reference", **kw)  # torch autograd
    cot = (_rand(*oa.shape, seed=3), _rand(*la.shape, seed=4))
    torch.testing.assert_close(torch.autograd.grad((oa, la), a, cot), torch.autograd.grad((ob, lb), b, cot), **F64)


def test_block_indices_from_select_chunks_reproduce_the_op():
    q, k, v = _rand(2, 13, 8, 8, seed=0, dtype=torch.float32), *(_rand(2, 13, 2, 8, seed=s, dtype=torch.float32)
                                                                 for s in (1, 2))
    idx = rk.select_chunks(q, k, C, 2)
    reused = rk.routed_attention(q, k, v, C, 2, block_indices=idx.flip(-1), return_lse=True)
    assert_close_scaled(reused, rk.routed_attention(q, k, v, C, 2, return_lse=True), torch.float32)


def test_inference_layouts_name_what_the_kernels_do_not_yet_do():
    # The C++ CPU kernels take every inference layout now (test_cpu_routed_prefill.py); a backend that does not
    # take one names which kernels do: Triton has no fp64, and the note says where each layout runs.
    x = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="queries shorter than keys .* Triton and the C\\+\\+ CPU kernels"):
        rk.routed_attention(x[:, :1], x, x, C, 2, backend="triton")


def test_inference_opcheck():
    q, k = _rand(5, 4, 8, seed=0, dtype=torch.float32), _rand(9, 2, 8, seed=1, dtype=torch.float32)
    cu_q, cu_k = _cu([2, 3]), _cu([4, 5])
    rq = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    torch.library.opcheck(OPS.routed_attention, (*rq(q, k, k), C, 2, True, cu_q, 3, None, None, cu_k, 5))
    cache = _rand(2, 6, 2, 8, seed=2, dtype=torch.float32)
    used = torch.tensor([4, 6], dtype=torch.int32)
    torch.library.opcheck(OPS.routed_attention, (*rq(q[:2].view(2, 1, 4, 8), cache, cache), C, 2, True, None, None,
                                                 None, None, None, None, used))
    idx = OPS.route_chunks(q, k, C, 2, True, cu_q, 3, None, cu_k, 5)
    torch.library.opcheck(OPS.routed_attention, (*rq(q, k, k), C, 2, True, cu_q, 3, None, None, cu_k, 5, None, idx))
    torch.library.opcheck(OPS.route_chunks, (q, k, C, 2, True, cu_q, 3, None, cu_k, 5))


# ---- RoutedKVCache ----

LENGTHS = [0, 1, C - 1, C, C + 1, 5 * C + 3]  # prompt lengths of the varlen batch


def _sequences(total, hq=4, hkv=2, d=8, dtype=torch.float32, seed=0):
    b = len(LENGTHS)
    return (_rand(b, total, hq, d, seed=seed, dtype=dtype), _rand(b, total, hkv, d, seed=seed + 1, dtype=dtype),
            _rand(b, total, hkv, d, seed=seed + 2, dtype=dtype))


def test_appended_sums_are_the_chunk_sums_of_the_cache():
    steps = [LENGTHS, [1] * 6, [C + 2, 0, 3, 1, C, 0], [7] * 6]  # varlen appends, some rows get nothing
    total = sum(max(s) for s in steps) + 8
    _, k, v = _sequences(total)
    cache = rk.RoutedKVCache(2, 6, capacity=64, num_kv_heads=2, head_dim=8, chunk_size=C)
    filled = [0] * 6
    for counts in steps:
        rows_k = [k[b, filled[b]:filled[b] + n] for b, n in enumerate(counts)]
        rows_v = [v[b, filled[b]:filled[b] + n] for b, n in enumerate(counts)]
        cache.append(1, torch.cat(rows_k), torch.cat(rows_v), cu_seqlens=_cu(counts))
        filled = [f + n for f, n in zip(filled, counts)]
    assert cache.seqlens[1].tolist() == filled and cache.seqlens[0].tolist() == [0] * 6
    for b, n in enumerate(filled):
        torch.testing.assert_close(cache.keys(1)[b, :n], k[b, :n], rtol=0, atol=0)
        sums = torch.zeros_like(cache.key_sums[1, b])
        for t in range(n):
            sums[t // C] += k[b, t]
        torch.testing.assert_close(cache.key_sums[1, b], sums, rtol=1e-6, atol=1e-6)
        means = rk.chunk_mean(k[b:b + 1, :n], C)[0] if n else sums[:0]
        counts = torch.tensor([min(C, n - j * C) for j in range(means.shape[0])], dtype=torch.float32)
        torch.testing.assert_close(cache.key_sums[1, b, :means.shape[0]] / counts[:, None, None], means,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decode_every_step_equals_the_full_sequence_rows(dtype):
    """300 decode steps over a varlen batch (prompt lengths 0, 1, C-1, C, C+1, 5C+3) through the cache give the
    full-sequence op's rows: the same chunk indices exactly, outputs to the dtype's tolerance."""
    steps = 300 if dtype == torch.float32 else 40
    total = max(LENGTHS) + steps
    q, k, v = _sequences(total, dtype=dtype)
    cache = rk.RoutedKVCache(1, 6, capacity=total, num_kv_heads=2, head_dim=8, chunk_size=C, dtype=dtype)
    cache.append(0, _pack(k, LENGTHS), _pack(v, LENGTHS), cu_seqlens=_cu(LENGTHS))
    got_o, got_idx = [], []
    for _ in range(steps):
        pos = cache.seqlens[0].long()
        step = lambda t: t[torch.arange(6), pos][:, None]  # noqa: E731  the next token of every row
        cache.append(0, step(k), step(v))
        got_o.append(cache.attention(0, step(q), top_k=3))
        got_idx.append(rk.select_chunks(step(q), cache.keys(0), C, 3, seqused_k=cache.seqlens[0]))
    for b, n0 in enumerate(LENGTHS):
        n = n0 + steps
        full_o = rk.routed_attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], C, 3, backend="cpu")
        full_idx = rk.select_chunks(q[b:b + 1, :n], k[b:b + 1, :n], C, 3, backend="cpu")
        assert torch.equal(torch.stack([i[b, 0] for i in got_idx]), full_idx[0, n0:])
        assert_close_scaled(torch.stack([o[b, 0] for o in got_o]), full_o[0, n0:], dtype)


@pytest.mark.parametrize("piece", [1, 7, 64])
def test_chunked_prefill_through_the_cache_equals_one_shot(piece):
    n = 70
    q, k, v = (t[:2] for t in _sequences(n))
    cache = rk.RoutedKVCache(1, 2, capacity=n, num_kv_heads=2, head_dim=8, chunk_size=C)
    outs = []
    for start in range(0, n, piece):
        end = min(start + piece, n)
        cache.append(0, k[:, start:end], v[:, start:end])
        outs.append(cache.attention(0, q[:, start:end], top_k=3))
    assert_close_scaled(torch.cat(outs, 1), rk.routed_attention(q, k, v, C, 3, backend="cpu"), torch.float32)


@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
def test_decode_gqa_groups(group):
    hkv = 2
    q, k, v = _rand(3, 1, hkv * group, 8, seed=0), _rand(3, 11, hkv, 8, seed=1), _rand(3, 11, hkv, 8, seed=2)
    used = torch.tensor([1, 6, 11], dtype=torch.int32)
    got = rk.routed_attention(q, k, v, C, 2, seqused_k=used, return_lse=True)
    kk = torch.cat([k[b, :n] for b, n in enumerate(used.tolist())])
    vv = torch.cat([v[b, :n] for b, n in enumerate(used.tolist())])
    want = bf.routed_attention(q.reshape(3, hkv * group, 8), kk, vv, C, 2, True, _cu([1, 1, 1]), None,
                               _cu(used.tolist()))
    torch.testing.assert_close((got[0].reshape(3, -1, 8), got[1].reshape(3, -1)), want, **F64)


def test_overflow_is_a_clear_error_and_leaves_the_cache_unchanged():
    cache = rk.RoutedKVCache(1, 2, capacity=6, num_kv_heads=1, head_dim=4, chunk_size=C)
    k = torch.randn(9, 1, 4)
    cache.append(0, k[:5], k[:5], cu_seqlens=_cu([2, 3]))
    before = [t.clone() for t in (cache.k, cache.v, cache.key_sums, cache.seqlens)]
    with pytest.raises(ValueError, match=r"pass the cache capacity \(6 tokens\) in row 1: it holds 3 and 4 more"):
        cache.append(0, k[:5], k[:5], cu_seqlens=_cu([1, 4]))
    with pytest.raises(ValueError, match="capacity"):
        cache.append(0, torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1, 4))
    for name, call in [("k_new has dtype", lambda: cache.append(0, k[:2].double(), k[:2].double(), cu_seqlens=_cu([1, 1]))),
                       ("k_new must be", lambda: cache.append(0, torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))),
                       ("cu_seqlens must have B\\+1 = 3", lambda: cache.append(0, k[:2], k[:2], cu_seqlens=_cu([2]))),
                       ("non-decreasing", lambda: cache.append(0, k[:2], k[:2],
                                                               cu_seqlens=torch.tensor([0, 3, 2], dtype=torch.int32))),
                       ("layer must be < num_layers", lambda: cache.append(1, k[:2], k[:2], cu_seqlens=_cu([1, 1])))]:
        with pytest.raises((ValueError, TypeError), match=name):
            call()
    for t, b in zip((cache.k, cache.v, cache.key_sums, cache.seqlens), before):
        assert torch.equal(t, b)
    cache.append(0, k[:4], k[:4], cu_seqlens=_cu([4, 0]))  # exactly full is fine
    assert cache.seqlens[0].tolist() == [6, 3]


def test_compiled_decode_step():
    cache = rk.RoutedKVCache(1, 2, capacity=32, num_kv_heads=2, head_dim=8, chunk_size=C)
    k = torch.randn(2, 13, 2, 8)
    cache.append(0, k, k)
    q = torch.randn(2, 1, 4, 8)

    def step(q, k_cache, v_cache, seqlens):
        return rk.routed_attention(q, k_cache, v_cache, C, 2, seqused_k=seqlens)

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q, cache.keys(0), cache.values(0), cache.seqlens[0])
    torch.testing.assert_close(got, step(q, cache.keys(0), cache.values(0), cache.seqlens[0]))


def test_key_sums_rebuilt_from_a_cache_equal_the_running_sums():
    from routing_kernels.ops.routed_attention.decode import key_sums_from_cache
    cache = rk.RoutedKVCache(1, 3, capacity=19, num_kv_heads=2, head_dim=8, chunk_size=C)
    k = _rand(12, 2, 8, seed=0, dtype=torch.float32)
    cache.append(0, k, k, cu_seqlens=_cu([0, 5, 7]))
    cache.append(0, _rand(3, 1, 2, 8, seed=1, dtype=torch.float32), _rand(3, 1, 2, 8, seed=2, dtype=torch.float32))
    torch.testing.assert_close(key_sums_from_cache(cache.keys(0), cache.seqlens[0], C), cache.key_sums[0],
                               rtol=1e-6, atol=1e-6)


def test_bad_key_sums():
    x, used = torch.randn(2, 8, 2, 4), torch.tensor([3, 8], dtype=torch.int32)
    for kwargs, match in [(dict(key_sums=torch.zeros(2, 2, 2, 4)), "pass seqused_k with it"),
                          (dict(key_sums=torch.zeros(2, 3, 2, 4), seqused_k=used), r"\(B, ceil\(capacity / chunk_size\)"),
                          (dict(key_sums=torch.zeros(2, 2, 2, 4, dtype=torch.float64), seqused_k=used),
                           "key_sums must be torch.float32")]:
        with pytest.raises((ValueError, TypeError), match=match):
            rk.routed_attention(x[:, :1], x, x, C, 2, **kwargs)


DECODE_BACKENDS = [b for b, ok in (("cpu", rk._ext.has_kernel("routed_decode_fwd", "cpu")),
                                   ("triton", rk._triton.can_run("cpu"))) if ok]


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_layout_runs_the_decode_kernels_and_a_backward_kernel(backend, monkeypatch):
    from routing_kernels.ops.routed_attention import decode, op
    calls = []
    for name in ("cpu", "triton"):
        real = getattr(decode, name)
        monkeypatch.setattr(decode, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    bwd = []
    for name in ("reference", "cpu"):
        real_bwd = op.BACKWARD_KERNELS[name]
        monkeypatch.setitem(op.BACKWARD_KERNELS, name, lambda *a, _real=real_bwd, _name=name: bwd.append(_name) or
                            _real(*a))
    cache = rk.RoutedKVCache(1, 3, capacity=40, num_kv_heads=2, head_dim=16, chunk_size=C)
    k = _rand(3, 29, 2, 16, seed=1, dtype=torch.float32)
    cache.append(0, k[:, :26], k[:, :26])
    q = _rand(3, 3, 4, 16, seed=2, dtype=torch.float32).requires_grad_()
    cache.append(0, k[:, 26:], k[:, 26:])
    got = cache.attention(0, q, top_k=3, backend=backend)
    want = rk.routed_attention(q, cache.keys(0), cache.values(0), C, 3, seqused_k=cache.seqlens[0],
                               backend="reference")
    assert calls == [backend]
    assert_close_scaled(got, want, torch.float32)
    # Forward-only decode kernels: the backward is the C++ inference kernel's on CPU, the reference's otherwise.
    got.sum().backward()
    assert bwd == ["cpu" if backend == "cpu" else "reference"] and q.grad is not None
    q_want = q.detach().clone().requires_grad_()
    rk.routed_attention(q_want, cache.keys(0), cache.values(0), C, 3, seqused_k=cache.seqlens[0],
                        backend="reference").sum().backward()
    assert_close_scaled(q.grad, q_want.grad, torch.float32)


@pytest.mark.skipif(not rk._triton.can_run("cpu"), reason="Triton interpreter not on")
@pytest.mark.parametrize("layout", ["dense", "cu_k"])
def test_prefill_layout_runs_the_triton_forward_and_the_reference_backward(layout, monkeypatch):
    from routing_kernels.ops.routed_attention import op
    from routing_kernels.ops.route_chunks import op as gate_op
    ran = []
    for table, name in ((op.KERNELS, "triton"), (gate_op.KERNELS, "triton"), (op.BACKWARD_KERNELS, "reference")):
        real = table[name]
        monkeypatch.setitem(table, name, lambda *a, _real=real, _t=id(table): ran.append(_t) or _real(*a))
    if layout == "dense":
        q, k, v = _rand(2, 5, 4, 16, seed=0, dtype=torch.float32), *(_rand(2, 13, 2, 16, seed=s, dtype=torch.float32)
                                                                     for s in (1, 2))
        kw = {}
    else:
        q, k, v = _rand(8, 4, 16, seed=0, dtype=torch.float32), *(_rand(19, 2, 16, seed=s, dtype=torch.float32)
                                                                  for s in (1, 2))
        kw = dict(cu_seqlens_q=_cu([3, 5]), cu_seqlens_k=_cu([7, 12]))
    q.requires_grad_()
    got = rk.routed_attention(q, k, v, C, 2, backend="triton", **kw)
    want = rk.routed_attention(q, k, v, C, 2, backend="reference", **kw)
    assert_close_scaled(got, want, torch.float32)
    idx = rk.select_chunks(q, k, C, 2, backend="triton", **kw)
    assert torch.equal(idx, rk.select_chunks(q, k, C, 2, backend="reference", **kw))
    got.sum().backward()
    assert ran == [id(op.KERNELS), id(gate_op.KERNELS), id(op.BACKWARD_KERNELS)] and q.grad is not None
