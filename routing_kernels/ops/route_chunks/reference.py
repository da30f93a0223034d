"""Eager reference of route_chunks (MoBA's gate): which chunks each query token attends to.

For token t (position within its sequence) and query head h (kv head h // (Hq // Hkv)):
    g_i = <q_t, mean of k over chunk i>            (fp32, fp64 for fp64 inputs; unscaled)
The own chunk t // chunk_size is always selected. Eligible others: chunks that end before t,
(i+1) * chunk_size <= t, when causal; every other chunk of the sequence when not. The top_k - 1
eligible chunks with the largest gate are added (ties: lower index first). Indices are sorted
ascending and padded with -1 at the end.

Queries and keys may have different lengths (inference: chunked prefill, decode against a cache). The Lq
queries of a sequence with Lk keys are its LAST Lq positions (bottom-right aligned, as flash-attn >= 2.1):
query i sits at position t = Lk - Lq + i, and everything above holds with that t; chunks and their means
are those of the keys. Lq == Lk is the training case.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._layout import accum_dtype, ceil_div, chunk_means, pack, unpack_tokens


def _select_sequence(q: Tensor, k_means: Tensor, chunk_size: int, top_k: int, causal: bool,
                     offset: int = 0) -> Tensor:
    """One sequence: q (L, Hq, D) at positions offset.., k_means (n, Hkv, D) -> (L, Hq, top_k) int64, -1 padded."""
    length, hq, _ = q.shape
    n = k_means.shape[0]
    group = hq // k_means.shape[1]
    gate = torch.einsum("thd,mhd->thm", q, k_means.repeat_interleave(group, dim=1))  # (L, Hq, n)
    own = (offset + torch.arange(length, device=q.device)) // chunk_size
    chunk = torch.arange(n, device=q.device)
    eligible = (chunk[None, :] < own[:, None]) if causal else (chunk[None, :] != own[:, None])
    eligible = eligible[:, None, :].expand(length, hq, n)
    # A stable descending sort keeps equal gates in index order: ties go to the lower index.
    order = gate.masked_fill(~eligible, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    others = order[..., : min(top_k - 1, n)]
    others = torch.where(eligible.gather(-1, others), others, n)  # n marks padding, sorts last
    picked = torch.cat([own[:, None, None].expand(length, hq, 1), others], dim=-1).sort(dim=-1).values
    picked = picked.masked_fill(picked == n, -1)
    pad = top_k - picked.shape[-1]
    return torch.nn.functional.pad(picked, (0, pad), value=-1) if pad > 0 else picked


def pack_qk(q: Tensor, k: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int],
            cu_seqlens_k: Optional[Tensor], max_seqlen_k: Optional[int], seqused_k: Optional[Tensor] = None):
    """Packed q and k, each with its own offsets: k shares q's unless cu_seqlens_k is given. With seqused_k, k
    is a dense (B, capacity, ..) cache of which row b holds seqused_k[b] valid keys: those are gathered."""
    if seqused_k is not None:
        used = seqused_k.tolist()
        k = torch.cat([k[b, :n] for b, n in enumerate(used)]) if used else k.reshape(0, *k.shape[2:])
        cu_seqlens_k = torch.tensor([0] + used, device=k.device).cumsum(0)
        max_seqlen_k = max(used, default=0)
    elif cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, (max_seqlen if max_seqlen_k is None else max_seqlen_k)
    elif max_seqlen_k is None:
        max_seqlen_k = int(cu_seqlens_k.diff().max()) if cu_seqlens_k.numel() > 1 else 0
    return pack(q, cu_seqlens, max_seqlen), pack(k, cu_seqlens_k, max_seqlen_k)


def spans(pq, pk):
    """Per sequence: (q start, q end, k start, k end); queries are the last q end - q start key positions."""
    qb, kb = pq.cu_seqlens.tolist(), pk.cu_seqlens.tolist()
    return list(zip(qb[:-1], qb[1:], kb[:-1], kb[1:]))


def route_chunks_ref(q: Tensor, k: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None, *,
                     cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
                     seqused_k: Optional[Tensor] = None) -> Tensor:
    """int32 chunk indices (B, Nq, Hq, top_k), or (Tq, Hq, top_k) for varlen input.

    k may be longer than q: dense (B, Nk, Hkv, D) (of which seqused_k[b] keys are valid, when given), or
    packed with its own cu_seqlens_k / max_seqlen_k."""
    acc = accum_dtype(q.dtype)
    pq, pk = pack_qk(q.detach(), k.detach(), cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k)
    k_means, _, _ = chunk_means(pk, chunk_size, acc)  # (S, M, Hkv, D)
    out = torch.full((pq.data.shape[0], q.shape[-2], top_k), -1, dtype=torch.int64, device=q.device)
    for s, (qs, qe, ks, ke) in enumerate(spans(pq, pk)):
        if qe > qs:
            n = ceil_div(ke - ks, chunk_size)
            out[qs:qe] = _select_sequence(pq.data[qs:qe].to(acc), k_means[s, :n], chunk_size, top_k, causal,
                                          offset=(ke - ks) - (qe - qs))
    return unpack_tokens(out.to(torch.int32), pq)
