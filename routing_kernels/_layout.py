"""Sequence layout helpers shared by the eager references.

Every op accepts either a dense batch ``(B, N, ...)`` or a packed varlen batch ``(T, ...)`` with
``cu_seqlens``. The references turn both into the packed form, so one code path covers both.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one rule for accumulation and for fp32-or-wider outputs (chunk_route's weights, attention's lse):
    fp64 inputs accumulate in fp64; everything else in fp32. Its C++ twin is the one helper in
    csrc/include/routing_kernels/."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Packed(NamedTuple):
    """A batch in packed form. ``batch`` is B for a dense input (to restore its shape), else None."""

    data: Tensor  # (T, ...)
    cu_seqlens: Tensor  # (S+1,) int64
    max_seqlen: int
    batch: Optional[int]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1


def pack(x: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]) -> Packed:
    if cu_seqlens is None:
        b, n = x.shape[0], x.shape[1]
        cu = torch.arange(b + 1, device=x.device, dtype=torch.int64) * n
        return Packed(x.reshape(b * n, *x.shape[2:]), cu, n, b)
    assert max_seqlen is not None, "max_seqlen is required with cu_seqlens"
    return Packed(x, cu_seqlens.to(torch.int64), int(max_seqlen), None)


def unpack_tokens(t: Tensor, p: Packed) -> Tensor:
    """(T, ...) -> (B, N, ...) for a dense input; unchanged for varlen."""
    if p.batch is None:
        return t
    return t.reshape(p.batch, -1, *t.shape[1:])


def token_positions(cu_seqlens: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """For every packed token: the index of its sequence and its position inside it (both int64)."""
    lengths = cu_seqlens.diff()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                  output_size=num_tokens)
    pos = torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens[seq]
    return seq, pos


class ChunkTable(NamedTuple):
    """Explicit chunk boundaries of a packed batch (dynamic chunking).

    Chunk g spans packed tokens ``[cu_chunks[g], cu_chunks[g+1])``; sequence s owns the chunks
    ``[seq_chunks[s], seq_chunks[s+1])`` (none when it is empty); ``max_chunks`` bounds how many one sequence
    owns and sizes the padded outputs ``(S, max_chunks, ...)``."""

    cu_chunks: Tensor  # (K+1,) int32, 0 = cu_chunks[0] < ... < cu_chunks[K] = T
    seq_chunks: Tensor  # (S+1,) int32
    max_chunks: int


# How a batch is cut: one chunk size for every sequence, or an explicit table.
Chunking = Union[int, ChunkTable]


def seq_chunk_offsets(cu_chunks: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(S+1,) int32: the index in cu_chunks of each sequence's first chunk (on the device, no sync). An empty
    sequence gets the same index as the next one, so it owns no chunk."""
    return torch.searchsorted(cu_chunks.to(torch.int64), cu_seqlens.to(torch.int64)).to(torch.int32)


def chunk_slots(p: Packed, chunking: Chunking) -> tuple[Tensor, int]:
    """Flat index ``seq * M + chunk`` of every token's chunk, and M (chunks of the longest sequence)."""
    seq, pos = token_positions(p.cu_seqlens, p.data.shape[0])
    if isinstance(chunking, ChunkTable):
        tokens = torch.arange(p.data.shape[0], device=p.data.device)
        g = torch.searchsorted(chunking.cu_chunks.to(torch.int64), tokens, right=True) - 1
        local = g - chunking.seq_chunks.to(torch.int64)[seq]
        return seq * chunking.max_chunks + local, chunking.max_chunks
    num_chunks = ceil_div(p.max_seqlen, chunking)
    return seq * num_chunks + pos // chunking, num_chunks


def chunk_sums(p: Packed, chunking: Chunking, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-chunk sums ``(S, M, *feature)`` in ``dtype``, token counts ``(S, M)`` and the token slots."""
    slots, m = chunk_slots(p, chunking)
    feat = p.data.shape[1:]
    sums = p.data.new_zeros((p.num_seqs * m, *feat), dtype=dtype)
    sums = sums.index_add(0, slots, p.data.to(dtype))
    counts = torch.bincount(slots, minlength=p.num_seqs * m)
    return sums.view(p.num_seqs, m, *feat), counts.view(p.num_seqs, m), slots


def chunk_means(p: Packed, chunking: Chunking, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per-chunk means ``(S, M, *feature)`` (zero for chunks a sequence lacks), counts, token slots."""
    sums, counts, slots = chunk_sums(p, chunking, dtype)
    shape = counts.shape + (1,) * (sums.dim() - 2)
    return sums / counts.clamp(min=1).view(shape).to(dtype), counts, slots


def valid_chunks(p: Packed, chunking: Chunking, num_chunks: int) -> Tensor:
    """(S, M) bool: chunk i exists in sequence s."""
    if isinstance(chunking, ChunkTable):
        per_seq = chunking.seq_chunks.to(torch.int64).diff()
    else:
        per_seq = (p.cu_seqlens.diff() + chunking - 1) // chunking
    return torch.arange(num_chunks, device=per_seq.device) < per_seq[:, None]


def pack_table(x: Tensor, table: ChunkTable) -> Packed:
    """A packed (T, ...) batch cut by ``table``: its sequences are where the table says they start."""
    cu = table.cu_chunks.to(torch.int64)[table.seq_chunks.to(torch.int64)]
    return Packed(x, cu, 0, None)  # max_seqlen only sizes the integer chunking: unused (and unread) here
