"""Triton kernels of routed_attention (MoBA), forward and backward; maths in README.md.

Design: query-tile centric, chosen because every query row carries its own selection and this is the
simplest layout that stays exact and deterministic (no atomics, no partial-result merge):

- Forward, one program per (sequence, tile of BLOCK_M tokens, PACK q heads of one kv group; see
  heads_per_tile), so BLOCK_M * PACK rows. It loads the tile's selection
  (BLOCK_M x top_k int32, from route_chunks_triton) and walks exactly the union of its rows' chunks in
  increasing order (next chunk = the smallest selected index above the current one, one BLOCK_M x BLOCK_K
  min). A selected chunk is streamed in BLOCK_N key blocks with the flash online softmax, masking per row
  (row selected j, and key <= query when causal).
- Backward dq: the same walk per query tile, recomputing P from the saved lse.
- Backward dk/dv: one program per (sequence, kv head, chunk, BLOCK_N slice of the chunk). It loops over the
  group's q heads and, through an inverted index of the selection (_tiles_by_chunk: a counting sort into
  (sequence, q head, chunk) -> query tiles), only over the tiles with a row that selected the chunk. It
  accumulates dK, dV in registers; each output element has one writer, so the result is deterministic.

Cost: the work of a tile is the UNION of its rows' selected chunks. Queries of one chunk often route alike,
but when they do not, a tile of R = BLOCK_M * PACK rows can touch up to min(M, R * (top_k - 1) + 1) chunks and
drift toward dense attention; BLOCK_M = 16 keeps the union small (at the price of smaller MMA tiles). The
alternative (gather queries per chunk by counting sort, then merge the per-chunk partials by lse) does
exactly the selected work but needs two extra passes and a workspace; it is the natural next step if the
union overhead shows up in benchmarks. Key blocks never straddle chunks, so chunk_size < BLOCK_N (16) wastes
part of each key block.

Precision: fp32 accumulation everywhere; for fp32 inputs the dots use input_precision="ieee" (exact fp32;
the GPU default tf32 would cost ~1e-3 relative), for fp16/bf16 P and dS are rounded to the input dtype
before their dot, as flash attention does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import next_pow2
from ..chunk_mean.triton import as_packed
from ..route_chunks.triton import route_chunks_triton

BLOCK_M = 16  # query tokens per tile (tl.dot needs >= 16 rows); forward/dq rows = BLOCK_M * heads_per_tile


@triton.jit
def _query_rows(cu_seqlens, num_tiles, num_heads, BLOCK_M: tl.constexpr, PACK: tl.constexpr):
    """A program's BLOCK_M rows: BLOCK_M // PACK consecutive tokens x PACK consecutive q heads of one kv
    group (row r = token r // PACK, head r % PACK). Returns (seq, first head, first token of the sequence,
    its length, tokens (BLOCK_M,), heads (BLOCK_M,), row mask)."""
    pid = tl.program_id(0).to(tl.int64)
    num_packs = num_heads // PACK
    i_p = pid % num_packs
    i_m = (pid // num_packs) % num_tiles
    i_s = pid // (num_packs * num_tiles)
    bos = tl.load(cu_seqlens + i_s).to(tl.int64)
    length = tl.load(cu_seqlens + i_s + 1).to(tl.int64) - bos
    o_r = tl.arange(0, BLOCK_M)
    o_m = i_m * (BLOCK_M // PACK) + o_r // PACK
    o_h = i_p * PACK + o_r % PACK
    return i_s, i_p * PACK, bos, length, o_m, o_h, o_m < length


@triton.jit
def _chunk_range(o_m, length, chunk_size, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Chunks a query tile may attend to: [0, end), and keys past `last` are never visible."""
    last = tl.minimum(tl.max(o_m, axis=0), length - 1)  # last query of the tile (-1 past the end)
    if CAUSAL:
        end = tl.where(last >= 0, last // chunk_size + 1, 0)
    else:
        end = tl.where(last >= 0, (length + chunk_size - 1) // chunk_size, 0)
    return last, end


@triton.jit
def _first_chunk(b_sel, after):
    """Smallest chunk index > `after` that some row of the tile selected (int32 max when none): the walk
    visits exactly the union of the rows' selections, in increasing order."""
    b_next = tl.where(b_sel > after, b_sel, 2147483647)
    return tl.min(tl.min(b_next, axis=1), axis=0)


@triton.jit
def _chunk_keys(b_sel, j, chunk_size, length, last, CAUSAL: tl.constexpr):
    """The rows of the tile that selected chunk j, and the end of the keys they may see in it."""
    b_rows = tl.max(tl.where(b_sel == j, 1, 0), axis=1) > 0
    k_end = tl.minimum((j + 1) * chunk_size, length)
    if CAUSAL:
        k_end = tl.minimum(k_end, last + 1)
    return b_rows, k_end


@triton.jit
def _scores(b_q, k, bos, o_n, m_n, i_kh, stride_kt, stride_kh, o_d, m_d, o_m, b_rows, scale,
            CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scaled scores (BLOCK_M, BLOCK_N) of a key block, -inf where a row may not see a key; and K."""
    p_k = k + (bos + o_n[:, None]) * stride_kt + i_kh * stride_kh + o_d[None, :]
    b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale
    mask = b_rows[:, None] & m_n[None, :]
    if CAUSAL:
        mask = mask & (o_n[None, :] <= o_m[:, None])
    return tl.where(mask, b_s, float("-inf")), b_k


@triton.jit
def routed_fwd_kernel(
    q, k, v, sel, o, lse, cu_seqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    chunk_size, top_k, num_tiles, num_heads, group, head_dim, head_dim_v, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr, PACK: tl.constexpr,
):
    """o, lse of a (seq, query tile, PACK q heads): flash online softmax over the rows' selected chunks."""
    i_s, i_h0, bos, length, o_m, o_h, m_m = _query_rows(cu_seqlens, num_tiles, num_heads, BLOCK_M, PACK)
    i_kh = i_h0 // group
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < head_dim_v
    o_k = tl.arange(0, BLOCK_K)
    b_q = tl.load(q + (bos + o_m[:, None]) * stride_qt + o_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0)
    p_sel = sel + ((bos + o_m[:, None]) * num_heads + o_h[:, None]) * top_k + o_k[None, :]
    b_sel = tl.load(p_sel, mask=m_m[:, None] & (o_k[None, :] < top_k), other=-1)
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    last, end = _chunk_range(o_m, length, chunk_size, CAUSAL, BLOCK_M)
    j = _first_chunk(b_sel, -1)
    while j < end:  # the union of the rows' selected chunks
        b_rows, k_end = _chunk_keys(b_sel, j, chunk_size, length, last, CAUSAL)
        for n0 in range(j * chunk_size, k_end, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < k_end
            b_s, b_k = _scores(b_q, k, bos, o_n, m_n, i_kh, stride_kt, stride_kh, o_d, m_d, o_m, b_rows,
                               scale, CAUSAL, DOT_PREC)
            b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
            b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)  # rows with nothing yet: exp(-inf) = 0
            b_p = tl.exp(b_s - b_ref[:, None])
            b_alpha = tl.exp(b_max - b_ref)
            p_v = v + (bos + o_n[:, None]) * stride_vt + i_kh * stride_vh + o_dv[None, :]
            b_v = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
            b_sum = b_sum * b_alpha + tl.sum(b_p, axis=1)
            b_max = b_new
        j = _first_chunk(b_sel, j)
    # the own chunk is always selected, so b_sum > 0 on every real row
    b_sum = tl.where(m_m, b_sum, 1.0)
    b_o = b_acc / b_sum[:, None]
    p_o = o + (bos + o_m[:, None]) * stride_ot + o_h[:, None] * stride_oh + o_dv[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & m_dv[None, :])
    tl.store(lse + (bos + o_m) * num_heads + o_h, b_max + tl.log(b_sum), mask=m_m)


@triton.jit
def routed_bwd_dq_kernel(
    q, k, v, sel, do, lse, delta, dq, cu_seqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    chunk_size, top_k, num_tiles, num_heads, group, head_dim, head_dim_v, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr, PACK: tl.constexpr,
):
    """dq of a (seq, query tile, PACK q heads) = scale * sum over selected keys of P * (dP - delta) * k."""
    i_s, i_h0, bos, length, o_m, o_h, m_m = _query_rows(cu_seqlens, num_tiles, num_heads, BLOCK_M, PACK)
    i_kh = i_h0 // group
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < head_dim_v
    o_k = tl.arange(0, BLOCK_K)
    b_q = tl.load(q + (bos + o_m[:, None]) * stride_qt + o_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_do = tl.load(do + (bos + o_m[:, None]) * stride_dot + o_h[:, None] * stride_doh + o_dv[None, :],
                   mask=m_m[:, None] & m_dv[None, :], other=0.0)
    p_row = (bos + o_m) * num_heads + o_h
    b_lse = tl.load(lse + p_row, mask=m_m, other=0.0)
    b_delta = tl.load(delta + p_row, mask=m_m, other=0.0)
    b_sel = tl.load(sel + p_row[:, None] * top_k + o_k[None, :], mask=m_m[:, None] & (o_k[None, :] < top_k),
                    other=-1)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last, end = _chunk_range(o_m, length, chunk_size, CAUSAL, BLOCK_M)
    j = _first_chunk(b_sel, -1)
    while j < end:  # the union of the rows' selected chunks, as in the forward
        b_rows, k_end = _chunk_keys(b_sel, j, chunk_size, length, last, CAUSAL)
        for n0 in range(j * chunk_size, k_end, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < k_end
            b_s, b_k = _scores(b_q, k, bos, o_n, m_n, i_kh, stride_kt, stride_kh, o_d, m_d, o_m, b_rows,
                               scale, CAUSAL, DOT_PREC)
            b_p = tl.exp(b_s - b_lse[:, None])  # masked scores are -inf: p = 0
            p_v = v + (bos + o_n[:, None]) * stride_vt + i_kh * stride_vh + o_dv[None, :]
            b_v = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)
        j = _first_chunk(b_sel, j)
    p_dq = dq + (bos + o_m[:, None]) * stride_dqt + o_h[:, None] * stride_dqh + o_d[None, :]
    tl.store(p_dq, (scale * b_dq).to(dq.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def mark_tiles_kernel(sel, cu_seqlens, base, flags, top_k, num_tiles, num_heads, chunk_size,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """flags[base[s] + (h * M_s + c) * tiles_s + tile] = 1 when a row of (s, tile, h) selected chunk c, where
    M_s and tiles_s are sequence s's chunk and tile counts: the (chunk -> query tiles) table of the dk/dv pass."""
    i_s, i_h, bos, length, o_m, _, m_m = _query_rows(cu_seqlens, num_tiles, num_heads, BLOCK_M, 1)
    i_m = o_m[:, None] // BLOCK_M  # the tile (the same on every row)
    o_k = tl.arange(0, BLOCK_K)
    b_sel = tl.load(sel + ((bos + o_m[:, None]) * num_heads + i_h) * top_k + o_k[None, :],
                    mask=m_m[:, None] & (o_k[None, :] < top_k), other=-1)
    num_chunks_s = (length + chunk_size - 1) // chunk_size
    tiles_s = (length + BLOCK_M - 1) // BLOCK_M
    p_flag = tl.load(base + i_s) + (i_h * num_chunks_s + b_sel) * tiles_s + i_m
    tl.store(flags + p_flag, tl.full([BLOCK_M, BLOCK_K], 1, tl.int8), mask=b_sel >= 0)


@triton.jit
def routed_bwd_dkv_kernel(
    q, k, v, sel, do, lse, delta, dk, dv, cu_seqlens, tile_pos, tile_lo, tile_hi, row_pos,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    chunk_size, top_k, num_chunks, num_slices, num_heads, num_kv_heads, head_dim, head_dim_v, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk, dv of a (seq, kv head, chunk, BLOCK_N slice): sums over the group's q heads and the query tiles
    with a row that selected the chunk, read from the inverted index (tile_pos[tile_lo[r]:tile_hi[r]] - row_pos[r]
    are the tiles of row r = (seq, q head, chunk), in increasing order). One writer per element: deterministic,
    no atomics."""
    pid = tl.program_id(0).to(tl.int64)
    i_kh = pid % num_kv_heads
    i_j = (pid // num_kv_heads) % num_slices
    i_c = (pid // (num_kv_heads * num_slices)) % num_chunks
    i_s = pid // (num_kv_heads * num_slices * num_chunks)
    bos = tl.load(cu_seqlens + i_s).to(tl.int64)
    length = tl.load(cu_seqlens + i_s + 1).to(tl.int64) - bos
    group = num_heads // num_kv_heads
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < head_dim_v
    o_k = tl.arange(0, BLOCK_K)
    n0 = i_c * chunk_size + i_j * BLOCK_N
    n_end = tl.minimum((i_c + 1) * chunk_size, length)  # end of the chunk's keys
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < n_end
    b_k = tl.load(k + (bos + o_n[:, None]) * stride_kt + i_kh * stride_kh + o_d[None, :],
                  mask=m_n[:, None] & m_d[None, :], other=0.0)
    b_v = tl.load(v + (bos + o_n[:, None]) * stride_vt + i_kh * stride_vh + o_dv[None, :],
                  mask=m_n[:, None] & m_dv[None, :], other=0.0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for i_g in range(0, group):
        i_h = i_kh * group + i_g
        r = (i_s * num_heads + i_h) * num_chunks + i_c
        e_lo = tl.load(tile_lo + r)
        e_hi = tl.where(n0 < n_end, tl.load(tile_hi + r), e_lo)  # a slice past the last key: nothing to sum
        p0 = tl.load(row_pos + r)
        for e in range(e_lo, e_hi):
            m0 = (tl.load(tile_pos + e) - p0) * BLOCK_M
            o_m = m0 + tl.arange(0, BLOCK_M)
            m_m = o_m < length
            p_row = (bos + o_m) * num_heads + i_h
            b_sel = tl.load(sel + p_row[:, None] * top_k + o_k[None, :],
                            mask=m_m[:, None] & (o_k[None, :] < top_k), other=-1)
            b_rows = tl.max(tl.where(b_sel == i_c, 1, 0), axis=1) > 0  # the tile's rows that selected i_c
            b_q = tl.load(q + (bos + o_m[:, None]) * stride_qt + i_h * stride_qh + o_d[None, :],
                          mask=m_m[:, None] & m_d[None, :], other=0.0)
            b_do = tl.load(do + (bos + o_m[:, None]) * stride_dot + i_h * stride_doh + o_dv[None, :],
                           mask=m_m[:, None] & m_dv[None, :], other=0.0)
            b_lse = tl.load(lse + p_row, mask=m_m, other=0.0)
            b_delta = tl.load(delta + p_row, mask=m_m, other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale
            mask = b_rows[:, None] & m_n[None, :]
            if CAUSAL:
                mask = mask & (o_n[None, :] <= o_m[:, None])
            b_p = tl.where(mask, tl.exp(b_s - b_lse[:, None]), 0.0)
            b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PREC)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PREC)
    p_dk = dk + (bos + o_n[:, None]) * stride_dkt + i_kh * stride_dkh + o_d[None, :]
    tl.store(p_dk, (scale * b_dk).to(dk.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])
    p_dv = dv + (bos + o_n[:, None]) * stride_dvt + i_kh * stride_dvh + o_dv[None, :]
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None] & m_dv[None, :])


def _blocks(q, v, chunk_size, top_k):
    """Constexpr tile sizes shared by the kernels: D, Dv padded to powers of 2 (>= 16, tl.dot's minimum), key
    blocks inside a chunk, and the fp32 dot precision (ieee = exact fp32; tf32 is ignored for 16-bit inputs).
    Key blocks of 32, not 64: at 64 (bf16, 64-row tiles) the forward and dq spilled on sm_80/86 (up to 156 bytes)
    and dq needed 104 KB of shared memory at D = 128, more than sm_86/89 give a block (bench/resources.py)."""
    return dict(
        BLOCK_N=max(16, min(next_pow2(chunk_size), 32)),
        BLOCK_K=next_pow2(top_k),
        BLOCK_D=max(16, next_pow2(q.shape[-1])),
        BLOCK_DV=max(16, next_pow2(v.shape[-1])),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _warps(rows):
    """Warps of a forward/dq program with `rows` = BLOCK_M * pack rows: 8 for 64 rows (the fp32 accumulator, the
    scores and their 64-bit addresses then fit in registers without spills on sm_80/86/90; 4 warps needed 250+
    registers per thread), else 4."""
    return 8 if rows >= 64 else 4


# Forced q heads per forward/dq program (a power of 2 dividing the GQA group), or None for the heuristic.
# The benchmark sets it to compare packings; users have no reason to.
HEADS_PER_TILE = None


def heads_per_tile(num_heads, num_kv_heads, head_dim):
    """q heads of one kv group that a forward/dq program packs into its rows (BLOCK_M = 16 * pack): they share
    every K/V block load and give tl.dot 32 or 64 rows instead of 16. At most 4 (64 rows) and 64 * 128
    fp32 accumulator values per program, the size flash attention uses for one warp group; the largest power
    of 2 that divides the group. Each extra head adds its own selections to the tile's union of chunks, so
    the best packing is a measurement (bench: HEADS_PER_TILE); this default is a first guess, GPU-unmeasured."""
    group = num_heads // num_kv_heads
    limit = HEADS_PER_TILE or min(4, max(1, 8192 // (BLOCK_M * max(16, next_pow2(head_dim)))))
    pack = 1
    while pack * 2 <= limit and group % (pack * 2) == 0:
        pack *= 2
    return pack


def _tiles_by_chunk(sel, cu, max_seqlen, chunk_size, top_k):
    """Inverted index of the selection for the dk/dv pass: for each row r = (seq, q head, chunk), the query
    tiles with a row that selected the chunk, in increasing order. Returns (tile_pos, tile_lo, tile_hi,
    row_pos), all int64: row r's tiles are tile_pos[tile_lo[r]:tile_hi[r]] - row_pos[r]; r indexes
    (S, Hq, ceil(max_seqlen / chunk_size)) and is empty for chunks a sequence does not have.

    Built as a byte table of (seq, q head, chunk, tile) flags that the selection marks, then its nonzero
    positions: a counting sort whose memory is Hq * sum_s M_s * tiles_s bytes (33 MB for one 128K sequence,
    32 heads, chunk 1024) plus 8 bytes per (tile, head, selected chunk), instead of the 8 bytes per
    (token, head, slot) of a sort over the selection itself. Costs two host syncs (the table's size, nonzero).
    The table grows as Hq * N^2 / (16 * chunk_size): 512 MB at N = 256K, Hq = 32, chunk 256; a sort-based
    build for small chunks at very long N is future work (GPU-unmeasured)."""
    t, hq, _ = sel.shape
    s = cu.numel() - 1
    dev = sel.device
    lengths = (cu[1:] - cu[:-1]).to(torch.int64)
    chunks_s = (lengths + chunk_size - 1) // chunk_size
    tiles_s = (lengths + BLOCK_M - 1) // BLOCK_M
    base = torch.zeros(s + 1, dtype=torch.int64, device=dev)
    torch.cumsum(hq * chunks_s * tiles_s, 0, out=base[1:])
    total = int(base[-1])
    flags = torch.zeros(max(total, 1), dtype=torch.int8, device=dev)
    num_tiles = triton.cdiv(max_seqlen, BLOCK_M)
    if total:
        mark_tiles_kernel[(s * num_tiles * hq,)](sel, cu, base, flags, top_k, num_tiles, hq, chunk_size,
                                                  BLOCK_M=BLOCK_M, BLOCK_K=next_pow2(top_k))
    tile_pos = flags[:total].nonzero().squeeze(1)
    num_chunks = triton.cdiv(max_seqlen, chunk_size)
    c = torch.arange(num_chunks, device=dev)[None, None, :]
    h = torch.arange(hq, device=dev)[None, :, None]
    row_pos = base[:-1, None, None] + (h * chunks_s[:, None, None] + c) * tiles_s[:, None, None]
    tile_lo = torch.searchsorted(tile_pos, row_pos.flatten())
    tile_hi = torch.searchsorted(tile_pos, (row_pos + tiles_s[:, None, None]).flatten())
    live = (c < chunks_s[:, None, None]).expand(s, hq, num_chunks)  # chunks the sequence has
    tile_hi = torch.where(live.flatten(), tile_hi, tile_lo)
    if tile_pos.numel() == 0:  # a kernel argument needs storage; no program reads it
        tile_pos = torch.zeros(1, dtype=torch.int64, device=dev)
    return tile_pos, tile_lo, tile_hi, row_pos.flatten().contiguous()


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def routed_attention_fwd_triton(q, k, v, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None,
                                scale=None):
    """Routed (MoBA) attention forward with Triton: each query attends to the chunks route_chunks selects.

    Args:
        q: (B, N, Hq, D) or varlen (T, Hq, D), fp16/bf16/fp32. k: like q with Hkv heads (Hq % Hkv == 0).
        v: (.., Hkv, Dv), same dtype. chunk_size, top_k: ints >= 1 (top_k counts the own chunk).
        causal: bool, default True. cu_seqlens: optional (S+1,) int32/int64; max_seqlen: int with it.
        scale: float, default D ** -0.5.
    Returns:
        o: (.., Hq, Dv) in q.dtype; lse: (.., Hq) fp32 (fp64 for fp64 inputs; the kernel computes in fp32),
        natural-log log-sum-exp of the scaled scores.
    Example:
        o, lse = routed_attention_fwd_triton(q, k, v, 64, 8)
        o, lse = routed_attention_fwd_triton(q, k, v, 64, 8, cu_seqlens=cu, max_seqlen=4096)
    Argument checks are the op's job (routed_attention/op.py check_args).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sel = route_chunks_triton(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)
    qp, cu, max_seqlen = as_packed(q, cu_seqlens, max_seqlen)
    kp, _, _ = as_packed(k, cu_seqlens, max_seqlen)
    vp, _, _ = as_packed(v, cu_seqlens, max_seqlen)
    t, hq, d = qp.shape
    hkv, dv = kp.shape[1], vp.shape[2]
    o = torch.empty(t, hq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(t, hq, device=q.device, dtype=torch.float32)
    num_tiles = triton.cdiv(max_seqlen, BLOCK_M)
    pack = heads_per_tile(hq, hkv, max(d, dv))
    grid = (cu.numel() - 1) * num_tiles * (hq // pack)
    if t and grid:
        routed_fwd_kernel[(grid,)](
            qp, kp, vp, sel.reshape(t, hq, top_k), o, lse, cu,
            qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
            o.stride(0), o.stride(1), chunk_size, top_k, num_tiles, hq, hq // hkv, d, dv, scale,
            CAUSAL=bool(causal), BLOCK_M=BLOCK_M * pack, PACK=pack, **_blocks(q, v, chunk_size, top_k),
            num_warps=_warps(BLOCK_M * pack))
    return o.reshape(*q.shape[:-1], dv), lse.to(_lse_dtype(q.dtype)).reshape(q.shape[:-1])


def routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal=True, cu_seqlens=None,
                                max_seqlen=None, scale=None):
    """Gradients of routed_attention_fwd_triton (README.md "Backward"); the selection is recomputed.

    Args:
        do: like o (.., Hq, Dv); dlse: like lse (.., Hq) (any float dtype, may be stride-0 expanded);
        q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale: as in the forward;
        o: the forward output; lse: the forward lse.
    Returns:
        (dq like q, dk like k, dv like v), in the input dtype; dk, dv summed over a kv group's q heads.
        Deterministic: no atomics (dk/dv programs own their key slice).
    Example:
        dq, dk, dv = routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, 64, 8, cu_seqlens=cu, max_seqlen=4096)
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sel = route_chunks_triton(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)
    qp, cu, max_seqlen = as_packed(q, cu_seqlens, max_seqlen)
    kp, _, _ = as_packed(k, cu_seqlens, max_seqlen)
    vp, _, _ = as_packed(v, cu_seqlens, max_seqlen)
    dop, _, _ = as_packed(do, cu_seqlens, max_seqlen)
    op_, _, _ = as_packed(o, cu_seqlens, max_seqlen)
    t, hq, d = qp.shape
    hkv, dv_dim = kp.shape[1], vp.shape[2]
    # delta_t = <dO_t, O_t> - dlse_t, (T, Hq) fp32: O(T * Hq * Dv), done once instead of per key slice
    delta = ((dop.float() * op_.float()).sum(-1) - dlse.reshape(t, hq).float()).contiguous()
    lse_p = lse.reshape(t, hq).float().contiguous()
    sel = sel.reshape(t, hq, top_k)
    dq = torch.empty(qp.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(kp.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(vp.shape, device=q.device, dtype=v.dtype)
    s = cu.numel() - 1
    num_tiles = triton.cdiv(max_seqlen, BLOCK_M)
    blocks = _blocks(q, v, chunk_size, top_k)
    if t and s * num_tiles * hq:
        common = (chunk_size, top_k)
        pack = heads_per_tile(hq, hkv, max(d, dv_dim))
        routed_bwd_dq_kernel[(s * num_tiles * (hq // pack),)](
            qp, kp, vp, sel, dop, lse_p, delta, dq, cu,
            qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
            dop.stride(0), dop.stride(1), dq.stride(0), dq.stride(1),
            *common, num_tiles, hq, hq // hkv, d, dv_dim, scale,
            CAUSAL=bool(causal), BLOCK_M=BLOCK_M * pack, PACK=pack, **blocks, num_warps=_warps(BLOCK_M * pack))
        num_chunks = triton.cdiv(max_seqlen, chunk_size)
        num_slices = triton.cdiv(chunk_size, blocks["BLOCK_N"])
        index = _tiles_by_chunk(sel, cu, max_seqlen, chunk_size, top_k)
        routed_bwd_dkv_kernel[(s * num_chunks * num_slices * hkv,)](
            qp, kp, vp, sel, dop, lse_p, delta, dk, dv, cu, *index,
            qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
            dop.stride(0), dop.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            *common, num_chunks, num_slices, hq, hkv, d, dv_dim, scale,
            CAUSAL=bool(causal), BLOCK_M=BLOCK_M, **blocks, num_warps=4)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
