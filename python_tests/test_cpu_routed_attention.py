"""C++ CPU route_chunks_fwd / routed_attention_fwd / routed_attention_bwd (routing_kernels._C), called directly
through torch.ops, against the eager references: exact indices, o / lse / dq / dk / dv within a per-dtype
tolerance, over the awkward-shape grid, GQA groups, top_k beyond the number of chunks, Dv != D."""
from __future__ import annotations

import pytest
import torch

from routing_kernels._ext import has_kernel
from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.routed_attention.reference import routed_attention_backward_ref, routed_attention_ref
from shapes import LAYOUT_IDS, LAYOUTS, make

pytestmark = pytest.mark.skipif(not has_kernel("routed_attention_fwd", "cpu"), reason="routing_kernels._C not built")

ops = torch.ops.routing_kernels
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _inputs(layout, hq, hkv, d, dv, dtype, seed=0):
    q, cu, ms = make(layout, hq, d, dtype, seed=seed)
    k, _, _ = make(layout, hkv, d, dtype, seed=seed + 1)
    v, _, _ = make(layout, hkv, dv, dtype, seed=seed + 2)
    return q, k, v, cu, ms


def _check_attention(q, k, v, cs, top_k, causal, cu, ms, dtype, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ms_op = 0 if ms is None else ms
    o, lse = ops.routed_attention_fwd(q, k, v, cs, top_k, causal, cu, ms_op, scale)
    want_o, want_lse = routed_attention_ref(q, k, v, cs, top_k, causal, cu, ms, scale)
    torch.testing.assert_close((o, lse), (want_o, want_lse), **TOL[dtype])
    g = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    # The reference backward takes the kernel's o: both then differentiate the same forward.
    got = ops.routed_attention_bwd(do, dlse, q, k, v, o, lse, cs, top_k, causal, cu, ms_op, scale)
    want = routed_attention_backward_ref(do, dlse, q, k, v, o, cs, top_k, causal, cu, ms, scale)
    torch.testing.assert_close(got, want, **TOL[dtype])


# (Hq, Hkv, D, Dv, top_k): GQA groups 1/2/4, top_k 1 (own chunk only), 2, and > M (dense attention), Dv != D.
HEADS = [(2, 2, 16, 16, 2), (4, 2, 16, 24, 1), (4, 1, 20, 8, 9)]
HEAD_IDS = ["g1_k2", "g2_k1_dv24", "g4_k9_dv8"]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_route_chunks_exact(case, heads, causal, poison):
    _, layout, cs = case
    hq, hkv, d, _, top_k = heads
    q, k, _, cu, ms = _inputs(layout, hq, hkv, d, d, torch.float32)
    got = ops.route_chunks_fwd(q, k, cs, top_k, causal, cu, 0 if ms is None else ms)
    assert got.dtype == torch.int32
    assert torch.equal(got, route_chunks_ref(q, k, cs, top_k, causal, cu, ms))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_route_chunks_exact_dtypes_and_ties(dtype, causal, poison):
    # Constant k: every chunk mean and gate is equal (exactly: integer data), so the selection is all ties and
    # must go to the lower indices. Random q in the given dtype checks the fp32/fp64 gate of reduced inputs.
    layout = {"lengths": [37, 0, 20]}
    q, k, _, cu, ms = _inputs(layout, 4, 2, 8, 8, dtype)
    q = q.round()
    for kk in (k, torch.ones_like(k)):
        got = ops.route_chunks_fwd(q, kk, 4, 3, causal, cu, ms)
        assert torch.equal(got, route_chunks_ref(q, kk, 4, 3, causal, cu, ms))
    ties = ops.route_chunks_fwd(torch.ones_like(q), torch.ones_like(k), 4, 3, causal, cu, ms)
    # Sequence 0, token 36 (chunk 9): causal keeps chunks 0, 1 (lowest indices) besides its own.
    assert ties[36, 0].tolist() == [0, 1, 9]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_routed_attention_fp32_grid(case, heads, causal, poison):
    _, layout, cs = case
    hq, hkv, d, dv, top_k = heads
    q, k, v, cu, ms = _inputs(layout, hq, hkv, d, dv, torch.float32)
    _check_attention(q, k, v, cs, top_k, causal, cu, ms, torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [LAYOUTS[3], LAYOUTS[7], LAYOUTS[11]], ids=[LAYOUT_IDS[i] for i in (3, 7, 11)])
def test_routed_attention_dtypes(case, dtype, causal, poison):
    _, layout, cs = case
    q, k, v, cu, ms = _inputs(layout, 4, 2, 16, 12, dtype)
    _check_attention(q, k, v, cs, 2, causal, cu, ms, dtype)


@pytest.mark.parametrize("hkv", [16, 8, 4, 2, 1], ids=lambda h: f"group{16 // h}")
def test_routed_attention_sixteen_query_heads(hkv, poison):
    # Hq = 16 with every GQA group the issue names (1..16), varlen with an empty sequence.
    q, k, v, cu, ms = _inputs({"lengths": [37, 0, 20]}, 16, hkv, 16, 16, torch.float32, seed=4)
    _check_attention(q, k, v, 8, 3, True, cu, ms, torch.float32)


@pytest.mark.parametrize("dim", [16, 72, 128, 256], ids=lambda d: f"D{d}")
def test_routed_attention_head_dims(dim, poison):
    # Several chunks, a key range longer than one GEMM block (chunk 600 > 512 keys), GQA group 2.
    q, k, v, cu, ms = _inputs({"lengths": [1300, 0, 70]}, 4, 2, dim, dim // 2 + 8, torch.float32)
    _check_attention(q, k, v, 600, 2, True, cu, ms, torch.float32, scale=0.3 / dim ** 0.5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_routed_attention_long_sequence_many_rows(causal, poison):
    # More query rows per chunk than one row block (512) and per forward task: group 4 over 700 tokens.
    q, k, v, cu, ms = _inputs({"B": 1, "N": 700}, 8, 2, 16, 16, torch.float32)
    _check_attention(q, k, v, 64, 3, causal, cu, ms, torch.float32)


def test_routed_attention_dense_equals_sdpa_and_is_deterministic():
    q, k, v, _, _ = _inputs({"B": 2, "N": 50}, 2, 2, 16, 16, torch.float32)
    o, lse = ops.routed_attention_fwd(q, k, v, 8, 100, True, None, 0, 0.25)
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                                            scale=0.25).transpose(1, 2)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    g1 = ops.routed_attention_bwd(do, dlse, q, k, v, o, lse, 8, 3, True, None, 0, 0.25)
    g2 = ops.routed_attention_bwd(do, dlse, q, k, v, o, lse, 8, 3, True, None, 0, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_routed_attention_noncontiguous_and_expanded_grads(poison):
    q, k, v, _, _ = _inputs({"B": 1, "N": 19}, 4, 2, 16, 16, torch.float32)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous view, same values
    o, lse = ops.routed_attention_fwd(qt, k, v, 4, 2, True, None, 0, 0.25)
    do = torch.ones(1, 1, 1, 1).expand(o.shape)  # stride-0, as a .sum() backward hands it over
    dlse = torch.zeros(1, 1, 1).expand(lse.shape)
    got = ops.routed_attention_bwd(do, dlse, qt, k, v, o, lse, 4, 2, True, None, 0, 0.25)
    want = routed_attention_backward_ref(do, dlse, q, k, v, o, 4, 2, True, None, None, 0.25)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_bad_input_raises_naming_the_argument():
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 8)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    cases = [
        ("top_k must be >= 1", lambda: ops.route_chunks_fwd(q, k, 4, 0, True, None, 0)),
        ("chunk_size must be >= 1", lambda: ops.route_chunks_fwd(q, k, 0, 2, True, None, 0)),
        ("heads of q", lambda: ops.route_chunks_fwd(q, torch.randn(1, 8, 3, 16), 4, 2, True, None, 0)),
        ("k must have q's head dim", lambda: ops.route_chunks_fwd(q, torch.randn(1, 8, 2, 8), 4, 2, True, None, 0)),
        ("k must have q's dtype", lambda: ops.route_chunks_fwd(q, k.double(), 4, 2, True, None, 0)),
        ("k must have q's leading shape", lambda: ops.route_chunks_fwd(q, k[:, :5], 4, 2, True, None, 0)),
        ("v must have the heads of k",
         lambda: ops.routed_attention_fwd(q, k, torch.randn(1, 8, 4, 8), 4, 2, True, None, 0, 1.0)),
        ("q must be float", lambda: ops.routed_attention_fwd(q.int(), k, v, 4, 2, True, None, 0, 1.0)),
        ("cu_seqlens must be int32", lambda: ops.route_chunks_fwd(q[0], k[0], 4, 2, True, cu.long(), 8)),
        ("max_seqlen", lambda: ops.route_chunks_fwd(q[0], k[0], 4, 2, True, cu, 5)),
        ("cu_seqlens\\[-1\\]", lambda: ops.route_chunks_fwd(q[0], k[0], 4, 2, True, cu - 1 + 1 + cu, 16)),
        ("q must have 3 dimensions", lambda: ops.route_chunks_fwd(q, k, 4, 2, True, cu, 8)),
    ]
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    o, lse = ops.routed_attention_fwd(q, k, v, 4, 2, True, None, 0, 1.0)
    with pytest.raises(RuntimeError, match="lse must be"):
        ops.routed_attention_bwd(o, lse, q, k, v, o, lse.double(), 4, 2, True, None, 0, 1.0)
    with pytest.raises(RuntimeError, match="do must be"):
        ops.routed_attention_bwd(o[..., :4], lse, q, k, v, o, lse, 4, 2, True, None, 0, 1.0)


# ------------------------------------------------------------------------------------------ backward workspace
# The backward processes chunk indices in ascending phases whose dQ shares fit a workspace budget
# (ROUTING_KERNELS_CPU_BWD_WORKSPACE_MB; tests force one in bytes). Results must not depend on the budget or on
# the thread count, bit for bit, and the extra memory must not grow with the shares.

@pytest.fixture
def workspace():
    """set(bytes) forces the backward's workspace budget; the environment's budget comes back afterwards."""
    from routing_kernels import _ext
    yield _ext._C.set_routed_attention_bwd_workspace
    _ext._C.set_routed_attention_bwd_workspace(-1)


def _bwd_stats():
    from routing_kernels import _ext
    return _ext._C.routed_attention_bwd_stats()


# (layout, chunk_size, top_k, Hq, Hkv, D, Dv): dense with 11 chunks, varlen with empty sequences, a chunk longer
# than one key block (600 > 512: the dQ share of a row sums over key blocks), GQA group 4, Dv != D.
BLOCKED = [
    ({"B": 2, "N": 700}, 64, 3, 8, 2, 16, 24),
    ({"lengths": [300, 0, 1300, 5, 0]}, 600, 2, 4, 1, 16, 8),
    ({"lengths": [0, 257, 1, 130]}, 16, 4, 2, 2, 8, 8),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", BLOCKED, ids=["dense_11chunks", "varlen_chunk600_g4", "varlen_chunk16"])
def test_backward_blocked_bit_identical(case, causal, workspace, poison):
    layout, cs, top_k, hq, hkv, d, dv = case
    q, k, v, cu, ms = _inputs(layout, hq, hkv, d, dv, torch.float32, seed=3)
    ms = 0 if ms is None else ms
    o, lse = ops.routed_attention_fwd(q, k, v, cs, top_k, causal, cu, ms, 0.3)
    g = torch.Generator().manual_seed(5)
    do, dlse = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
    run = lambda: ops.routed_attention_bwd(do, dlse, q, k, v, o, lse, cs, top_k, causal, cu, ms, 0.3)
    workspace(1 << 40)  # one phase: every share in one buffer, the unblocked backward
    whole = run()
    st = _bwd_stats()
    assert (st["phases"], st["buffered_phases"]) == (1, 1)
    torch.testing.assert_close(whole, routed_attention_backward_ref(do, dlse, q, k, v, o, cs, top_k, causal, cu,
                                                                    ms, 0.3), **TOL[torch.float32])
    full_bytes = st["workspace_bytes"]
    num_chunks = -(-(q.shape[1] if cu is None else ms) // cs)
    rows = q.shape[:-1].numel()
    # 0: one phase per chunk index, shares straight into dq. Fractions of all shares: many phases, some of them
    # buffered (several chunk indices), some not (one chunk index, as the big causal chunk 0).
    stats = {}
    for budget in (0, full_bytes // 8, full_bytes // 4, full_bytes // 2, full_bytes * 3 // 4):
        workspace(budget)
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = run()
            finally:
                torch.set_num_threads(before)
            stats[budget] = st = _bwd_stats()
            # The buffer stays within the budget; a phase of one chunk index may add its index (8 bytes a row).
            assert st["workspace_bytes"] <= budget + 8 * rows, (budget, st)
            for name, a, b in zip("dq dk dv".split(), got, whole):
                assert torch.equal(a, b), f"{name} differs with budget {budget}, {threads} threads"
    assert stats[0]["phases"] == num_chunks and stats[0]["buffered_phases"] == 0, stats[0]
    assert any(0 < s["buffered_phases"] < s["phases"] for s in stats.values()), stats  # both kinds in one call


def _peak_bytes(fn):
    """Peak of the bytes allocated while fn runs (torch's CPU allocator and the output cache), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, result


def _backward_growth(n1, n2, budget, workspace):
    """Peak bytes of one backward at n1 and n2 tokens, and what may grow between them: the gradients, and the
    per-query-row index arrays (selection int32 x top_k, delta, a phase's index of 8 bytes), per-chunk tables."""
    hq = hkv = 4
    d, cs, top_k = 32, 64, 3
    workspace(budget)
    peaks, allowed = [], []
    for n in (n1, n2):
        q, k, v, _, _ = _inputs({"B": 1, "N": n}, hq, hkv, d, d, torch.float32, seed=1)
        o, lse = ops.routed_attention_fwd(q, k, v, cs, top_k, True, None, 0, 0.2)
        do, dlse = torch.randn_like(o), torch.zeros_like(lse)
        peak, grads = _peak_bytes(lambda: ops.routed_attention_bwd(do, dlse, q, k, v, o, lse, cs, top_k, True, None,
                                                                   0, 0.2))
        rows, chunks = n * hq, -(-n // cs)
        peaks.append(peak)
        allowed.append(sum(g.nbytes for g in grads) + rows * (4 * top_k + 4 + 8) + chunks * hkv * (8 + 4 * d))
        del grads
    return peaks, allowed


def test_backward_extra_memory_does_not_grow_with_n(workspace):
    # 2K -> 8K tokens: the peak grows by the gradients and the index arrays (~6% of them here), nothing more;
    # the shares alone would add 2x the gradients' growth.
    budget = 64 << 10
    (p1, p2), (a1, a2) = _backward_growth(2048, 8192, budget, workspace)
    assert p2 - p1 <= a2 - a1, (p1, p2, a1, a2)
    assert p2 - a2 <= budget and p1 - a1 <= budget, (p1, p2, a1, a2)  # what is left is within the budget


def test_backward_memory_check_catches_a_growing_workspace(workspace):
    # The check above is tight enough to fail for the unblocked backward (one phase: all shares at once).
    (p1, p2), (a1, a2) = _backward_growth(2048, 8192, 1 << 40, workspace)
    assert p2 - p1 > a2 - a1 + (a2 - a1) // 2, (p1, p2, a1, a2)
