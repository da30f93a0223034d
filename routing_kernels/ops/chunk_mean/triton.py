"""Triton kernels of chunk_mean, and the per-chunk passes that chunk_route builds on.

Work is split one program per (sequence, chunk, head): the program streams its chunk's tokens in
(BLOCK_T, BLOCK_D) tiles. Dense inputs are launched as varlen with cu_seqlens = arange(B+1) * N, so one
kernel serves both layouts (routing_kernels/_triton/layout.py). All token offsets are int64 (T * H * D passes
2^31 for long inputs). With IS_TABLE the chunks come from a chunk table (dynamic chunking, triton_table.py) and
a program covers one piece of <= `split` tokens of a chunk (layout.py chunk_work): the per-chunk terms then
combine across pieces with fp32 atomic adds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton.layout import as_packed, chunk_work, tiles


@triton.jit
def chunk_reduce_kernel(
    x, dy, vec, extra, means, out, cu_seqlens,
    stride_xt, stride_xh, stride_dyt, stride_dyh, stride_vs, stride_vh,
    chunk_size, alpha, empty_value,
    num_chunks, num_heads, head_dim, seq_chunks, num_table_chunks, num_seqs, num_tokens,
    HAS_VEC: tl.constexpr, HAS_DY: tl.constexpr, HAS_EXTRA: tl.constexpr, IS_TABLE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per (seq, chunk, head): mean of x over the chunk -> means (S, M, H, D) fp32, and when HAS_VEC
        out[s, h, c] = alpha * <vec[s, h], mean> (+ sum_t <dy_t, x_t> if HAS_DY) (+ extra[s, h, c])
    chunk_route uses it as the forward scores (vec = query) and the backward dw (vec = dsummary).
    Chunks a sequence lacks get mean 0 and out = empty_value.
    IS_TABLE: every term is linear in the chunk's tokens, so each piece adds its share (sum / |chunk|, its part
    of sum_t <dy_t, x_t>; extra from the first piece) into means and out, which the launcher initialised (zeros;
    out: 0 for real chunks, empty_value for missing ones)."""
    i_s, i_c, i_h, tok0, tokens, count, is_first = chunk_work(
        cu_seqlens, chunk_size, num_chunks, num_heads, seq_chunks, num_table_chunks, num_seqs, num_tokens, IS_TABLE)
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    b_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        tok = tok0 + t0 + o_t
        m = ((t0 + o_t) < tokens)[:, None] & m_d[None, :]
        b_x = tl.load(x + tok[:, None] * stride_xt + i_h * stride_xh + o_d[None, :], mask=m, other=0.0)
        b_x = b_x.to(tl.float32)  # [BLOCK_T, BLOCK_D]
        b_sum += tl.sum(b_x, axis=0)
        if HAS_DY:
            p_dy = dy + tok[:, None] * stride_dyt + i_h * stride_dyh + o_d[None, :]
            b_dy = tl.load(p_dy, mask=m, other=0.0)  # [BLOCK_T, BLOCK_D]
            b_dot += tl.sum(b_dy.to(tl.float32) * b_x, axis=0)
    b_mean = b_sum / tl.maximum(count, 1).to(tl.float32)  # [BLOCK_D]
    p_mean = means + ((i_s * num_chunks + i_c) * num_heads + i_h) * head_dim + o_d
    if IS_TABLE:
        tl.atomic_add(p_mean, b_mean, mask=m_d & (tokens > 0), sem="relaxed")
    else:
        tl.store(p_mean, b_mean, mask=m_d)
    if HAS_VEC:
        b_vec = tl.load(vec + i_s * stride_vs + i_h * stride_vh + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        value = alpha * tl.sum(b_vec * b_mean, axis=0)
        if HAS_DY:
            value += tl.sum(b_dot, axis=0)
        p_out = (i_s * num_heads + i_h) * num_chunks + i_c
        if IS_TABLE:
            if HAS_EXTRA:
                value += tl.load(extra + p_out, mask=is_first, other=0.0).to(tl.float32)
            tl.atomic_add(out + p_out, value, mask=tokens > 0, sem="relaxed")
        else:
            if HAS_EXTRA:
                value += tl.load(extra + p_out).to(tl.float32)
            value = tl.where(count > 0, value, empty_value)
            tl.store(out + p_out, value)


@triton.jit
def chunk_mean_backward_kernel(
    grad, dx, cu_seqlens, stride_gs, stride_gc, stride_gh, stride_xt, stride_xh, chunk_size,
    num_chunks, num_heads, head_dim, seq_chunks, num_table_chunks, num_seqs, num_tokens,
    IS_TABLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx_t = grad[s, chunk(t), h] / |chunk(t)| for every token of the chunk (of the piece, IS_TABLE)."""
    i_s, i_c, i_h, tok0, tokens, count, _ = chunk_work(
        cu_seqlens, chunk_size, num_chunks, num_heads, seq_chunks, num_table_chunks, num_seqs, num_tokens, IS_TABLE)
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    b_g = tl.load(grad + i_s * stride_gs + i_c * stride_gc + i_h * stride_gh + o_d, mask=m_d, other=0.0)
    b_g = b_g.to(tl.float32) / tl.maximum(count, 1).to(tl.float32)  # [BLOCK_D]
    b_out = tl.broadcast_to(b_g[None, :], [BLOCK_T, BLOCK_D]).to(dx.dtype.element_ty)  # [BLOCK_T, BLOCK_D]
    for t0 in range(0, tokens, BLOCK_T):
        tok = tok0 + t0 + o_t
        m = ((t0 + o_t) < tokens)[:, None] & m_d[None, :]
        tl.store(dx + tok[:, None] * stride_xt + i_h * stride_xh + o_d[None, :], b_out, mask=m)


def chunk_mean_fwd(x, chunk_size, cu_seqlens=None, max_seqlen=None, vec=None, alpha=1.0, dy=None, extra=None,
                   empty_value=0.0):
    """Launch chunk_reduce_kernel. Returns (means fp32 (S, M, H, D), out fp32 (S, H, M) or None)."""
    xp, cu, max_seqlen = as_packed(x, cu_seqlens, max_seqlen)
    s, (_, h, d) = cu.numel() - 1, xp.shape
    m = -(-max_seqlen // chunk_size)
    means = torch.empty(s, m, h, d, device=x.device, dtype=torch.float32)
    out = torch.empty(s, h, m, device=x.device, dtype=torch.float32) if vec is not None else None
    if dy is not None:
        dy, _, _ = as_packed(dy, cu_seqlens, max_seqlen)
    if s * m * h == 0:
        return means, out
    block_t, block_d = tiles(d, chunk_size)
    vs = vec if vec is not None else means
    chunk_reduce_kernel[(s * m * h,)](
        xp, dy if dy is not None else xp, vs, extra if extra is not None else means, means,
        out if out is not None else means, cu,
        xp.stride(0), xp.stride(1), *(dy.stride()[:2] if dy is not None else (0, 0)),
        *((vs.stride(0), vs.stride(1)) if vec is not None else (0, 0)),
        chunk_size, alpha, empty_value, m, h, d, cu, 0, 0, 0, HAS_VEC=vec is not None, HAS_DY=dy is not None,
        HAS_EXTRA=extra is not None, IS_TABLE=False, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return means, out


def chunk_mean_bwd(grad, x, chunk_size, cu_seqlens=None, max_seqlen=None):
    xp, cu, max_seqlen = as_packed(x, cu_seqlens, max_seqlen)
    dx = torch.empty(xp.shape, device=x.device, dtype=x.dtype)
    s, m, h, d = grad.shape
    if s * m * h and dx.numel():
        block_t, block_d = tiles(d, chunk_size)
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        chunk_mean_backward_kernel[(s * m * h,)](
            grad, dx, cu, grad.stride(0), grad.stride(1), grad.stride(2), dx.stride(0), dx.stride(1), chunk_size, m, h, d,
            cu, 0, 0, 0, IS_TABLE=False, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return dx.reshape(x.shape)
