"""Eager reference of routed_attention (MoBA semantics), forward and analytic backward.

Query token t of head h attends, with exact softmax, to the keys of the chunks route_chunks selected for
(t, h), restricted to keys at positions <= t when causal. The own chunk is always selected and holds key t
itself (causal) or a whole chunk (non-causal), so no row is empty. With top_k >= M this is dense attention.
Per sequence the reference builds the (Hq, L, L) mask: it is O(L^2) memory, fine for a ground truth.

Inference layouts (q shorter than k, see route_chunks/reference.py): query i of a sequence with Lq queries
and Lk keys sits at position t = Lk - Lq + i and everything above holds with that t. ``block_indices``
replaces the gate by the caller's selection ((.., Hq, top_k) int32 in q's layout, -1 = none, any order,
repeats count once); a row that selects no visible key gets o = 0 and lse = -inf.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._layout import accum_dtype, ceil_div, pack, unpack_tokens
from ..route_chunks.reference import pack_qk, route_chunks_ref, spans


def _allowed(sel: Tensor, q_len: int, k_len: int, chunk_size: int, causal: bool) -> Tensor:
    """sel (Lq, Hq, top_k) chunk indices (-1 padding) -> (Hq, Lq, Lk) bool: may query i see key j."""
    n = ceil_div(k_len, chunk_size)
    picked = torch.zeros(*sel.shape[:2], n + 1, dtype=torch.bool, device=sel.device)
    picked.scatter_(-1, sel.long().masked_fill(sel < 0, n), True)  # padding lands in the extra column
    key_chunk = torch.arange(k_len, device=sel.device) // chunk_size
    allowed = picked[:, :, key_chunk].permute(1, 0, 2)  # (Hq, L_query, L_key)
    if causal:
        position = k_len - q_len + torch.arange(q_len, device=sel.device)  # bottom-right aligned queries
        allowed = allowed & (torch.arange(k_len, device=sel.device)[None, :] <= position[:, None])
    return allowed


def _probs(q: Tensor, k: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax over the allowed keys; a row with none gets p = 0 and lse = -inf (not NaN)."""
    scores = scale * torch.einsum("thd,jhd->htj", q, k)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hq, L)
    p = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0)[..., None])
    return p, lse


def _sequences(pq, pk):
    return [span for span in spans(pq, pk) if span[1] > span[0]]


def _selection(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, keys, block_indices):
    if block_indices is not None:
        return block_indices
    return route_chunks_ref(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, **keys)


def _unpack_keys(g: Tensor, pk, like: Tensor, seqused_k: Optional[Tensor]) -> Tensor:
    """A packed key gradient back in k's layout (zeros past each cache row's valid keys)."""
    if seqused_k is None:
        return unpack_tokens(g, pk)
    out = g.new_zeros(like.shape)
    for b, (start, end) in enumerate(zip(pk.cu_seqlens[:-1].tolist(), pk.cu_seqlens[1:].tolist())):
        out[b, :end - start] = g[start:end]
    return out


def routed_attention_ref(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                         cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                         scale: Optional[float] = None, *, cu_seqlens_k: Optional[Tensor] = None,
                         max_seqlen_k: Optional[int] = None, seqused_k: Optional[Tensor] = None,
                         block_indices: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Returns o (.., Hq, Dv) in q.dtype and lse (.., Hq) in fp32 (fp64 for fp64 inputs)."""
    acc = accum_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k, seqused_k=seqused_k)
    sel = _selection(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, keys, block_indices)
    pq, pk = pack_qk(q, k, cu_seqlens, max_seqlen, **keys)
    pv = pack_qk(q, v, cu_seqlens, max_seqlen, **keys)[1]
    sel = pack(sel, cu_seqlens, max_seqlen).data
    group = q.shape[-2] // k.shape[-2]
    o = pq.data.new_zeros(*pq.data.shape[:-1], v.shape[-1], dtype=acc)
    lse = pq.data.new_zeros(pq.data.shape[:-1], dtype=acc)
    for qs, qe, ks, ke in _sequences(pq, pk):
        kk = pk.data[ks:ke].to(acc).repeat_interleave(group, dim=1)
        vv = pv.data[ks:ke].to(acc).repeat_interleave(group, dim=1)
        allowed = _allowed(sel[qs:qe], qe - qs, ke - ks, chunk_size, causal)
        p, lse_s = _probs(pq.data[qs:qe].to(acc), kk, allowed, scale)
        o[qs:qe] = torch.einsum("htj,jhd->thd", p, vv)
        lse[qs:qe] = lse_s.transpose(0, 1)
    return unpack_tokens(o.to(q.dtype), pq), unpack_tokens(lse, pq)


def routed_attention_backward_ref(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                                  chunk_size: int, top_k: int, causal: bool = True,
                                  cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                                  scale: Optional[float] = None, *, cu_seqlens_k: Optional[Tensor] = None,
                                  max_seqlen_k: Optional[int] = None, seqused_k: Optional[Tensor] = None,
                                  block_indices: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Flash-attention backward restricted to the routed mask (see README.md):
        dP = dO V^T,  dS = P * (dP - delta),  delta_t = <dO_t, O_t> - dlse_t
        dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO   (dK, dV summed over a kv group's q heads)
    """
    acc = accum_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = dict(cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k, seqused_k=seqused_k)
    sel = _selection(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, keys, block_indices)
    pq, pdo, po, pdl, psel = (pack(t, cu_seqlens, max_seqlen) for t in (q, do, o, dlse, sel))
    pk = pack_qk(q, k, cu_seqlens, max_seqlen, **keys)[1]
    pv = pack_qk(q, v, cu_seqlens, max_seqlen, **keys)[1]
    hq, hkv = q.shape[-2], k.shape[-2]
    group = hq // hkv
    dq = torch.zeros_like(pq.data, dtype=acc)
    dk = torch.zeros_like(pk.data, dtype=acc)
    dv = torch.zeros_like(pv.data, dtype=acc)
    for qs, qe, ks, ke in _sequences(pq, pk):
        qq = pq.data[qs:qe].to(acc)
        kk = pk.data[ks:ke].to(acc).repeat_interleave(group, dim=1)
        vv = pv.data[ks:ke].to(acc).repeat_interleave(group, dim=1)
        dd = pdo.data[qs:qe].to(acc)
        p, _ = _probs(qq, kk, _allowed(psel.data[qs:qe], qe - qs, ke - ks, chunk_size, causal), scale)
        delta = (dd * po.data[qs:qe].to(acc)).sum(-1) - pdl.data[qs:qe].to(acc)  # (L, Hq)
        dp = torch.einsum("thd,jhd->htj", dd, vv)
        ds = p * (dp - delta.transpose(0, 1)[..., None])
        dq[qs:qe] = scale * torch.einsum("htj,jhd->thd", ds, kk)
        dk_h = scale * torch.einsum("htj,thd->jhd", ds, qq)
        dv_h = torch.einsum("htj,thd->jhd", p, dd)
        dk[ks:ke] = dk_h.unflatten(1, (hkv, group)).sum(2)
        dv[ks:ke] = dv_h.unflatten(1, (hkv, group)).sum(2)
    return (unpack_tokens(dq.to(q.dtype), pq), _unpack_keys(dk.to(q.dtype), pk, k, seqused_k),
            _unpack_keys(dv.to(q.dtype), pv, v, seqused_k))
