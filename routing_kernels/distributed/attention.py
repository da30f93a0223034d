"""context_parallel_routed_attention: routed attention over sequences whose tokens are split over ranks.

After the gate and the exchange plan (exchange_plan.py), every rank receives the K/V chunks its queries
selected from other ranks and builds, per sequence, a VIRTUAL key sequence: the received chunks in chunk
order, then its own tokens (then, non-causal only, a received partial last chunk). Its queries are the last
tokens of that sequence, so the existing query-shorter-than-keys layout of ``routed_attention``
(``cu_seqlens_q`` / ``cu_seqlens_k``, bottom-right aligned) with ``block_indices`` remapped to virtual chunk
slots computes exactly the single-process result:
- causal: a received chunk is entirely before the query's chunk (that is what made it eligible) and stays
  before it; local chunks keep their order; positions inside the own chunk keep their offsets, so the causal
  mask inside it is the same. A partial chunk (only a sequence's last) is never a remote causal pick.
- non-causal: positions play no part; the partial chunk goes last so that every other chunk stays aligned.
Gradients flow through the virtual gather (each row once) and the exchange's reverse all-to-all.
"""
from __future__ import annotations

import struct
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_cu_seqlens_shape, check_int, check_tensor
from ..functional import routed_attention
from .comm import ExchangeRows, agree
from .exchange_plan import ExchangePlan, _rows, plan_exchange
from .sharding import LAYOUTS, ShardPlan, make_plan

_FIELDS = ["chunk_size", "top_k", "causal", "layout", "Hq", "Hkv", "D", "Dv", "dtype", "dense (1) / varlen (0)",
           "batch or number of sequences", "cu_seqlens (checksum)", "cu_seqlens (weighted checksum)", "scale",
           "which of q, k, v require grad", "~local tokens"]


def _check_local(q, k, v, chunk_size, top_k, cu_seqlens, layout) -> None:
    varlen = cu_seqlens is not None
    check_int("chunk_size", chunk_size, 1)
    check_int("top_k", top_k, 1)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_tensor("q", q, varlen=varlen)
    check_tensor("k", k, varlen=varlen, like=q)
    check_tensor("v", v, varlen=varlen, like=q)
    if k.shape[:-1] != v.shape[:-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must hold the same "
                         "tokens, and k and v the same heads")
    if k.shape[-1] != q.shape[-1] or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"k must have q's head dim and a number of heads dividing q's; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if varlen:
        check_cu_seqlens_shape(cu_seqlens, 0, q)  # max_seqlen: not an argument here (derived per rank)
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        if cu[0] != 0 or (cu.diff() < 0).any():
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()[:8]}..")


def _describe(q, k, v, chunk_size, top_k, causal, cu_seqlens, layout, scale) -> tuple[list[int], Optional[str]]:
    try:
        _check_local(q, k, v, chunk_size, top_k, cu_seqlens, layout)
    except (TypeError, ValueError) as e:
        return [0] * len(_FIELDS), f"{type(e).__name__}: {e}"
    dense = cu_seqlens is None
    cu = None if dense else cu_seqlens.detach().to("cpu", torch.int64)
    sums = [0, 0] if dense else [int(cu.sum()), int((cu * torch.arange(1, cu.numel() + 1)).sum())]
    grads = int(q.requires_grad) + 2 * int(k.requires_grad) + 4 * int(v.requires_grad)
    scale_bits = 0 if scale is None else struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    return [chunk_size, top_k, int(causal), LAYOUTS.index(layout), q.shape[-2], k.shape[-2], q.shape[-1],
            v.shape[-1], FLOAT_DTYPES.index(q.dtype), int(dense), q.shape[0] if dense else cu.numel() - 1, *sums,
            scale_bits, grads, q.shape[1] * q.shape[0] if dense else q.shape[0]], None


def _check_shards(plan: ShardPlan, local_tokens: list[int], batch: int) -> None:
    """Every rank checks every rank's token count against the plan: all raise together."""
    for r, n in enumerate(local_tokens):
        want = sum(plan.local_lengths(r)) if batch < 0 else plan.local_lengths(r)[0] * batch
        if n != want:
            raise ValueError(f"context_parallel_routed_attention: rank {r} holds {n} tokens but its {plan.layout} "
                             f"shard of these sequences has {want} (build shards with routing_kernels.distributed."
                             "shard)")


def context_parallel_routed_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, *,
                                      causal: bool = True, cu_seqlens: Optional[Tensor] = None,
                                      layout: str = "contiguous", scale: Optional[float] = None,
                                      return_lse: bool = False, group=None, backend: Optional[str] = None):
    """Routed attention (MoBA semantics, as :func:`routing_kernels.routed_attention`) of sequences sharded over
    the ranks of ``group``: every rank passes its shard and gets the output rows of its own queries, equal to
    the single-process op on the full sequences (the same chunk selection, exactly). Every rank of the group
    must call it, with the same arguments besides its own tensors, and (training) run backward through it.

    Args:
        q: this rank's shard, dense (B, N_r, Hq, D) or packed (T_r, Hq, D) with ``cu_seqlens``; k (.., Hkv, D),
            v (.., Hkv, Dv); fp16 / bf16 / fp32 (fp64 on CPU); Hq a multiple of Hkv. Build shards with
            :func:`routing_kernels.distributed.shard` (the rank's chunks of every sequence, local order).
        chunk_size, top_k, causal, scale: as in :func:`routing_kernels.routed_attention`.
        cu_seqlens: int32 (S+1,) offsets of the FULL sequences (the same on every rank); the local offsets
            follow from it (``make_plan(...).local_cu_seqlens(rank)``). None for a dense batch, whose full
            length is the sum of the ranks' N_r.
        layout: "contiguous" or "zigzag" (see ``sharding.py``); the shards must have been made with it.
        return_lse: also return lse (.., Hq) fp32.
        group: the process group (default: the world). gloo for CPU tensors, NCCL for CUDA ones.
        backend: passed to routed_attention (its query-shorter-than-keys layout with block_indices).
    Returns:
        o like q's shard with Dv, and lse when asked.
    Raises:
        ValueError / TypeError on EVERY rank when any rank's input is malformed, the ranks disagree on an
        argument, or a shard does not match the layout (one small all-gather of the arguments first).
    Communication per call (bytes sent by one rank, see README.md): (W-1) * its chunk sums; the chunk ids it
    requests; the K/V rows others selected from it (backward: the same volume of dK/dV back).
    Example (on each of 4 ranks):
        >>> q, k, v = (shard(x, 512, 4, rank) for x in (q_full, k_full, v_full))      # (1, N/4, H, D)
        >>> o = context_parallel_routed_attention(q, k, v, 512, 8)
        >>> cu = torch.tensor([0, 5000, 5000, 9000], dtype=torch.int32)               # varlen, one empty
        >>> qs = shard(q_packed, 512, 4, rank, cu_seqlens=cu)
        >>> o = context_parallel_routed_attention(qs, ks, vs, 512, 8, cu_seqlens=cu)
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    descriptor, error = _describe(q, k, v, chunk_size, top_k, causal, cu_seqlens, layout, scale)
    table = agree(descriptor, error, _FIELDS, group)
    dense = cu_seqlens is None
    local_tokens = table[:, -1].tolist()
    if dense:
        batch = q.shape[0]
        plan = make_plan(chunk_size, world, seqlen=sum(local_tokens) // max(batch, 1), batch=batch, layout=layout)
    else:
        batch = -1
        plan = make_plan(chunk_size, world, cu_seqlens=cu_seqlens, layout=layout)
    _check_shards(plan, local_tokens, batch)

    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    qp, kp, vp = (fold_kv_heads(x.reshape(-1, *x.shape[-2:]), hkv) for x in (q, k, v))
    plan, ex = plan_folded(qp, kp, plan, rank, top_k, causal, hkv, group)
    kv = torch.cat([kp, vp], dim=-1)
    received = ExchangeRows.apply(kv, ex.send_rows.to(q.device), ex.send_splits, ex.recv_splits, group)
    rows, cu_k, slots = _virtual_keys(plan, rank, ex, causal, kp.shape[0])
    kv_virtual = torch.cat([kv, received])[rows.to(q.device)]
    block_indices = slots.to(q.device)[torch.where(ex.selection >= 0, ex.selection, slots.numel() - 1)]
    cu_q = plan.local_cu_seqlens(rank, q.device)
    o, lse = routed_attention(qp, kv_virtual[..., :d], kv_virtual[..., d:], chunk_size, top_k, causal=causal,
                              cu_seqlens_q=cu_q, max_seqlen_q=max(plan.local_lengths(rank), default=0),
                              cu_seqlens_k=cu_k.to(q.device, torch.int32),
                              max_seqlen_k=int(cu_k.diff().max()) if cu_k.numel() > 1 else 0,
                              block_indices=block_indices.to(torch.int32), scale=scale, return_lse=True,
                              backend=backend)
    o, lse = unfold_kv_heads(o, hkv), unfold_kv_heads(lse, hkv)
    if dense:
        o, lse = o.reshape(*q.shape[:2], hq, v.shape[-1]), lse.reshape(*q.shape[:2], hq)
    return (o, lse) if return_lse else o


def fold_kv_heads(x: Tensor, hkv: int) -> Tensor:
    """(T, H, ..) -> (Hkv * T, H // Hkv, ..): kv head h's rows (k/v) or query group (q) become sequences of
    their own, after all of kv head h - 1's. The exchange then moves (chunk, kv head) pairs that some query head
    of that kv head's group selected, not whole chunks with every kv head."""
    t, h = x.shape[:2]
    return x.reshape(t, hkv, h // hkv, *x.shape[2:]).transpose(0, 1).reshape(hkv * t, h // hkv, *x.shape[2:])


def unfold_kv_heads(x: Tensor, hkv: int) -> Tensor:
    """Inverse of :func:`fold_kv_heads`."""
    g = x.shape[1]
    return x.reshape(hkv, -1, g, *x.shape[2:]).transpose(0, 1).reshape(-1, hkv * g, *x.shape[2:])


def plan_folded(q: Tensor, k: Tensor, plan: ShardPlan, rank: int, top_k: int, causal: bool, hkv: int, group=None):
    """plan_exchange on kv-head-folded q (Hkv * T, G, D) and k (Hkv * T, 1, D): returns the folded plan (each
    sequence repeated Hkv times, kv head major) and the ExchangePlan. The gate is the same function: query
    head (h, g) is scored against kv head h's chunk means either way."""
    folded = ShardPlan(plan.lengths * hkv, plan.chunk_size, plan.world_size, plan.layout)
    return folded, plan_exchange(q, k, folded, rank, top_k, causal, group)


def _virtual_keys(plan: ShardPlan, rank: int, ex: ExchangePlan, causal: bool, num_local: int):
    """Rows of cat([local kv, received kv]) forming each sequence's virtual key sequence, its int64 offsets
    (S+1,), and the virtual slot of every global chunk id (-1 where absent; last entry -1 for padding)."""
    recv_start = torch.zeros(plan.total_chunks, dtype=torch.int64)
    lens = ex.chunk_len[ex.requested]
    recv_start[ex.requested] = num_local + lens.cumsum(0) - lens
    received = set(ex.requested.tolist())
    slots = torch.full((plan.total_chunks + 1,), -1, dtype=torch.int64)
    starts, lengths, cu = [], [], [0]
    for s in range(len(plan.lengths)):
        base, m = plan.chunk_base[s], plan.num_chunks[s]
        remote = [g for g in range(base, base + m) if g in received]
        tail = []
        if remote and remote[-1] == base + m - 1 and int(ex.chunk_len[remote[-1]]) < plan.chunk_size:
            assert not causal, "a causal query never selects another rank's partial last chunk"
            tail = [remote.pop()]
        local = [plan.chunk_base[s] + j for a, b in plan.pieces[rank][s] for j in range(a, b)]
        order = remote + local + tail
        for slot, g in enumerate(order):
            slots[g] = slot
            starts.append(int(recv_start[g]) if g in received else int(ex.chunk_start[g]))
            lengths.append(int(ex.chunk_len[g]))
        cu.append(cu[-1] + sum(lengths[len(lengths) - len(order):]))
    starts_t, lengths_t = torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)
    return _rows(starts_t, lengths_t), torch.tensor(cu, dtype=torch.int64), slots
