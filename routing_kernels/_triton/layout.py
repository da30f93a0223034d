"""Layout helpers shared by the Triton launchers and kernels of every op: one definition each.

Packed form: every launcher works on (T, H, D) tensors and cu_seqlens (S+1,) (int32 or int64, contiguous);
a dense (B, N, H, D) batch becomes cu_seqlens = arange(B+1) * N, so one kernel serves both layouts.

Ways to number programs over (sequence, block of tokens):
- program_coords: every sequence gets the longest sequence's block count (S * ceil(max_seqlen / block)
  programs); the grid is known from shapes alone, and programs past a sequence's end find empty masks.
- seq_blocks / seq_block: only the real (sequence, block) pairs, through a device-side prefix sum of the
  per-sequence block counts. The grid is bounded by shapes (sum_s ceil(L_s / block) <= (T + S (block - 1))
  / block), so no host sync either; a skewed batch (one 64K sequence and 100 short ones, block 16) launches
  ~4.1K programs instead of 101 * 4K.
- chunk_work with IS_TABLE (chunk tables, dynamic chunking): K chunk heads and ceil(T / SPLIT) windows of the
  tails of longer chunks, each program finding its chunk and sequence by binary searches (count_le).
None reads device data on the host: launchers stay free of syncs (python_tests/test_triton_no_sync.py).
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


def seq_blocks(cu_seqlens: torch.Tensor, num_tokens: int, max_seqlen: int, block: int):
    """Enumerate the real (sequence, block of `block` tokens) pairs of a packed batch, on the device.

    Returns (first, seq_of, num_programs):
        first: (S+1,) int64, first[s] = sum_{s' < s} ceil(L_s' / block), the global index of s's block 0;
        seq_of: (num_programs,) int32, the sequence of global block g (clamped to S-1 past the last real block,
            where seq_block then yields a block past that sequence's end: every mask empty);
        num_programs: int, an upper bound of the real blocks from shapes only,
            min(S * ceil(max_seqlen / block), (T + S * (block - 1)) // block).
    """
    s = cu_seqlens.numel() - 1
    dev = cu_seqlens.device
    num = min(s * triton.cdiv(max_seqlen, block), (num_tokens + s * (block - 1)) // block) if s > 0 else 0
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    first = torch.zeros(s + 1, dtype=torch.int64, device=dev)
    torch.cumsum((lengths + block - 1) // block, 0, out=first[1:])
    g = torch.arange(num, dtype=torch.int64, device=dev)
    # first[s] <= g < first[s+1]: the count of first[1:] entries <= g (right=True skips empty sequences)
    seq_of = torch.searchsorted(first[1:], g, right=True, out_int32=True).clamp_(max=max(s - 1, 0))
    return first, seq_of, num


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
def seq_block(cu_seqlens, block_first, block_seq, i_g):
    """(sequence, block inside it, first token of the sequence, its length) of global block i_g, numbered by
    seq_blocks; all int64."""
    i_s = tl.load(block_seq + i_g).to(tl.int64)
    bos, length = seq_span(cu_seqlens, i_s)
    return i_s, i_g - tl.load(block_first + i_s), bos, length


@triton.jit
def chunk_coords(cu_seqlens, chunk_size, num_chunks, num_heads):
    """(seq, chunk, head, first token of the chunk, tokens in the chunk) of a program of the
    S * num_chunks * num_heads grid (heads fastest)."""
    i_s, i_c, i_h = program_coords(num_chunks, num_heads)
    bos, length = seq_span(cu_seqlens, i_s)
    first = i_c * chunk_size
    count = tl.minimum(tl.maximum(length - first, 0), chunk_size)  # 0 for chunks the sequence lacks
    return i_s, i_c, i_h, bos + first, count


@triton.jit
def count_le(sorted_values, n, value):
    """How many of sorted_values[0:n] (non-decreasing) are <= value: a binary search of ~log2(n) scalar loads,
    int64. The index of the chunk holding token `value` is count_le(cu_chunks + 1, K, value)."""
    lo = tl.zeros([], dtype=tl.int64)
    hi = lo + n
    while lo < hi:
        mid = (lo + hi) // 2
        go = tl.load(sorted_values + mid).to(tl.int64) <= value
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def chunk_work(cu_offsets, chunk_size, num_chunks, num_heads, seq_chunks, num_table_chunks, num_seqs, num_tokens,
               IS_TABLE: tl.constexpr):
    """What one program of the chunk kernels covers: (seq, chunk in it, head, first token, tokens, tokens in the
    whole chunk, is it the chunk's first piece), int64 but the flag.
    - integer chunks (IS_TABLE False): cu_offsets = cu_seqlens, a program per (seq, chunk, head) of the
      S * num_chunks * num_heads grid (chunk_coords); the piece is the whole chunk (0 tokens past a sequence).
    - chunk table (IS_TABLE True): cu_offsets = cu_chunks (K+1,), seq_chunks (S+1,), chunk_size = SPLIT, and
      (K + ceil(T / SPLIT)) * num_heads programs (heads fastest), so the grid comes from shapes:
        piece p < K: the first SPLIT tokens of chunk p;
        piece K + j: the tokens of [j * SPLIT, (j+1) * SPLIT) past the first SPLIT of their chunk. Such a window
          meets one chunk's tail at most (a tail starts SPLIT tokens after its chunk does), the chunk holding
          token j * SPLIT, found by a binary search; often it is empty (0 tokens).
      Every token is in exactly one piece, no piece is longer than SPLIT: a chunk 1000x longer than the others is
      spread over ~L / SPLIT programs instead of one."""
    if IS_TABLE:
        i_p, _, i_h = program_coords(1, num_heads)
        if i_p < num_table_chunks:  # a chunk's head
            i_g = i_p
            bos = tl.load(cu_offsets + i_g).to(tl.int64)
            count = tl.load(cu_offsets + i_g + 1).to(tl.int64) - bos
            tok0 = bos
            tokens = tl.minimum(count, chunk_size)
        else:  # a window of the tails
            w0 = tl.minimum((i_p - num_table_chunks) * chunk_size, num_tokens - 1)
            i_g = count_le(cu_offsets + 1, num_table_chunks, w0)
            bos = tl.load(cu_offsets + i_g).to(tl.int64)
            count = tl.load(cu_offsets + i_g + 1).to(tl.int64) - bos
            tok0 = tl.maximum(w0, bos + chunk_size)
            tokens = tl.maximum(tl.minimum(w0 + chunk_size, bos + count) - tok0, 0)
        i_s = count_le(seq_chunks + 1, num_seqs, i_g)
        i_c = i_g - tl.load(seq_chunks + i_s).to(tl.int64)
        is_first = i_p < num_table_chunks
    else:
        i_s, i_c, i_h, tok0, count = chunk_coords(cu_offsets, chunk_size, num_chunks, num_heads)
        tokens = count
        is_first = True
    return i_s, i_c, i_h, tok0, tokens, count, is_first


def key_layout(q: torch.Tensor, k: torch.Tensor, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k):
    """Keys of the launchers that accept queries shorter than keys (chunked prefill): returns (cu_seqlens_k,
    max_seqlen_k, separate) to hand to as_packed(k, ..) / chunk_mean_fwd, with separate = True when the keys
    have their own offsets (the kernels' SEPARATE_KEYS flag).
    - cu_seqlens_k given: packed k with its own offsets; max_seqlen_k defaults to k.shape[0], an upper bound
      from shapes (reading the real one would sync).
    - dense k (B, Nk, ..) with dense q (B, Nq, ..), Nq != Nk: separate, as_packed makes arange(B+1) * Nk.
    - otherwise k is laid out like q: q's offsets, and separate = False (the training kernels, unchanged)."""
    if cu_seqlens_k is not None:
        return cu_seqlens_k, (k.shape[0] if max_seqlen_k is None else max_seqlen_k), True
    if cu_seqlens is None and k.shape[1] != q.shape[1]:
        return None, None, True
    return cu_seqlens, max_seqlen, False
