"""Eager reference of chunk_mean: the ground truth for every kernel."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..._layout import accum_dtype, chunk_means, chunk_slots, pack


def chunk_mean_ref(x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None,
                   max_seqlen: Optional[int] = None) -> Tensor:
    """Mean of x over each chunk: (B, N, H, D) -> (B, M, H, D), or (T, H, D) -> (S, M_max, H, D)."""
    p = pack(x, cu_seqlens, max_seqlen)
    means, _, _ = chunk_means(p, chunk_size, accum_dtype(x.dtype))
    return means.to(x.dtype)


def chunk_mean_backward_ref(grad_mean: Tensor, x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None,
                            max_seqlen: Optional[int] = None) -> Tensor:
    """dx_t = dmean_{chunk(t)} / |chunk(t)|: every token of a chunk gets an equal share."""
    p = pack(x, cu_seqlens, max_seqlen)
    slots, m = chunk_slots(p, chunk_size)
    counts = slots.bincount(minlength=p.num_seqs * m)
    acc = accum_dtype(x.dtype)
    g = grad_mean.to(acc).reshape(p.num_seqs * m, *x.shape[-2:])
    dx = g[slots] / counts[slots].to(acc)[:, None, None]
    return dx.to(x.dtype).reshape(x.shape)
