"""Triton kernels of chunk_route, forward and backward (maths in README.md).

Forward, 3 launches: (1) chunk_reduce_kernel: chunk means + scores, one read of x; (2) per (seq, head):
softmax over chunks and the summary, touching only the (S, M, H, D) means; (3) y = w * x, a second read of
x and one write. Backward, 3 launches: (1) chunk_reduce_kernel with dy: means and dw, reading x and dy;
(2) per (seq, head): ds and dquery; (3) dx from dy and per-chunk scalars, reading dy and writing dx.
Two passes are the minimum each way: the softmax needs every chunk's score before any y is final.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton.layout import as_packed, chunk_work, program_coords, tiles
from ..chunk_mean.triton import chunk_mean_fwd


@triton.jit
def softmax_summary_kernel(scores, means, weights, summary, num_chunks, num_heads, head_dim, seq_chunks,
                           IS_TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (seq, head): w = softmax(scores) over chunks (0 when the sequence is empty) and
    summary = sum_i w_i mean_i. Scores of missing chunks are -inf, so they get weight 0 (IS_TABLE: the chunks
    past seq_chunks[s+1] - seq_chunks[s] are read as -inf, whatever the scores buffer holds there)."""
    i_s, _, i_h = program_coords(1, num_heads)
    if IS_TABLE:
        num_real = (tl.load(seq_chunks + i_s + 1) - tl.load(seq_chunks + i_s)).to(tl.int64)
    else:
        num_real = num_chunks
    i_row = i_s * num_heads + i_h  # row (s, h) of the (S, H, M) scores and (S, H, D) outputs
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    p_row = i_row * num_chunks
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for m0 in range(0, num_chunks, BLOCK_M):
        b_s = tl.load(scores + p_row + m0 + o_m, mask=m0 + o_m < num_real, other=float("-inf"))  # [BLOCK_M]
        b_max = tl.maximum(b_max, b_s)
    row_max = tl.max(b_max, axis=0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # empty sequence: every exp is 0
    b_den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(0, num_chunks, BLOCK_M):
        b_s = tl.load(scores + p_row + m0 + o_m, mask=m0 + o_m < num_real, other=float("-inf"))  # [BLOCK_M]
        b_den += tl.exp(b_s - row_max)
    den = tl.sum(b_den, axis=0)
    inv = tl.where(den != 0, 1.0 / tl.where(den != 0, den, 1.0), 0.0)  # 0: empty sequence; NaN stays NaN
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for m0 in range(0, num_chunks, BLOCK_M):
        m_m = m0 + o_m < num_chunks
        b_s = tl.load(scores + p_row + m0 + o_m, mask=m0 + o_m < num_real, other=float("-inf"))  # [BLOCK_M]
        b_w = tl.exp(b_s - row_max) * inv  # [BLOCK_M]
        tl.store(weights + p_row + m0 + o_m, b_w, mask=m_m)
        p_mean = means + ((i_s * num_chunks + m0 + o_m[:, None]) * num_heads + i_h) * head_dim + o_d[None, :]
        b_mean = tl.load(p_mean, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        b_acc += tl.sum(b_w[:, None] * b_mean, axis=0)
    tl.store(summary + i_row * head_dim + o_d, b_acc, mask=m_d)


@triton.jit
def softmax_backward_kernel(weights, dw, means, ds, dquery, num_chunks, num_heads, head_dim, scale,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (seq, head): ds = w * (dw - sum_j w_j dw_j) and dquery = scale * sum_i ds_i mean_i."""
    i_s, _, i_h = program_coords(1, num_heads)
    i_row = i_s * num_heads + i_h  # row (s, h) of the (S, H, M) scores and (S, H, D) outputs
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    p_row = i_row * num_chunks
    b_wdw = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(0, num_chunks, BLOCK_M):
        m_m = m0 + o_m < num_chunks
        b_wdw += tl.load(weights + p_row + m0 + o_m, mask=m_m, other=0.0) * tl.load(dw + p_row + m0 + o_m,
                                                                                 mask=m_m, other=0.0)
    total = tl.sum(b_wdw, axis=0)
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for m0 in range(0, num_chunks, BLOCK_M):
        m_m = m0 + o_m < num_chunks
        b_w = tl.load(weights + p_row + m0 + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
        b_ds = b_w * (tl.load(dw + p_row + m0 + o_m, mask=m_m, other=0.0) - total)  # [BLOCK_M]
        tl.store(ds + p_row + m0 + o_m, b_ds, mask=m_m)
        p_mean = means + ((i_s * num_chunks + m0 + o_m[:, None]) * num_heads + i_h) * head_dim + o_d[None, :]
        b_mean = tl.load(p_mean, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        b_acc += tl.sum(b_ds[:, None] * b_mean, axis=0)
    tl.store(dquery + i_row * head_dim + o_d, scale * b_acc, mask=m_d)


@triton.jit
def chunk_scale_kernel(
    src, out, weights, ds, query, dsummary, cu_seqlens,
    stride_st, stride_sh, stride_ot, stride_oh, stride_qs, stride_qh, stride_gs, stride_gh,
    chunk_size, num_chunks, num_heads, head_dim, scale, seq_chunks, num_table_chunks, num_seqs, num_tokens,
    IS_BACKWARD: tl.constexpr, IS_TABLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per (seq, chunk, head), for every token t of the chunk:
        forward:  y_t  = w_c * x_t
        backward: dx_t = w_c * dy_t + (scale * ds_c * query + w_c * dsummary) / |c|
    (IS_TABLE: for the tokens of one piece of a table chunk, routing_kernels/_triton/layout.py chunk_work)"""
    i_s, i_c, i_h, tok0, tokens, count, _ = chunk_work(
        cu_seqlens, chunk_size, num_chunks, num_heads, seq_chunks, num_table_chunks, num_seqs, num_tokens, IS_TABLE)
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    p_w = (i_s * num_heads + i_h) * num_chunks + i_c
    b_w = tl.load(weights + p_w)  # scalar
    if IS_BACKWARD:
        b_q = tl.load(query + i_s * stride_qs + i_h * stride_qh + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        b_g = tl.load(dsummary + i_s * stride_gs + i_h * stride_gh + o_d, mask=m_d, other=0.0)
        b_g = b_g.to(tl.float32)  # [BLOCK_D]
        b_add = (scale * tl.load(ds + p_w) * b_q + b_w * b_g) / tl.maximum(count, 1).to(tl.float32)  # [BLOCK_D]
    for t0 in range(0, tokens, BLOCK_T):
        tok = tok0 + t0 + o_t
        m = ((t0 + o_t) < tokens)[:, None] & m_d[None, :]
        p_src = src + tok[:, None] * stride_st + i_h * stride_sh + o_d[None, :]
        b_src = tl.load(p_src, mask=m, other=0.0)  # [BLOCK_T, BLOCK_D]
        b_out = b_w * b_src.to(tl.float32)
        if IS_BACKWARD:
            b_out += b_add[None, :]
        tl.store(out + tok[:, None] * stride_ot + i_h * stride_oh + o_d[None, :], b_out.to(out.dtype.element_ty),
                 mask=m)


def _per_seq(t: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """(H, D) shared -> stride-0 (S, H, D) view; (S, H, D) unchanged. Unit last stride for the kernels."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.expand(num_seqs, *t.shape) if t.dim() == 2 else t


def _row_blocks(num_chunks: int, head_dim: int) -> tuple[int, int]:
    # <= 2048 / D chunks per (BLOCK_M, BLOCK_D) means tile: at 4096 / D the softmax summary spilled at D = 64
    # (sm_90, 8 bytes); now <= 72 registers, no spills (bench/resources.py)
    block_d = max(16, triton.next_power_of_2(head_dim))
    return max(16, min(triton.next_power_of_2(max(num_chunks, 1)), 2048 // block_d)), block_d


def _launch_scale(src, out, weights, ds, query, dsummary, cu, chunk_size, scale, is_backward):
    s, h, m = weights.shape
    d = src.shape[-1]
    if s * m * h == 0 or src.shape[0] == 0:
        return
    block_t, block_d = tiles(d, chunk_size)
    chunk_scale_kernel[(s * m * h,)](
        src, out, weights, ds, query, dsummary, cu,
        src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        query.stride(0), query.stride(1), dsummary.stride(0), dsummary.stride(1),
        chunk_size, m, h, d, scale, cu, 0, 0, 0, IS_BACKWARD=is_backward, IS_TABLE=False, BLOCK_T=block_t,
        BLOCK_D=block_d, num_warps=4)


def chunk_route_fwd(x, query, chunk_size, cu_seqlens, max_seqlen, scale):
    """Returns (y like x, weights fp32 (S, H, M), summary in x.dtype (S, H, D))."""
    xp, cu, _ = as_packed(x, cu_seqlens, max_seqlen)
    num_seqs = cu.numel() - 1
    q = _per_seq(query, num_seqs)
    means, scores = chunk_mean_fwd(x, chunk_size, cu_seqlens, max_seqlen, vec=q, alpha=scale,
                                   empty_value=float("-inf"))
    s, m, h, d = means.shape
    weights = torch.empty(s, h, m, device=x.device, dtype=torch.float32)
    summary = torch.empty(s, h, d, device=x.device, dtype=torch.float32)
    if s * h:
        block_m, block_d = _row_blocks(m, d)
        softmax_summary_kernel[(s * h,)](scores, means, weights, summary, m, h, d, cu, IS_TABLE=False,
                                         BLOCK_M=block_m, BLOCK_D=block_d)
    y = torch.empty(xp.shape, device=x.device, dtype=x.dtype)
    _launch_scale(xp, y, weights, weights, q, q, cu, chunk_size, 1.0, False)
    return y.reshape(x.shape), weights, summary.to(x.dtype)


def chunk_route_bwd(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen, scale):
    """Returns (dx like x, dquery like query)."""
    xp, cu, _ = as_packed(x, cu_seqlens, max_seqlen)
    num_seqs = cu.numel() - 1
    dsum = _per_seq(dsummary, num_seqs)
    dweights = dweights.contiguous().float()
    means, dw = chunk_mean_fwd(x, chunk_size, cu_seqlens, max_seqlen, vec=dsum, dy=dy, extra=dweights)
    s, m, h, d = means.shape
    ds = torch.empty_like(dw)
    dquery = torch.empty(s, h, d, device=x.device, dtype=torch.float32)
    weights = weights.contiguous()
    if s * h:
        block_m, block_d = _row_blocks(m, d)
        softmax_backward_kernel[(s * h,)](weights, dw, means, ds, dquery, m, h, d, scale,
                                          BLOCK_M=block_m, BLOCK_D=block_d)
    dyp, _, _ = as_packed(dy, cu_seqlens, max_seqlen)
    dx = torch.empty(xp.shape, device=x.device, dtype=x.dtype)
    _launch_scale(dyp, dx, weights, ds, _per_seq(query, num_seqs), dsum, cu, chunk_size, scale, True)
    dq = dquery.sum(0) if query.dim() == 2 else dquery
    return dx.reshape(x.shape), dq.to(query.dtype)
