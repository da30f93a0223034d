"""Eager reference of routed_attention (MoBA semantics), forward and analytic backward.

Query token t of head h attends, with exact softmax, to the keys of the chunks route_chunks selected for
(t, h), restricted to keys at positions <= t when causal. The own chunk is always selected and holds key t
itself (causal) or a whole chunk (non-causal), so no row is empty. With top_k >= M this is dense attention.
Per sequence the reference builds the (Hq, L, L) mask: it is O(L^2) memory, fine for a ground truth.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._layout import accum_dtype, ceil_div, pack, unpack_tokens
from ..route_chunks.reference import route_chunks_ref


def _allowed(sel: Tensor, length: int, chunk_size: int, causal: bool) -> Tensor:
    """sel (L, Hq, top_k) chunk indices (-1 padding) -> (Hq, L, L) bool: may query t see key j."""
    n = ceil_div(length, chunk_size)
    picked = torch.zeros(*sel.shape[:2], n + 1, dtype=torch.bool, device=sel.device)
    picked.scatter_(-1, sel.long().masked_fill(sel < 0, n), True)  # padding lands in the extra column
    key_chunk = torch.arange(length, device=sel.device) // chunk_size
    allowed = picked[:, :, key_chunk].permute(1, 0, 2)  # (Hq, L_query, L_key)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=sel.device).tril()
    return allowed


def _probs(q: Tensor, k: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    scores = scale * torch.einsum("thd,jhd->htj", q, k)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hq, L)
    return torch.exp(scores - lse[..., None]), lse


def _sequences(cu_seqlens: Tensor):
    bounds = cu_seqlens.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def routed_attention_ref(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                         cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                         scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Returns o (.., Hq, Dv) in q.dtype and lse (.., Hq) in fp32 (fp64 for fp64 inputs)."""
    acc = accum_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sel = route_chunks_ref(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)
    pq, pk, pv = (pack(t, cu_seqlens, max_seqlen) for t in (q, k, v))
    sel = pack(sel, cu_seqlens, max_seqlen).data
    group = q.shape[-2] // k.shape[-2]
    o = pq.data.new_zeros(*pq.data.shape[:-1], v.shape[-1], dtype=acc)
    lse = pq.data.new_zeros(pq.data.shape[:-1], dtype=acc)
    for start, end in _sequences(pq.cu_seqlens):
        kk = pk.data[start:end].to(acc).repeat_interleave(group, dim=1)
        vv = pv.data[start:end].to(acc).repeat_interleave(group, dim=1)
        allowed = _allowed(sel[start:end], end - start, chunk_size, causal)
        p, lse_s = _probs(pq.data[start:end].to(acc), kk, allowed, scale)
        o[start:end] = torch.einsum("htj,jhd->thd", p, vv)
        lse[start:end] = lse_s.transpose(0, 1)
    return unpack_tokens(o.to(q.dtype), pq), unpack_tokens(lse, pq)


def routed_attention_backward_ref(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                                  chunk_size: int, top_k: int, causal: bool = True,
                                  cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                                  scale: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Flash-attention backward restricted to the routed mask (see README.md):
        dP = dO V^T,  dS = P * (dP - delta),  delta_t = <dO_t, O_t> - dlse_t
        dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO   (dK, dV summed over a kv group's q heads)
    """
    acc = accum_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sel = route_chunks_ref(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)
    pq, pk, pv, pdo, po, pdl, psel = (pack(t, cu_seqlens, max_seqlen) for t in (q, k, v, do, o, dlse, sel))
    hq, hkv = q.shape[-2], k.shape[-2]
    group = hq // hkv
    dq = torch.zeros_like(pq.data, dtype=acc)
    dk = torch.zeros_like(pk.data, dtype=acc)
    dv = torch.zeros_like(pv.data, dtype=acc)
    for start, end in _sequences(pq.cu_seqlens):
        qq = pq.data[start:end].to(acc)
        kk = pk.data[start:end].to(acc).repeat_interleave(group, dim=1)
        vv = pv.data[start:end].to(acc).repeat_interleave(group, dim=1)
        dd = pdo.data[start:end].to(acc)
        p, _ = _probs(qq, kk, _allowed(psel.data[start:end], end - start, chunk_size, causal), scale)
        delta = (dd * po.data[start:end].to(acc)).sum(-1) - pdl.data[start:end].to(acc)  # (L, Hq)
        dp = torch.einsum("thd,jhd->htj", dd, vv)
        ds = p * (dp - delta.transpose(0, 1)[..., None])
        dq[start:end] = scale * torch.einsum("htj,jhd->thd", ds, kk)
        dk_h = scale * torch.einsum("htj,thd->jhd", ds, qq)
        dv_h = torch.einsum("htj,thd->jhd", p, dd)
        dk[start:end] = dk_h.unflatten(1, (hkv, group)).sum(2)
        dv[start:end] = dv_h.unflatten(1, (hkv, group)).sum(2)
    return tuple(unpack_tokens(g.to(q.dtype), pq) for g in (dq, dk, dv))
