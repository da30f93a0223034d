"""Triton launchers of chunk_route for a chunk table (dynamic chunking; the contract is _layout.ChunkTable).

The same three passes each way as triton.py (maths in README.md): (1) chunk_reduce_kernel with IS_TABLE, one
program per (piece, head) of the table's work list, adds each piece's share of the chunk means and scores (or
dw) into zeroed buffers; (2) the per-(sequence, head) softmax kernels: they only see the padded (S, H,
max_chunks) scores (the forward's, with IS_TABLE, reads those past a sequence's chunks as -inf; the backward's
gets weight 0 there) and the (S, max_chunks, H, D) means; (3)
chunk_scale_kernel with IS_TABLE writes y (dx) piece by piece. No host sync: every grid comes from shapes.
"""
from __future__ import annotations

import torch

from ..chunk_mean.triton_table import packed, table_grid, table_reduce
from .triton import _per_seq, _row_blocks, chunk_scale_kernel, softmax_backward_kernel, softmax_summary_kernel


def _launch_scale(src, out, weights, ds, query, dsummary, grid, scale, is_backward):
    s, h, m = weights.shape
    d = src.shape[-1]
    if grid.num_pieces * h == 0:
        return
    cu, split, tail = grid.args()
    chunk_scale_kernel[(grid.num_pieces * h,)](
        src, out, weights, ds, query, dsummary, cu,
        src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        query.stride(0), query.stride(1), dsummary.stride(0), dsummary.stride(1),
        split, m, h, d, scale, *tail, IS_BACKWARD=is_backward, IS_TABLE=True, BLOCK_T=grid.block_t,
        BLOCK_D=grid.block_d, num_warps=4)


def chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, max_chunks, scale):
    """x: packed (T, H, D) fp16/bf16/fp32, any strides; query (H, D) shared or (S, H, D); cu_chunks (K+1,) and
    seq_chunks (S+1,) int32 (_layout.ChunkTable); scale: float.
    Returns (y (T, H, D) contiguous in x.dtype, weights (S, H, max_chunks) fp32 with zeros past a sequence's
    chunks, summary (S, H, D) in x.dtype; an empty sequence gets zero weights and summary)."""
    xp = packed(x)
    grid = table_grid(xp, cu_chunks, seq_chunks, max_chunks)
    s, m = grid.num_seqs, grid.max_chunks
    q = _per_seq(query, s)
    means, scores = table_reduce(xp, grid, vec=q, alpha=scale, empty_value=float("-inf"))
    _, h, d = xp.shape
    weights = torch.empty(s, h, m, device=x.device, dtype=torch.float32)
    summary = torch.empty(s, h, d, device=x.device, dtype=torch.float32)
    if s * h:
        block_m, block_d = _row_blocks(m, d)
        softmax_summary_kernel[(s * h,)](scores, means, weights, summary, m, h, d, grid.seq_chunks, IS_TABLE=True,
                                         BLOCK_M=block_m, BLOCK_D=block_d)
    y = torch.empty(xp.shape, device=x.device, dtype=x.dtype)
    _launch_scale(xp, y, weights, weights, q, q, grid, 1.0, False)
    return y, weights, summary.to(x.dtype)


def chunk_route_table_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks, scale):
    """Gradients of chunk_route_table_fwd. dy (T, H, D), dweights (S, H, max_chunks), dsummary (S, H, D) (any
    strides, stride-0 expanded too); weights: the forward's. Returns (dx (T, H, D) contiguous in x.dtype,
    dquery like query: (H, D) summed over sequences when shared, else (S, H, D))."""
    xp, dyp = packed(x), packed(dy)
    grid = table_grid(xp, cu_chunks, seq_chunks, max_chunks)
    s, m = grid.num_seqs, grid.max_chunks
    dsum = _per_seq(dsummary, s)
    means, dw = table_reduce(xp, grid, vec=dsum, dy=dyp, extra=dweights.contiguous().float())
    _, h, d = xp.shape
    ds = torch.empty_like(dw)
    dquery = torch.empty(s, h, d, device=x.device, dtype=torch.float32)
    weights = weights.contiguous()
    if s * h:
        block_m, block_d = _row_blocks(m, d)
        softmax_backward_kernel[(s * h,)](weights, dw, means, ds, dquery, m, h, d, scale,
                                          BLOCK_M=block_m, BLOCK_D=block_d)
    dx = torch.empty(xp.shape, device=x.device, dtype=x.dtype)
    _launch_scale(dyp, dx, weights, ds, _per_seq(query, s), dsum, grid, scale, True)
    dq = dquery.sum(0) if query.dim() == 2 else dquery
    return dx, dq.to(query.dtype)
