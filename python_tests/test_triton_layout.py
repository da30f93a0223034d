"""The shared Triton layout helpers (routing_kernels/_triton/layout.py) and what every launcher owes its
callers on its own: a non-contiguous cu_seqlens."""
from __future__ import annotations

import pytest
import torch

from routing_kernels._triton.layout import as_packed
from routing_kernels.ops.chunk_mean import triton as cm_triton
from routing_kernels.ops.chunk_route import triton as cr_triton
from routing_kernels.ops.route_chunks import triton as rc_triton
from routing_kernels.ops.routed_attention import triton as ra_triton

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def test_as_packed_makes_cu_seqlens_contiguous():
    cu = torch.tensor([0, 0, 5, 5, 10, 10], dtype=torch.int32)[::2]
    _, got, _ = as_packed(torch.zeros(10, 1, 4), cu, 5)
    assert got.is_contiguous() and got.tolist() == [0, 5, 10]


def _strided(cu):
    """The same values as cu, every other element of a buffer whose other elements are wrong on purpose."""
    buf = torch.full((2 * cu.numel(),), 7, dtype=cu.dtype, device=cu.device)
    buf[::2] = cu
    return buf[::2]


@pytest.mark.usefixtures("poison")
def test_every_launcher_honours_a_strided_cu_seqlens():
    # a strided cu_seqlens read as if contiguous would give lengths 7-0, 13-7, ... : every output would differ
    g = torch.Generator().manual_seed(0)
    lengths = [13, 0, 9]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    cus = _strided(cu)
    assert not cus.is_contiguous() and torch.equal(cus, cu)
    t, ms = sum(lengths), max(lengths)
    x = torch.randn(t, 2, 8, generator=g).to(DEVICE)
    query = torch.randn(3, 2, 8, generator=g).to(DEVICE)
    q, k, v = (torch.randn(t, h, 16, generator=g).to(DEVICE) for h in (4, 2, 2))

    def run(c):
        out = []
        means, _ = cm_triton.chunk_mean_fwd(x, 4, c, ms)
        out += [means, cm_triton.chunk_mean_bwd(torch.ones_like(means), x, 4, c, ms)]
        y, w, s = cr_triton.chunk_route_fwd(x, query, 4, c, ms, 0.5)
        out += [y, w, s, *cr_triton.chunk_route_bwd(y, w, s, x, query, w, 4, c, ms, 0.5)]
        out.append(rc_triton.route_chunks_triton(q, k, 4, 2, True, c, ms))
        o, lse = ra_triton.routed_attention_fwd_triton(q, k, v, 4, 2, True, c, ms)
        out += [o, lse, *ra_triton.routed_attention_bwd_triton(o, lse, q, k, v, o, lse, 4, 2, True, c, ms)]
        return out

    want, got = run(cu), run(cus)
    assert len(want) == 13
    for i, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True, rtol=0,
                                                                             atol=0)), i
