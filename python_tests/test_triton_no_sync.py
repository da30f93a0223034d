"""The Triton launchers never wait for the GPU: no device -> host read (`.item()`, `int(t)`, `bool(t)`,
`.tolist()`, `.cpu()`), and no op whose output shape depends on data (`nonzero`, boolean-mask indexing,
`masked_select`, `unique`, `repeat_interleave` without output_size, `bincount`). On a GPU each of them
blocks the host until the stream drains, which serialises every launch behind the previous kernel.

Every launcher (forward and backward, dense and varlen) runs under a TorchDispatchMode that records such
ops, plus Python-level patches of the Tensor methods that read data to the host without dispatching an op
on a CPU tensor (`tolist`, `numpy`, `cpu`). On a GPU, device -> cpu copies are recorded too.

What is excluded, and why: under TRITON_INTERPRET=1 a kernel launch itself copies its tensor arguments to
host storages, runs the kernel in numpy and copies the results back (triton/runtime/interpreter.py,
GridExecutor). Those are the interpreter's operations, not ours (a compiled launch does none of them), so
recording pauses while a kernel launch runs: `_paused` is set around the kernel object's `run` (the method
`kernel[grid](...)` calls). Everything our Python code does before and after launches is recorded.
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from routing_kernels.ops.chunk_mean import triton as cm_triton
from routing_kernels.ops.chunk_mean import triton_table as cm_table
from routing_kernels.ops.chunk_route import triton as cr_triton
from routing_kernels.ops.chunk_route import triton_table as cr_table
from routing_kernels.ops.route_chunks import triton as rc_triton
from routing_kernels.ops.routed_attention import triton as ra_triton

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
aten = torch.ops.aten

# ops that read device data on the host, or whose output shape depends on data (so the host must wait)
SYNC_OPS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select,
            aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
            aten.bincount, aten.argwhere}
MASK_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # sync with bool masks


def _is_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return True
    if packet in MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if packet is aten.repeat_interleave:
        return kwargs.get("output_size") is None
    if packet is aten._to_copy:  # .cpu() / .to("cpu") of a device tensor
        dev = kwargs.get("device")
        return dev is not None and torch.device(dev).type == "cpu" and args[0].device.type != "cpu"
    if packet is aten.copy_:  # a host tensor filled from a device tensor
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _where() -> str:
    """The innermost frame of our package that led to the op, for the failure message."""
    frames = [f for f in traceback.extract_stack() if "routing_kernels" in f.filename]
    return f"{frames[-1].filename.split('routing_kernels')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


class SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._paused = 0

    def record(self, what):
        if not self._paused:
            self.events.append(f"{what} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused and _is_sync(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def recorder(monkeypatch):
    rec = SyncRecorder()
    # Pause recording during kernel launches (the interpreter's own host copies, see the module docstring).
    kernel_cls = type(cm_triton.chunk_reduce_kernel)  # InterpretedFunction under the interpreter, else JITFunction
    launch = kernel_cls.run

    def run(self, *args, **kwargs):
        rec._paused += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            rec._paused -= 1

    monkeypatch.setattr(kernel_cls, "run", run)
    # Host reads that dispatch no op on a CPU tensor (on a GPU, .cpu() would also show up as _to_copy).
    for name in ("tolist", "numpy", "cpu"):
        method = getattr(torch.Tensor, name)

        def wrapper(self, *a, _method=method, _name=name, **k):
            rec.record(f"Tensor.{_name}")
            return _method(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return rec


def test_recorder_catches_syncs(recorder):
    # the recorder itself: each of these would block on a GPU (so the test below can fail)
    t = torch.arange(6, device=DEVICE, dtype=torch.int32)
    with recorder:
        int(t[-1]), bool(t[1]), t.nonzero(), t[t > 2], t.tolist(), t.unique(), t.cpu()
        torch.cumsum(t, 0), t[1:] - t[:-1], torch.searchsorted(t, t)  # these do not
    assert len(recorder.events) == 7, recorder.events


LAYOUTS = {"dense": ({"B": 2, "N": 19}, None), "varlen": ({"lengths": [13, 0, 9]}, [0, 13, 13, 22])}


def _inputs(layout, heads, dim, seed):
    shape_info, cu = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    if cu is None:
        x = torch.randn(shape_info["B"], shape_info["N"], heads, dim, generator=g)
        return x.to(DEVICE), None, None
    x = torch.randn(cu[-1], heads, dim, generator=g)
    return x.to(DEVICE), torch.tensor(cu, dtype=torch.int32, device=DEVICE), max(shape_info["lengths"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chunk_mean_and_route_launchers_do_not_sync(layout, recorder):
    x, cu, ms = _inputs(layout, 2, 8, seed=0)
    num_seqs = 2 if cu is None else cu.numel() - 1
    query = torch.randn(num_seqs, 2, 8, device=DEVICE)
    with recorder:
        means, _ = cm_triton.chunk_mean_fwd(x, 4, cu, ms)
        cm_triton.chunk_mean_bwd(torch.randn_like(means), x, 4, cu, ms)
        for q in (query, query[0]):  # per-sequence and shared query
            y, w, s = cr_triton.chunk_route_fwd(x, q, 4, cu, ms, 0.5)
            cr_triton.chunk_route_bwd(torch.randn_like(y), torch.randn_like(w), torch.randn_like(s), x, q, w, 4, cu,
                                      ms, 0.5)
    assert recorder.events == []


def test_chunk_table_launchers_do_not_sync(recorder, monkeypatch):
    # chunk table (dynamic chunking): sequences of 13, 0 and 9 tokens in chunks of 1..6 tokens, pieces of 4 tokens
    # (the work list is built on the device; its length comes from shapes)
    monkeypatch.setattr(cm_table, "SPLIT", 4)
    x, _, _ = _inputs("varlen", 2, 8, seed=5)
    cu_chunks = torch.tensor([0, 6, 7, 13, 14, 16, 22], dtype=torch.int32, device=DEVICE)
    seq_chunks = torch.tensor([0, 3, 3, 6], dtype=torch.int32, device=DEVICE)
    table = (cu_chunks, seq_chunks, 3)
    query = torch.randn(3, 2, 8, device=DEVICE)
    with recorder:
        means = cm_table.chunk_mean_table_fwd(x, *table)
        cm_table.chunk_mean_table_bwd(torch.randn_like(means), x, *table)
        for q in (query, query[0]):  # per-sequence and shared query
            y, w, s = cr_table.chunk_route_table_fwd(x, q, *table, 0.5)
            cr_table.chunk_route_table_bwd(torch.randn_like(y), torch.randn_like(w), torch.randn_like(s), x, q, w,
                                           *table, 0.5)
    assert recorder.events == []


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_routing_and_attention_launchers_do_not_sync(layout, causal, recorder):
    q, cu, ms = _inputs(layout, 4, 16, seed=1)
    k, _, _ = _inputs(layout, 2, 16, seed=2)
    v, _, _ = _inputs(layout, 2, 16, seed=3)
    with recorder:
        rc_triton.route_chunks_triton(q, k, 4, 2, causal, cu, ms)
        o, lse = ra_triton.routed_attention_fwd_triton(q, k, v, 4, 2, causal, cu, ms)
        ra_triton.routed_attention_bwd_triton(torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, 4, 2,
                                              causal, cu, ms)
    assert recorder.events == []


# queries shorter than keys (chunked prefill): dense Nq < Nk, and packed q with the keys' own cu_seqlens_k
PREFILL = {"dense": ((2, 5), (2, 19), None), "varlen": ((10,), (22,), ([0, 3, 3, 10], [0, 13, 13, 22]))}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", list(PREFILL))
def test_prefill_launchers_do_not_sync(layout, causal, recorder):
    q_shape, k_shape, offsets = PREFILL[layout]
    g = torch.Generator().manual_seed(4)
    q = torch.randn(*q_shape, 4, 16, generator=g).to(DEVICE)
    k = torch.randn(*k_shape, 2, 16, generator=g).to(DEVICE)
    v = torch.randn(*k_shape, 2, 16, generator=g).to(DEVICE)
    args, keys = (None, None), {}
    if offsets is not None:
        cu, cu_k = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in offsets)
        args, keys = (cu, 7), dict(cu_seqlens_k=cu_k, max_seqlen_k=13)
    with recorder:
        rc_triton.route_chunks_triton(q, k, 4, 2, causal, *args, **keys)
        ra_triton.routed_attention_fwd_triton(q, k, v, 4, 2, causal, *args, None, **keys)
        if offsets is not None:  # max_seqlen_k omitted: an upper bound from shapes, still no sync
            ra_triton.routed_attention_fwd_triton(q, k, v, 4, 2, causal, *args, None, cu_seqlens_k=keys["cu_seqlens_k"])
    assert recorder.events == []
