"""Triton decode kernels of routed_attention over a KV cache (flash-decoding); semantics in README.md and
reference.py (``routed_attention_ref(q, k_cache, v_cache, C, top_k, causal, seqused_k=seqused_k)``).

A decode step has few queries (Lq = 1..16 per row) against a long cache, so the prefill kernels' query-tile
grid (B * ceil(Lq / 16) * Hq / pack programs) would leave most of the GPU idle, each program walking its
chunks one after another. Here the work is spread over the chunks instead, with grids sized from shapes only
(no host sync, CUDA-graph capturable):

1. Gate + top-k (decode_gate_kernel), one program per (row b, kv head, tile of BLOCK_R rows, split of the
   chunks). A kv group's rows are its (query, q head) pairs, R = Lq * group, row r = query r // group, head
   r % group. It reads only key_sums: mean_j = key_sums[b, j] / count_j (count = C, or the remainder of the
   last chunk), gate g = <q, mean_j> in fp32, and keeps a running top-(top_k - 1) of the chunks with route_chunks'
   int64 keys (route_chunks/triton.py: the fp32 gate mapped to a monotone integer in the high bits, 2^31 - 1 - j
   in the low bits, so the keys order exactly like the reference's stable descending sort, ties to the lower
   index, and are unique). With one split it writes the selection itself; with several (a long cache:
   M * Hkv * D * 4 bytes of sums would otherwise stream through B * Hkv programs, 64 MB at 1M tokens, C = 64,
   Hkv = 8, D = 128) each split writes its local top-(top_k - 1) keys and decode_gate_merge_kernel merges them
   (exact: every global winner is in its split's top). The selection (B, Lq, Hq, S), S = min(top_k, M), is
   ascending with -1 padding, like route_chunks.
2. Partials (decode_partial_kernel), one program per (row b, kv head, row tile, row, slot), i.e. one per
   (row, selected chunk). The program whose (row, slot) is the FIRST row of its tile to have selected chunk j
   owns j (the others exit at once): it streams j's keys and values once for every row of the tile that
   selected j (GQA heads and queries share the loads; tl.dot when the tile has >= 16 rows, a broadcast
   multiply-reduce below) and writes each such row's partial (lse, normalized o) into that row's slot of j.
   Every (row, slot) has exactly one writer: no atomics, deterministic.
3. Merge (decode_merge_kernel), one program per MERGE_ROWS (b, query, q head) rows: combines each row's
   partials by lse, a sequential sum in slot order.

Costs: the needed bytes are the key sums (M * Hkv * D * 4 per row b) plus the selected chunks' K/V; the grid of
kernel 2 is B * Hq * Lq * S programs of which only the union of each tile's selections does work (the rest read
S indices and exit). Workspace: partial o, B * Lq * Hq * S * Dv fp32 (S = min(top_k, M): the bound promised to
the caller), and partial lse, B * Lq * Hq * S fp32; with a split gate also its candidates,
B * Lq * Hq * splits * (top_k - 1) int64 (splits * (top_k - 1) about MAX_CANDIDATES at most). A chunk is streamed by one program, so few selected chunks
(small B * Hkv * top_k) leave SMs idle; splitting chunks across programs would need a larger workspace.
GPU-unmeasured: the tile sizes and split heuristics below are first guesses for the benchmark to tune.

Precision: fp32 accumulation; fp32 dots use input_precision="ieee" (the gate always: tf32 would reorder
near-ties against the reference); the tl.dot path rounds P to the input dtype before P @ V (flash style), the
broadcast path computes in fp32. exp2 with log2(e) folded into the scale; lse is returned in natural log.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import next_pow2
from ..route_chunks.triton import _gate_keys

LOG2E = 1.4426950408889634
# Programs the gate aims for when it splits the chunks (~2 per SM of an H200's 132); shapes only, no GPU query.
GATE_TARGET_PROGRAMS = 264
MAX_CANDIDATES = 1024  # splits * (top_k - 1) per row: the merge kernel's work, kept small
# Register budget of a broadcast multiply-reduce tile: rows * keys * dim fp32 values (64 per thread at 4 warps;
# 16384 spilled at sm_90).
BROADCAST_BUDGET = 8192
MERGE_ROWS = 8  # (b, query, q head) rows per merge program: 8 x KS x Dv fp32 partials read per program
# Forced chunks per gate split (None = heuristic); tests set it to exercise the split + merge path.
GATE_SPLIT_CHUNKS = None


@triton.jit
def _decode_rows(i_b, i_kh, i_t, seqlen, q_len, num_heads, group, BLOCK_R: tl.constexpr):
    """A tile's rows of one kv group: (local ids, mask, query index, q head, cache position, flat row id into
    the (B, Lq, Hq) layout of q / sel / o)."""
    o_rl = tl.arange(0, BLOCK_R)
    o_r = i_t * BLOCK_R + o_rl
    m_r = o_r < q_len * group
    o_i = o_r // group
    o_h = i_kh * group + o_r % group
    pos = seqlen - q_len + o_i
    return o_rl, m_r, o_i, o_h, pos, (i_b * q_len + o_i) * num_heads + o_h


@triton.jit
def _merge_top(b_best, b_key, num_others, BLOCK_K: tl.constexpr):
    """The num_others largest keys of (b_best | b_key) per row, largest first (-1 = empty). b_best (R, BLOCK_K)
    is sorted descending; keys are unique, so the next pick is the largest key below the previous one."""
    o_k = tl.arange(0, BLOCK_K)
    worst = tl.max(tl.where(o_k[None, :] == num_others - 1, b_best, -1), axis=1)
    # most blocks of a long cache hold nothing better than the current picks: skip their num_others passes
    if tl.max(tl.max(tl.where(b_key > worst[:, None], 1, 0), axis=1), axis=0) > 0:
        b_new = tl.full(b_best.shape, -1, dtype=tl.int64)
        prev = tl.full([b_best.shape[0]], 9223372036854775807, dtype=tl.int64)
        for r in range(0, num_others):
            a = tl.max(tl.where(b_best < prev[:, None], b_best, -1), axis=1)
            b = tl.max(tl.where(b_key < prev[:, None], b_key, -1), axis=1)
            prev = tl.maximum(a, b)
            b_new = tl.where(o_k[None, :] == r, prev[:, None], b_new)
        b_best = b_new
    return b_best


@triton.jit
def _emit_selection(b_best, sel, row, m_r, own, num_slots, CAUSAL: tl.constexpr):
    """Decode the picks, drop ineligible ones (they compete with gate -inf, as in the reference, and only get
    in when the eligible gates run out), add the own chunk, write num_slots ascending indices, -1 padded."""
    none = 2147483647
    b_idx = 2147483647 - (b_best % 2147483648)
    if CAUSAL:
        keep = (b_best >= 0) & (b_idx < own[:, None])
    else:
        keep = (b_best >= 0) & (b_idx != own[:, None])
    b_idx = tl.where(keep, b_idx, none)
    prev = tl.full(own.shape, -1, dtype=tl.int64)
    for s in range(0, num_slots):  # slot s: the smallest pick above slot s - 1 (num_slots small: O(S^2))
        nxt = tl.min(tl.where(b_idx > prev[:, None], b_idx, none), axis=1)
        nxt = tl.minimum(nxt, tl.where(own > prev, own, none))
        tl.store(sel + row * num_slots + s, tl.where(nxt == none, -1, nxt).to(tl.int32), mask=m_r)
        prev = nxt


@triton.jit
def decode_gate_kernel(
    q, key_sums, seqused, cand, sel,
    stride_qb, stride_qi, stride_qh, stride_sb, stride_sc, stride_sh,
    chunk_size, q_len, num_heads, num_kv_heads, num_others, num_slots, num_tiles, num_splits, split_chunks,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, FINAL: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per (b, kv head, row tile, split): the top num_others chunk keys of chunks
    [split * split_chunks, +split_chunks) of the row's cache. FINAL (one split): write the selection;
    else write the keys to cand[row, split * num_others:][:num_others]."""
    pid = tl.program_id(0).to(tl.int64)
    i_sp = pid % num_splits
    i_t = (pid // num_splits) % num_tiles
    i_kh = (pid // (num_splits * num_tiles)) % num_kv_heads
    i_b = pid // (num_splits * num_tiles * num_kv_heads)
    group = num_heads // num_kv_heads
    seqlen = tl.load(seqused + i_b).to(tl.int64)
    n_chunks = (seqlen + chunk_size - 1) // chunk_size
    o_rl, m_r, o_i, o_h, pos, row = _decode_rows(i_b, i_kh, i_t, seqlen, q_len, num_heads, group, BLOCK_R)
    own = pos // chunk_size
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM  # constexpr: no mask at all when D is a power of 2
    p_q = q + i_b * stride_qb + o_i[:, None] * stride_qi + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    p_sum = key_sums + i_b * stride_sb + i_kh * stride_sh + o_d[None, :]
    b_best = tl.full([BLOCK_R, BLOCK_K], -1, dtype=tl.int64)  # sorted descending, -1 = empty
    c_lo = i_sp * split_chunks
    c_hi = tl.minimum(c_lo + split_chunks, n_chunks)
    c_hi = tl.where(num_others > 0, c_hi, c_lo)  # top_k == 1: nothing to rank
    for c0 in range(c_lo, c_hi, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < c_hi
        b_s = tl.load(p_sum + o_c[:, None] * stride_sc, mask=m_c[:, None] & m_d[None, :], other=0.0)
        count = tl.where(m_c, tl.minimum(chunk_size, seqlen - o_c * chunk_size), 1).to(tl.float32)
        b_mean = b_s / count[:, None]  # [BLOCK_C, BLOCK_D], the reference's sums / counts
        if USE_DOT:
            b_g = tl.dot(b_q, tl.trans(b_mean), input_precision="ieee")  # [BLOCK_R, BLOCK_C]
        else:
            b_g = tl.sum(b_q[:, None, :] * b_mean[None, :, :], axis=2)
        if CAUSAL:
            eligible = o_c[None, :] < own[:, None]  # (j + 1) * C <= p
        else:
            eligible = o_c[None, :] != own[:, None]
        b_g = tl.where(eligible, b_g, float("-inf"))
        b_key = tl.where(m_c[None, :] & m_r[:, None], _gate_keys(b_g, o_c), -1)
        b_best = _merge_top(b_best, b_key, num_others, BLOCK_K)
    if FINAL:
        _emit_selection(b_best, sel, row, m_r, own, num_slots, CAUSAL)
    else:
        o_k = tl.arange(0, BLOCK_K)
        p_c = cand + row[:, None] * (num_splits * num_others) + i_sp * num_others + o_k[None, :]
        tl.store(p_c, b_best, mask=m_r[:, None] & (o_k[None, :] < num_others))


@triton.jit
def decode_gate_merge_kernel(
    cand, seqused, sel, chunk_size, q_len, num_heads, num_kv_heads, num_others, num_slots, num_tiles,
    num_cand, CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Per (b, kv head, row tile): the top num_others of the splits' num_cand candidate keys -> selection."""
    pid = tl.program_id(0).to(tl.int64)
    i_t = pid % num_tiles
    i_kh = (pid // num_tiles) % num_kv_heads
    i_b = pid // (num_tiles * num_kv_heads)
    seqlen = tl.load(seqused + i_b).to(tl.int64)
    group = num_heads // num_kv_heads
    o_rl, m_r, o_i, o_h, pos, row = _decode_rows(i_b, i_kh, i_t, seqlen, q_len, num_heads, group, BLOCK_R)
    b_best = tl.full([BLOCK_R, BLOCK_K], -1, dtype=tl.int64)
    for e0 in range(0, num_cand, BLOCK_E):
        o_e = e0 + tl.arange(0, BLOCK_E)
        b_key = tl.load(cand + row[:, None] * num_cand + o_e[None, :], mask=m_r[:, None] & (o_e[None, :] < num_cand),
                        other=-1)  # [BLOCK_R, BLOCK_E]
        b_best = _merge_top(b_best, b_key, num_others, BLOCK_K)
    _emit_selection(b_best, sel, row, m_r, pos // chunk_size, num_slots, CAUSAL)


@triton.jit
def decode_partial_kernel(
    q, k, v, seqused, sel, part_o, part_lse,
    stride_qb, stride_qi, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    chunk_size, q_len, num_heads, num_kv_heads, num_slots, num_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CAUSAL: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Per (b, kv head, row tile, row i_r, slot i_s): if row i_r is the tile's first row to select chunk
    j = sel[i_r, i_s], attend every tile row that selected j to j's keys and write its partial (log2-domain
    lse, o normalized by its own sum) into that row's slot of j."""
    pid = tl.program_id(0).to(tl.int64)
    i_s = pid % num_slots
    i_r = (pid // num_slots) % BLOCK_R
    i_t = (pid // (num_slots * BLOCK_R)) % num_tiles
    i_kh = (pid // (num_slots * BLOCK_R * num_tiles)) % num_kv_heads
    i_b = pid // (num_slots * BLOCK_R * num_tiles * num_kv_heads)
    group = num_heads // num_kv_heads
    seqlen = tl.load(seqused + i_b).to(tl.int64)
    o_rl, m_r, o_i, o_h, pos, row = _decode_rows(i_b, i_kh, i_t, seqlen, q_len, num_heads, group, BLOCK_R)
    o_s = tl.arange(0, BLOCK_S)
    r_own = i_t * BLOCK_R + i_r
    row_own = (i_b * q_len + r_own // group) * num_heads + i_kh * group + r_own % group
    j = tl.load(sel + row_own * num_slots + i_s, mask=r_own < q_len * group, other=-1)
    j = j.to(tl.int64)
    b_sel = tl.load(sel + row[:, None] * num_slots + o_s[None, :],
                    mask=m_r[:, None] & (o_s[None, :] < num_slots) & (j >= 0), other=-1)  # [BLOCK_R, BLOCK_S]
    b_has = (b_sel == j) & (j >= 0)
    # the owner of chunk j is its (row, slot) in the tile's first row that selected j; every other program
    # exits here (one reduction: most programs of the grid are not owners)
    taken = tl.max(tl.where(b_has & (o_rl[:, None] < i_r), 1, 0))
    if (j >= 0) & (taken == 0):
        b_rows = tl.max(b_has.to(tl.int32), axis=1) > 0  # the tile's rows that selected j
        b_slot = tl.sum(tl.where(b_has, o_s[None, :], 0), axis=1)  # where each row keeps j
        k_end = tl.minimum((j + 1) * chunk_size, seqlen)
        if CAUSAL:
            k_end = tl.minimum(k_end, tl.max(tl.where(b_rows, pos, -1), axis=0) + 1)
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < HEAD_DIM  # constexpr: no mask at all when D is a power of 2
        o_dv = tl.arange(0, BLOCK_DV)
        m_dv = o_dv < HEAD_DIM_V
        p_q = q + i_b * stride_qb + o_i[:, None] * stride_qi + o_h[:, None] * stride_qh + o_d[None, :]
        b_q = tl.load(p_q, mask=b_rows[:, None] & m_d[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]
        if not USE_DOT:
            b_q = b_q.to(tl.float32)
        p_k = k + i_b * stride_kb + i_kh * stride_kh
        p_v = v + i_b * stride_vb + i_kh * stride_vh
        b_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        b_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
        for n0 in range(j * chunk_size, k_end, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < k_end
            b_k = tl.load(p_k + o_n[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                          other=0.0)  # [BLOCK_N, BLOCK_D]
            if USE_DOT:
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
            elif BLOCK_R == 1:  # one row: 2D products, no [1, BLOCK_N, BLOCK_D] broadcast
                b_s = tl.sum(b_q * b_k.to(tl.float32), axis=1)[None, :]
            else:
                b_s = tl.sum(b_q[:, None, :] * b_k.to(tl.float32)[None, :, :], axis=2)
            mask = b_rows[:, None] & m_n[None, :]
            if CAUSAL:
                mask = mask & (o_n[None, :] <= pos[:, None])
            b_s = tl.where(mask, b_s * qk_scale, float("-inf"))  # [BLOCK_R, BLOCK_N], log2 domain
            b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
            b_ref = tl.where(b_new == float("-inf"), 0.0, b_new)  # rows with nothing yet: exp2(-inf) = 0
            b_p = tl.exp2(b_s - b_ref[:, None])
            b_alpha = tl.exp2(b_max - b_ref)
            # V after the scores: K and V tiles are never live in registers together
            b_v = tl.load(p_v + o_n[:, None] * stride_vt + o_dv[None, :], mask=m_n[:, None] & m_dv[None, :],
                          other=0.0)  # [BLOCK_N, BLOCK_DV]
            if USE_DOT:
                b_pv = tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
            elif BLOCK_R == 1:
                b_pv = tl.sum(tl.reshape(b_p, [BLOCK_N])[:, None] * b_v.to(tl.float32), axis=0)[None, :]
            else:
                b_pv = tl.sum(b_p[:, :, None] * b_v.to(tl.float32)[None, :, :], axis=1)
            b_acc = b_acc * b_alpha[:, None] + b_pv
            b_sum = b_sum * b_alpha + tl.sum(b_p, axis=1)
            b_max = b_new
        # a selected chunk always shows a row at least one key (own: key p; others: all keys before p)
        b_den = tl.where(b_sum > 0, b_sum, 1.0)
        p_part = row * num_slots + b_slot
        tl.store(part_lse + p_part, tl.where(b_sum > 0, b_max + tl.log2(b_den), float("-inf")), mask=b_rows)
        tl.store(part_o + p_part[:, None] * HEAD_DIM_V + o_dv[None, :], b_acc / b_den[:, None],
                 mask=b_rows[:, None] & m_dv[None, :])


@triton.jit
def decode_merge_kernel(
    sel, part_o, part_lse, o, lse, stride_ob, stride_oi, stride_oh, num_rows, q_len, num_heads, num_slots,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Per BLOCK_M rows (b, query, q head): o, lse from the rows' slot partials, combined by lse in slot order
    (a sequential sum: the result does not depend on which programs wrote the partials, or when)."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < num_rows
    o_s = tl.arange(0, BLOCK_S)
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < HEAD_DIM_V
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_slots, BLOCK_S):  # only the slots a chunk filled (sel >= 0) hold a partial
        p_s = o_m[:, None] * num_slots + s0 + o_s[None, :]
        m_s = m_m[:, None] & ((s0 + o_s[None, :]) < num_slots)
        m_s = m_s & (tl.load(sel + p_s, mask=m_s, other=-1) >= 0)
        b_max = tl.maximum(b_max, tl.max(tl.load(part_lse + p_s, mask=m_s, other=float("-inf")), axis=1))
    b_ref = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_tot = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, num_slots):
        p_s = o_m * num_slots + s
        m_s = m_m & (tl.load(sel + p_s, mask=m_m, other=-1) >= 0)
        b_w = tl.exp2(tl.load(part_lse + p_s, mask=m_s, other=float("-inf")) - b_ref)
        b_o = tl.load(part_o + p_s[:, None] * HEAD_DIM_V + o_dv[None, :], mask=m_s[:, None] & m_dv[None, :],
                      other=0.0)  # [BLOCK_M, BLOCK_DV]
        b_acc += b_w[:, None] * b_o
        b_tot += b_w
    b_den = tl.where(b_tot > 0, b_tot, 1.0)  # no partial (impossible: the own chunk is always selected): o = 0
    b_out = b_acc / b_den[:, None]
    i_h = o_m % num_heads
    i_i = (o_m // num_heads) % q_len
    i_b = o_m // (num_heads * q_len)
    p_out = o + i_b[:, None] * stride_ob + i_i[:, None] * stride_oi + i_h[:, None] * stride_oh + o_dv[None, :]
    tl.store(p_out, b_out.to(o.dtype.element_ty), mask=m_m[:, None] & m_dv[None, :])
    b_lse = tl.where(b_tot > 0, b_ref + tl.log2(b_den), float("-inf")) * 0.6931471805599453  # ln 2: natural log
    tl.store(lse + o_m, b_lse, mask=m_m)


def _gate_plan(b, hkv, tiles, m, num_others, block_c):
    """(splits, chunks per split) of the gate, from shapes only: enough programs to fill the GPU on one long
    row, few enough candidates (splits * num_others <= MAX_CANDIDATES) for the merge."""
    if num_others == 0 or m == 0:
        return 1, max(m, 1)
    per = GATE_SPLIT_CHUNKS
    if per is None:
        want = max(1, GATE_TARGET_PROGRAMS // max(1, b * hkv * tiles))
        per = max(block_c, triton.cdiv(m, want), triton.cdiv(m * num_others, MAX_CANDIDATES))
        per = triton.cdiv(per, block_c) * block_c
    return triton.cdiv(m, per), per


def routed_decode_select(q, key_sums, seqused_k, chunk_size, top_k, causal=True):
    """Chunk selection of a decode step (kernel 1), (B, Lq, Hq, min(top_k, M)) int32, ascending, -1 padded;
    equal to route_chunks_ref(q, k_cache, chunk_size, top_k, causal, seqused_k=seqused_k)[..., :S].
    Arguments as in routed_decode_triton; M = key_sums.shape[1]."""
    if q.stride(-1) != 1:  # the kernels assume a unit stride in the last dim (vector loads)
        q = q.contiguous()
    b, lq, hq, d = q.shape
    hkv = key_sums.shape[2]
    m = key_sums.shape[1]
    slots, num_others = min(top_k, m), min(top_k - 1, m)
    group = hq // hkv
    rows = lq * group
    sel = torch.empty(b, lq, hq, slots, device=q.device, dtype=torch.int32)
    if sel.numel() == 0:
        return sel
    block_d = max(16, next_pow2(d))
    # tl.dot (fp32 FMA, ieee) on 16-row tiles up to D = 128; beyond, or with fewer rows, the broadcast form on
    # <= 8 rows. 8 warps: at 4, ptxas spills the 16 x 16 x 128 dot (sm_90 compile, triton 3.8)
    use_dot = rows >= 16 and block_d <= 128
    block_r = 16 if use_dot else min(next_pow2(rows), 8)
    if use_dot:
        block_c = max(16, min(next_pow2(m), 2048 // block_d))
    else:
        block_c = max(1, min(next_pow2(m), BROADCAST_BUDGET // (block_r * block_d)))
    tiles = triton.cdiv(rows, block_r)
    splits, per = _gate_plan(b, hkv, tiles, m, num_others, block_c)
    block_k = max(1, next_pow2(num_others))
    final = splits == 1
    cand = sel if final else torch.empty(b * lq * hq, splits * num_others, device=q.device, dtype=torch.int64)
    decode_gate_kernel[(b * hkv * tiles * splits,)](
        q, key_sums, seqused_k, cand, sel, q.stride(0), q.stride(1), q.stride(2),
        key_sums.stride(0), key_sums.stride(1), key_sums.stride(2),
        chunk_size, lq, hq, hkv, num_others, slots, tiles, splits, per,
        HEAD_DIM=d, CAUSAL=bool(causal), FINAL=final, USE_DOT=use_dot, BLOCK_R=block_r, BLOCK_C=block_c,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=8)
    if not final:
        num_cand = splits * num_others
        decode_gate_merge_kernel[(b * hkv * tiles,)](
            cand, seqused_k, sel, chunk_size, lq, hq, hkv, num_others, slots, tiles, num_cand,
            CAUSAL=bool(causal), BLOCK_R=block_r, BLOCK_K=block_k,
            BLOCK_E=max(16, min(next_pow2(num_cand), 2048 // block_r)), num_warps=4)
    return sel


def routed_decode_triton(q, k_cache, v_cache, key_sums, seqused_k, chunk_size, top_k, causal=True, scale=None):
    """Routed (MoBA) attention of a decode step over a KV cache, flash-decoding style (module docstring).

    Args:
        q: (B, Lq, Hq, D) fp16/bf16/fp32, any strides (last dim contiguous, else copied); row b's queries are its
            LAST Lq cache positions: query i sits at p = seqused_k[b] - Lq + i (needs seqused_k[b] >= Lq).
        k_cache: (B, capacity, Hkv, D), v_cache: (B, capacity, Hkv, Dv), q's dtype, Hq % Hkv == 0 (GQA).
        key_sums: (B, >= ceil(capacity / chunk_size), Hkv, D) fp32: per chunk, the sum of k over the row's valid
            tokens (RoutedKVCache.key_sums[layer]).
        seqused_k: (B,) int32 (or int64), valid tokens per row, on q's device; read only by the kernels.
        chunk_size, top_k: ints >= 1 (top_k counts the own chunk; may exceed the number of chunks).
        causal: bool, default True. scale: float, default D ** -0.5.
    Returns:
        o: (B, Lq, Hq, Dv) in q.dtype; lse: (B, Lq, Hq) fp32, natural-log log-sum-exp of the scaled scores.
    No host sync (grid sizes come from shapes): capturable in a CUDA graph. Argument checks are the caller's
    job. Every row has the same Lq (dense q); ragged per-row query counts are the prefill kernels' case.
    Example:
        o, lse = routed_decode_triton(q, cache.keys(0), cache.values(0), cache.key_sums[0], cache.seqlens[0],
                                      cache.chunk_size, top_k=8)
    """
    b, lq, hq, d = q.shape
    cap, hkv = k_cache.shape[1], k_cache.shape[2]
    dv = v_cache.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or key_sums.stride(-1) != 1:
        raise ValueError("routed_decode_triton: k_cache, v_cache and key_sums need a unit stride in the last dim")
    m = triton.cdiv(cap, chunk_size)
    key_sums = key_sums[:, :m]
    o = torch.empty(b, lq, hq, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, lq, hq, device=q.device, dtype=torch.float32)
    slots = min(top_k, m)
    if o.numel() == 0 or slots == 0:
        return o, lse
    sel = routed_decode_select(q, key_sums, seqused_k, chunk_size, top_k, causal)
    group = hq // hkv
    rows = lq * group
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))
    dim = max(block_d, block_dv)
    wide = 2 if q.dtype == torch.float32 else 1  # fp32 operands: twice the registers per tile element
    use_dot = rows >= 16
    if use_dot:  # up to 64 rows x 128 dims (32 x 128 in fp32): no spills at sm_90 (ptxas, with the JIT's hints)
        block_r = min(next_pow2(rows), max(16, 8192 // (dim * wide)))
        block_n = max(16, min(next_pow2(chunk_size), 64))
        num_warps = 8 if block_r * dim * wide >= 8192 else 4
    else:
        block_r = next_pow2(rows)
        block_n = max(1, min(next_pow2(chunk_size), 64, BROADCAST_BUDGET // (block_r * dim)))
        num_warps = 4
    tiles = triton.cdiv(rows, block_r)
    part_o = torch.empty(b * lq * hq, slots, dv, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(b * lq * hq, slots, device=q.device, dtype=torch.float32)
    block_s = next_pow2(slots)
    decode_partial_kernel[(b * hkv * tiles * block_r * slots,)](
        q, k_cache, v_cache, seqused_k, sel, part_o, part_lse, q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), chunk_size, lq, hq, hkv, slots, tiles, scale * LOG2E,
        HEAD_DIM=d, HEAD_DIM_V=dv, CAUSAL=bool(causal), USE_DOT=use_dot, BLOCK_R=block_r, BLOCK_N=block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_S=block_s,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps)
    num_rows = b * lq * hq
    decode_merge_kernel[(triton.cdiv(num_rows, MERGE_ROWS),)](
        sel, part_o, part_lse, o, lse, o.stride(0), o.stride(1), o.stride(2), num_rows, lq, hq, slots,
        HEAD_DIM_V=dv, BLOCK_M=MERGE_ROWS, BLOCK_S=min(block_s, 64), BLOCK_DV=block_dv, num_warps=4)
    return o, lse
