"""Triton kernels of routed_attention (MoBA), forward and backward; maths in README.md.

Design: query-tile centric, chosen because every query row carries its own selection and this is the
simplest layout that stays exact and deterministic (no atomics, no partial-result merge):

- Forward, one program per (sequence, tile of 16 tokens, PACK q heads of one kv group; see heads_per_tile), so
  BLOCK_M = 16 * PACK rows; programs enumerate only the real (sequence, tile) pairs (seq_blocks in
  routing_kernels/_triton/layout.py), so a skewed varlen batch launches no idle programs. It loads the tile's
  selection (BLOCK_M x min(top_k, M) int32, from route_chunks' select_chunks) and walks exactly the union of its
  rows' chunks in increasing order (next chunk = the smallest selected index above the current one, one
  BLOCK_M x BLOCK_K min). A selected chunk is streamed in BLOCK_N key blocks with the flash online softmax,
  masking per row (row selected j, and key <= query when causal).
- Backward dq: the same walk per query tile, recomputing P from the saved lse.
- Backward dk/dv: one program per (real (sequence, chunk) pair, BLOCK_N slice of the chunk, kv head). It loops
  over the group's q heads and, through an inverted index of the selection (_chunk_tile_flags: a byte per
  (sequence, q head, chunk, query tile), set when a row of the tile selected the chunk), only over the tiles
  that selected the chunk (and, when causal, start at the slice's first key). It accumulates dK, dV in
  registers; each output element has one writer, so the result is deterministic.
- No launcher reads device data on the host: every size (grids, the flag table) is an upper bound from shapes
  and arguments, so a GPU caller is never blocked (python_tests/test_triton_no_sync.py).

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

from ..._layout import accum_dtype
from ..._triton import next_pow2
from ..._triton.layout import as_packed, key_layout, program_coords, seq_block, seq_blocks, seq_span
from ..route_chunks.triton import select_chunks

BLOCK_M = 16  # query tokens per tile (tl.dot needs >= 16 rows); forward/dq rows = BLOCK_M * heads_per_tile


@triton.jit
def _query_rows(cu_seqlens, tile_first, tile_seq, num_heads, BLOCK_M: tl.constexpr, PACK: tl.constexpr):
    """A program's BLOCK_M rows: BLOCK_M // PACK consecutive tokens x PACK consecutive q heads of one kv
    group (row r = token r // PACK, head r % PACK). Programs enumerate the real (sequence, tile of
    BLOCK_M // PACK tokens) pairs (seq_blocks) x the head packs. Returns (seq, tile, first head, first token
    of the sequence, its length, tokens (BLOCK_M,), heads (BLOCK_M,), row mask)."""
    i_g, _, i_p = program_coords(1, num_heads // PACK)
    i_s, i_m, bos, length = seq_block(cu_seqlens, tile_first, tile_seq, i_g)
    o_r = tl.arange(0, BLOCK_M)
    o_m = i_m * (BLOCK_M // PACK) + o_r // PACK  # [BLOCK_M] token of each row
    o_h = i_p * PACK + o_r % PACK  # [BLOCK_M] q head of each row
    return i_s, i_m, i_p * PACK, bos, length, o_m, o_h, o_m < length


@triton.jit
def _chunk_range(o_m, length, chunk_size, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Chunks a query tile may attend to: [0, end), and keys past `last` are never visible."""
    # the tile's last query, clamped to the sequence's last token: a tile past the end (a padding program)
    # gets length - 1, and only an empty sequence gives -1 (end = 0). Rows past the end load no selection
    # (b_sel = -1), so such a tile walks no chunk whatever `end` is.
    last = tl.minimum(tl.max(o_m, axis=0), length - 1)
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
    b_rows = tl.max(tl.where(b_sel == j, 1, 0), axis=1) > 0  # [BLOCK_M]
    k_end = tl.minimum((j + 1) * chunk_size, length)
    if CAUSAL:
        k_end = tl.minimum(k_end, last + 1)
    return b_rows, k_end


@triton.jit
def _scores(b_q, k, bos, o_n, m_n, i_kh, stride_kt, stride_kh, o_d, m_d, o_m, b_rows, scale,
            CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scaled scores (BLOCK_M, BLOCK_N) of a key block, -inf where a row may not see a key; and K."""
    p_k = k + (bos + o_n[:, None]) * stride_kt + i_kh * stride_kh + o_d[None, :]
    b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale  # [BLOCK_M, BLOCK_N]
    mask = b_rows[:, None] & m_n[None, :]
    if CAUSAL:
        mask = mask & (o_n[None, :] <= o_m[:, None])
    return tl.where(mask, b_s, float("-inf")), b_k


@triton.jit
def routed_fwd_kernel(
    q, k, v, sel, o, lse, cu_seqlens, cu_seqlens_k, tile_first, tile_seq,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    chunk_size, top_k, num_heads, group, head_dim, head_dim_v, scale,
    CAUSAL: tl.constexpr, SEPARATE_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    PACK: tl.constexpr,
):
    """o, lse of a (seq, query tile, PACK q heads): flash online softmax over the rows' selected chunks.
    SEPARATE_KEYS: k/v have their own offsets cu_seqlens_k (chunked prefill, Lk >= Lq): query row i sits at key
    position Lk - Lq + i; otherwise cu_seqlens_k is not read and positions are the rows."""
    i_s, _, i_h0, bos, length, o_m, o_h, m_m = _query_rows(cu_seqlens, tile_first, tile_seq, num_heads, BLOCK_M,
                                                            PACK)
    if SEPARATE_KEYS:
        bos_k, length_k = seq_span(cu_seqlens_k, i_s)
    else:
        bos_k, length_k = bos, length
    o_p = o_m + (length_k - length)  # [BLOCK_M] key position of each row (rows past Lq: past Lk, masked)
    i_kh = i_h0 // group
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < head_dim_v
    o_k = tl.arange(0, BLOCK_K)
    b_q = tl.load(q + (bos + o_m[:, None]) * stride_qt + o_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    p_sel = sel + ((bos + o_m[:, None]) * num_heads + o_h[:, None]) * top_k + o_k[None, :]
    b_sel = tl.load(p_sel, mask=m_m[:, None] & (o_k[None, :] < top_k), other=-1)  # [BLOCK_M, BLOCK_K]
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # in key positions: o_p and Lk (= shift + Lq), so the helpers of the training layout serve unchanged
    last, end = _chunk_range(o_p, length_k, chunk_size, CAUSAL, BLOCK_M)
    j = _first_chunk(b_sel, -1)
    while j < end:  # the union of the rows' selected chunks
        b_rows, k_end = _chunk_keys(b_sel, j, chunk_size, length_k, last, CAUSAL)
        for n0 in range(j * chunk_size, k_end, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < k_end
            b_s, b_k = _scores(b_q, k, bos_k, o_n, m_n, i_kh, stride_kt, stride_kh, o_d, m_d, o_p, b_rows,
                               scale, CAUSAL, DOT_PREC)
            b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
            b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)  # rows with nothing yet: exp(-inf) = 0
            b_p = tl.exp(b_s - b_ref[:, None])  # [BLOCK_M, BLOCK_N]
            b_alpha = tl.exp(b_max - b_ref)
            p_v = v + (bos_k + o_n[:, None]) * stride_vt + i_kh * stride_vh + o_dv[None, :]
            b_v = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
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
    q, k, v, sel, do, lse, delta, dq, cu_seqlens, tile_first, tile_seq,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    chunk_size, top_k, num_heads, group, head_dim, head_dim_v, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr, PACK: tl.constexpr,
):
    """dq of a (seq, query tile, PACK q heads) = scale * sum over selected keys of P * (dP - delta) * k."""
    i_s, _, i_h0, bos, length, o_m, o_h, m_m = _query_rows(cu_seqlens, tile_first, tile_seq, num_heads, BLOCK_M,
                                                            PACK)
    i_kh = i_h0 // group
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < head_dim_v
    o_k = tl.arange(0, BLOCK_K)
    b_q = tl.load(q + (bos + o_m[:, None]) * stride_qt + o_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    b_do = tl.load(do + (bos + o_m[:, None]) * stride_dot + o_h[:, None] * stride_doh + o_dv[None, :],
                   mask=m_m[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_M, BLOCK_DV]
    p_row = (bos + o_m) * num_heads + o_h
    b_lse = tl.load(lse + p_row, mask=m_m, other=0.0)  # [BLOCK_M]
    b_delta = tl.load(delta + p_row, mask=m_m, other=0.0)  # [BLOCK_M]
    b_sel = tl.load(sel + p_row[:, None] * top_k + o_k[None, :], mask=m_m[:, None] & (o_k[None, :] < top_k),
                    other=-1)  # [BLOCK_M, BLOCK_K]
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
            b_p = tl.exp(b_s - b_lse[:, None])  # [BLOCK_M, BLOCK_N]; masked scores are -inf: p = 0
            p_v = v + (bos + o_n[:, None]) * stride_vt + i_kh * stride_vh + o_dv[None, :]
            b_v = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
            b_ds = b_p * (b_dp - b_delta[:, None])  # [BLOCK_M, BLOCK_N]
            b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PREC)
        j = _first_chunk(b_sel, j)
    p_dq = dq + (bos + o_m[:, None]) * stride_dqt + o_h[:, None] * stride_dqh + o_d[None, :]
    tl.store(p_dq, (scale * b_dq).to(dq.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit
def mark_tiles_kernel(sel, cu_seqlens, tile_first, tile_seq, flags, flag_base, num_flags, top_k, num_heads,
                      chunk_size, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """flags[flag_base[s] + (h * M_s + c) * tiles_s + tile] = 1 when a row of (s, tile, h) selected chunk c, where
    M_s and tiles_s are sequence s's chunk and tile counts: the (chunk -> query tiles) table of the dk/dv pass."""
    i_s, i_m, i_h, bos, length, o_m, _, m_m = _query_rows(cu_seqlens, tile_first, tile_seq, num_heads, BLOCK_M, 1)
    o_k = tl.arange(0, BLOCK_K)
    b_sel = tl.load(sel + ((bos + o_m[:, None]) * num_heads + i_h) * top_k + o_k[None, :],
                    mask=m_m[:, None] & (o_k[None, :] < top_k), other=-1)  # [BLOCK_M, BLOCK_K]
    num_chunks_s = (length + chunk_size - 1) // chunk_size
    tiles_s = (length + BLOCK_M - 1) // BLOCK_M
    p_flag = tl.load(flag_base + i_s) + (i_h * num_chunks_s + b_sel) * tiles_s + i_m  # [BLOCK_M, BLOCK_K]
    # p_flag < num_flags only fails for a max_seqlen below the longest sequence: stay in bounds
    tl.store(flags + p_flag, tl.full([BLOCK_M, BLOCK_K], 1, tl.int8), mask=(b_sel >= 0) & (p_flag < num_flags))


@triton.jit
def routed_bwd_dkv_kernel(
    q, k, v, sel, do, lse, delta, dk, dv, cu_seqlens, chunk_first, chunk_seq, flags, flag_base, num_flags,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    chunk_size, top_k, num_slices, num_heads, num_kv_heads, head_dim, head_dim_v, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk, dv of a (seq, chunk, BLOCK_N slice, kv head): sums over the group's q heads and the query tiles with
    a row that selected the chunk, read from the flag table (mark_tiles_kernel) in increasing tile order.
    Programs enumerate the real (sequence, chunk) pairs (seq_blocks). One writer per element: deterministic,
    no atomics."""
    i_g, i_j, i_kh = program_coords(num_slices, num_kv_heads)
    i_s, i_c, bos, length = seq_block(cu_seqlens, chunk_first, chunk_seq, i_g)
    group = num_heads // num_kv_heads
    num_chunks_s = (length + chunk_size - 1) // chunk_size
    tiles_s = (length + BLOCK_M - 1) // BLOCK_M
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
                  mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    b_v = tl.load(v + (bos + o_n[:, None]) * stride_vt + i_kh * stride_vh + o_dv[None, :],
                  mask=m_n[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # The query tiles that can see the slice: causal, a key is seen from its own position on, so tiles before
    # the one holding n0 are skipped (their rows may have selected the chunk, for an earlier slice). A slice past
    # the chunk's last key, or a padding program (a chunk past its sequence's end), has none.
    if CAUSAL:
        t_lo = n0 // BLOCK_M
    else:
        t_lo = n0 * 0
    t_hi = tl.where(n0 < n_end, tiles_s, t_lo)
    for i_q in range(0, group):
        i_h = i_kh * group + i_q
        f_row = tl.load(flag_base + i_s) + (i_h * num_chunks_s + i_c) * tiles_s  # flags of (s, i_h, i_c)
        for f0 in range(t_lo, t_hi, BLOCK_F):
            o_f = f0 + tl.arange(0, BLOCK_F)  # [BLOCK_F] query tiles
            m_f = (o_f < t_hi) & (f_row + o_f < num_flags)
            b_f = tl.load(flags + f_row + o_f, mask=m_f, other=0) != 0  # [BLOCK_F] tile selected the chunk
            i_t = tl.min(tl.where(b_f, o_f, t_hi), axis=0)
            while i_t < t_hi:  # the flagged tiles of this block, in increasing order
                o_m = i_t * BLOCK_M + tl.arange(0, BLOCK_M)
                m_m = o_m < length
                p_row = (bos + o_m) * num_heads + i_h
                b_sel = tl.load(sel + p_row[:, None] * top_k + o_k[None, :],
                                mask=m_m[:, None] & (o_k[None, :] < top_k), other=-1)  # [BLOCK_M, BLOCK_K]
                b_rows = tl.max(tl.where(b_sel == i_c, 1, 0), axis=1) > 0  # [BLOCK_M] rows that selected i_c
                b_q = tl.load(q + (bos + o_m[:, None]) * stride_qt + i_h * stride_qh + o_d[None, :],
                              mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
                b_do = tl.load(do + (bos + o_m[:, None]) * stride_dot + i_h * stride_doh + o_dv[None, :],
                               mask=m_m[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_M, BLOCK_DV]
                b_lse = tl.load(lse + p_row, mask=m_m, other=0.0)  # [BLOCK_M]
                b_delta = tl.load(delta + p_row, mask=m_m, other=0.0)  # [BLOCK_M]
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale  # [BLOCK_M, BLOCK_N]
                mask = b_rows[:, None] & m_n[None, :]
                if CAUSAL:
                    mask = mask & (o_n[None, :] <= o_m[:, None])
                b_p = tl.where(mask, tl.exp(b_s - b_lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
                b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PREC)
                b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
                b_ds = b_p * (b_dp - b_delta[:, None])  # [BLOCK_M, BLOCK_N]
                b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PREC)
                i_t = tl.min(tl.where(b_f & (o_f > i_t), o_f, t_hi), axis=0)
    p_dk = dk + (bos + o_n[:, None]) * stride_dkt + i_kh * stride_dkh + o_d[None, :]
    tl.store(p_dk, (scale * b_dk).to(dk.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])
    p_dv = dv + (bos + o_n[:, None]) * stride_dvt + i_kh * stride_dvh + o_dv[None, :]
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None] & m_dv[None, :])


def _blocks(q, v, chunk_size, width):
    """Constexpr tile sizes shared by the kernels: D, Dv padded to powers of 2 (>= 16, tl.dot's minimum), key
    blocks inside a chunk, the selection's columns (width = min(top_k, M), see route_chunks' select_chunks) and
    the fp32 dot precision (ieee = exact fp32; tf32 is ignored for 16-bit inputs).
    Key blocks of 32, not 64: at 64 (bf16, 64-row tiles) the forward and dq spilled on sm_80/86 (up to 156 bytes)
    and dq needed 104 KB of shared memory at D = 128, more than sm_86/89 give a block (bench/resources.py)."""
    return dict(
        BLOCK_N=max(16, min(next_pow2(chunk_size), 32)),
        BLOCK_K=next_pow2(width),
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


# Flags a dk/dv program reads per vector load (BLOCK_F = min(FLAG_BLOCK, tiles of the longest sequence)): 128
# bytes, one L2 line. Tests lower it to run several flag blocks per chunk on short sequences.
FLAG_BLOCK = 128


def flag_table_size(num_tokens, num_seqs, max_seqlen, num_heads, chunk_size):
    """An upper bound, from shapes only, of the flag table's Hq * sum_s M_s * tiles_s bytes (M_s, tiles_s:
    ceil(L_s / chunk_size), ceil(L_s / 16)). With c = chunk_size, b = BLOCK_M:
        ceil(L / c) * ceil(L / b) <= (L + c - 1) (L + b - 1) / (c b),  sum_s L_s^2 <= max_seqlen * T,
    so sum_s M_s tiles_s <= (max_seqlen T + (c + b - 2) T + S (c - 1) (b - 1)) / (c b); also <= S * M * tiles
    for the longest sequence's M, tiles. Within 1% of the real size for one long sequence, ~15% for one 64K
    sequence beside 100 short ones (chunk 1024)."""
    c, b = chunk_size, BLOCK_M
    tight = (max_seqlen * num_tokens + (c + b - 2) * num_tokens + num_seqs * (c - 1) * (b - 1)) // (c * b)
    return num_heads * min(num_seqs * triton.cdiv(max_seqlen, c) * triton.cdiv(max_seqlen, b), tight)


def _chunk_tile_flags(sel, cu, tiles, max_seqlen, chunk_size):
    """The dk/dv pass's inverted index of the selection: a byte table with one row of tiles_s flags per (seq, q
    head, chunk), flag t = 1 when a row of query tile t selected the chunk (mark_tiles_kernel). Returns (flags
    int8, flag_base (S+1,) int64: the first flag of each sequence, size of the table).

    Everything on the device: the table's size is an upper bound from shapes (flag_table_size), the per-sequence
    bases a cumsum, so no host sync; the dk/dv kernel scans a row's flags in vector loads of BLOCK_F. Memory:
    Hq * sum_s M_s * tiles_s bytes (33 MB for one 128K sequence, 32 heads, chunk 1024), growing as
    Hq * N^2 / (16 * chunk_size): 512 MB at N = 256K, Hq = 32, chunk 256; a sort-based build for small chunks at
    very long N is future work (GPU-unmeasured)."""
    t, hq, width = sel.shape
    s = cu.numel() - 1
    dev = sel.device
    lengths = (cu[1:] - cu[:-1]).to(torch.int64)
    chunks_s = (lengths + chunk_size - 1) // chunk_size
    tiles_s = (lengths + BLOCK_M - 1) // BLOCK_M
    flag_base = torch.zeros(s + 1, dtype=torch.int64, device=dev)
    torch.cumsum(hq * chunks_s * tiles_s, 0, out=flag_base[1:])
    size = flag_table_size(t, s, max_seqlen, hq, chunk_size)
    flags = torch.zeros(max(size, 1), dtype=torch.int8, device=dev)
    tile_first, tile_seq, num_tiles = tiles
    if num_tiles * hq:
        mark_tiles_kernel[(num_tiles * hq,)](sel, cu, tile_first, tile_seq, flags, flag_base, size, width, hq,
                                             chunk_size, BLOCK_M=BLOCK_M, BLOCK_K=next_pow2(width))
    return flags, flag_base, size


def routed_attention_fwd_triton(q, k, v, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None,
                                scale=None, cu_seqlens_k=None, max_seqlen_k=None):
    """Routed (MoBA) attention forward with Triton: each query attends to the chunks route_chunks selects.

    Args:
        q: (B, N, Hq, D) or varlen (T, Hq, D), fp16/bf16/fp32. k: like q with Hkv heads (Hq % Hkv == 0), or
            longer (chunked prefill): dense (B, Nk, Hkv, D), Nk >= Nq, or packed (Tk, Hkv, D) with cu_seqlens_k;
            the Lq queries of a sequence with Lk keys are its last positions (query i at Lk - Lq + i).
        v: (.., Hkv, Dv) laid out like k, same dtype. chunk_size, top_k: ints >= 1 (top_k counts the own chunk; it may exceed
            the number of chunks M: the kernels' tiles are sized by min(top_k, M)).
        causal: bool, default True. cu_seqlens: optional (S+1,) int32/int64 (any strides); max_seqlen: int with
            it, at least the longest sequence.
        scale: float, default D ** -0.5.
        cu_seqlens_k: optional (S+1,) int32/int64, the keys' own offsets (Lk >= Lq each); max_seqlen_k: int, at
            least the longest key sequence (default k.shape[0]). Default None: k laid out like q (or dense, longer).
    Returns:
        o: (.., Hq, Dv) in q.dtype; lse: (.., Hq) fp32 (fp64 for fp64 inputs; the kernel computes in fp32),
        natural-log log-sum-exp of the scaled scores.
    Example:
        o, lse = routed_attention_fwd_triton(q, k, v, 64, 8)
        o, lse = routed_attention_fwd_triton(q, k, v, 64, 8, cu_seqlens=cu, max_seqlen=4096)
        o, lse = routed_attention_fwd_triton(q, k, v, 64, 8, True, cu_q, 512, None, cu_seqlens_k=cu_k,
                                             max_seqlen_k=4096)  # chunked prefill
    The backward (routed_attention_bwd_triton) is for k laid out like q only.
    Argument checks are the op's job (routed_attention/op.py check_args). No host sync.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sel, width = select_chunks(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, None, cu_seqlens_k,
                               max_seqlen_k)
    cu_seqlens_k, max_seqlen_k, separate = key_layout(q, k, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    qp, cu, max_seqlen = as_packed(q, cu_seqlens, max_seqlen)
    kp, cu_k, _ = as_packed(k, cu_seqlens_k, max_seqlen_k)
    vp, _, _ = as_packed(v, cu_seqlens_k, max_seqlen_k)
    t, hq, d = qp.shape
    hkv, dv = kp.shape[1], vp.shape[2]
    o = torch.empty(t, hq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(t, hq, device=q.device, dtype=torch.float32)
    tile_first, tile_seq, num_tiles = seq_blocks(cu, t, max_seqlen, BLOCK_M)
    pack = heads_per_tile(hq, hkv, max(d, dv))
    grid = num_tiles * (hq // pack)
    if t and grid:
        routed_fwd_kernel[(grid,)](
            qp, kp, vp, sel, o, lse, cu, cu_k, tile_first, tile_seq,
            qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
            o.stride(0), o.stride(1), chunk_size, width, hq, hq // hkv, d, dv, scale,
            CAUSAL=bool(causal), SEPARATE_KEYS=separate, BLOCK_M=BLOCK_M * pack, PACK=pack,
            **_blocks(q, v, chunk_size, width), num_warps=_warps(BLOCK_M * pack))
    return o.reshape(*q.shape[:-1], dv), lse.to(accum_dtype(q.dtype)).reshape(q.shape[:-1])


def routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal=True, cu_seqlens=None,
                                max_seqlen=None, scale=None):
    """Gradients of routed_attention_fwd_triton (README.md "Backward"); the selection is recomputed.

    Args:
        do: like o (.., Hq, Dv); dlse: like lse (.., Hq) (any float dtype, may be stride-0 expanded);
        q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale: as in the forward;
        o: the forward output; lse: the forward lse.
    Returns:
        (dq like q, dk like k, dv like v), in the input dtype; dk, dv summed over a kv group's q heads.
        Deterministic: no atomics (dk/dv programs own their key slice). No host sync.
    Example:
        dq, dk, dv = routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, 64, 8, cu_seqlens=cu, max_seqlen=4096)
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sel, width = select_chunks(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)
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
    dq = torch.empty(qp.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(kp.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(vp.shape, device=q.device, dtype=v.dtype)
    tiles = seq_blocks(cu, t, max_seqlen, BLOCK_M)
    num_tiles = tiles[2]
    blocks = _blocks(q, v, chunk_size, width)
    if t and num_tiles * hq:
        common = (chunk_size, width)
        pack = heads_per_tile(hq, hkv, max(d, dv_dim))
        routed_bwd_dq_kernel[(num_tiles * (hq // pack),)](
            qp, kp, vp, sel, dop, lse_p, delta, dq, cu, tiles[0], tiles[1],
            qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
            dop.stride(0), dop.stride(1), dq.stride(0), dq.stride(1),
            *common, hq, hq // hkv, d, dv_dim, scale,
            CAUSAL=bool(causal), BLOCK_M=BLOCK_M * pack, PACK=pack, **blocks, num_warps=_warps(BLOCK_M * pack))
        flags = _chunk_tile_flags(sel, cu, tiles, max_seqlen, chunk_size)
        chunk_first, chunk_seq, num_chunks = seq_blocks(cu, t, max_seqlen, chunk_size)
        num_slices = triton.cdiv(chunk_size, blocks["BLOCK_N"])
        block_f = min(FLAG_BLOCK, next_pow2(triton.cdiv(max_seqlen, BLOCK_M)))
        routed_bwd_dkv_kernel[(num_chunks * num_slices * hkv,)](
            qp, kp, vp, sel, dop, lse_p, delta, dk, dv, cu, chunk_first, chunk_seq, *flags,
            qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
            dop.stride(0), dop.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            *common, num_slices, hq, hkv, d, dv_dim, scale,
            # 8 warps: with 4, the flag scan (BLOCK_F 128) beside 32-key slices spilled 16-24 bytes on sm_80/86 at
            # D = 64 bf16 (ptxas capped it at 128 registers); 8 warps need 112-116, no spills (bench/resources.py)
            CAUSAL=bool(causal), BLOCK_M=BLOCK_M, BLOCK_F=block_f, **blocks, num_warps=8)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
