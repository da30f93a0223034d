"""Worker side of test_context_parallel.py: runs in every spawned rank (gloo on CPU).

Each case builds the full inputs from one seed (the same on every rank), runs the single-process op on the
full sequences, shards everything, runs the context-parallel op, backpropagates a fixed random projection of
the output and compares this rank's rows: selection exactly, forward and dq/dk/dv to the tolerance table
(scaled to the reference's magnitude). Failures are collected per case, never raised mid-run, so one case's
mismatch cannot leave the other ranks waiting in a collective.
"""
from __future__ import annotations

import itertools
import traceback

import torch
import torch.distributed as dist

from routing_kernels import routed_attention, select_chunks
from routing_kernels.distributed import (context_parallel_routed_attention, count_bytes, make_plan, shard,
                                          unshard)
from routing_kernels.distributed.attention import fold_kv_heads, plan_folded, unfold_kv_heads

from tolerance import assert_close_scaled  # noqa: E402  (python_tests/ is on sys.path in the workers)

CHUNK = 8


def _full_inputs(seed, tokens, hq, hkv, d, dtype, dense):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda h: (2, tokens, h, d)) if dense else (lambda h: (tokens, h, d))
    q, k, v = (torch.randn(shape(h), generator=g).to(dtype) for h in (hq, hkv, hkv))
    w = torch.randn(shape(hq), generator=g).to(dtype)  # the output's cotangent
    return q, k, v, w


def _run_case(rank, world, *, tokens, hq, hkv, top_k, causal, layout, dtype, cu=None, seed=0, d=16):
    dense = cu is None
    q, k, v, w = _full_inputs(seed, tokens, hq, hkv, d, dtype, dense)
    var = dict(cu_seqlens=cu, max_seqlen=int(cu.diff().max()) if cu is not None and cu.numel() > 1 else None)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = routed_attention(*full, CHUNK, top_k, causal=causal, return_lse=True, **var)
    torch.autograd.backward(o_ref, w)
    sel_ref = select_chunks(q, k, CHUNK, top_k, causal=causal, backend="reference", **var)

    cut = dict(cu_seqlens=cu, layout=layout)
    local = [shard(x, CHUNK, world, rank, **cut).detach().requires_grad_() for x in (q, k, v)]
    with count_bytes() as log:
        o, lse = context_parallel_routed_attention(*local, CHUNK, top_k, causal=causal, return_lse=True, **cut)
        torch.autograd.backward(o, shard(w, CHUNK, world, rank, **cut))

    # every collective before the first assertion: a rank that fails must not skip one the others wait in
    plan = make_plan(CHUNK, world, cu_seqlens=cu, seqlen=None if cu is not None else tokens, batch=2, layout=layout)
    flat = [fold_kv_heads(x.detach().reshape(-1, *x.shape[-2:]), hkv) for x in local[:2]]
    plan, ex = plan_folded(*flat, plan, rank, top_k, causal, hkv)
    back = unshard(o.detach(), CHUNK, cu_seqlens=cu, seqlen=None if cu is not None else tokens, layout=layout)

    seq_of_token = torch.repeat_interleave(torch.arange(len(plan.lengths)), torch.tensor(plan.local_lengths(rank)))
    base = torch.tensor(plan.chunk_base[:-1], dtype=torch.int64)[seq_of_token][:, None, None]
    sel = unfold_kv_heads(torch.where(ex.selection >= 0, ex.selection - base, ex.selection), hkv)
    want_sel = shard(sel_ref, CHUNK, world, rank, **cut).long()
    assert torch.equal(sel.reshape(want_sel.shape), want_sel), "selection"
    assert_close_scaled(o, shard(o_ref, CHUNK, world, rank, **cut), dtype, name="o")
    assert_close_scaled(lse, shard(lse_ref, CHUNK, world, rank, **cut), dtype, name="lse")
    for name, mine, ref in zip("qkv", local, full):
        assert_close_scaled(mine.grad, shard(ref.grad, CHUNK, world, rank, **cut), dtype, name=f"d{name}")
    assert_close_scaled(back, o_ref.detach(), dtype, name="unshard(o)")
    # the bytes counted are the plan's rows; never more K/V than ring attention's forward sends
    row = 2 * d * q.element_size()  # the exchange moves (token, kv head) rows
    assert log.bytes_sent["kv"] == row * sum(n for r, n in enumerate(ex.send_splits) if r != rank), "kv bytes"
    assert log.bytes_sent["dkv"] == row * sum(n for r, n in enumerate(ex.recv_splits) if r != rank), "dkv bytes"
    assert log.bytes_sent["kv"] <= (world - 1) * row * flat[1].shape[0], "more K/V than ring attention"


def cases(world):
    """(name, kwargs): every awkward case runs in both layouts."""
    out = []
    for (hq, hkv), causal, layout, dtype in itertools.product(
            [(4, 4), (4, 2), (8, 1), (6, 2)], [True, False], ["contiguous", "zigzag"],
            [torch.float32, torch.bfloat16]):
        # 75 tokens: 10 chunks, the last partial; not divisible by 2 or 4 ranks (tokens nor chunks)
        out.append((f"dense-H{hq}/{hkv}-{'causal' if causal else 'full'}-{layout}-{str(dtype)[6:]}",
                    dict(tokens=75, hq=hq, hkv=hkv, top_k=3, causal=causal, layout=layout, dtype=dtype)))
    for causal, layout in itertools.product([True, False], ["contiguous", "zigzag"]):
        tag = f"{'causal' if causal else 'full'}-{layout}"
        # top_k >= M: every chunk selected (dense attention through the same path)
        out.append((f"topk>=M-{tag}", dict(tokens=75, hq=4, hkv=2, top_k=12, causal=causal, layout=layout,
                                           dtype=torch.float32)))
        # varlen: an empty sequence, one shorter than a chunk, one with fewer chunks than ranks, a long one
        cu = torch.tensor([0, 37, 37, 42, 63, 163], dtype=torch.int32)
        out.append((f"varlen-{tag}", dict(tokens=163, hq=4, hkv=2, top_k=3, causal=causal, layout=layout,
                                          dtype=torch.float32, cu=cu)))
        # so short that some ranks hold no token at all
        out.append((f"tiny-{tag}", dict(tokens=11, hq=2, hkv=1, top_k=2, causal=causal, layout=layout,
                                        dtype=torch.float32)))
    return out


def run_all(rank, world):
    failures = {}
    for name, kwargs in cases(world):
        try:
            _run_case(rank, world, **kwargs)
        except AssertionError:
            failures[name] = traceback.format_exc(limit=2)[-600:]
    return failures


def run_bad_inputs(rank, world):
    """Each bad call must raise ValueError/TypeError on every rank; the group must stay usable after."""
    q, k, v, _ = _full_inputs(0, 40, 4, 2, 16, torch.float32, True)
    q, k, v = (shard(x, CHUNK, world, rank) for x in (q, k, v))
    outcomes = {}
    bad = {
        "top_k 0 on rank 1": lambda: context_parallel_routed_attention(q, k, v, CHUNK, 0 if rank == 1 else 2),
        "chunk sizes disagree": lambda: context_parallel_routed_attention(q, k, v, CHUNK + rank, 2),
        "fp64 k on the last rank": lambda: context_parallel_routed_attention(
            q, k.double() if rank == world - 1 else k, v, CHUNK, 2),
        "shard one token short on rank 0": lambda: context_parallel_routed_attention(
            *((x[:, 1:] if rank == 0 else x) for x in (q, k, v)), CHUNK, 2),
    }
    for name, call in bad.items():
        try:
            call()
            outcomes[name] = "did not raise"
        except (ValueError, TypeError) as e:
            outcomes[name] = "raised" if "rank" in str(e) or "disagree" in str(e) else f"message: {e}"
    o = context_parallel_routed_attention(q, k, v, CHUNK, 2)  # the group still works
    outcomes["valid call after"] = "ok" if o.shape == q.shape else "bad shape"
    dist.barrier()
    return outcomes
