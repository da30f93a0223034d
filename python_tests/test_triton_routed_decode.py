"""Triton decode kernels (routed_attention/triton_decode.py) against the eager reference over a RoutedKVCache.

The cache is filled by appends (a varlen prefill, then two more varlen appends), so key_sums are the cache's own
running sums; the reference recomputes everything from the cache's K/V and seqused_k. On CPU the kernels run
under TRITON_INTERPRET=1 (root conftest.py), in fp32 and fp16 (the interpreter cannot do bf16); it costs per
program and per reduction, so the shapes are small: C = 4 (8 for Lq = 16), D <= 128, a few rows.
The row lengths are C's boundaries 1, C-1, C, C+1, 3C+1, 5C+3, each raised to Lq (query i of a row sits at
seqused - Lq + i, so a row needs seqused >= Lq).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import routing_kernels as rk
from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.routed_attention import triton_decode as td
from routing_kernels.ops.routed_attention.reference import routed_attention_ref
from tolerance import assert_close_scaled

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LSE_TOL = dict(rtol=1e-4, atol=1e-4)  # lse: fp32 sums of exact (fp32-accumulated) scores in every dtype


def _cu(counts):
    return torch.tensor([0] + list(counts), dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)


def _lengths(chunk_size, q_len):
    c = chunk_size
    # 3C + 1: a query at p = 3C, where chunk 2 just became eligible and competes with chunks 0 and 1 (at p = C
    # an off-by-one in the eligibility still picks chunk 0, the only other candidate, with gate -inf)
    return sorted({max(n, q_len) for n in (1, c - 1, c, c + 1, 3 * c + 1, 5 * c + 3)})


def _cache(lengths, hkv, d, dv, chunk_size, dtype, capacity, seed=0):
    """A one-layer RoutedKVCache whose row b holds lengths[b] random tokens, appended in three varlen steps."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    k = torch.randn(b, capacity, hkv, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    v = torch.randn(b, capacity, hkv, dv, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    cache = rk.RoutedKVCache(1, b, capacity, hkv, d, chunk_size, v_head_dim=dv, dtype=dtype, device=DEVICE)
    done = [0] * b
    for back in (2, 1, 0):  # a prefill up to n - 2 tokens, then one token twice (0 tokens for short rows)
        counts = [max(n - back, 0) - f for n, f in zip(lengths, done)]
        cache.append(0, torch.cat([k[r, f:f + c] for r, (f, c) in enumerate(zip(done, counts))]),
                     torch.cat([v[r, f:f + c] for r, (f, c) in enumerate(zip(done, counts))]), cu_seqlens=_cu(counts))
        done = [f + c for f, c in zip(done, counts)]
    assert cache.seqlens[0].tolist() == list(lengths)
    return cache


def _q(b, q_len, hq, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, q_len, hq, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _check(q, cache, chunk_size, top_k, causal, scale=None):
    """Kernel selection == reference selection (exactly), o and lse == reference (per-dtype tolerance)."""
    kc, vc, sums, used = cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0]
    sel = td.routed_decode_select(q, sums, used, chunk_size, top_k, causal)
    want_sel = route_chunks_ref(q, kc, chunk_size, top_k, causal, seqused_k=used)
    slots = sel.shape[-1]
    assert slots == min(top_k, sums.shape[1])
    assert torch.equal(sel, want_sel[..., :slots]) and bool((want_sel[..., slots:] == -1).all())
    o, lse = td.routed_decode_triton(q, kc, vc, sums, used, chunk_size, top_k, causal, scale)
    want_o, want_lse = routed_attention_ref(q, kc, vc, chunk_size, top_k, causal, seqused_k=used, scale=scale)
    assert o.dtype == q.dtype and o.shape == want_o.shape and lse.dtype == torch.float32
    assert_close_scaled(o, want_o, q.dtype, name="o")
    torch.testing.assert_close(lse, want_lse.float(), **LSE_TOL)
    return o, lse


# (id, Lq, Hq, Hkv, D, Dv, chunk_size, top_k); rows of a kv group = Lq * Hq / Hkv pick the kernels' tile path
CASES = [
    ("mha_lq1_top2", 1, 2, 2, 16, 16, 4, 2),             # 1 row: 2D broadcast path
    ("gqa2_lq3_top2", 3, 4, 2, 16, 16, 4, 2),            # 6 rows (tile of 8), queries at 3 positions
    ("gqa4_lq1_d64_dv32_top3", 1, 8, 2, 64, 32, 4, 3),   # Dv != D, 4 rows
    ("gqa8_lq3_top2", 3, 8, 1, 16, 16, 4, 2),            # 24 rows: tl.dot (tile of 32), 2 gate tiles of 16
    ("gqa2_lq1_dense", 1, 4, 2, 16, 16, 4, 64),          # top_k >= M = 7: dense attention over the cache
    ("gqa16_lq1_d128_top3", 1, 16, 1, 128, 128, 4, 3),   # 16 rows: tl.dot in both kernels, D = 128
    ("mha_lq16_top3", 16, 2, 2, 16, 16, 8, 3),           # Lq 16 of one head: 16 rows, tl.dot
    ("gqa4_lq16_d128_dv64_top2", 16, 4, 1, 128, 64, 8, 2),  # 64 rows: 2 row tiles in fp32 (cap 32 x 128)
    ("gqa2_lq1_top1", 1, 4, 2, 16, 16, 4, 1),            # top_k = 1: the own chunk only
]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_fp32(case, causal):
    _, q_len, hq, hkv, d, dv, cs, top_k = case
    lengths = _lengths(cs, q_len)
    cache = _cache(lengths, hkv, d, dv, cs, torch.float32, capacity=max(lengths) + cs + 1)  # chunks past the end
    _check(_q(len(lengths), q_len, hq, d, torch.float32), cache, cs, top_k, causal)


LOW_CASES = ["gqa2_lq3_top2", "gqa4_lq1_d64_dv32_top3", "gqa16_lq1_d128_top3", "gqa4_lq16_d128_dv64_top2"]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", LOW_CASES)
def test_decode_low_precision(name, causal, dtype):
    _, q_len, hq, hkv, d, dv, cs, top_k = next(c for c in CASES if c[0] == name)
    lengths = _lengths(cs, q_len)
    cache = _cache(lengths, hkv, d, dv, cs, dtype, capacity=max(lengths))  # the longest row fills the cache
    _check(_q(len(lengths), q_len, hq, d, dtype), cache, cs, top_k, causal, scale=0.3)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("per", [1, 3], ids=lambda p: f"split{p}")
@pytest.mark.parametrize("rows", ["broadcast", "dot"])
def test_decode_gate_splits_merge_exactly(rows, per, monkeypatch):
    """A long cache splits the gate over programs (partial top-k keys + merge kernel); forcing tiny splits
    (12 of one chunk; 3 chunks, the last split short) must give the reference's selection, as one split does."""
    q_len, hq = (1, 4) if rows == "broadcast" else (1, 16)  # 4 / 16 rows per kv group
    cs, top_k = 4, 4
    cache = _cache([45, 29, 3], 1, 16, 16, cs, torch.float32, capacity=48)  # M = 12
    q = _q(3, q_len, hq, 16, torch.float32)
    args = (q, cache.key_sums[0], cache.seqlens[0], cs, top_k)
    for causal in (True, False):
        _check(q, cache, cs, top_k, causal)  # one split (the default here), selection and outputs
        want = route_chunks_ref(q, cache.keys(0), cs, top_k, causal, seqused_k=cache.seqlens[0])
        monkeypatch.setattr(td, "GATE_SPLIT_CHUNKS", per)
        assert torch.equal(td.routed_decode_select(*args, causal), want)
        monkeypatch.setattr(td, "GATE_SPLIT_CHUNKS", None)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_decode_gate_ties_and_nan(causal):
    """Equal gates go to the lower chunk (the reference's stable sort); a NaN chunk sum ranks first."""
    cs = 4
    cache = rk.RoutedKVCache(1, 2, 24, 1, 16, cs, device=DEVICE)
    ones = torch.ones(2, 23, 1, 16, device=DEVICE)
    cache.append(0, ones[:, :22], ones[:, :22])  # every complete chunk's mean is exactly 1: all gates tie
    q = torch.ones(2, 1, 4, 16, device=DEVICE)  # rows 1.. of the group differ only in sign: +-16 or 0
    q[:, :, 1] = -1.0
    q[:, :, 2, :8] = -1.0
    for top_k in (2, 3, 5):
        _check(q, cache, cs, top_k, causal)
    cache.key_sums[0, 0, 2, 0, 3] = float("nan")  # chunk 2 of row 0
    sel = td.routed_decode_select(q, cache.key_sums[0], cache.seqlens[0], cs, 3, causal)
    assert torch.equal(sel, route_chunks_ref_from_sums(q, cache, cs, 3, causal))
    assert bool((sel[0] == 2).any(-1).all())


def route_chunks_ref_from_sums(q, cache, cs, top_k, causal):
    """The reference gate on the cache's own sums (a NaN planted in key_sums is not in K): the keys are rebuilt
    so that their chunk means are the sums' means, then route_chunks_ref runs on them."""
    used = cache.seqlens[0]
    k = torch.zeros_like(cache.keys(0))
    for b, n in enumerate(used.tolist()):
        for j in range((n + cs - 1) // cs):
            count = min(cs, n - j * cs)
            k[b, j * cs:j * cs + count] = cache.key_sums[0, b, j] / count
    return route_chunks_ref(q, k, cs, top_k, causal, seqused_k=used)[..., :min(top_k, k.shape[1] // cs)]


@pytest.mark.usefixtures("poison")
def test_decode_noncontiguous_q():
    cs, hq, hkv, d = 4, 4, 2, 16
    cache = _cache([5, 23], hkv, d, d, cs, torch.float32, capacity=24)
    q_heads_first = _q(2, hq, 3, d, torch.float32).transpose(1, 2)  # (B, Lq, Hq, D) view, heads outer
    q_strided = _q(2, 3, hq, 2 * d, torch.float32)[..., ::2]  # last dim stride 2: the launcher copies it
    for q in (q_heads_first, q_strided):
        assert not q.is_contiguous()
        _check(q, cache, cs, 2, True)


class _SyncRecorder(TorchDispatchMode):
    """Records the ops that make the host wait for the device: a tensor read into Python (item, int(),
    bool(), tolist go through _local_scalar_dense), data-dependent shapes (nonzero, masked_select, unique), and
    copies from a device to the host. The Triton interpreter copies kernel arguments host <-> host (set_,
    new_empty, copy_ between CPU tensors) and reads no value: measured, nothing of it needs excluding."""

    SYNC = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.SYNC:
            self.seen.append(name)
        elif name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.seen.append("copy_ to host")
        elif name == "_to_copy" and str(kwargs.get("device", args[0].device)) == "cpu" and \
                args[0].device.type != "cpu":
            self.seen.append("_to_copy to host")
        return func(*args, **kwargs)


def test_decode_makes_no_host_sync():
    cs = 4
    cache = _cache([3, 23], 2, 16, 16, cs, torch.float32, capacity=24)
    q = _q(2, 3, 8, 16, torch.float32)
    args = (q, cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0], cs, 3)
    with _SyncRecorder() as rec:
        td.routed_decode_triton(*args, causal=True)
    assert rec.seen == []
    with _SyncRecorder() as rec:  # the recorder sees what it must: a value read on the host
        int(cache.seqlens[0][0])
    assert rec.seen == ["_local_scalar_dense"]


def test_decode_workspace_bound(monkeypatch):
    """fp32 workspace <= B * Hq * Lq * min(top_k, M) * (Dv + 1) (partial o and lse), whatever top_k."""
    cs, b, q_len, hq, dv = 4, 2, 3, 4, 8
    cache = _cache([5, 23], 2, 16, dv, cs, torch.float32, capacity=24)  # M = 6
    q = _q(b, q_len, hq, 16, torch.float32)
    sizes = []
    empty = torch.empty

    def recording_empty(*shape, **kw):
        t = empty(*shape, **kw)
        sizes.append((t.dtype, t.numel()))
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    for top_k in (2, 50):
        sizes.clear()
        td.routed_decode_triton(q, cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0], cs, top_k)
        fp32 = sum(n for dt, n in sizes if dt == torch.float32) - b * q_len * hq * (dv + 1)  # minus o, lse
        assert fp32 <= b * hq * q_len * min(top_k, 6) * (dv + 1), (top_k, sizes)
