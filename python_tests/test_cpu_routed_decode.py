"""C++ CPU routed_decode_fwd (decode / speculative decode over a KV cache), called through torch.ops, against the
eager reference routed_attention_ref(q, k_cache, v_cache, ..., seqused_k=...) (which the repo tests against a float64
brute force). Key sums always come from a RoutedKVCache filled by appends, so the gate sees the cache's own sums.
The selection is checked through the outputs (a wrong chunk changes o far beyond the tolerance) and directly by a
block-structured cache whose top chunks are known by construction."""
from __future__ import annotations

import pytest
import torch

import routing_kernels as rk
from routing_kernels._ext import has_kernel
from routing_kernels.ops.routed_attention.reference import routed_attention_ref
from tolerance import assert_close_scaled

pytestmark = pytest.mark.skipif(not has_kernel("routed_decode_fwd", "cpu"), reason="routing_kernels._C not built")

ops = torch.ops.routing_kernels
C = 8  # chunk size of the small cases
# Row lengths: 1 token, one short chunk, exactly one chunk, one chunk + 1, several chunks + a remainder, many chunks.
LENGTHS = [1, C - 1, C, C + 1, 5 * C + 3, 125 * C + 5]


def _rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _filled_cache(lengths, hkv, d, dv, chunk, dtype, seed=0, capacity=None):
    """A RoutedKVCache (1 layer) whose row b holds lengths[b] random tokens, appended in two varlen pieces (a prefill
    and a second, uneven append) so that the key sums are the ones append maintains."""
    cap = capacity or max(lengths) + 3
    cache = rk.RoutedKVCache(1, len(lengths), cap, num_kv_heads=hkv, head_dim=d, chunk_size=chunk, v_head_dim=dv,
                             dtype=dtype)
    first = [n // 2 + (b % 2) for b, n in enumerate(lengths)]
    for piece, counts in enumerate([first, [n - f for n, f in zip(lengths, first)]]):
        total = sum(counts)
        cu = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32)
        cache.append(0, _rand(total, hkv, d, seed=seed + 10 * piece, dtype=dtype),
                     _rand(total, hkv, dv, seed=seed + 10 * piece + 1, dtype=dtype), cu_seqlens=cu)
    assert cache.seqlens[0].tolist() == list(lengths)
    return cache


def _decode(q, cache, chunk, top_k, causal, scale):
    return ops.routed_decode_fwd(q, cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0], chunk, top_k,
                                 causal, scale)


def _check(q, cache, chunk, top_k, causal, scale=None, dtype=torch.float32):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, lse = _decode(q, cache, chunk, top_k, causal, scale)
    want = routed_attention_ref(q, cache.keys(0), cache.values(0), chunk, top_k, causal, scale=scale,
                                seqused_k=cache.seqlens[0])
    assert o.dtype == q.dtype and lse.dtype == want[1].dtype
    assert o.shape == (*q.shape[:-1], cache.values(0).shape[-1]) and lse.shape == q.shape[:-1]
    assert_close_scaled((o, lse), want, dtype, name="o, lse")
    return o, lse


@pytest.mark.parametrize("top_k", [1, 2, 4], ids=lambda k: f"top{k}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("q_len", [1, 3, 16], ids=lambda n: f"Lq{n}")
def test_lengths_q_len_causal_top_k(q_len, causal, top_k, poison):
    # Lq queries need Lq keys: shorter rows are lengthened to Lq. Lq = 3 and 16 put the queries of one row in two
    # own chunks (position 7 | 8 with C = 8), so causal rows see different key counts inside the own chunk.
    lengths = [max(n, q_len) for n in LENGTHS]
    cache = _filled_cache(lengths, hkv=2, d=16, dv=24, chunk=C, dtype=torch.float32)
    q = _rand(len(lengths), q_len, 8, 16, seed=5)
    _check(q, cache, C, top_k, causal)


@pytest.mark.parametrize("group", [1, 2, 4, 8, 16], ids=lambda g: f"group{g}")
def test_gqa_groups(group, poison):
    cache = _filled_cache([3, 17, 333], hkv=2, d=16, dv=16, chunk=C, dtype=torch.float32, seed=1)
    _check(_rand(3, 3, 2 * group, 16, seed=6), cache, C, 3, True)


@pytest.mark.parametrize("dims", [(16, 16), (64, 40), (128, 72), (256, 256)], ids=lambda t: f"D{t[0]}_Dv{t[1]}")
def test_head_dims(dims, poison):
    # Chunk 100: blocks of 64 keys do not divide it, nor the rows' lengths; causal, and non-causal with Lq = 2.
    d, dv = dims
    cache = _filled_cache([2, 99, 100, 101, 503, 1200], hkv=2, d=d, dv=dv, chunk=100, dtype=torch.float32, seed=2)
    q = _rand(6, 2, 4, d, seed=7)
    _check(q[:, 1:], cache, 100, 3, True, scale=0.3 / d ** 0.5)
    _check(q, cache, 100, 2, False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_top_k_covering_every_chunk_is_dense_attention(causal, poison):
    lengths = [5, 40, 203]
    cache = _filled_cache(lengths, hkv=2, d=16, dv=8, chunk=C, dtype=torch.float32, seed=3)
    q = _rand(3, 4, 4, 16, seed=8)
    o, lse = _check(q, cache, C, 26, causal)  # 26 chunks >= M = 26 of the longest row
    for b, n in enumerate(lengths):  # and it is SDPA over the row's keys (queries at the last 4 positions)
        k, v = (t[b:b + 1, :n].transpose(1, 2).repeat_interleave(2, 1) for t in (cache.keys(0), cache.values(0)))
        mask = torch.arange(n)[None, :] <= (n - 4 + torch.arange(4))[:, None] if causal else None
        want = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k, v, attn_mask=mask)
        torch.testing.assert_close(o[b:b + 1], want.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(dtype, causal, poison):
    # fp16/bf16 K/V blocks are converted to fp32 per block; fp64 runs in fp64 (key sums fp64, lse fp64).
    lengths = [3, 9, 44, 600]
    cache = _filled_cache(lengths, hkv=2, d=32, dv=16, chunk=C, dtype=dtype, seed=4)
    assert cache.key_sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check(_rand(4, 3 if causal else 1, 4, 32, seed=9, dtype=dtype), cache, C, 3, causal, dtype=dtype)


def test_noncontiguous_q_and_strided_caches(poison):
    lengths = [3, 50, 301]
    cache = _filled_cache(lengths, hkv=2, d=16, dv=16, chunk=C, dtype=torch.float32, seed=5)
    q = _rand(3, 4, 2, 16, seed=10).transpose(1, 2)  # (B, Lq, Hq, D) = (3, 2, 4, 16) as a (B, Hq, Lq, D) view
    assert not q.is_contiguous()
    _check(q, cache, C, 3, True)
    k, v, sums, used = cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0]
    want = routed_attention_ref(q, k, v, C, 3, True, seqused_k=used)
    # Caches inside wider tensors (head stride 2 D, read in place) and with a strided D (converted per block).
    wide_k, wide_v = torch.zeros(*k.shape[:-1], 2 * 16), torch.zeros(*v.shape[:-1], 2 * 16)
    wide_k[..., :16], wide_v[..., 16:] = k, v
    t_k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide_sums = torch.zeros(*sums.shape[:-1], 32)
    wide_sums[..., ::2] = sums
    for kk, vv, ss in [(wide_k[..., :16], wide_v[..., 16:], wide_sums[..., ::2]), (t_k, v, sums)]:
        got = ops.routed_decode_fwd(q, kk, vv, ss, used, C, 3, True, 16 ** -0.5)
        assert_close_scaled(got, want, torch.float32)


def test_block_structure_selects_the_planted_chunks(poison):
    """K chunk j of kv head h has mean a_{h,j} e_0 (plus noise averaging out), q = e_0 per head: the top chunks are the
    planted ones. V of chunk j is j in feature 0: o[..., 0] is the softmax-weighted mean chunk id, computed here by a
    float64 loop over exactly the planted chunks. The two heads of a kv group plant different chunks (a union)."""
    chunk, n, hkv, group, d = 16, 16 * 40 + 5, 2, 2, 8
    cap = n + 1
    k = 0.01 * _rand(1, n, hkv, d, seed=11)
    v = torch.zeros(1, n, hkv, d)
    pos = torch.arange(n)
    v[0, :, :, 0] = (pos // chunk).float()[:, None]
    v[0, :, :, 1] = 1.0
    q = torch.zeros(1, 1, hkv * group, d)
    planted = {}  # (q head) -> chunks besides the own one
    for hk in range(hkv):
        for g in range(group):
            h = hk * group + g
            q[0, 0, h, 1 + g] = 1.0  # head g of the group looks at feature 1 + g
            planted[h] = [3 + 7 * hk + g, 20 + 5 * hk + 3 * g, 31 - hk - g]
            for j in planted[h]:
                k[0, j * chunk:(j + 1) * chunk, hk, 1 + g] += 1.0 + 0.1 * j  # distinct gates: no ties
    cache = rk.RoutedKVCache(1, 1, cap, num_kv_heads=hkv, head_dim=d, chunk_size=chunk)
    cache.append(0, k, v)
    o, lse = _decode(q, cache, chunk, 4, True, 1.0)
    own = (n - 1) // chunk
    for h in range(hkv * group):
        hk = h // group
        keys = torch.cat([torch.arange(j * chunk, min((j + 1) * chunk, n)) for j in sorted(planted[h] + [own])])
        s = (k[0, keys, hk].double() @ q[0, 0, h].double())
        p = torch.softmax(s, 0)
        torch.testing.assert_close(o[0, 0, h].double(), p @ v[0, keys, hk].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[0, 0, h].double(), torch.logsumexp(s, 0), rtol=1e-5, atol=1e-5)
    _check(q, cache, chunk, 4, True, scale=1.0)
    # Ties: a constant cache makes every gate equal (exactly, integer sums); the lowest chunks win, as in the reference.
    flat = rk.RoutedKVCache(1, 1, cap, num_kv_heads=hkv, head_dim=d, chunk_size=chunk)
    flat.append(0, torch.ones(1, n, hkv, d), v)
    _check(torch.ones(1, 1, hkv * group, d), flat, chunk, 4, True)
    _check(torch.ones(1, 1, hkv * group, d), flat, chunk, 4, False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_few_tasks_split_chunks_into_key_ranges(causal, poison):
    # B = 1, one kv head, top_k 2: 2 (chunk, head) tasks < MIN_TASKS, so each chunk of 256 is cut into 4 key ranges of
    # 64; with Lq = 16 the earliest queries see none of the own chunk's last ranges (empty partials in the merge).
    cache = _filled_cache([256 * 3 + 10], hkv=1, d=16, dv=16, chunk=256, dtype=torch.float32, seed=6)
    _check(_rand(1, 16, 4, 16, seed=12), cache, 256, 2, causal)
    cache = _filled_cache([256 * 3 + 200], hkv=1, d=16, dv=16, chunk=256, dtype=torch.float32, seed=7)
    _check(_rand(1, 16, 4, 16, seed=13), cache, 256, 2, causal)


def test_decode_loop_through_the_cache():
    # 40 steps of append + decode over a varlen batch, every step against the reference.
    lengths = [1, 7, 30]
    cache = _filled_cache(lengths, hkv=2, d=16, dv=16, chunk=4, dtype=torch.float32, seed=8, capacity=80)
    for step in range(40):
        cache.append(0, _rand(3, 1, 2, 16, seed=100 + step), _rand(3, 1, 2, 16, seed=200 + step))
        _check(_rand(3, 1, 4, 16, seed=300 + step), cache, 4, 3, True)


def test_deterministic_across_thread_counts():
    cache = _filled_cache([5, 700, 2000], hkv=2, d=32, dv=32, chunk=64, dtype=torch.float32, seed=9)
    q = _rand(3, 2, 8, 32, seed=14)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _decode(q, cache, 64, 4, True, 0.2)
        torch.set_num_threads(max(2, threads))
        many = _decode(q, cache, 64, 4, True, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_opcheck_and_fake():
    cache = _filled_cache([3, 20], hkv=2, d=8, dv=8, chunk=4, dtype=torch.float32, seed=10)
    args = (_rand(2, 2, 4, 8, seed=15), cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0], 4, 2,
            True, 0.3)
    torch.library.opcheck(ops.routed_decode_fwd, args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        o, lse = ops.routed_decode_fwd(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert o.shape == (2, 2, 4, 8) and lse.shape == (2, 2, 4) and lse.dtype == torch.float32


def test_compiled_decode_step_fullgraph():
    # aot_eager: traces through the fake kernel and runs the C++ kernel, without inductor's C++ build (minutes here).
    cache = _filled_cache([3, 20], hkv=2, d=8, dv=8, chunk=4, dtype=torch.float32, seed=12)
    q = _rand(2, 1, 4, 8, seed=16)
    step = torch.compile(lambda q, k, v, s, u: ops.routed_decode_fwd(q, k, v, s, u, 4, 2, True, 0.3),
                         fullgraph=True, backend="aot_eager")
    got = step(q, cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0])
    assert all(torch.equal(a, b) for a, b in zip(got, _decode(q, cache, 4, 2, True, 0.3)))


def test_bad_inputs_name_the_argument():
    cache = _filled_cache([3, 20], hkv=2, d=8, dv=8, chunk=4, dtype=torch.float32, seed=11)
    k, v, sums, used = cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0]
    q = torch.randn(2, 2, 4, 8)
    call = lambda **kw: ops.routed_decode_fwd(  # noqa: E731
        kw.get("q", q), kw.get("k", k), kw.get("v", v), kw.get("sums", sums), kw.get("used", used), kw.get("c", 4),
        kw.get("top_k", 2), True, 1.0)
    cases = [
        ("q must have 4 dimensions", dict(q=q[0])),
        ("q must be float", dict(q=q.int())),
        ("k_cache must have q's dtype", dict(k=k.double())),
        ("v_cache must have q's batch size", dict(v=v[:1])),
        ("heads of q", dict(q=torch.randn(2, 2, 3, 8))),
        ("k_cache must have q's head dim", dict(q=torch.randn(2, 2, 4, 6))),
        ("v_cache must be", dict(v=v[:, :5])),
        ("key_sums must be in the accumulation type", dict(sums=sums.double())),
        ("key_sums must be \\(B, ceil\\(capacity / chunk_size\\)", dict(sums=sums[:, :2])),
        ("key_sums must be \\(B, ceil\\(capacity / chunk_size\\)", dict(c=8)),
        ("seqused_k must be int32", dict(used=used.long())),
        ("seqused_k must be \\(B,\\)", dict(used=used[:1])),
        ("seqused_k\\[0\\] = 1 must lie in \\[Lq, capacity\\]", dict(used=torch.tensor([1, 20], dtype=torch.int32))),
        ("seqused_k\\[1\\] = 24 must lie", dict(used=torch.tensor([3, 24], dtype=torch.int32))),
        ("top_k must be >= 1", dict(top_k=0)),
        ("chunk_size must be >= 1", dict(c=0)),
    ]
    for message, kw in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**kw)
