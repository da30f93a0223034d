"""Dynamic chunking: chunk boundaries that follow each sequence.

An explicit chunk table is ``cu_chunks``: int32 offsets into the packed token dimension, in the ``cu_seqlens``
convention (starts at 0, strictly increasing, ends at T) and containing every offset of ``cu_seqlens``, so
that every non-empty sequence starts a chunk. Chunk g covers tokens ``[cu_chunks[g], cu_chunks[g+1])``. A dense
batch ``(B, N, ...)`` is read as packed ``(B*N, ...)`` with sequences at multiples of N.

:func:`chunk_boundaries` builds ``cu_chunks`` from a rule; :func:`chunk_mean`, :func:`chunk_route` and
:class:`ChunkRouter` take it with ``chunk_size=None``. Outputs stay padded per sequence: ``(S, max_chunks, ...)``
with zeros (zero weights) past a sequence's own chunks, where ``max_chunks`` is the most chunks one sequence has.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._layout import ceil_div, seq_chunk_offsets
from ._validation import _fail, check_int, is_compiling, should_read_values


class ChunkBoundaries(NamedTuple):
    cu_chunks: Tensor  # (K+1,) int32 on the device of cu_seqlens
    max_chunks: int  # the most chunks any one sequence has: the padded outputs' M


def dense_offsets(batch: int, seqlen: int, device=None) -> Tensor:
    """cu_seqlens of a dense (batch, seqlen) batch read as packed tokens."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


# ----------------------------------------------------------------------------------------------- validation
def check_table_shape(cu_chunks, max_chunks, like: Tensor, chunk_size) -> None:
    """Metadata-only checks (safe under fake tensors and torch.compile)."""
    if chunk_size is not None:
        _fail("give either chunk_size or cu_chunks, not both (chunk_size must be None when cu_chunks is given)")
    if not isinstance(cu_chunks, Tensor):
        _fail(f"cu_chunks must be a torch.Tensor, got {type(cu_chunks).__name__}", TypeError)
    if cu_chunks.dtype != torch.int32:
        _fail(f"cu_chunks must be int32, got {cu_chunks.dtype}", TypeError)
    if cu_chunks.dim() != 1 or cu_chunks.numel() < 1:
        _fail(f"cu_chunks must be 1-D of shape (K+1,) with K >= 0, got shape {tuple(cu_chunks.shape)}")
    if cu_chunks.device != like.device:
        _fail(f"cu_chunks is on {cu_chunks.device} but the inputs are on {like.device}")
    if max_chunks is None:
        _fail("max_chunks is required when cu_chunks is given (the public functions compute it)")
    check_int("max_chunks", max_chunks, 0)


def check_table_values(cu_chunks: Tensor, cu_seqlens: Tensor, num_tokens: int, max_chunks: Optional[int]) -> None:
    """Data checks: reads the tables (a device sync on GPU), so only run eagerly."""
    cu = cu_chunks.detach().to("cpu", torch.int64)
    seqs = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        _fail(f"cu_chunks must start at 0, got {cu[0].item()}")
    if cu[-1].item() != num_tokens:
        _fail(f"cu_chunks must end at the number of tokens T={num_tokens}, got {cu[-1].item()}")
    steps = cu.diff()
    if (steps <= 0).any():
        g = int((steps <= 0).nonzero()[0])
        _fail(f"cu_chunks must be strictly increasing (chunks of at least one token), but cu_chunks[{g}] = "
              f"{cu[g].item()} and cu_chunks[{g + 1}] = {cu[g + 1].item()}")
    at = torch.searchsorted(cu, seqs).clamp(max=cu.numel() - 1)
    missing = cu[at] != seqs
    if missing.any():
        s = int(missing.nonzero()[0])
        _fail(f"cu_chunks must contain every sequence start: sequence {s} starts at token {seqs[s].item()}, "
              f"which is not in cu_chunks")
    if max_chunks is not None and seqs.numel() > 1:
        most = int(at.diff().max())
        if most > max_chunks:
            _fail(f"max_chunks={max_chunks} is smaller than the most chunks of one sequence ({most})")


def resolve_max_chunks(cu_chunks: Tensor, cu_seqlens: Tensor, max_chunks: Optional[int]) -> int:
    """The public functions compute max_chunks when the caller did not give it (a device sync on GPU)."""
    if max_chunks is not None or not isinstance(cu_chunks, Tensor) or not isinstance(cu_seqlens, Tensor):
        return max_chunks
    if is_compiling():
        _fail("max_chunks must be given under torch.compile when cu_chunks is (computing it reads the tables)")
    per_seq = seq_chunk_offsets(cu_chunks, cu_seqlens).to(torch.int64).diff()
    return int(per_seq.max()) if per_seq.numel() else 0


def prepare_table(cu_chunks: Tensor, cu_seqlens: Tensor, num_tokens: int, max_chunks: int) -> tuple[Tensor, Tensor]:
    """Inside an op: validate the table where that costs no sync, and return (cu_chunks, seq_chunks) contiguous."""
    if should_read_values(cu_chunks) or should_read_values(cu_seqlens):
        check_table_values(cu_chunks, cu_seqlens, num_tokens, max_chunks)
    cu_chunks = cu_chunks.contiguous()
    return cu_chunks, seq_chunk_offsets(cu_chunks, cu_seqlens).contiguous()


# ----------------------------------------------------------------------------------------------- the builder
def chunk_boundaries(cu_seqlens: Optional[Tensor] = None, *, batch: Optional[int] = None,
                     seqlen: Optional[int] = None, chunk_size: Optional[int] = None, num_chunks: Optional[int] = None,
                     fraction: Optional[float] = None, chunk_ends: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None, device=None) -> ChunkBoundaries:
    """Chunk boundaries ``cu_chunks`` (and ``max_chunks``) from a rule, for a packed or a dense batch.

    The batch: ``cu_seqlens`` (int32 (S+1,), packed; the table is built on its device), or ``batch`` and
    ``seqlen`` (a dense (B, N) batch, whose tokens are read as packed; the table is built on ``device``). Exactly one rule:
        chunk_size=C: chunks of C tokens, the last one of a sequence shorter (the integer path's chunks exactly).
        num_chunks=n: each sequence of length L in min(n, L) near-equal chunks (sizes differ by at most one).
        fraction=f: chunk size ceil(f * L) per sequence (0 < f <= 1; 0.25 to 0.5 is the routing rule of thumb).
        chunk_ends: bool flags, (T,) packed or (B, N) dense, True on a token that ENDS a chunk (a sentence end);
            every sequence's last token ends a chunk as well.
    No device sync for a dense batch with chunk_size, num_chunks or fraction; otherwise the total number of
    chunks is data, read once (a sync on GPU; free when cu_seqlens is on the CPU).
    Example:
        >>> cu = torch.tensor([0, 500, 50500], dtype=torch.int32)
        >>> cu_chunks, max_chunks = chunk_boundaries(cu, fraction=0.25)   # 4 chunks each: 125 and 12,500 tokens
    """
    rules = {"chunk_size": chunk_size, "num_chunks": num_chunks, "fraction": fraction, "chunk_ends": chunk_ends}
    given = [k for k, v in rules.items() if v is not None]
    if len(given) != 1:
        _fail(f"give exactly one of chunk_size, num_chunks, fraction, chunk_ends; got {given or 'none'}")
    dense = cu_seqlens is None
    if dense:
        if batch is None or seqlen is None:
            _fail("give cu_seqlens (packed) or both batch and seqlen (dense)")
        check_int("batch", batch, 0)
        check_int("seqlen", seqlen, 0)
    elif batch is not None or seqlen is not None:
        _fail("give cu_seqlens (packed) or batch and seqlen (dense), not both")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if num_chunks is not None:
        check_int("num_chunks", num_chunks, 1)
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        _fail(f"fraction must be a number in (0, 1], got {fraction!r}")
    if chunk_ends is not None:
        return _from_ends(chunk_ends, cu_seqlens, batch, seqlen)
    if dense:
        return _dense(batch, seqlen, chunk_size, num_chunks, fraction, device)
    return _packed(cu_seqlens, chunk_size, num_chunks, fraction, max_seqlen)


def _count_and_size(lengths: Tensor, chunk_size, num_chunks, fraction) -> tuple[Tensor, Optional[Tensor]]:
    """Per sequence: its number of chunks, and its chunk size (None for num_chunks: near-equal split)."""
    if chunk_size is not None:
        return (lengths + chunk_size - 1) // chunk_size, torch.full_like(lengths, chunk_size)
    if num_chunks is not None:
        return lengths.clamp(max=num_chunks), None
    size = torch.ceil(lengths.to(torch.float64) * fraction).to(torch.int64).clamp(min=1)
    return (lengths + size - 1) // size, size


def _starts(first: Tensor, lengths: Tensor, counts: Tensor, size: Optional[Tensor], total: int) -> Tensor:
    """Start token of every chunk, in order: chunk j of sequence s starts at first_s + j*size_s (or, for a
    near-equal split into n_s chunks, at first_s + floor(j * L_s / n_s))."""
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=total)
    j = torch.arange(total, device=counts.device) - (counts.cumsum(0) - counts)[seq]
    offset = j * size[seq] if size is not None else (j * lengths[seq]) // counts[seq]
    return first[seq] + offset


def _packed(cu_seqlens: Tensor, chunk_size, num_chunks, fraction, max_seqlen) -> ChunkBoundaries:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        _fail("cu_seqlens must be a 1-D int32 tensor", TypeError)
    cu = cu_seqlens.to(torch.int64)
    lengths = cu.diff()
    counts, size = _count_and_size(lengths, chunk_size, num_chunks, fraction)
    total = int(counts.sum())  # the number of chunks is data: one read (a sync on GPU)
    if chunk_size is not None and max_seqlen is not None:
        most = ceil_div(max_seqlen, chunk_size)  # the integer path's M, even when no sequence is that long
    else:
        most = int(counts.max()) if counts.numel() else 0
    starts = _starts(cu[:-1], lengths, counts, size, total)
    cu_chunks = torch.cat([starts, cu[-1:]]).to(torch.int32)
    return ChunkBoundaries(cu_chunks, most)


def _dense(batch: int, seqlen: int, chunk_size, num_chunks, fraction, device) -> ChunkBoundaries:
    """Every sequence has the same length, so every count is known on the host: no sync."""
    if chunk_size is not None:
        size, count = chunk_size, ceil_div(seqlen, chunk_size)
    elif num_chunks is not None:
        size, count = None, min(num_chunks, seqlen)
    else:
        size = max(1, math.ceil(seqlen * fraction))
        count = ceil_div(seqlen, size)
    j = torch.arange(count, dtype=torch.int64, device=device)
    local = j * size if size is not None else (j * seqlen) // max(count, 1)
    starts = (torch.arange(batch, dtype=torch.int64, device=device)[:, None] * seqlen + local[None, :]).reshape(-1)
    end = torch.tensor([batch * seqlen], dtype=torch.int64, device=device)
    return ChunkBoundaries(torch.cat([starts, end]).to(torch.int32), count if batch else 0)


def _from_ends(chunk_ends: Tensor, cu_seqlens: Optional[Tensor], batch, seqlen) -> ChunkBoundaries:
    if not isinstance(chunk_ends, Tensor) or chunk_ends.dtype != torch.bool:
        _fail("chunk_ends must be a bool tensor", TypeError)
    if cu_seqlens is None:
        if tuple(chunk_ends.shape) != (batch, seqlen):
            _fail(f"chunk_ends must have shape (batch, seqlen) = {(batch, seqlen)}, got {tuple(chunk_ends.shape)}")
        cu_seqlens = dense_offsets(batch, seqlen, chunk_ends.device)
        chunk_ends = chunk_ends.reshape(-1)
    if chunk_ends.dim() != 1 or int(cu_seqlens[-1]) != chunk_ends.shape[0]:
        _fail(f"chunk_ends must be (T,) with T = cu_seqlens[-1] for a packed batch, got {tuple(chunk_ends.shape)}")
    cu = cu_seqlens.to(device=chunk_ends.device, dtype=torch.int64)
    ends = chunk_ends.clone()
    last = cu[1:][cu.diff() > 0] - 1  # every non-empty sequence's last token ends a chunk
    ends[last] = True
    cut = ends.nonzero().flatten() + 1  # a sync: the count of chunks is data
    cu_chunks = torch.cat([cu.new_zeros(1), cut]).to(torch.int32)
    per_seq = seq_chunk_offsets(cu_chunks, cu).to(torch.int64).diff()
    return ChunkBoundaries(cu_chunks, int(per_seq.max()) if per_seq.numel() else 0)
