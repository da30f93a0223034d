"""Triton kernel of route_chunks (MoBA's gate), semantics in README.md and reference.py.

Two launches: (1) chunk_mean_fwd (chunk_mean/triton.py) writes the fp32 key means (S, M, Hkv, D), one read
of k; (2) route_select_kernel, one program per (sequence, block of BLOCK_T query tokens, q head), streams
the means in blocks of BLOCK_C chunks, computes the gates in registers and keeps a running top-(top_k - 1)
per query row. The (T, Hq, M) gate matrix never reaches global memory: the means are M * Hkv * D floats
(L2-resident), the selection state is BLOCK_T x BLOCK_K int64.

Ordering trick: every candidate gets one int64 key that orders exactly like the reference's stable
descending sort: high bits = the fp32 gate mapped to a monotone unsigned integer (NaN above +inf, -0 == +0),
low 31 bits = (2^31 - 1 - chunk), so equal gates rank the lower chunk first. Keys are unique, so "the next
best" is simply "the largest key below the previous pick", and merging a block into the running top-k is
top_k - 1 max-reductions over (running | block), with no bookkeeping of what was taken.
Like the reference, ineligible chunks of the sequence compete with gate -inf and are dropped after the
top-k (this matters only for -inf gates, where the reference can then return fewer chunks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import next_pow2
from ..._triton.layout import as_packed, key_layout, program_coords, seq_span
from ..chunk_mean.triton import chunk_mean_fwd

_LOW_BITS = 2147483648  # 2^31: the chunk index lives in the low 31 bits of a key


@triton.jit
def _gate_keys(b_g, o_c):
    """fp32 gates (R, C), chunk ids (C,) -> int64 keys, larger = ranked first (see module docstring)."""
    b_g = tl.where(b_g == 0.0, 0.0, b_g)  # -0.0 ties with +0.0, as in torch.sort
    bits = b_g.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order for non-NaN
    mono = tl.where(b_g != b_g, 0x7FC00000, mono)  # every NaN ranks above +inf (0x7F800000)
    return (mono.to(tl.int64) + 2147483648) * 2147483648 + (2147483647 - o_c[None, :].to(tl.int64))


@triton.jit
def route_select_kernel(
    q, means, out, cu_seqlens, cu_seqlens_k,
    stride_qt, stride_qh, stride_ms, stride_mc, stride_mh, stride_ot, stride_oh,
    chunk_size, num_others, num_out, num_tiles, num_heads, group, head_dim,
    CAUSAL: tl.constexpr, SEPARATE_KEYS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per (seq, token block, q head): out[t, h, :num_out] = own chunk + the num_others best eligible chunks,
    sorted ascending, -1 padded. num_others = min(top_k - 1, M) (more can never be eligible) and num_out =
    min(top_k, M) (a row never holds more than M chunks; columns num_out.. are the launcher's).
    SEPARATE_KEYS: the keys (hence the means) have their own offsets cu_seqlens_k, Lk >= Lq, and query i sits at
    position Lk - Lq + i (chunked prefill, bottom-right aligned); otherwise cu_seqlens_k is not read."""
    i_s, i_b, i_h = program_coords(num_tiles, num_heads)
    bos, length = seq_span(cu_seqlens, i_s)
    if SEPARATE_KEYS:
        _, length_k = seq_span(cu_seqlens_k, i_s)
    else:
        length_k = length
    shift = length_k - length  # position of query 0: queries are the last Lq key positions
    n_chunks = (length_k + chunk_size - 1) // chunk_size
    o_t = i_b * BLOCK_T + tl.arange(0, BLOCK_T)  # query rows inside the sequence
    m_t = o_t < length
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < head_dim
    own = (shift + o_t) // chunk_size  # [BLOCK_T]
    p_q = q + (bos + o_t[:, None]) * stride_qt + i_h * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
    p_mean = means + i_s * stride_ms + (i_h // group) * stride_mh + o_d[None, :]

    o_k = tl.arange(0, BLOCK_K)
    b_best = tl.full([BLOCK_T, BLOCK_K], -1, dtype=tl.int64)  # sorted descending, -1 = empty slot
    # The chunks to scan. Causal: a row may pick only chunks before its own, so the scan stops before the own
    # chunk of the tile's last real row (half the chunks of a sequence on average, instead of all of them).
    # Tiles past the sequence end, and top_k == 1, have nothing to rank.
    last = shift + tl.minimum(i_b * BLOCK_T + BLOCK_T - 1, length - 1)  # position of the tile's last real row
    if CAUSAL:
        c_end = last // chunk_size
    else:
        c_end = n_chunks
    c_end = tl.where((num_others > 0) & (i_b * BLOCK_T < length), c_end, 0)
    for c0 in range(0, c_end, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < c_end
        b_m = tl.load(p_mean + o_c[:, None] * stride_mc, mask=m_c[:, None] & m_d[None, :], other=0.0)
        # b_m: [BLOCK_C, BLOCK_D] chunk means
        # ieee: the gate must be the fp32 dot product (tf32 would reorder near-ties against the reference)
        b_g = tl.dot(b_q, tl.trans(b_m), input_precision="ieee")  # [BLOCK_T, BLOCK_C]
        if CAUSAL:
            eligible = o_c[None, :] < own[:, None]
        else:
            eligible = o_c[None, :] != own[:, None]
        b_g = tl.where(eligible, b_g, float("-inf"))
        b_key = tl.where(m_c[None, :], _gate_keys(b_g, o_c), -1)  # [BLOCK_T, BLOCK_C]
        # merge: the num_others largest of (running best | this block), largest first
        b_new = tl.full([BLOCK_T, BLOCK_K], -1, dtype=tl.int64)
        prev = tl.full([BLOCK_T], 9223372036854775807, dtype=tl.int64)
        for r in range(0, num_others):
            a = tl.max(tl.where(b_best < prev[:, None], b_best, -1), axis=1)
            b = tl.max(tl.where(b_key < prev[:, None], b_key, -1), axis=1)
            prev = tl.maximum(a, b)
            b_new = tl.where(o_k[None, :] == r, prev[:, None], b_new)
        b_best = b_new

    # decode, drop ineligible picks (they only got in with gate -inf), add the own chunk
    none = 2147483647
    b_idx = 2147483647 - (b_best % 2147483648)  # [BLOCK_T, BLOCK_K]
    if CAUSAL:
        keep = (b_best >= 0) & (b_idx < own[:, None])
    else:
        keep = (b_best >= 0) & (b_idx != own[:, None])
    b_idx = tl.where(keep, b_idx, none)
    # emit ascending: slot r gets the smallest chosen chunk above slot r - 1 (O(num_out^2), num_out <= M)
    p_out = out + (bos + o_t) * stride_ot + i_h * stride_oh
    prev = tl.full([BLOCK_T], -1, dtype=tl.int64)
    for r in range(0, num_out):
        nxt = tl.min(tl.where(b_idx > prev[:, None], b_idx, none), axis=1)
        nxt = tl.minimum(nxt, tl.where(own > prev, own, none))
        tl.store(p_out + r, tl.where(nxt == none, -1, nxt).to(tl.int32), mask=m_t)
        prev = nxt


def select_chunks(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, width=None, cu_seqlens_k=None,
                  max_seqlen_k=None):
    """The selection in columns [0, used) of a new (T, Hq, width) int32 tensor, used = min(top_k, M) (columns
    past it are left unwritten; width defaults to used); returns (tensor, used). A row never holds more than
    M = ceil(max_seqlen_k / chunk_size) chunks, so the kernel's tiles and loops stop at `used` whatever top_k.
    Keys: see key_layout (routing_kernels/_triton/layout.py)."""
    cu_seqlens_k, max_seqlen_k, separate = key_layout(q, k, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    means, _ = chunk_mean_fwd(k, chunk_size, cu_seqlens_k, max_seqlen_k)  # (S, M, Hkv, D) fp32
    if separate and cu_seqlens_k is None:  # dense k: offsets arange(B+1) * Nk
        cu_seqlens_k = torch.arange(k.shape[0] + 1, device=k.device, dtype=torch.int32) * k.shape[1]
    qp, cu, max_seqlen = as_packed(q, cu_seqlens, max_seqlen)
    cu_k = cu_seqlens_k.contiguous() if separate else cu
    t, hq, d = qp.shape
    s, m = cu.numel() - 1, means.shape[1]
    used = max(1, min(top_k, m))
    out = torch.empty(t, hq, used if width is None else width, device=q.device, dtype=torch.int32)
    block_t = 16  # tl.dot needs >= 16 rows; queries of a block share every means load
    num_tiles = triton.cdiv(max_seqlen, block_t)
    if t == 0 or s * num_tiles * hq == 0:
        return out, used
    num_others = min(top_k - 1, m)
    block_d = max(16, next_pow2(d))
    # <= 2048 / D chunks per block: at 4096 / D the gate tile and the merge spilled at D = 128 (sm_90, 64 bytes)
    # and took 168 registers (3 blocks / SM) at D = 64; now 48-80 registers, no spills (bench/resources.py)
    block_c = max(16, min(next_pow2(m), 2048 // block_d))
    route_select_kernel[(s * num_tiles * hq,)](
        qp, means, out, cu, cu_k, qp.stride(0), qp.stride(1), means.stride(0), means.stride(1), means.stride(2),
        out.stride(0), out.stride(1), chunk_size, num_others, used, num_tiles, hq, hq // k.shape[-2], d,
        CAUSAL=bool(causal), SEPARATE_KEYS=separate, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_K=max(1, next_pow2(num_others)),
        BLOCK_D=block_d, num_warps=4)
    return out, used


def route_chunks_triton(q, k, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None,
                        max_seqlen_k=None):
    """Chunk selection of route_chunks (README.md) with Triton.

    Args:
        q: (B, N, Hq, D) or varlen (T, Hq, D), fp16/bf16/fp32 (fp64 is computed in fp32).
        k: like q with Hkv heads, Hq a multiple of Hkv (kv head of h is h // (Hq // Hkv)); or longer than q
            (chunked prefill): dense (B, Nk, Hkv, D) with Nk >= Nq, or packed (Tk, Hkv, D) with cu_seqlens_k.
            The Lq queries of a sequence with Lk keys are its last positions: query i sits at Lk - Lq + i.
        chunk_size: int >= 1. top_k: int >= 1, chunks per query including its own; it may exceed the number
            of chunks M (the columns past M are -1; the kernel's tiles are sized by min(top_k, M)).
        causal: bool, default True: only chunks before the own chunk compete.
        cu_seqlens: optional (S+1,) int32/int64 prefix sums for varlen input (any strides); max_seqlen: int
            with it, at least the longest sequence.
        cu_seqlens_k: optional (S+1,) int32/int64, k's own offsets (same S, Lk >= Lq each); max_seqlen_k: int, at
            least the longest key sequence (default k.shape[0], an upper bound). Default None: k laid out like q
            (or dense and longer, see k).
    Returns:
        int32 (B, N, Hq, top_k) / (T, Hq, top_k): ascending chunk indices, -1 padding at the end.
    Example:
        sel = route_chunks_triton(q, k, 64, 8)                                    # dense
        sel = route_chunks_triton(q, k, 64, 8, cu_seqlens=cu, max_seqlen=4096)   # varlen
        sel = route_chunks_triton(q, k, 64, 8, True, cu_q, 512, cu_seqlens_k=cu_k, max_seqlen_k=4096)  # prefill
    Argument checks are the op's job (route_chunks/op.py check_args). No host sync.
    """
    out, used = select_chunks(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, top_k, cu_seqlens_k,
                              max_seqlen_k)
    if used < top_k:  # columns no row can fill (top_k > M): -1, one fill on the device
        out[..., used:].fill_(-1)
    return out.reshape(*q.shape[:-1], top_k)
