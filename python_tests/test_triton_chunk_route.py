"""Triton chunk_route / chunk_mean kernels against the eager references: forward and every gradient,
dense and varlen, on the awkward-shape grid. On CPU they run under TRITON_INTERPRET=1 (fp32/fp16 only:
the interpreter cannot do bf16 arithmetic); on a GPU the same tests also cover bf16 and large shapes."""
from __future__ import annotations

import pytest
import torch

import routing_kernels as rk
from routing_kernels.ops.chunk_mean.reference import chunk_mean_ref
from routing_kernels.ops.chunk_route.reference import chunk_route_ref
from shapes import LAYOUT_IDS, LAYOUTS, make, num_seqs

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Kernel vs reference, both accumulating in fp32: the difference is summation order, then the output
# rounding of the dtype (one ulp: 2^-10 fp16, 2^-7 bf16).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _run(fn, inputs, backend):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, backend)
    outs = tuple(outs) if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(3)
    cot = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cot, allow_unused=True, materialize_grads=True) \
        if any(o.requires_grad for o in outs) else [torch.zeros_like(t) for t in leaves]
    return outs, grads


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("shared_query", [True, False], ids=["query_shared", "query_per_seq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_route_triton(case, dtype, shared_query):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=3, dim=20, dtype=dtype, device=DEVICE)
    q_shape = (3, 20) if shared_query else (num_seqs(layout), 3, 20)
    query = torch.randn(q_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    fn = lambda x, q, backend: rk.chunk_route(x, q, cs, cu_seqlens=cu, max_seqlen=ms, backend=backend)  # noqa
    (outs, grads), (ref_outs, ref_grads) = _run(fn, [x, query], "triton"), _run(fn, [x, query], "reference")
    torch.testing.assert_close(outs, ref_outs, **TOL[dtype])
    torch.testing.assert_close(grads, ref_grads, **TOL[dtype])


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dim", [1, 7, 64, 100, 256], ids=lambda d: f"D{d}")
def test_chunk_route_triton_head_dims(dim):
    x, cu, ms = make({"lengths": [37, 0, 5]}, heads=2, dim=dim, device=DEVICE)
    query = torch.randn(3, 2, dim, device=DEVICE)
    fn = lambda x, q, backend: rk.chunk_route(x, q, 8, cu_seqlens=cu, backend=backend, scale=0.3)  # noqa
    (outs, grads), (ref_outs, ref_grads) = _run(fn, [x, query], "triton"), _run(fn, [x, query], "reference")
    torch.testing.assert_close(outs, ref_outs, **TOL[torch.float32])
    torch.testing.assert_close(grads, ref_grads, **TOL[torch.float32])


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYOUTS, ids=LAYOUT_IDS)
def test_chunk_mean_triton(case, dtype):
    _, layout, cs = case
    x, cu, ms = make(layout, heads=2, dim=9, dtype=dtype, device=DEVICE)
    fn = lambda x, backend: rk.chunk_mean(x, cs, cu_seqlens=cu, max_seqlen=ms, backend=backend)  # noqa
    (outs, grads), (ref_outs, ref_grads) = _run(fn, [x], "triton"), _run(fn, [x], "reference")
    torch.testing.assert_close(outs, ref_outs, **TOL[dtype])
    torch.testing.assert_close(grads, ref_grads, **TOL[dtype])


def test_noncontiguous_input_and_expanded_grads():
    x = torch.randn(2, 19, 4, 3, device=DEVICE).transpose(2, 3)  # (2, 19, 3, 4), strided heads
    query = torch.randn(4, device=DEVICE).expand(3, 4)
    for backend in ("triton", "reference"):
        xa, qa = x.clone().requires_grad_(), query.clone().requires_grad_()
        y, w, s = rk.chunk_route(xa, qa, 5, backend=backend)
        (y.sum() + s.sum() + w.sum()).backward()  # stride-0 gradients
        if backend == "triton":
            got = (y, w, s, xa.grad, qa.grad)
    torch.testing.assert_close(got, (y, w, s, xa.grad, qa.grad))


def test_triton_backend_refuses_float64():
    x = torch.randn(1, 8, 2, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="backend='triton' is not available for chunk_route"):
        rk.chunk_route(x, x[0, 0], 4, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_chunk_route_triton_large(dtype):
    # 2^31 + 2^22 elements (4.3 GB in bf16) with a varlen batch: element offsets pass 2^31, so an int32 offset
    # anywhere in the kernels reads the wrong rows (or faults) and fails this.
    x = torch.randn((2**31 + 2**22) // (16 * 128), 16, 128, device="cuda", dtype=dtype)
    cu = torch.tensor([0, 1, 40_000, 40_000, x.shape[0]], device="cuda", dtype=torch.int32)
    query = torch.randn(4, 16, 128, device="cuda", dtype=dtype)
    outs = [rk.chunk_route(x, query, 1000, cu_seqlens=cu, backend=b) for b in ("triton", "reference")]
    torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])


def test_nan_poisons_its_softmax_row_only():
    x = torch.randn(1, 12, 2, 4, device=DEVICE)
    x[0, 5, 1, 2] = float("nan")
    y, w, s = rk.chunk_route(x, torch.randn(2, 4, device=DEVICE), 4, backend="triton")
    assert w[0, 1].isnan().all() and not w[0, 0].isnan().any()
