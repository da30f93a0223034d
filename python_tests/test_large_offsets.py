"""The C++ CPU kernels on a tensor of more than 2^31 elements: chunk_mean_fwd, chunk_route_fwd and chunk_mean_bwd
(and chunk_mean_table_fwd / _bwd, the same chunks given as a table) on an fp16 x of 2^31 + 2^23 elements (4.3 GB),
checked exactly on chunks that lie beyond element 2^31, and
routed_attention_fwd on an fp32 q of 2^31 + 2^24 elements (8.7 GB; fp32 so that no fp32 copy of it is made).

x is zero except a few chunks filled with one value per head (exact in fp16, so their mean is exact); one of them
straddles element 2^31, one is the last (partial) chunk. An element offset computed in 32 bits wraps to a
negative one there: the kernel reads or writes outside x (a crash) or the wrong place (a wrong value here).
Peak memory ~8.8 GB (x and one output of its size; q alone, before x exists), ~10-30 s on a 2-core machine."""
from __future__ import annotations

import math

import pytest
import torch

from routing_kernels._ext import has_kernel

ops = torch.ops.routing_kernels
B, H, D, CS = 2, 2, 64, 1000
N = 2**23 + 2**15                          # 8,421,376 tokens per sequence: 2^31 + 2^23 elements in all
M = math.ceil(N / CS)                      # 8422 chunks, the last one of 376 tokens
ROW = H * D
FAR_TOKEN = 2**31 // ROW - N               # sequence 1's token holding element 2^31 (8,355,840)
# (sequence, chunk, value of head 0, value of head 1): the chunk straddling element 2^31, one past it, the last
# (partial) chunk, and one in sequence 0 far below 2^31.
SPECIAL = [(1, FAR_TOKEN // CS, 1.5, -2.25), (1, FAR_TOKEN // CS + 40, 0.75, 3.0), (1, M - 1, -1.25, 0.5),
           (0, 5, 2.0, -0.5)]
NEED_BYTES = 11 * 2**30


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


pytestmark = [
    pytest.mark.skipif(not has_kernel("chunk_mean_bwd", "cpu"), reason="routing_kernels._C not built"),
    pytest.mark.skipif(not __import__("sys").platform.startswith("linux") or _available_bytes() < NEED_BYTES,
                       reason=f"needs {NEED_BYTES / 2**30:.0f} GiB of available memory"),
]


def _span(c):
    return c * CS, min(N, (c + 1) * CS)


def test_routed_attention_fwd_beyond_2_31():
    # Before the x fixture exists (pytest makes it at its first use): q alone is 8.7 GB. Two tokens, chunk_size 1,
    # so every key chunk is one token and the work is tiny; 2^18 query heads of dim 4104 make q's rows run past
    # element 2^31 (row 523,264 on, token 1's heads 261,120 on). GQA group 64: k is 134 MB, v (Dv = 1) 4 MB.
    t, hq, hkv, d = 2, 2**18, 2**12, 4104
    q = torch.zeros(1, t, hq, d)
    assert q.numel() > 2**31
    k = torch.zeros(1, t, hkv, d)
    k[0, 1] = 2.0**-6
    v = torch.empty(1, t, hkv, 1)
    v[0, 0], v[0, 1] = 1.0, 3.0
    far = torch.arange(hq - 40, hq)  # token 1's last 40 heads: their rows start past element 2^31
    assert (1 * hq + far[0].item()) * d > 2**31
    q[0, 1, far] = 2.0**-6  # score of key 1: 4104 * 2^-12, exact in fp32; key 0 scores 0
    o, lse = ops.routed_attention_fwd(q, k, v, 1, 2, True, None, 0, 1.0)
    del q
    s1 = d * 2.0**-12
    want_o = torch.full((1, t, hq, 1), 2.0)  # zero queries: both keys score 0 -> (1 + 3) / 2
    want_lse = torch.full((1, t, hq), math.log(2.0))
    want_o[0, 0], want_lse[0, 0] = 1.0, 0.0  # token 0 sees key 0 only
    want_o[0, 1, far] = (1.0 + 3.0 * math.exp(s1)) / (1.0 + math.exp(s1))
    want_lse[0, 1, far] = math.log1p(math.exp(s1))
    torch.testing.assert_close(o, want_o, rtol=1e-6, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def x():
    t = torch.zeros(B, N, H, D, dtype=torch.float16)
    assert t.numel() > 2**31 and B * N * ROW - 2**31 == 2**23
    for s, c, v0, v1 in SPECIAL:
        a, b = _span(c)
        t[s, a:b, 0] = v0
        t[s, a:b, 1] = v1
    a, b = _span(SPECIAL[0][1])
    assert (1 * N + a) * ROW < 2**31 < (1 * N + b) * ROW  # the first special chunk straddles element 2^31
    yield t


def _expected_means():
    want = torch.zeros(B, M, H, D, dtype=torch.float16)
    for s, c, v0, v1 in SPECIAL:
        want[s, c, 0], want[s, c, 1] = v0, v1
    return want


def test_chunk_mean_fwd_beyond_2_31(x):
    want = _expected_means()
    assert torch.equal(ops.chunk_mean_fwd(x, CS, None, 0), want)
    cu = torch.tensor([0, N, 2 * N], dtype=torch.int32)  # the same tokens as varlen (T, H, D)
    assert torch.equal(ops.chunk_mean_fwd(x.view(B * N, H, D), CS, cu, N), want)


@pytest.mark.parametrize("table", [False, True], ids=["integer", "table"])
def test_chunk_route_fwd_beyond_2_31(x, table):
    query = torch.full((H, D), 1 / 64, dtype=torch.float16)  # score = scale * <query, mean> = the chunk's value
    if table:  # the same chunks as a chunk table (dynamic chunking)
        y, weights, summary = ops.chunk_route_table_fwd(x.view(B * N, H, D), query, *_table(), 1.0)
        y = y.view(B, N, H, D)
    else:
        y, weights, summary = ops.chunk_route_fwd(x, query, CS, None, 0, 1.0)
    # weights: softmax over M chunk scores per (sequence, head), all 0 but the special chunks'. Their fp32
    # normalizer sums 8422 terms (~1e-4 relative error), so compare weights relative to a zero-score chunk's
    # (exp(v - top) * inv against exp(0 - top) * inv: a few fp32 roundings), and those of every zero-score chunk
    # with each other, exactly.
    special = {(s, c): (v0, v1) for s, c, v0, v1 in SPECIAL}
    zero_c = M // 2
    for s in range(B):
        for h in range(H):
            w = weights[s, h].double()
            base = w[zero_c]
            others = [c for (ss, c) in special if ss == s]
            mask = torch.ones(M, dtype=torch.bool)
            mask[others] = False
            assert torch.equal(w[mask], torch.full_like(w[mask], base.item())), (s, h)
            for c in others:
                ratio = (w[c] / base).item()
                assert math.isclose(ratio, math.exp(special[s, c][h]), rel_tol=1e-6), (s, h, c, ratio)
            assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-3)
    want_w = weights.double()
    want_summary = (want_w[..., None] * _expected_means().double().permute(0, 2, 1, 3)).sum(2)
    torch.testing.assert_close(summary.double(), want_summary, rtol=1e-3, atol=1e-6)
    for s, c, v0, v1 in SPECIAL:
        a, b = _span(c)
        for h, v in ((0, v0), (1, v1)):
            got = y[s, a:b, h]
            assert torch.equal(got, torch.full_like(got, (weights[s, h, c] * v).item())), (s, c, h)
        after = y[s, b:b + CS]  # the next chunk is zero
        assert not after.any(), (s, c)
    del y


def _table():
    """x's integer chunking (chunks of CS tokens per sequence) as a chunk table: (cu_chunks, seq_chunks, M)."""
    starts = [s * N + a for s in range(B) for a in range(0, N, CS)]
    return (torch.tensor(starts + [B * N], dtype=torch.int32), torch.tensor([0, M, 2 * M], dtype=torch.int32), M)


def test_chunk_mean_table_fwd_beyond_2_31(x):
    # The chunk-table kernel reaches tokens through cu_chunks (int32) times H * D: int64 products past 2^31.
    assert torch.equal(ops.chunk_mean_table_fwd(x.view(B * N, H, D), *_table()), _expected_means())


@pytest.mark.parametrize("table", [False, True], ids=["integer", "table"])
def test_chunk_mean_bwd_beyond_2_31(x, table):
    grad = torch.zeros(B, M, H, D, dtype=torch.float16)
    for s, c, v0, v1 in SPECIAL:
        grad[s, c, 0], grad[s, c, 1] = v0 * 1000, v1 * 1000
    if table:
        dx = ops.chunk_mean_table_bwd(grad, x.view(B * N, H, D), *_table()).view(B, N, H, D)
    else:
        dx = ops.chunk_mean_bwd(grad, x, CS, None, 0)
    for s, c, v0, v1 in SPECIAL:
        a, b = _span(c)
        count = b - a
        for h, v in ((0, v0), (1, v1)):
            got = dx[s, a:b, h]
            assert torch.equal(got, torch.full_like(got, float(torch.tensor(v * 1000 / count, dtype=torch.float32)
                                                               .half()))), (s, c, h)
        assert not dx[s, b:b + CS].any() and not dx[s, max(0, a - CS):a].any(), (s, c)
    del dx
