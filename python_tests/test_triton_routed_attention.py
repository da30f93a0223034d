"""Triton route_chunks / routed_attention kernels against the eager references.

On CPU they run under TRITON_INTERPRET=1 (root conftest.py), which is slow (~0.1 s per program launch
batch): the grid here is a chosen subset of shapes.py (small H, D = 16/32, N <= 40) that still covers
every boundary. fp32 and fp16 on CPU; bf16 only on a GPU (the interpreter cannot do bf16 arithmetic).
"""
from __future__ import annotations

import pytest
import torch

from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.route_chunks.triton import route_chunks_triton
from routing_kernels.ops.routed_attention.reference import routed_attention_backward_ref, routed_attention_ref
from routing_kernels.ops.routed_attention.triton import routed_attention_bwd_triton, routed_attention_fwd_triton
from shapes import LAYOUT_IDS, LAYOUTS, make
from tolerance import assert_close_scaled

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT = dict((c[0], c[1:]) for c in LAYOUTS)
# Kernel vs reference, both accumulating in fp32. fp32: summation order only (interpreter dots are exact
# fp32; on a GPU the kernels ask for ieee fp32 dots). 16-bit: the reference runs on the same 16-bit inputs
# and rounds its outputs once; the kernel also rounds P and dS to 16 bits before their dots (flash style).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _qkv(layout, hq, hkv, d, dv, dtype, seed=0):
    q, cu, ms = make(layout, hq, d, dtype, seed=seed, device=DEVICE)
    k, _, _ = make(layout, hkv, d, dtype, seed=seed + 1, device=DEVICE)
    v, _, _ = make(layout, hkv, dv, dtype, seed=seed + 2, device=DEVICE)
    return q, k, v, cu, ms


# ---------------------------------------------------------------------------------------------- route_chunks

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_route_chunks_exact(case, causal):
    _, layout, cs = case
    q, k, _, cu, ms = _qkv(layout, 4, 2, 16, 16, torch.float32)
    got = route_chunks_triton(q, k, cs, 3, causal, cu, ms)
    assert got.dtype == torch.int32
    assert torch.equal(got, route_chunks_ref(q, k, cs, 3, causal, cu, ms))


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("top_k", [1, 2, 4, 9], ids=lambda k: f"top{k}")  # 9 > M = 3: -1 padding
def test_route_chunks_top_k(top_k, dtype):
    layout, cs = LAYOUT["varlen_prime"]
    q, k, _, cu, ms = _qkv(layout, 2, 1, 32, 32, dtype, seed=4)
    for causal in (True, False):
        got = route_chunks_triton(q, k, cs, top_k, causal, cu, ms)
        assert torch.equal(got, route_chunks_ref(q, k, cs, top_k, causal, cu, ms))


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_route_chunks_ties_and_nan(causal):
    # constant k: every chunk mean is exactly 1 (sums of ones are exact), so all gates tie -> lowest indices
    q, cu, ms = make({"lengths": [23, 0, 9]}, 2, 16, device=DEVICE)
    k = torch.ones(q.shape[0], 1, 16, device=DEVICE)
    for top_k in (2, 3):
        assert torch.equal(route_chunks_triton(q, k, 3, top_k, causal, cu, ms),
                           route_chunks_ref(q, k, 3, top_k, causal, cu, ms))
    # a NaN key makes its chunk's gate NaN for every query: it ranks first, like torch.sort
    k = torch.randn(k.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    k[4, 0, 3] = float("nan")  # chunk 1 of the first sequence
    assert torch.equal(route_chunks_triton(q, k, 3, 3, causal, cu, ms), route_chunks_ref(q, k, 3, 3, causal, cu, ms))


# ----------------------------------------------------------------------------------------- routed_attention

# (id, layout, top_k, Hq, Hkv, Dv): each exercises one feature; top_k 9 exceeds M (dense attention).
ATTN_CASES = [
    ("N1_top1", "N1", 1, 2, 1, 16),
    ("lt_chunk_dense", "N_lt_chunk", 9, 1, 1, 16),
    ("plus1_top2_gqa2", "N_eq_chunk_plus1", 2, 2, 1, 16),
    ("prime_top2_mha_Dv32", "N_prime", 2, 2, 2, 32),       # Dv != D
    ("chunk1_top2_gqa2", "chunk1", 2, 2, 1, 16),           # every token its own chunk
    ("N0_top2", "N0", 2, 2, 1, 16),
    ("empty_mid_top1_mha", "varlen_empty_mid", 1, 2, 2, 16),
    ("empty_ends_dense_gqa2", "varlen_empty_ends", 9, 2, 1, 16),
    ("all_empty_top2", "varlen_all_empty", 2, 2, 1, 16),
    ("varlen_prime_top2_gqa2", "varlen_prime", 2, 2, 1, 16),
]


def _check_attention(q, k, v, cs, top_k, causal, cu, ms, tol, scale=None):
    o, lse = routed_attention_fwd_triton(q, k, v, cs, top_k, causal, cu, ms, scale)
    ref_o, ref_lse = routed_attention_ref(q, k, v, cs, top_k, causal, cu, ms, scale)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    # atol scaled with each reference's magnitude (tolerance.py): outputs and gradients here can be << 1
    assert_close_scaled(o, ref_o, q.dtype, rtol=tol["rtol"], name="o")
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32] if q.dtype == torch.float32 else tol)
    g = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=g).to(DEVICE, q.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    grads = routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, cs, top_k, causal, cu, ms, scale)
    ref = routed_attention_backward_ref(do, dlse, q, k, v, ref_o, cs, top_k, causal, cu, ms, scale)
    assert_close_scaled(grads, ref, q.dtype, rtol=tol["rtol"], name="dq, dk, dv")


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_routed_attention_fp32(case, causal):
    _, name, top_k, hq, hkv, dv = case
    layout, cs = LAYOUT[name]
    q, k, v, cu, ms = _qkv(layout, hq, hkv, 16, dv, torch.float32)
    _check_attention(q, k, v, cs, top_k, causal, cu, ms, TOL[torch.float32])


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", ["N_eq_chunk_plus1", "varlen_empty_mid"])
def test_routed_attention_low_precision(name, causal, dtype):
    layout, cs = LAYOUT[name]
    q, k, v, cu, ms = _qkv(layout, 2, 1, 32, 32, dtype, seed=5)
    _check_attention(q, k, v, cs, 2, causal, cu, ms, TOL[dtype])


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("pack", [1, 2, 4], ids=lambda p: f"pack{p}")
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1), (16, 1)], ids=["group4", "group8", "group16"])
def test_routed_attention_gqa_head_packing(hq, hkv, pack, monkeypatch):
    # forward/dq programs pack `pack` q heads of a kv group into their rows; every packing must be exact
    from routing_kernels.ops.routed_attention import triton as ra_triton
    monkeypatch.setattr(ra_triton, "HEADS_PER_TILE", pack)
    assert ra_triton.heads_per_tile(hq, hkv, 16) == pack
    layout, cs = LAYOUT["varlen_prime"]
    q, k, v, cu, ms = _qkv(layout, hq, hkv, 16, 16, torch.float32, seed=13)
    _check_attention(q, k, v, cs, 2, True, cu, ms, TOL[torch.float32])


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_routed_attention_many_tiles_and_chunks(causal):
    # ~10 query tiles and 19 chunks per long sequence: the union walk skips gaps between selected chunks, and
    # the dK/dV index lists several tiles per chunk; an empty sequence sits between; GQA group 4 (packing 4).
    q, k, v, cu, ms = _qkv({"lengths": [150, 0, 97]}, 8, 2, 16, 16, torch.float32, seed=21)
    _check_attention(q, k, v, 8, 3, causal, cu, ms, TOL[torch.float32])


def test_heads_per_tile_default():
    from routing_kernels.ops.routed_attention.triton import heads_per_tile
    assert heads_per_tile(32, 8, 128) == 4  # group 4, 64 rows x 128
    assert heads_per_tile(8, 8, 64) == 1    # MHA: nothing to share
    assert heads_per_tile(8, 2, 256) == 2   # D = 256: 32 rows keep the accumulator at 8192 values
    assert heads_per_tile(6, 2, 64) == 1    # group 3: no power of 2 > 1 divides it
    assert heads_per_tile(16, 1, 64) == 4   # group 16: capped at 64 rows


@pytest.mark.usefixtures("poison")
def test_routed_attention_head_dim_128():
    q, k, v, cu, ms = _qkv({"lengths": [21, 6]}, 2, 1, 128, 128, torch.float32, seed=9)
    _check_attention(q, k, v, 8, 2, True, cu, ms, TOL[torch.float32], scale=0.05)


@pytest.mark.usefixtures("poison")
def test_routed_attention_dense_equals_sdpa():
    # top_k >= M: every chunk selected, so routed attention is causal SDPA (GQA by repeating k, v here)
    q, k, v, _, _ = _qkv({"B": 1, "N": 19}, 2, 1, 16, 16, torch.float32, seed=3)
    o, _ = routed_attention_fwd_triton(q, k, v, 4, 5, True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    torch.testing.assert_close(o, ref, **TOL[torch.float32])


@pytest.mark.usefixtures("poison")
def test_routed_attention_strided_inputs_and_expanded_grads():
    # heads-strided q and a .sum()-style stride-0 do / dlse must not be read out of bounds
    q = torch.randn(1, 11, 2, 40, device=DEVICE)[..., 3:19]  # (1, 11, 2, 16), padded token/head strides
    k, v = torch.randn(1, 11, 1, 16, device=DEVICE), torch.randn(1, 11, 1, 16, device=DEVICE)
    o, lse = routed_attention_fwd_triton(q, k, v, 4, 2, True)
    ref_o, ref_lse = routed_attention_ref(q, k, v, 4, 2, True)
    torch.testing.assert_close((o, lse), (ref_o, ref_lse), **TOL[torch.float32])
    do, dlse = torch.ones(()).expand(o.shape), torch.ones(()).expand(lse.shape)
    grads = routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, 4, 2, True)
    ref = routed_attention_backward_ref(do, dlse, q, k, v, ref_o, 4, 2, True)
    torch.testing.assert_close(grads, ref, **TOL[torch.float32])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_public_functions_with_triton_backend(causal):
    # Through torch.ops.routing_kernels (autograd registration, backend recorded for the backward).
    import routing_kernels as rk
    g = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 13, 13, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(30, h, 16, generator=g).to(DEVICE) for h in (4, 2, 2))
    outs = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = rk.routed_attention(*leaves, 4, 2, causal=causal, cu_seqlens=cu, return_lse=True, backend=backend)
        (o.square().sum() + lse.sum()).backward()
        idx = rk.route_chunks(q, k, 4, 2, causal=causal, cu_seqlens=cu, backend=backend)
        outs.append((o, lse, idx, *(t.grad for t in leaves)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- launch sizes (hardening)

class _LaunchSpy:
    """Stands in for a kernel in its module: records each launch's grid and constexpr keywords, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _spy(monkeypatch, module, *names):
    spies = {name: _LaunchSpy(getattr(module, name)) for name in names}
    for name, spy in spies.items():
        monkeypatch.setattr(module, name, spy)
    return spies


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_huge_top_k_sizes_tiles_by_the_chunks(causal, monkeypatch):
    # top_k = 1000 with at most M = 3 chunks per sequence: every eligible chunk is selected (dense attention),
    # route_chunks keeps width 1000 padded with -1, and no kernel tile is sized by top_k (BLOCK_K <= 4).
    from routing_kernels.ops.route_chunks import triton as rc_triton
    from routing_kernels.ops.routed_attention import triton as ra_triton
    spies = {**_spy(monkeypatch, rc_triton, "route_select_kernel"),
             **_spy(monkeypatch, ra_triton, "routed_fwd_kernel", "routed_bwd_dq_kernel", "mark_tiles_kernel",
                    "routed_bwd_dkv_kernel")}
    q, k, v, cu, ms = _qkv({"lengths": [9, 0, 4, 12]}, 2, 1, 16, 16, torch.float32, seed=17)
    got = route_chunks_triton(q, k, 4, 1000, causal, cu, ms)
    assert got.shape == (25, 2, 1000) and (got[..., 3:] == -1).all()
    assert torch.equal(got, route_chunks_ref(q, k, 4, 1000, causal, cu, ms))
    _check_attention(q, k, v, 4, 1000, causal, cu, ms, TOL[torch.float32])
    for name, spy in spies.items():
        assert spy.launches, name
        assert all(kw["BLOCK_K"] <= 4 for _, kw in spy.launches), (name, [kw["BLOCK_K"] for _, kw in spy.launches])


# Causal gate: a tile scans chunks only up to the own chunk of its last row. Each case puts a query exactly
# on a chunk boundary at the end of a 16-row tile (BLOCK_T = 16) or alone in a tile, where an off-by-one in the
# stopping point drops the chunk just before it (top_k = M makes every eligible chunk selected).
GATE_CASES = [
    ("chunk1_N17", {"B": 1, "N": 17}, 1),       # every token a chunk; tile 1 is row 16 alone, sees 0..15
    ("chunk16_N17", {"B": 1, "N": 17}, 16),     # chunk + 1: row 16 starts chunk 1
    ("chunk8_N32", {"B": 1, "N": 32}, 8),       # last row of tile 1 (31) is in chunk 3, may pick chunk 2
    ("chunk5_primes", {"lengths": [17, 31, 13, 1]}, 5),
    ("chunk2_N33", {"B": 2, "N": 33}, 2),
]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("case", GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_route_chunks_causal_stop_at_the_tile_boundary(case):
    _, layout, cs = case
    q, k, _, cu, ms = _qkv(layout, 2, 1, 16, 16, torch.float32, seed=23)
    m = -(-(ms if cu is not None else layout["N"]) // cs)
    for top_k in sorted({2, 3, m}):
        got = route_chunks_triton(q, k, cs, top_k, True, cu, ms)
        assert torch.equal(got, route_chunks_ref(q, k, cs, top_k, True, cu, ms)), top_k


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_skewed_varlen_grid_counts_real_chunks(causal, monkeypatch):
    # one long sequence among short and empty ones: the dK/dV grid enumerates the real (sequence, chunk)
    # pairs (bound (T + S (cs - 1)) // cs = 27 chunks here, not S * M = 7 * 19), the forward/dq grids the real
    # 16-token tiles; FLAG_BLOCK = 4 makes the dK/dV programs read the long sequence's 10 tile flags in 3 blocks.
    from routing_kernels.ops.routed_attention import triton as ra_triton
    monkeypatch.setattr(ra_triton, "FLAG_BLOCK", 4, raising=False)
    spies = _spy(monkeypatch, ra_triton, "routed_fwd_kernel", "routed_bwd_dkv_kernel", "mark_tiles_kernel")
    lengths = [150, 0, 3, 0, 1, 17, 0]
    q, k, v, cu, ms = _qkv({"lengths": lengths}, 4, 2, 16, 16, torch.float32, seed=29)
    _check_attention(q, k, v, 8, 3, causal, cu, ms, TOL[torch.float32])
    (grid, kw), = spies["routed_bwd_dkv_kernel"].launches
    assert grid == ((171 + 7 * 7) // 8 * 1 * 2,)  # chunk bound x 1 slice (chunk 8 < BLOCK_N) x 2 kv heads
    assert kw.get("BLOCK_F") == 4
    (grid, kw), = spies["mark_tiles_kernel"].launches
    assert grid == ((171 + 7 * 15) // 16 * 4,)  # tile bound x 4 q heads (not 7 * 10 * 4)
    (grid, kw), = spies["routed_fwd_kernel"].launches
    assert grid == ((171 + 7 * 15) // 16 * 2,)  # GQA 4:2 packs 2 heads per program
