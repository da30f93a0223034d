"""What the user asked for is what runs: ``backend=`` in eager mode and under torch.compile(fullgraph=True),
forward and backward; the dense dispatch when routing cannot skip work; no quadratic fallback by surprise;
strided cu_seqlens on every backend; and the C++ kernels as torch ops (fakes, autograd)."""
from __future__ import annotations

import collections

import pytest
import torch

import routing_kernels as rk
from routing_kernels import _ext, _triton, functional
from routing_kernels.nn import ChunkRouter
from routing_kernels.ops.chunk_mean import op as chunk_mean_op
from routing_kernels.ops.chunk_route import op as chunk_route_op
from routing_kernels.ops.route_chunks import op as route_chunks_op
from routing_kernels.ops.routed_attention import op as routed_attention_op
from shapes import make

OPS = torch.ops.routing_kernels
TABLES = {"chunk_mean": chunk_mean_op, "chunk_route": chunk_route_op, "route_chunks": route_chunks_op,
          "routed_attention": routed_attention_op}
# The backends this machine can run for CPU tensors (Triton only under the interpreter).
CPU_BACKENDS = [b for b, ok in (("cpu", _ext.HAS_C), ("triton", _triton.can_run("cpu"))) if ok]


@pytest.fixture
def ran(monkeypatch):
    """Counter of (op, direction, backend) over the kernels that really ran, compiled or eager."""
    calls = collections.Counter()
    for op, module in TABLES.items():
        for direction, table in (("fwd", module.KERNELS), ("bwd", getattr(module, "BACKWARD_KERNELS", {}))):
            for name, fn in list(table.items()):
                def counted(*args, _fn=fn, _key=(op, direction, name), **kwargs):
                    calls[_key] += 1
                    return _fn(*args, **kwargs)
                monkeypatch.setitem(table, name, counted)
    return calls


def _inputs(varlen: bool, requires_grad: bool = True):
    layout = {"lengths": [9, 0, 5]} if varlen else {"B": 2, "N": 9}
    q, cu, ms = make(layout, heads=4, dim=8)
    k, _, _ = make(layout, heads=2, dim=8, seed=1)
    v, _, _ = make(layout, heads=2, dim=8, seed=2)
    query = torch.randn(4, 8)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, query)], dict(cu_seqlens=cu, max_seqlen=ms)


def _calls(backend):
    """Each public function with the backend asked for; top_k = 2 < M, so routed attention stays routed."""
    return {
        "chunk_mean": lambda q, k, v, query, lay: rk.chunk_mean(q, 4, backend=backend, **lay).sum(),
        "chunk_route": lambda q, k, v, query, lay: sum(
            t.sum() for t in rk.chunk_route(q, query, 4, backend=backend, **lay)),
        "route_chunks": lambda q, k, v, query, lay: rk.select_chunks(q, k, 4, 2, backend=backend, **lay).sum(),
        "routed_attention": lambda q, k, v, query, lay: rk.routed_attention(
            q, k, v, 4, 2, backend=backend, **lay).sum(),
    }


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", list(TABLES))
def test_backend_is_what_runs(ran, op, backend, compiled, varlen):
    (q, k, v, query), lay = _inputs(varlen)
    fn = _calls(backend)[op]
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = fn(q, k, v, query, lay)
    if loss.requires_grad:
        loss.backward()
    expected = collections.Counter({(op, "fwd", backend): 1})
    if op != "route_chunks":  # the gate is discrete: no backward
        expected[(op, "bwd", backend)] = 1
    assert ran == expected


def test_backend_under_inductor(ran):
    """The issue's own example, with inductor: chunk_mean(x, 4, backend=...) inside torch.compile."""
    backend = CPU_BACKENDS[-1]
    x = torch.randn(2, 10, 3, 4)
    torch._dynamo.reset()
    got = torch.compile(lambda x: rk.chunk_mean(x, 4, backend=backend), fullgraph=True)(x)
    torch.testing.assert_close(got, rk.chunk_mean(x, 4, backend="reference"))
    assert ran == {("chunk_mean", "fwd", backend): 1}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunk_router_backend_survives_compile(ran, backend):
    router = ChunkRouter(dim=8, heads=2, chunk_size=4, backend=backend)
    x = torch.randn(2, 10, 8, requires_grad=True)
    torch._dynamo.reset()
    y, w, s = torch.compile(router, fullgraph=True, backend="aot_eager")(x)
    (y.sum() + s.sum()).backward()
    assert ran == {("chunk_route", "fwd", backend): 1, ("chunk_route", "bwd", backend): 1}


def test_reference_backend_runs_the_reference(monkeypatch, ran):
    seen = []
    real = functional.chunk_mean_ref
    monkeypatch.setattr(functional, "chunk_mean_ref", lambda *a: seen.append(1) or real(*a))
    x = torch.randn(2, 10, 3, 4)
    torch._dynamo.reset()
    torch.compile(lambda x: rk.chunk_mean(x, 4, backend="reference"), fullgraph=True, backend="aot_eager")(x)
    assert seen and not ran  # traced into the graph (once, at compile time); no kernel ran


def test_compiled_varlen_needs_max_seqlen():
    x, cu, _ = make({"lengths": [5, 5]}, heads=2, dim=4)
    torch._dynamo.reset()
    f = torch.compile(lambda x, cu: rk.chunk_mean(x, 4, cu_seqlens=cu), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="max_seqlen is required with cu_seqlens under torch.compile"):
        f(x, cu)


# ---- strided cu_seqlens: the kernels read offsets by raw position, so the ops make them contiguous ----

STRIDED_CU = torch.tensor([0, 0, 5, 5, 10, 10, 10, 10], dtype=torch.int32)[::2]  # [0, 5, 10, 10]


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("op", list(TABLES))
def test_strided_cu_seqlens(op, backend):
    assert not STRIDED_CU.is_contiguous()
    contiguous = STRIDED_CU.contiguous()
    results = []
    for cu in (STRIDED_CU, contiguous):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(10, h, 8, generator=g).requires_grad_() for h in (4, 2, 2))
        query = torch.randn(3, 4, 8, generator=g).requires_grad_()
        lay = dict(cu_seqlens=cu, max_seqlen=5)
        out = _calls(backend)[op](q, k, v, query, lay)
        grads = torch.autograd.grad(out, (q, k, v, query), allow_unused=True, materialize_grads=True) \
            if out.requires_grad else ()
        results.append((out, grads))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# ---- dense dispatch when every query selects every chunk ----

@pytest.fixture
def dense_calls(monkeypatch):
    calls = []
    real = functional._dense_attention
    monkeypatch.setattr(functional, "_dense_attention", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_dense_dispatch_when_routing_selects_everything(dense_calls, ran, causal, heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 13, heads[0], 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 13, heads[1], 8, generator=g, dtype=torch.float64) for _ in range(2))
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    got = rk.routed_attention(*a, 4, 4, causal=causal)  # M = 4 chunks, top_k 4: everything selected
    assert dense_calls == [1] and not ran
    want = rk.routed_attention(*b, 4, 4, causal=causal, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    cot = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, a, cot), torch.autograd.grad(want, b, cot),
                               rtol=1e-10, atol=1e-10)


def test_no_dense_dispatch_when_routing_skips_work_or_asked_otherwise(dense_calls):
    x = torch.randn(1, 13, 2, 8)
    rk.routed_attention(x, x, x, 4, 3)  # top_k 3 < M = 4: routing skips a chunk
    rk.routed_attention(x, x, x, 4, 4, return_lse=True)  # lse wanted: the routed kernel returns it
    rk.routed_attention(x, x, x, 4, 4, backend="reference")  # a named backend is what runs
    if _ext.HAS_C:
        rk.routed_attention(x, x, x, 4, 4, backend="cpu")
    cu = torch.tensor([0, 13], dtype=torch.int32)
    rk.routed_attention(x[0], x[0], x[0], 4, 4, cu_seqlens=cu)  # varlen: no dense varlen kernel on CPU
    assert dense_calls == []


@pytest.fixture
def dense_cache_calls(monkeypatch):
    calls = []
    real = functional._dense_cache_attention
    monkeypatch.setattr(functional, "_dense_cache_attention", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("lq", [1, 3])
def test_dense_dispatch_when_the_cache_fits_in_top_k(dense_cache_calls, ran, causal, lq):
    """A cache of capacity <= top_k * chunk_size: every query selects every chunk it may see, whatever the rows
    hold, so the decode call is one masked SDPA over the cache (rows of different lengths, bottom-right causal)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, lq, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 20, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    used = torch.tensor([3, 11, 20], dtype=torch.int32)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    got = rk.routed_attention(*a, 4, 5, causal=causal, seqused_k=used)  # capacity 20 = 5 chunks of 4
    assert dense_cache_calls == [1] and not ran
    want = rk.routed_attention(*b, 4, 5, causal=causal, seqused_k=used, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    cot = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, a, cot), torch.autograd.grad(want, b, cot),
                               rtol=1e-10, atol=1e-10)


def test_no_dense_cache_dispatch_when_routing_can_skip(dense_cache_calls):
    x, cache_kv = torch.randn(2, 1, 4, 8), torch.randn(2, 21, 2, 8)
    used = torch.tensor([21, 21], dtype=torch.int32)
    rk.routed_attention(x, cache_kv, cache_kv, 4, 5, seqused_k=used)  # capacity 21: 6 chunks > top_k 5
    rk.routed_attention(x, cache_kv[:, :20], cache_kv[:, :20], 4, 5, seqused_k=used - 1, return_lse=True)
    rk.routed_attention(x, cache_kv[:, :20], cache_kv[:, :20], 4, 5, seqused_k=used - 1, backend="reference")
    assert dense_cache_calls == []
    with pytest.raises(ValueError):  # the values are still checked: 2 queries but a row of 1 key
        rk.routed_attention(torch.randn(2, 2, 4, 8), cache_kv[:, :20], cache_kv[:, :20], 4, 5,
                            seqused_k=torch.tensor([1, 20], dtype=torch.int32))
    assert dense_cache_calls == []


def test_routed_kv_cache_runs_dense_while_its_rows_fit_in_top_k(dense_cache_calls):
    cache = rk.RoutedKVCache(1, 2, 100, num_kv_heads=2, head_dim=8, chunk_size=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 30, 2, 8, generator=g, dtype=torch.float64)
    cache.append(0, kv, kv)
    q = torch.randn(2, 1, 4, 8, generator=g, dtype=torch.float64)
    got = cache.attention(0, q, top_k=4)  # 30 keys <= 4 chunks of 8, capacity 100
    assert dense_cache_calls == [1]
    want = cache.attention(0, q, top_k=4, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    cache.append(0, kv[:, :3], kv[:, :3])  # 33 keys: 5 chunks > top_k 4, routing skips work again
    got = cache.attention(0, q, top_k=4)
    assert dense_cache_calls == [1]
    torch.testing.assert_close(got, cache.attention(0, q, top_k=4, backend="reference"), rtol=1e-10, atol=1e-10)


def test_dense_dispatch_under_compile():
    x = torch.randn(1, 8, 2, 8)
    torch._dynamo.reset()
    got = torch.compile(lambda x: rk.routed_attention(x, x, x, 4, 2), fullgraph=True)(x)
    torch.testing.assert_close(got, rk.routed_attention(x, x, x, 4, 2, backend="reference"), rtol=1e-5, atol=1e-5)


# ---- no silent O(L^2) fallback ----

def test_no_silent_quadratic_fallback(monkeypatch):
    """Where no kernel fits (here simulated: as if nothing were built), a long input is refused, not run
    through the (Hq, L, L) reference; a short one still runs it; asking by name is always honoured."""
    monkeypatch.setattr(route_chunks_op, "available_backends", lambda *args: {})
    monkeypatch.setattr(routed_attention_op, "available_backends", lambda *args: {})
    long = torch.randn(1, 40_000, 8, 4)
    with pytest.raises(ValueError, match=r"routed_attention: no kernel is available .* backend='reference'"):
        rk.routed_attention(long, long, long, 64, 2, return_lse=True)
    with pytest.raises(ValueError, match=r"route_chunks: no kernel is available"):
        rk.select_chunks(long, long, 4, 2)
    short = torch.randn(1, 9, 2, 4)
    torch.testing.assert_close(rk.routed_attention(short, short, short, 4, 2),
                               rk.routed_attention(short, short, short, 4, 2, backend="reference"))


# ---- the C++ kernels as torch ops ----

needs_c = pytest.mark.skipif(not _ext.HAS_C, reason="routing_kernels._C not built")


@needs_c
def test_cpp_ops_trace_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, q = torch.empty(2, 10, 3, 4), torch.empty(3, 4)
        assert OPS.chunk_mean_fwd(x, 4, None, 10).shape == (2, 3, 3, 4)
        assert [t.shape for t in OPS.chunk_route_fwd(x, q, 4, None, 10, 0.5)] == [x.shape, (2, 3, 3), (2, 3, 4)]
        assert OPS.route_chunks_fwd(x, x, 4, 2, True, None, 10).dtype == torch.int32
        assert OPS.routed_attention_fwd(x, x, x, 4, 2, True, None, 10, 0.5)[1].shape == (2, 10, 3)


@needs_c
def test_cpp_forward_ops_have_autograd():
    (q, k, v, query), lay = _inputs(varlen=True)
    cu, ms = lay["cu_seqlens"], lay["max_seqlen"]
    leaves = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    for direct, public, inputs in [
        (lambda x, qy: OPS.chunk_route_fwd(x, qy, 4, cu, ms, 0.5),
         lambda x, qy: OPS.chunk_route(x, qy, 4, cu, ms, 0.5, backend="cpu"), (q, query.expand(3, 4, 8))),
        (lambda *t: OPS.routed_attention_fwd(*t, 4, 2, True, cu, ms, 0.3),
         lambda *t: OPS.routed_attention(*t, 4, 2, True, cu, ms, 0.3, backend="cpu"), (q, k, v)),
        (lambda x: (OPS.chunk_mean_fwd(x, 4, cu, ms),), lambda x: (OPS.chunk_mean(x, 4, cu, ms, backend="cpu"),),
         (q,)),
    ]:
        a, b = leaves(*inputs), leaves(*inputs)
        outs_a, outs_b = direct(*a), public(*b)
        cots = [torch.randn_like(o) for o in outs_a]
        torch.testing.assert_close(torch.autograd.grad(outs_a, a, cots), torch.autograd.grad(outs_b, b, cots))


@needs_c
def test_cpp_backward_ops_refuse_double_backward():
    x = torch.randn(1, 8, 2, 4, requires_grad=True)
    query = torch.randn(2, 4)
    y, w, s = OPS.chunk_route_fwd(x, query, 4, None, 8, 0.5)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@needs_c
def test_cpp_ops_opcheck():
    x, q = torch.randn(2, 7, 2, 4), torch.randn(2, 4)
    torch.library.opcheck(OPS.chunk_mean_fwd, (x.requires_grad_(), 3, None, 7))
    torch.library.opcheck(OPS.chunk_route_fwd, (x, q.requires_grad_(), 3, None, 7, 0.5))
    qkv = [torch.randn(1, 9, 4, 8, requires_grad=True)] + [torch.randn(1, 9, 2, 8, requires_grad=True)] * 2
    torch.library.opcheck(OPS.routed_attention_fwd, (*qkv, 3, 2, True, None, 9, 0.3))
    torch.library.opcheck(OPS.route_chunks_fwd, (qkv[0].detach(), qkv[1].detach(), 3, 2, True, None, 9))


# ---- cu_seqlens values: read on CPU, never on a device unless debugging ----

def test_offsets_of_device_tensors_are_not_read_unless_debugging():
    from routing_kernels._validation import prepare_offsets
    meta = torch.tensor([0, 5, 10], dtype=torch.int32, device="meta")  # reading a meta tensor's values raises
    assert prepare_offsets(meta, 5, 10).device.type == "meta"
    rk.set_debug(True)
    try:
        with pytest.raises((RuntimeError, NotImplementedError)):
            prepare_offsets(meta, 5, 10)
    finally:
        rk.set_debug(False)
    with pytest.raises(ValueError, match="non-decreasing"):  # CPU tensors are always validated
        prepare_offsets(torch.tensor([0, 6, 5, 10], dtype=torch.int32), 6, 10)


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(TABLES))
def test_gpu_varlen_call_makes_no_host_sync(op):
    (q, k, v, query), lay = _inputs(varlen=True)
    q, k, v, query = (t.detach().cuda().requires_grad_() for t in (q, k, v, query))
    lay["cu_seqlens"] = lay["cu_seqlens"].cuda()
    fn = _calls(None)[op]
    fn(q, k, v, query, lay)  # warm-up: Triton compiles, allocator pools fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn(q, k, v, query, lay)
        if out.requires_grad:
            out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
