"""Eager reference of route_chunks (MoBA's gate): which chunks each query token attends to.

For token t (position within its sequence) and query head h (kv head h // (Hq // Hkv)):
    g_i = <q_t, mean of k over chunk i>            (fp32, fp64 for fp64 inputs; unscaled)
The own chunk t // chunk_size is always selected. Eligible others: chunks that end before t,
(i+1) * chunk_size <= t, when causal; every other chunk of the sequence when not. The top_k - 1
eligible chunks with the largest gate are added (ties: lower index first). Indices are sorted
ascending and padded with -1 at the end.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._layout import accum_dtype, ceil_div, chunk_means, pack, unpack_tokens


def _select_sequence(q: Tensor, k_means: Tensor, chunk_size: int, top_k: int, causal: bool) -> Tensor:
    """One sequence: q (L, Hq, D), k_means (n, Hkv, D) -> (L, Hq, top_k) int64, -1 padded."""
    length, hq, _ = q.shape
    n = k_means.shape[0]
    group = hq // k_means.shape[1]
    gate = torch.einsum("thd,mhd->thm", q, k_means.repeat_interleave(group, dim=1))  # (L, Hq, n)
    own = torch.arange(length, device=q.device) // chunk_size
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


def route_chunks_ref(q: Tensor, k: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
    """int32 chunk indices (B, N, Hq, top_k), or (T, Hq, top_k) for varlen input."""
    acc = accum_dtype(q.dtype)
    pq = pack(q.detach(), cu_seqlens, max_seqlen)
    pk = pack(k.detach(), cu_seqlens, max_seqlen)
    k_means, _, _ = chunk_means(pk, chunk_size, acc)  # (S, M, Hkv, D)
    out = torch.full((pq.data.shape[0], q.shape[-2], top_k), -1, dtype=torch.int64, device=q.device)
    bounds = pq.cu_seqlens.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            n = ceil_div(end - start, chunk_size)
            out[start:end] = _select_sequence(pq.data[start:end].to(acc), k_means[s, :n], chunk_size, top_k, causal)
    return unpack_tokens(out.to(torch.int32), pq)
