"""Triton launchers of chunk_mean for a chunk table (dynamic chunking; the contract is _layout.ChunkTable).

The kernels are triton.py's, with IS_TABLE: one program per (piece, head), where a chunk of L tokens is cut into
ceil(L / SPLIT) pieces found inside the kernel (routing_kernels/_triton/layout.py chunk_work): K chunk heads and
ceil(T / SPLIT) windows of the tails of longer chunks, a grid from shapes. Nothing is built on the host (no
work list, no sync): a launch costs the integer path's kernels plus one memset. Pieces of one chunk add their
shares of the mean into the zeroed fp32 buffer with atomic adds: a chunk of <= SPLIT tokens is one piece, and
adding its mean to 0 gives the integer path's numbers bit for bit; longer chunks sum in an order the GPU picks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ..._triton.layout import tiles
from .triton import chunk_mean_backward_kernel, chunk_reduce_kernel

# Tokens per piece: a uniform table of chunks <= 1024 (the usual 64..512) runs one program per chunk and head,
# like the integer path (plus ceil(T / 1024) * H window programs that find no tail and return), while a
# 100K-token chunk beside short ones becomes ~100 programs instead of one that all the others wait for.
# The tests lower it so that their small chunks split too.
SPLIT = 1024


class TableGrid(NamedTuple):
    """A chunk table and the launch geometry of its kernels (all from shapes)."""
    cu_chunks: torch.Tensor  # (K+1,) contiguous
    seq_chunks: torch.Tensor  # (S+1,) contiguous
    max_chunks: int
    num_tokens: int
    split: int
    num_pieces: int  # K + ceil(T / split): chunk heads, then windows of the tails
    block_t: int
    block_d: int

    @property
    def num_seqs(self) -> int:
        return self.seq_chunks.numel() - 1

    def args(self):
        """(cu_offsets, chunk_size, (seq_chunks, num_table_chunks, num_seqs, num_tokens)) of the kernels."""
        k = self.cu_chunks.numel() - 1
        return self.cu_chunks, self.split, (self.seq_chunks, k, self.num_seqs, self.num_tokens)


def table_grid(x: torch.Tensor, cu_chunks: torch.Tensor, seq_chunks: torch.Tensor, max_chunks: int) -> TableGrid:
    """x: packed (T, H, D); cu_chunks (K+1,), seq_chunks (S+1,) int32 or int64."""
    cu_chunks, seq_chunks = cu_chunks.contiguous(), seq_chunks.contiguous()
    num_tokens, num_chunks = x.shape[0], cu_chunks.numel() - 1
    split = SPLIT
    num_pieces = num_chunks + triton.cdiv(num_tokens, split) if num_chunks > 0 else 0
    # Tiles sized by the mean chunk length T / K (shapes only): the integer path's tile for a uniform table.
    mean_len = -(-num_tokens // max(num_chunks, 1))
    block_t, block_d = tiles(x.shape[-1], min(split, max(mean_len, 1)))
    return TableGrid(cu_chunks, seq_chunks, int(max_chunks), num_tokens, split, num_pieces, block_t, block_d)


def packed(t: torch.Tensor) -> torch.Tensor:
    """A (T, H, D) view the kernels can index (unit last stride; other strides are passed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def table_reduce(x, grid: TableGrid, vec=None, alpha=1.0, dy=None, extra=None, empty_value=0.0):
    """chunk_reduce_kernel on a chunk table. Returns (means fp32 (S, M, H, D), out fp32 (S, H, M) or None; out is
    0 past each sequence's chunks: empty_value is the integer path's and unused here)."""
    s, m = grid.num_seqs, grid.max_chunks
    _, h, d = x.shape
    # one memset for both outputs: pieces add into them. out past a sequence's chunks stays 0: no program adds
    # there, and the softmax kernels (IS_TABLE) read those scores as -inf and give them weight 0
    size = s * m * h * d
    buf = torch.zeros(size + (s * h * m if vec is not None else 0), device=x.device, dtype=torch.float32)
    means = buf[:size].view(s, m, h, d)
    out = buf[size:].view(s, h, m) if vec is not None else None
    if grid.num_pieces * h == 0:
        return means, out
    cu, split, tail = grid.args()
    vs = vec if vec is not None else means
    chunk_reduce_kernel[(grid.num_pieces * h,)](
        x, dy if dy is not None else x, vs, extra if extra is not None else means, means,
        out if out is not None else means, cu,
        x.stride(0), x.stride(1), *(dy.stride()[:2] if dy is not None else (0, 0)),
        *((vs.stride(0), vs.stride(1)) if vec is not None else (0, 0)),
        split, alpha, empty_value, m, h, d, *tail, HAS_VEC=vec is not None, HAS_DY=dy is not None,
        HAS_EXTRA=extra is not None, IS_TABLE=True, BLOCK_T=grid.block_t, BLOCK_D=grid.block_d, num_warps=4)
    return means, out


def chunk_mean_table_fwd(x, cu_chunks, seq_chunks, max_chunks):
    """Means of packed x (T, H, D) fp16/bf16/fp32 over the chunks of a table -> (S, max_chunks, H, D) in x.dtype,
    zeros past each sequence's chunks. cu_chunks (K+1,), seq_chunks (S+1,): int32 (see _layout.ChunkTable)."""
    xp = packed(x)
    means, _ = table_reduce(xp, table_grid(xp, cu_chunks, seq_chunks, max_chunks))
    return means.to(x.dtype)


def chunk_mean_table_bwd(grad_mean, x, cu_chunks, seq_chunks, max_chunks):
    """dx_t = grad_mean[s, c] / |c| for every token t of chunk c: contiguous (T, H, D) in x.dtype.
    grad_mean: (S, max_chunks, H, D), any strides (stride-0 expanded gradients too)."""
    t, h, d = x.shape
    dx = torch.empty(t, h, d, device=x.device, dtype=x.dtype)
    grid = table_grid(dx, cu_chunks, seq_chunks, max_chunks)
    if grid.num_pieces * h == 0:
        return dx
    grad = packed(grad_mean)
    cu, split, tail = grid.args()
    chunk_mean_backward_kernel[(grid.num_pieces * h,)](
        grad, dx, cu, grad.stride(0), grad.stride(1), grad.stride(2), dx.stride(0), dx.stride(1), split,
        grid.max_chunks, h, d, *tail, IS_TABLE=True, BLOCK_T=grid.block_t, BLOCK_D=grid.block_d, num_warps=4)
    return dx
