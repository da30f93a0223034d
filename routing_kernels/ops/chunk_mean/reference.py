"""Eager reference of chunk_mean: the ground truth for every kernel.

Two ways to cut a batch into chunks: an integer ``chunk_size`` (every sequence in chunks of that size, the last
one shorter), or an explicit chunk table (``cu_chunks`` boundaries on packed tokens, see ``_layout.ChunkTable``).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..._layout import ChunkTable, Chunking, Packed, accum_dtype, chunk_means, chunk_slots, pack, pack_table


def _mean(p: Packed, chunking: Chunking, x: Tensor) -> Tensor:
    means, _, _ = chunk_means(p, chunking, accum_dtype(x.dtype))
    return means.to(x.dtype)


def _mean_backward(grad_mean: Tensor, p: Packed, chunking: Chunking, x: Tensor) -> Tensor:
    """dx_t = dmean_{chunk(t)} / |chunk(t)|: every token of a chunk gets an equal share."""
    slots, m = chunk_slots(p, chunking)
    counts = slots.bincount(minlength=p.num_seqs * m)
    acc = accum_dtype(x.dtype)
    g = grad_mean.to(acc).reshape(p.num_seqs * m, *x.shape[-2:])
    dx = g[slots] / counts[slots].to(acc)[:, None, None]
    return dx.to(x.dtype).reshape(x.shape)


def chunk_mean_ref(x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None,
                   max_seqlen: Optional[int] = None) -> Tensor:
    """Mean of x over each chunk: (B, N, H, D) -> (B, M, H, D), or (T, H, D) -> (S, M_max, H, D)."""
    return _mean(pack(x, cu_seqlens, max_seqlen), chunk_size, x)


def chunk_mean_backward_ref(grad_mean: Tensor, x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None,
                            max_seqlen: Optional[int] = None) -> Tensor:
    return _mean_backward(grad_mean, pack(x, cu_seqlens, max_seqlen), chunk_size, x)


def chunk_mean_table_ref(x: Tensor, cu_chunks: Tensor, seq_chunks: Tensor, max_chunks: int) -> Tensor:
    """Packed x (T, H, D) cut by a chunk table -> (S, max_chunks, H, D), zeros past a sequence's chunks."""
    table = ChunkTable(cu_chunks, seq_chunks, max_chunks)
    return _mean(pack_table(x, table), table, x)


def chunk_mean_table_backward_ref(grad_mean: Tensor, x: Tensor, cu_chunks: Tensor, seq_chunks: Tensor,
                                  max_chunks: int) -> Tensor:
    table = ChunkTable(cu_chunks, seq_chunks, max_chunks)
    return _mean_backward(grad_mean, pack_table(x, table), table, x)
