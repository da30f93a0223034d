"""Hand-written CUDA chunk_route kernels (csrc/cuda/chunk_route.cu) against the C++ CPU kernels, which
test_cpu_chunk_route.py checks against the eager reference (and the chunk-table kernels of chunk_table.cu against
the eager table references): forward and backward, all four dtypes, dense and
varlen, the vectorized and scalar paths, a large shape, misaligned and non-contiguous inputs. GPU only: the
`gpu` marker skips every test here on a machine without one."""
from __future__ import annotations

import pytest
import torch

import routing_kernels as rk
from routing_kernels._ext import has_kernel
from chunk_tables import TABLE_CASES, TABLE_IDS, make_table
from routing_kernels.ops.chunk_mean.reference import chunk_mean_table_backward_ref, chunk_mean_table_ref
from routing_kernels.ops.chunk_route.reference import chunk_route_table_backward_ref, chunk_route_table_ref
from shapes import CUDA_CASES as CASES
from shapes import CUDA_HEADS as HEADS
from shapes import make, num_seqs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not has_kernel("chunk_route_fwd", "cuda"),
                                 reason="routing_kernels._C was built without CUDA kernels")]

OPS = torch.ops.routing_kernels
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Both kernels accumulate in fp32 (fp64 for fp64) and differ only in summation order and in the GPU's expf,
# then in one rounding to the output dtype (one ulp: 2^-10 fp16, 2^-7 bf16).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAMES = ("y", "weights", "summary", "dx", "dquery")


def _assert_close(got, want, dtype):
    """rtol = atol = TOL[dtype], with atol shrunk for outputs much smaller than 1 (weights and dx are ~1/M):
    a fixed atol would pass whatever those held."""
    tol = TOL[dtype]
    for name, a, b in zip(NAMES, got, want):
        scale = min(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


def _poison_cuda_cache():
    """Leave the caching allocator holding blocks full of 0xFF bytes (NaN in every float dtype), so an output
    element a kernel forgets to write comes back NaN instead of a lucky leftover value."""
    small = [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(16)]  # <= 1 MB pool
    large = torch.full((256 << 20,), 255, dtype=torch.uint8, device="cuda")
    del small, large


def _grads_like(x, query, weights, seed=1):
    """Random dy (like x), dweights (like weights), dsummary ((S, H, D) in x's dtype), made on the CPU."""
    g = torch.Generator().manual_seed(seed)
    s, h, _ = weights.shape
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    dweights = torch.randn(weights.shape, generator=g, dtype=torch.float64).to(weights.dtype)
    dsummary = torch.randn((s, h, x.shape[-1]), generator=g, dtype=torch.float64).to(x.dtype)
    return dy, dweights, dsummary


def _cuda(t):
    return None if t is None else t.cuda()


def _fwd_bwd_both(x, query, cs, cu, ms, scale, to_cuda=_cuda, grads=None):
    """(y, weights, summary, dx, dquery) from the CUDA ops and from the CPU ops. Inputs live on the CPU;
    to_cuda moves each float input to the GPU (a test may hand in misaligned or strided copies there). The
    backward of both gets the CPU forward's weights, so it is compared on identical inputs."""
    max_len = x.shape[1] if cu is None else ms
    y, w, summary = OPS.chunk_route_fwd(x, query, cs, cu, max_len, scale)
    dy, dweights, dsummary = grads or _grads_like(x, query, w)
    dx, dq = OPS.chunk_route_bwd(dy, dweights, dsummary, x, query, w, cs, cu, max_len, scale)
    want = (y, w, summary, dx, dq)

    _poison_cuda_cache()
    x_d, q_d, cu_d = to_cuda(x), to_cuda(query), _cuda(cu)
    got_fwd = OPS.chunk_route_fwd(x_d, q_d, cs, cu_d, max_len, scale)
    got_bwd = OPS.chunk_route_bwd(to_cuda(dy), to_cuda(dweights), to_cuda(dsummary), x_d, q_d, _cuda(w), cs, cu_d,
                                  max_len, scale)
    got = (*got_fwd, *got_bwd)
    for name, a, b in zip(NAMES, got, want):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape, name
    return got, want


@pytest.mark.parametrize("heads,shared_query", HEADS, ids=["H2_query_shared", "H3_query_per_seq"])
@pytest.mark.parametrize("dim", [1, 64, 100, 128, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_cpu(case, dtype, dim, heads, shared_query):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=heads, dim=dim, dtype=dtype)
    q_shape = (heads, dim) if shared_query else (num_seqs(layout), heads, dim)
    query = torch.randn(q_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    got, want = _fwd_bwd_both(x, query, cs, cu, ms, dim ** -0.5)
    _assert_close(got, want, dtype)


# B = 2 long sequences: many chunks (cs 64) and a few long ones (cs 4096, where the head tiles narrow and
# token groups share a chunk to fill the SMs); 2^31 + 2^21 values (4.3 GB bf16), so ELEMENT offsets pass 2^31
# and an int32 offset in a kernel fails it (the CPU twin: python_tests/test_large_offsets.py).
@pytest.mark.parametrize("chunk_size", [64, 4096], ids=lambda c: f"cs{c}")
def test_cuda_matches_cpu_large_bf16(chunk_size):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2**20 + 1024, 8, 128, generator=g).to(torch.bfloat16)
    query = torch.randn(8, 128, generator=g).to(torch.bfloat16)
    got, want = _fwd_bwd_both(x, query, chunk_size, None, None, 128 ** -0.5)
    _assert_close(got, want, torch.bfloat16)


def _offset_by_one(t):
    """The same values in a contiguous tensor whose data pointer is one element past a 16-byte boundary."""
    if not t.is_floating_point():
        return t.cuda()
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    out = base.narrow(0, 1, t.numel()).view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# Same shapes as would vectorize (H * D a multiple of 8 values), but x, dy, query and dsummary start off a
# 16-byte boundary: the kernels must notice and take the scalar path.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,cs", [({"B": 2, "N": 45}, 8), ({"lengths": [9, 0, 40]}, 16)],
                         ids=["dense", "varlen"])
def test_cuda_misaligned_inputs(layout, cs, dtype):
    x, cu, ms = make(layout, heads=4, dim=64, dtype=dtype)
    query = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    got, want = _fwd_bwd_both(x, query, cs, cu, ms, 0.125, to_cuda=_offset_by_one)
    _assert_close(got, want, dtype)


def _strided(t):
    """Non-contiguous CUDA copies: x-like tensors transposed in memory, everything else expanded from a row."""
    if t is None or not t.is_floating_point():
        return _cuda(t)
    if t.dim() >= 3:
        return t.cuda().transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.cuda().t().contiguous().t()


def test_cuda_noncontiguous_and_expanded_inputs():
    x, _, _ = make({"B": 2, "N": 19}, heads=4, dim=6)
    query = torch.randn(4, 6)
    weights_shape = (2, 4, 3)
    # a .sum() backward hands in stride-0 gradients
    grads = (torch.randn(6).expand(x.shape).contiguous(), torch.zeros(weights_shape),
             torch.randn(6).expand(2, 4, 6).contiguous())
    got, want = _fwd_bwd_both(x, query, 7, None, None, 0.5, to_cuda=_strided, grads=grads)
    _assert_close(got, want, torch.float32)
    dy = torch.ones(()).cuda().expand(x.shape)  # stride 0 on the GPU too
    w = OPS.chunk_route_fwd(x.cuda(), query.cuda(), 7, None, 19, 0.5)[1]
    dx, _ = OPS.chunk_route_bwd(dy, torch.zeros(weights_shape, device="cuda").expand(weights_shape), grads[2].cuda(),
                                x.cuda(), query.cuda(), w, 7, None, 19, 0.5)
    dx_cpu, _ = OPS.chunk_route_bwd(torch.ones(x.shape), torch.zeros(weights_shape), grads[2], x, query, w.cpu(), 7,
                                    None, 19, 0.5)
    torch.testing.assert_close(dx.cpu(), dx_cpu, rtol=1e-5, atol=1e-5)


def test_cuda_kernels_are_deterministic():
    # No atomics: two runs give the same bits.
    x, cu, ms = make({"lengths": [300, 0, 1000]}, heads=4, dim=128, dtype=torch.bfloat16, device="cuda")
    query = torch.randn(4, 128, device="cuda").to(torch.bfloat16)
    runs = []
    for _ in range(2):
        y, w, s = OPS.chunk_route_fwd(x, query, 64, cu, ms, 0.1)
        dx, dq = OPS.chunk_route_bwd(torch.ones_like(x), torch.ones_like(w), torch.ones_like(s), x, query, w, 64, cu,
                                     ms, 0.1)
        runs.append((y, w, s, dx, dq))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_rejects_head_dim_above_limit():
    x = torch.randn(1, 4, 1, 1025, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim <= 1024"):
        OPS.chunk_route_fwd(x, torch.randn(1, 1025, device="cuda"), 2, None, 4, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,cs", [({"B": 2, "N": 50}, 8), ({"lengths": [13, 0, 40]}, 6)],
                         ids=["dense", "varlen"])
def test_public_chunk_route_cuda_matches_reference(layout, cs, dtype):
    x, cu, ms = make(layout, heads=4, dim=32, dtype=dtype, device="cuda")
    query = torch.randn(num_seqs(layout), 4, 32, device="cuda").to(dtype)
    results = []
    for backend in ("cuda", "reference"):
        xa, qa = x.detach().clone().requires_grad_(), query.detach().clone().requires_grad_()
        outs = tuple(rk.chunk_route(xa, qa, cs, cu_seqlens=cu, max_seqlen=ms, backend=backend))
        g = torch.Generator().manual_seed(5)
        cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to("cuda", o.dtype) for o in outs]
        results.append((*outs, *torch.autograd.grad(outs, (xa, qa), cot)))
    torch.testing.assert_close(results[0], results[1], rtol=TOL[dtype], atol=TOL[dtype])


# ---------------------------------------------------------------------------------------------------------------
# The chunk-table kernels (csrc/cuda/chunk_table*.cuh) against the eager table references on the CPU: every case
# of chunk_tables.TABLE_CASES (1000x-skewed chunks, empty sequences, no tokens), all four dtypes, outputs read from
# a NaN-filled allocator cache. The emulated twin, with schedules and SM counts: test_cuda_emu_chunk_table.py.
def _table_ops_both(x, query, table, scale):
    """(mean, dmean_x, y, weights, summary, dx, dquery) from the CUDA table ops and from the references; the
    backwards get the reference forward's weights and the same random cotangents."""
    mean = chunk_mean_table_ref(x, *table)
    grad_mean = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype)
    fwd = chunk_route_table_ref(x, query, *table, scale)
    dy, dweights, dsummary = _grads_like(x, query, fwd[1])
    want = (mean, chunk_mean_table_backward_ref(grad_mean, x, *table), *fwd,
            *chunk_route_table_backward_ref(dy, dweights, dsummary, x, query, fwd[1], *table, scale))
    _poison_cuda_cache()
    cu_d, seq_d, m = table[0].cuda(), table[1].cuda(), table[2]
    x_d, q_d = x.cuda(), query.cuda()
    got = (OPS.chunk_mean_table_fwd(x_d, cu_d, seq_d, m),
           OPS.chunk_mean_table_bwd(grad_mean.cuda(), x_d, cu_d, seq_d, m),
           *OPS.chunk_route_table_fwd(x_d, q_d, cu_d, seq_d, m, scale),
           *OPS.chunk_route_table_bwd(dy.cuda(), dweights.cuda(), dsummary.cuda(), x_d, q_d, fwd[1].cuda(), cu_d, seq_d,
                                      m, scale))
    return got, want


@pytest.mark.parametrize("heads,dim,per_seq", [(3, 5, True), (2, 64, False), (4, 128, False)],
                         ids=["H3_D5_query_per_seq", "H2_D64", "H4_D128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TABLE_CASES, ids=TABLE_IDS)
def test_cuda_table_ops_match_reference(case, dtype, heads, dim, per_seq):
    if not has_kernel("chunk_route_table_fwd", "cuda"):
        pytest.skip("routing_kernels._C was built without the CUDA chunk-table kernels")
    _, lengths, rule = case
    x, _, cu_chunks, seq_chunks, max_chunks = make_table(lengths, rule, heads, dim, dtype=dtype)
    q_shape = (len(lengths), heads, dim) if per_seq else (heads, dim)
    query = torch.randn(q_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    got, want = _table_ops_both(x, query, (cu_chunks, seq_chunks, max_chunks), dim ** -0.5)
    tol = TOL[dtype]
    names = ("mean", "dmean_x", "y", "weights", "summary", "dx", "dquery")
    for name, a, b in zip(names, got, want):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape, name
        scale = min(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


# A uniform table gives the integer kernels' numbers, on a bf16 input of 2^31 + 2^21 values (int64 offsets in the
# table path: an int32 one fails it), with one chunk 1000x longer than the rest in the second case.
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "one_long_chunk"])
def test_cuda_table_matches_integer_large_bf16(skewed):
    if not has_kernel("chunk_route_table_fwd", "cuda"):
        pytest.skip("routing_kernels._C was built without the CUDA chunk-table kernels")
    n, cs = 2**20 + 1024, 64
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 * n, 8, 128, generator=g).to("cuda", torch.bfloat16)
    query = torch.randn(8, 128, generator=g).to("cuda", torch.bfloat16)
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32, device="cuda")
    starts = torch.arange(0, n, cs, device="cuda")
    bounds = torch.cat([starts, starts + n, torch.tensor([2 * n], device="cuda")])
    if skewed:  # merge the second sequence's first 1000 chunks into one
        bounds = torch.cat([bounds[: len(starts) + 1], bounds[len(starts) + 1000:]])
    cu_chunks = bounds.to(torch.int32)
    seq_chunks = torch.tensor([0, len(starts), len(bounds) - 1], dtype=torch.int32, device="cuda")
    m = len(starts)
    y, w, s = OPS.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, m, 0.1)
    if not skewed:
        y_i, w_i, s_i = OPS.chunk_route_fwd(x, query, cs, cu, n, 0.1)
        torch.testing.assert_close((y, w, s), (y_i, w_i, s_i), rtol=TOL[torch.bfloat16], atol=1e-5)
    else:  # the long chunk's weight and mean against a float64 sum on the GPU
        mean = x[n: n + 1000 * cs].double().mean(0)
        score = 0.1 * (query.double() * mean).sum(-1)
        assert torch.isfinite(y).all() and torch.isfinite(w).all()
        assert (w[1, :, 0] > 0).all() and (w[1, :, m - 999:] == 0).all()
        next_mean = x[n + 1000 * cs: n + 1001 * cs].double().mean(0)
        next_score = 0.1 * (query.double() * next_mean).sum(-1)
        torch.testing.assert_close(w[1, :, 0].double().log() - w[1, :, 1].double().log(), score - next_score,
                                   rtol=1e-3, atol=1e-3)
    dx, dq = OPS.chunk_route_table_bwd(torch.ones_like(x), torch.zeros_like(w), torch.ones_like(s), x, query, w,
                                       cu_chunks, seq_chunks, m, 0.1)
    assert torch.isfinite(dx).all() and torch.isfinite(dq).all()
    if not skewed:
        dx_i, dq_i = OPS.chunk_route_bwd(torch.ones_like(x), torch.zeros_like(w), torch.ones_like(s), x, query, w, cs,
                                         cu, n, 0.1)
        torch.testing.assert_close((dx, dq), (dx_i, dq_i), rtol=TOL[torch.bfloat16], atol=1e-4)


# chunk_mean_bwd's CUDA kernel (chunk_route's scale pass over the integer chunks) against the C++ CPU kernel.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,cs", [({"B": 2, "N": 37}, 8), ({"lengths": [7, 0, 33, 1]}, 4)],
                         ids=["dense", "varlen"])
def test_cuda_chunk_mean_bwd_matches_cpu(layout, cs, dtype):
    if not has_kernel("chunk_mean_bwd", "cuda"):
        pytest.skip("routing_kernels._C was built without the CUDA chunk_mean_bwd kernel")
    x, cu, ms = make(layout, heads=3, dim=40, dtype=dtype)
    max_len = x.shape[1] if cu is None else ms
    mean = OPS.chunk_mean_fwd(x, cs, cu, max_len)
    grad = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    want = OPS.chunk_mean_bwd(grad, x, cs, cu, max_len)
    _poison_cuda_cache()
    got = OPS.chunk_mean_bwd(grad.cuda(), x.cuda(), cs, _cuda(cu), max_len)
    torch.testing.assert_close(got.cpu(), want, rtol=TOL[dtype], atol=TOL[dtype])
