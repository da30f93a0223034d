"""Eager reference of chunk_route (forward and the analytic backward): the ground truth for every kernel.

Per sequence s and head h, with chunk means ``mean_i``:
    s_i = scale * <query, mean_i>,  w = softmax_i(s),  y_t = w_{chunk(t)} x_t,  summary = sum_i w_i mean_i
Chunks a sequence lacks (varlen padding) get weight 0; an empty sequence gets zero weights and summary.
Chunks come from an integer ``chunk_size`` or from an explicit chunk table (``_layout.ChunkTable``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._layout import (ChunkTable, Chunking, Packed, accum_dtype, chunk_means, pack, pack_table, unpack_tokens,
                        valid_chunks)


def _per_seq_query(query: Tensor, p: Packed, dtype: torch.dtype) -> Tensor:
    q = query.to(dtype)
    return q.expand(p.num_seqs, *q.shape) if q.dim() == 2 else q  # (S, H, D)


def _weights(means: Tensor, q: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Softmax over each sequence's chunks: (S, H, M); 0 for missing chunks and empty sequences."""
    scores = scale * torch.einsum("smhd,shd->shm", means, q)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    w = torch.softmax(scores, dim=-1)
    return torch.where(valid[:, None, :], w, torch.zeros((), dtype=w.dtype, device=w.device))


def _route(x: Tensor, query: Tensor, p: Packed, chunking: Chunking, scale: Optional[float]):
    acc = accum_dtype(x.dtype)
    scale = x.shape[-1] ** -0.5 if scale is None else scale
    means, _, slots = chunk_means(p, chunking, acc)  # (S, M, H, D)
    m = means.shape[1]
    w = _weights(means, _per_seq_query(query, p, acc), valid_chunks(p, chunking, m), scale)
    w_tok = w.transpose(1, 2).reshape(-1, w.shape[1])[slots]  # (T, H): the weight of each token's chunk
    y = (w_tok[..., None] * p.data.to(acc)).to(x.dtype)
    summary = torch.einsum("shm,smhd->shd", w, means).to(x.dtype)
    return unpack_tokens(y, p), w, summary


def chunk_route_ref(x: Tensor, query: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None,
                    max_seqlen: Optional[int] = None, scale: Optional[float] = None):
    """Returns (y like x, weights (S|B, H, M) fp32/fp64, summary (S|B, H, D) in x.dtype)."""
    return _route(x, query, pack(x, cu_seqlens, max_seqlen), chunk_size, scale)


def chunk_route_table_ref(x: Tensor, query: Tensor, cu_chunks: Tensor, seq_chunks: Tensor, max_chunks: int,
                          scale: Optional[float] = None):
    """Packed x (T, H, D) cut by a chunk table: (y, weights (S, H, max_chunks), summary (S, H, D))."""
    table = ChunkTable(cu_chunks, seq_chunks, max_chunks)
    return _route(x, query, pack_table(x, table), table, scale)


def chunk_route_backward_ref(dy: Tensor, dweights: Tensor, dsummary: Tensor, x: Tensor, query: Tensor,
                             weights: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None,
                             max_seqlen: Optional[int] = None, scale: Optional[float] = None):
    """Analytic backward (see README.md):
        dw_i    = sum_{t in i} <dy_t, x_t> + <dsummary, mean_i> + dweights_i
        ds      = w * (dw - sum_j w_j dw_j)
        dmean_i = scale * ds_i * query + w_i * dsummary
        dx_t    = w_{chunk(t)} dy_t + dmean_{chunk(t)} / |chunk(t)|
        dquery  = scale * sum_i ds_i mean_i   (summed over sequences for a shared (H, D) query)
    Returns (dx like x, dquery like query).
    """
    return _route_backward(dy, dweights, dsummary, x, query, weights, pack(x, cu_seqlens, max_seqlen), chunk_size,
                           scale)


def chunk_route_table_backward_ref(dy: Tensor, dweights: Tensor, dsummary: Tensor, x: Tensor, query: Tensor,
                                   weights: Tensor, cu_chunks: Tensor, seq_chunks: Tensor, max_chunks: int,
                                   scale: Optional[float] = None):
    table = ChunkTable(cu_chunks, seq_chunks, max_chunks)
    return _route_backward(dy, dweights, dsummary, x, query, weights, pack_table(x, table), table, scale)


def _route_backward(dy, dweights, dsummary, x, query, weights, p: Packed, chunking: Chunking, scale):
    acc = accum_dtype(x.dtype)
    scale = x.shape[-1] ** -0.5 if scale is None else scale
    means, counts, slots = chunk_means(p, chunking, acc)
    s, m, h, d = means.shape
    w = weights.to(acc)
    xa = p.data.to(acc)
    dya = dy.reshape(xa.shape).to(acc)
    dsum = dsummary.to(acc)
    q = _per_seq_query(query, p, acc)

    dw_tok = (dya * xa).sum(-1)  # (T, H)
    dw = dw_tok.new_zeros(s * m, h).index_add(0, slots, dw_tok).view(s, m, h).transpose(1, 2)
    dw = dw + torch.einsum("shd,smhd->shm", dsum, means) + dweights.to(acc)
    ds = w * (dw - (w * dw).sum(-1, keepdim=True))
    dmean = scale * torch.einsum("shm,shd->smhd", ds, q) + torch.einsum("shm,shd->smhd", w, dsum)
    w_tok = w.transpose(1, 2).reshape(s * m, h)[slots]
    share = (dmean.reshape(s * m, h, d) / counts.reshape(-1, 1, 1).clamp(min=1).to(acc))[slots]
    dx = (w_tok[..., None] * dya + share).to(x.dtype).reshape(x.shape)
    dq = scale * torch.einsum("shm,smhd->shd", ds, means)
    if query.dim() == 2:
        dq = dq.sum(0)
    return dx, dq.to(query.dtype)
