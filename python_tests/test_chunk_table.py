"""Dynamic chunking (explicit chunk boundaries ``cu_chunks``): the references against the float64 brute force,
the public functions on every backend this machine runs, the boundary builder's rules, bad tables, opcheck,
torch.compile and ChunkRouter. The kernels' own grids are in test_{cpu,triton,cuda_emu}_chunk_table.py."""
from __future__ import annotations

import pytest
import torch

import bruteforce as bf
import routing_kernels as rk
from chunk_tables import TABLE_CASES, TABLE_IDS, make_table
from routing_kernels._layout import seq_chunk_offsets
from routing_kernels.chunking import chunk_boundaries
from routing_kernels.nn import ChunkRouter
from routing_kernels.ops.chunk_mean import table_op as mean_table_op
from routing_kernels.ops.chunk_mean.reference import chunk_mean_table_backward_ref, chunk_mean_table_ref
from routing_kernels.ops.chunk_route import table_op as route_table_op
from routing_kernels.ops.chunk_route.reference import chunk_route_table_backward_ref, chunk_route_table_ref
from tolerance import assert_close_scaled

OPS = torch.ops.routing_kernels
F64 = dict(rtol=1e-10, atol=1e-10)


def _backends():
    """Every backend that can run a CPU call of both table ops here (the Triton one under the interpreter)."""
    names = ["reference"]
    for name in ("cpu", "triton"):
        try:
            probe = torch.zeros(1, 1, 1)
            if (mean_table_op.backend_for(probe, name) == name and route_table_op.backend_for(probe, name) == name
                    and (name != "triton" or _triton_table_exists())):
                names.append(name)
        except ValueError:
            pass
    return names


def _triton_table_exists() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(f"routing_kernels.ops.{op}.triton_table") is not None
               for op in ("chunk_mean", "chunk_route"))


BACKENDS = _backends()


def _dtypes(backend):
    if backend == "triton":
        return [torch.float32, torch.float16]  # the interpreter does no bf16 arithmetic
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in _dtypes(b)]


def _leaf(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _grads(outs, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [o for o in outs if o.requires_grad]
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, allow_unused=True, materialize_grads=True)


# ------------------------------------------------------------------------------ references vs brute force
@pytest.mark.parametrize("shared_query", [True, False], ids=["query_shared", "query_per_seq"])
@pytest.mark.parametrize("case", TABLE_CASES, ids=TABLE_IDS)
def test_table_references_match_bruteforce(case, shared_query):
    _, lengths, rule = case
    x, cu, cu_chunks, seq_chunks, m = make_table(lengths, rule, 3, 5, torch.float64)
    spans = bf.table_spans(cu_chunks, cu)
    torch.testing.assert_close(chunk_mean_table_ref(x, cu_chunks, seq_chunks, m),
                               bf.chunk_mean(x, None, cu, None, spans, m), **F64)
    g = torch.Generator().manual_seed(1)
    query = torch.randn((3, 5) if shared_query else (len(lengths), 3, 5), generator=g, dtype=torch.float64)
    got = chunk_route_table_ref(x, query, cu_chunks, seq_chunks, m, scale=0.7)
    want = bf.chunk_route(x, query, None, cu, None, 0.7, spans, m)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)
    grad_mean = torch.randn(len(lengths), m, 3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(chunk_mean_table_backward_ref(grad_mean, x, cu_chunks, seq_chunks, m),
                               bf.chunk_mean_backward(grad_mean, x, None, cu, spans), **F64)


@pytest.mark.parametrize("case", TABLE_CASES, ids=TABLE_IDS)
def test_route_backward_reference_matches_autograd(case):
    _, lengths, rule = case
    x, cu, cu_chunks, seq_chunks, m = make_table(lengths, rule, 2, 3, torch.float64)
    query = torch.randn(len(lengths), 2, 3, dtype=torch.float64)
    xa, qa = _leaf(x, query)
    outs = chunk_route_table_ref(xa, qa, cu_chunks, seq_chunks, m, 0.9)
    g = torch.Generator().manual_seed(3)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    want = torch.autograd.grad(outs, (xa, qa), cot, allow_unused=True, materialize_grads=True)
    got = chunk_route_table_backward_ref(*cot, x, query, outs[1].detach(), cu_chunks, seq_chunks, m, 0.9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


# ------------------------------------------------------------------------------ the public functions
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("case", TABLE_CASES, ids=TABLE_IDS)
def test_public_functions_match_reference(case, backend, dtype):
    _, lengths, rule = case
    x, cu, cu_chunks, seq_chunks, m = make_table(lengths, rule, 3, 5, dtype)
    query = torch.randn(len(lengths), 3, 5).to(dtype)
    a, b = _leaf(x, query), _leaf(x, query)
    got = rk.chunk_route(*a, cu_seqlens=cu, cu_chunks=cu_chunks, backend=backend)
    want = chunk_route_table_ref(*b, cu_chunks, seq_chunks, m)
    assert got.weights.shape == (len(lengths), 3, m)
    assert_close_scaled(tuple(got), want, dtype)
    assert_close_scaled(_grads(got, a), _grads(want, b), dtype)
    (xa,), (xb,) = _leaf(x), _leaf(x)
    got = rk.chunk_mean(xa, cu_seqlens=cu, cu_chunks=cu_chunks, max_chunks=m, backend=backend)
    want = chunk_mean_table_ref(xb, cu_chunks, seq_chunks, m)
    assert_close_scaled(got, want, dtype)
    assert_close_scaled(_grads([got], [xa]), _grads([want], [xb]), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_require_grad_and_strided_inputs(backend):
    x, cu, cu_chunks, seq_chunks, m = make_table([9, 0, 14], ("random", 3), 2, 8)
    wide = torch.randn(x.shape[0], 2, 16)
    xs = wide[:, :, ::2].copy_(x)  # a strided view holding x
    query = torch.randn(2, 8, requires_grad=True)
    cu_strided = torch.stack([cu_chunks, torch.zeros_like(cu_chunks)], 1)[:, 0]  # cu_chunks as a strided view
    assert not cu_strided.is_contiguous()
    y, w, s = rk.chunk_route(xs, query, cu_seqlens=cu, cu_chunks=cu_strided, backend=backend)
    (dq,) = torch.autograd.grad(y.sum() + s.square().sum(), query)
    y2, w2, s2 = chunk_route_table_ref(x, query, cu_chunks, seq_chunks, m)
    (dq2,) = torch.autograd.grad(y2.sum() + s2.square().sum(), query)
    assert_close_scaled((y, w, s, dq), (y2, w2, s2, dq2), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_batch_with_uniform_table_equals_integer_chunks(backend):
    x, query = torch.randn(3, 37, 2, 8), torch.randn(2, 8)
    table = chunk_boundaries(batch=3, seqlen=37, chunk_size=8)
    assert table.max_chunks == 5
    got = rk.chunk_route(x, query, cu_chunks=table.cu_chunks, max_chunks=table.max_chunks, backend=backend)
    want = rk.chunk_route(x, query, 8, backend="reference")
    assert got.y.shape == x.shape and got.weights.shape == (3, 2, 5)
    assert_close_scaled(tuple(got), tuple(want), torch.float32)
    assert_close_scaled(rk.chunk_mean(x, None, cu_chunks=table.cu_chunks, backend=backend),
                        rk.chunk_mean(x, 8, backend="reference"), torch.float32)


# ------------------------------------------------------------------------------ the builder
def _spans(cu_chunks, cu):
    return [[b - a for a, b in seq] for seq in bf.table_spans(cu_chunks, cu)]


def test_builder_chunk_size_matches_the_integer_chunks():
    cu = torch.tensor([0, 7, 7, 30, 31], dtype=torch.int32)
    table = chunk_boundaries(cu, chunk_size=8, max_seqlen=23)
    assert _spans(table.cu_chunks, cu) == [[7], [], [8, 8, 7], [1]]
    assert table.max_chunks == 3
    x, query = torch.randn(31, 2, 4), torch.randn(4, 2, 4)
    for backend in BACKENDS:
        got = rk.chunk_route(x, query, cu_seqlens=cu, cu_chunks=table.cu_chunks, max_chunks=3, backend=backend)
        want = rk.chunk_route(x, query, 8, cu_seqlens=cu, max_seqlen=23, backend=backend)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref_table = rk.chunk_route(x, query, cu_seqlens=cu, cu_chunks=table.cu_chunks, backend="reference")
    ref_int = rk.chunk_route(x, query, 8, cu_seqlens=cu, backend="reference")
    for a, b in zip(ref_table, ref_int):
        assert torch.equal(a, b)  # the same chunks, the same reference: the same bits


def test_builder_num_chunks_fraction_and_flags():
    cu = torch.tensor([0, 2, 2, 12, 112], dtype=torch.int32)
    assert _spans(chunk_boundaries(cu, num_chunks=3).cu_chunks, cu) == [[1, 1], [], [3, 3, 4], [33, 33, 34]]
    frac = chunk_boundaries(cu, fraction=0.25)
    assert _spans(frac.cu_chunks, cu) == [[1, 1], [], [3, 3, 3, 1], [25, 25, 25, 25]]
    assert frac.max_chunks == 4
    ends = torch.zeros(112, dtype=torch.bool)
    ends[[0, 4, 5, 50]] = True  # token 0 ends a chunk; the sequence ends 1, 11, 111 end chunks by themselves
    flags = chunk_boundaries(cu, chunk_ends=ends)
    assert _spans(flags.cu_chunks, cu) == [[1, 1], [], [3, 1, 6], [39, 61]]
    dense = chunk_boundaries(batch=2, seqlen=10, chunk_ends=ends[:20].reshape(2, 10))
    assert dense.cu_chunks.tolist() == [0, 1, 5, 6, 10, 20]


@pytest.mark.parametrize("rule", [dict(chunk_size=3), dict(num_chunks=4), dict(fraction=0.3)], ids=str)
def test_builder_dense_rules_need_no_data(rule):
    # On the meta device any read of a value (a host sync on a GPU) raises: the dense rules must not read any.
    table = chunk_boundaries(batch=2, seqlen=10, device="meta", **rule)
    host = chunk_boundaries(batch=2, seqlen=10, **rule)
    assert table.cu_chunks.device.type == "meta" and table.cu_chunks.shape == host.cu_chunks.shape
    assert host.cu_chunks.tolist() == chunk_boundaries(torch.tensor([0, 10, 20], dtype=torch.int32),
                                                       **rule).cu_chunks.tolist()


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(chunk_size=2, fraction=0.5), "exactly one"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(num_chunks=0), "num_chunks must be >= 1"),
    (dict(fraction=1.5), "fraction must be"),
    (dict(fraction=0.0), "fraction must be"),
    (dict(chunk_ends=torch.zeros(5, dtype=torch.bool)), "chunk_ends must be"),
    (dict(chunk_ends=torch.zeros(12)), "chunk_ends must be a bool"),
])
def test_builder_bad_rules(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chunk_boundaries(torch.tensor([0, 5, 12], dtype=torch.int32), **kwargs)


# ------------------------------------------------------------------------------ bad tables
CU = torch.tensor([0, 5, 5, 12], dtype=torch.int32)


@pytest.mark.parametrize("cu_chunks,extra,match", [
    ([0, 2, 2, 5, 12], {}, "strictly increasing"),
    ([0, 4, 3, 5, 12], {}, "strictly increasing"),
    ([1, 5, 12], {}, "must start at 0"),
    ([0, 5, 13], {}, "must end at the number of tokens"),
    ([0, 5, 11], {}, "must end at the number of tokens"),
    ([0, 3, 12], {}, "every sequence start"),
    ([0, 5, 8, 12], dict(max_chunks=1), "max_chunks=1 is smaller"),
    ([0, 5, 12], dict(chunk_size=4), "not both"),
    ([0, 5, 12], dict(max_chunks=-1), "max_chunks must be >= 0"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_tables_raise_naming_the_argument(cu_chunks, extra, match, backend):
    x, query = torch.randn(12, 2, 4), torch.randn(2, 4)
    table = torch.tensor(cu_chunks, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        rk.chunk_route(x, query, cu_seqlens=CU, cu_chunks=table, backend=backend, **extra)
    with pytest.raises(ValueError, match=match):
        rk.chunk_mean(x, cu_seqlens=CU, cu_chunks=table, backend=backend, **extra)


def test_bad_table_types():
    x = torch.randn(12, 2, 4)
    with pytest.raises(TypeError, match="cu_chunks must be int32"):
        rk.chunk_mean(x, cu_seqlens=CU, cu_chunks=torch.tensor([0, 5, 12]))
    with pytest.raises(ValueError, match="cu_chunks must be 1-D"):
        rk.chunk_mean(x, cu_seqlens=CU, cu_chunks=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk_size is required unless cu_chunks"):
        rk.chunk_mean(x, cu_seqlens=CU)


# ------------------------------------------------------------------------------ ops, compile
def test_opcheck_table_ops():
    x, cu, cu_chunks, _, m = make_table([9, 0, 14], ("random", 3), 2, 4)
    query = torch.randn(3, 2, 4)
    torch.library.opcheck(OPS.chunk_mean_table, (x.clone().requires_grad_(), cu_chunks, cu, m))
    torch.library.opcheck(OPS.chunk_route_table, (x.clone().requires_grad_(), query.requires_grad_(), cu_chunks, cu,
                                                  m, 0.5))
    w = torch.rand(3, 2, m)
    torch.library.opcheck(OPS.chunk_mean_table_backward, (torch.randn(3, m, 2, 4), x, cu_chunks, cu, m))
    torch.library.opcheck(OPS.chunk_route_table_backward, (torch.randn_like(x), torch.randn_like(w),
                                                           torch.randn(3, 2, 4), x, query.detach(), w, cu_chunks, cu,
                                                           m, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_keeps_the_backend_and_the_gradients(backend, monkeypatch):
    x, cu, cu_chunks, seq_chunks, m = make_table([9, 0, 14], ("random", 3), 2, 4)
    query = torch.randn(2, 4)
    ran = []
    for table in (route_table_op.KERNELS, mean_table_op.KERNELS):
        fn = table[backend]
        monkeypatch.setitem(table, backend, lambda *a, fn=fn, **k: ran.append(backend) or fn(*a, **k))

    def loss(x, query):
        y, w, s = rk.chunk_route(x, query, cu_seqlens=cu, cu_chunks=cu_chunks, max_chunks=m, backend=backend)
        means = rk.chunk_mean(x, cu_seqlens=cu, cu_chunks=cu_chunks, max_chunks=m, backend=backend)
        return y.sum() + s.square().sum() + w.square().sum() + means.square().sum()

    a, b = _leaf(x, query), _leaf(x, query)
    la = torch.compile(loss, fullgraph=True, backend="aot_eager")(*a)
    if backend != "reference":  # the reference path is plain PyTorch: nothing to count
        assert ran and set(ran) == {backend}
    lb = loss(*b)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(torch.autograd.grad(la, a), torch.autograd.grad(lb, b))


def test_compile_without_max_chunks_is_a_clear_error():
    x, cu, cu_chunks, _, _ = make_table([9, 14], ("random", 3), 2, 4)
    f = torch.compile(lambda x: rk.chunk_mean(x, cu_seqlens=cu, cu_chunks=cu_chunks), fullgraph=True,
                      backend="eager")
    with pytest.raises(Exception, match="max_chunks must be given under torch.compile"):
        f(x)


def test_seq_chunk_offsets_of_empty_sequences():
    cu = torch.tensor([0, 0, 3, 3, 5, 5], dtype=torch.int32)
    cu_chunks = torch.tensor([0, 1, 3, 4, 5], dtype=torch.int32)
    assert seq_chunk_offsets(cu_chunks, cu).tolist() == [0, 0, 2, 2, 4, 4]


# ------------------------------------------------------------------------------ ChunkRouter
class CountingEncoder(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.calls = []

    def forward(self, chunks, src_key_padding_mask=None):
        self.calls.append((tuple(chunks.shape), src_key_padding_mask.sum().item()))
        return self.lin(chunks).masked_fill(src_key_padding_mask[..., None], float("nan"))  # padding must not leak


def test_chunk_router_rules_default_and_per_call():
    torch.manual_seed(0)
    enc = CountingEncoder(16)
    router = ChunkRouter(16, 2, encoder=enc, fraction=0.5)
    x = torch.randn(2, 10, 16, requires_grad=True)
    y, w, s = router(x)
    assert enc.calls[-1] == ((4, 5, 16), 0)  # 2 sequences x 2 chunks of 5, one encoder call
    assert w.shape == (2, 2, 2) and not y.isnan().any()
    y.sum().backward()
    assert router.query.grad is not None and enc.lin.weight.grad is not None and x.grad is not None
    cu = torch.tensor([0, 3, 3, 20], dtype=torch.int32)
    packed = torch.randn(20, 16)
    y, w, s = router(packed, cu_seqlens=cu, num_chunks=3)  # per-call rule on a packed batch with an empty sequence
    assert enc.calls[-1] == ((6, 6, 16), 6 * 6 - 20)  # chunks 1,1,1,5,6,6 padded to 6
    assert y.shape == (20, 16) and w.shape == (3, 2, 3) and s.shape == (3, 16) and not y.isnan().any()
    assert (w[1] == 0).all()
    y2, w2, _ = router(packed, cu_seqlens=cu, cu_chunks=chunk_boundaries(cu, num_chunks=3).cu_chunks)
    assert torch.equal(y, y2) and torch.equal(w, w2)


def test_chunk_router_integer_rule_unchanged_and_errors():
    torch.manual_seed(0)
    router = ChunkRouter(8, 2, 4)
    x = torch.randn(2, 9, 8)
    y, w, s = router(x)
    table = router(x, cu_chunks=chunk_boundaries(batch=2, seqlen=9, chunk_size=4).cu_chunks)
    for a, b in zip((y, w, s), table):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one chunking rule"):
        router(x, num_chunks=2, fraction=0.5)
    with pytest.raises(ValueError, match="no default chunking rule"):
        ChunkRouter(8, 2)(x)
    with pytest.raises(ValueError, match="exactly one chunking rule"):
        ChunkRouter(8, 2, 4, num_chunks=3)
    with pytest.raises(ValueError, match="fraction must be"):
        ChunkRouter(8, 2, fraction=2.0)
