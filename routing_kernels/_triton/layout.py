"""Layout helpers shared by the Triton launchers and kernels of every op: one definition each.

Packed form: every launcher works on (T, H, D) tensors and cu_seqlens (S+1,) (int32 or int64, contiguous);
a dense (B, N, H, D) batch becomes cu_seqlens = arange(B+1) * N, so one kernel serves both layouts.

program_coords numbers programs over (sequence, block, inner item) with the longest sequence's block count
for every sequence (S * ceil(max_seqlen / block) programs): the grid is known from shapes alone, and programs
past a sequence's end find empty masks.
Nothing here reads device data on the host: launchers stay free of syncs (python_tests/test_triton_no_sync.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import next_pow2


def as_packed(x: torch.Tensor, cu_seqlens, max_seqlen):
    """(T, H, D) view with unit last stride, contiguous cu_seqlens (the kernels index it as a flat array) and
    the longest length. Dense (B, N, H, D) input gets cu_seqlens = arange(B+1) * N and max_seqlen = N."""
    if cu_seqlens is None:
        b, n = x.shape[:2]
        cu_seqlens = torch.arange(b + 1, device=x.device, dtype=torch.int32) * n
        max_seqlen = n
        x = x.reshape(b * n, *x.shape[2:])
    elif not cu_seqlens.is_contiguous():
        cu_seqlens = cu_seqlens.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, cu_seqlens, max_seqlen


def tiles(head_dim: int, chunk_size: int) -> tuple[int, int]:
    """BLOCK_D covers the head dim (padded to a power of 2); BLOCK_T keeps a tile at ~4K elements
    (16 KB of fp32 registers across 4 warps) and never exceeds the chunk."""
    block_d = max(16, next_pow2(head_dim))
    block_t = max(1, min(next_pow2(chunk_size), 4096 // block_d))
    return block_t, block_d


@triton.jit
def program_coords(num_mid, num_inner):
    """This program's (outer, mid, inner) indices, int64, for pid = (outer * num_mid + mid) * num_inner + inner
    (inner fastest: neighbouring programs share the outer and mid items, e.g. the heads of one chunk)."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // (num_mid * num_inner), (pid // num_inner) % num_mid, pid % num_inner


@triton.jit
def seq_span(cu_seqlens, i_s):
    """(first token, length) of sequence i_s, int64."""
    bos = tl.load(cu_seqlens + i_s).to(tl.int64)
    return bos, tl.load(cu_seqlens + i_s + 1).to(tl.int64) - bos


@triton.jit
def chunk_coords(cu_seqlens, chunk_size, num_chunks, num_heads):
    """(seq, chunk, head, first token of the chunk, tokens in the chunk) of a program of the
    S * num_chunks * num_heads grid (heads fastest)."""
    i_s, i_c, i_h = program_coords(num_chunks, num_heads)
    bos, length = seq_span(cu_seqlens, i_s)
    first = i_c * chunk_size
    count = tl.minimum(tl.maximum(length - first, 0), chunk_size)  # 0 for chunks the sequence lacks
    return i_s, i_c, i_h, bos + first, count
