"""Independent float64 brute-force oracles: per sequence, per token, per head loops, no shared code
with the references (no packing helpers, no masks, no sorting tricks)."""
from __future__ import annotations

import math

import torch


def sequences(x, cu_seqlens):
    """List of per-sequence float64 tensors (L, H, D)."""
    if cu_seqlens is None:
        return [x[b].double() for b in range(x.shape[0])]
    cu = cu_seqlens.tolist()
    return [x[cu[i]:cu[i + 1]].double() for i in range(len(cu) - 1)]


def chunks_of(length, chunk_size):
    return [(s, min(s + chunk_size, length)) for s in range(0, length, chunk_size)]


def table_spans(cu_chunks, cu_seqlens):
    """Per sequence, its chunks as (start, end) token ranges relative to the sequence's first token, read off
    explicit packed boundaries one by one."""
    bounds, cu = cu_chunks.tolist(), cu_seqlens.tolist()
    spans = []
    for s in range(len(cu) - 1):
        cuts = [b for b in bounds if cu[s] <= b <= cu[s + 1]]
        spans.append([(a - cu[s], b - cu[s]) for a, b in zip(cuts[:-1], cuts[1:])])
    return spans


def _spans(s, length, chunk_size, spans):
    return chunks_of(length, chunk_size) if spans is None else spans[s]


def chunk_mean(x, chunk_size, cu_seqlens=None, max_seqlen=None, spans=None, max_chunks=None):
    """``spans`` (from table_spans) replaces the integer chunk_size; ``max_chunks`` then sizes the output."""
    seqs = sequences(x, cu_seqlens)
    n_max = x.shape[1] if cu_seqlens is None else max_seqlen
    m = math.ceil(n_max / chunk_size) if spans is None else max_chunks
    out = torch.zeros(len(seqs), m, *x.shape[-2:], dtype=torch.float64)
    for s, xs in enumerate(seqs):
        for i, (a, b) in enumerate(_spans(s, xs.shape[0], chunk_size, spans)):
            total = torch.zeros(x.shape[-2:], dtype=torch.float64)
            for t in range(a, b):
                total += xs[t]
            out[s, i] = total / (b - a)
    return out


def chunk_mean_backward(grad_mean, x, chunk_size, cu_seqlens=None, spans=None):
    """dx (float64, x's shape): every token of chunk i of sequence s gets grad_mean[s, i] / |chunk i|."""
    seqs = sequences(x, cu_seqlens)
    bos = [0] if cu_seqlens is None else cu_seqlens.tolist()
    dx = torch.zeros(x.shape, dtype=torch.float64).reshape(-1, *x.shape[-2:])
    for s, xs in enumerate(seqs):
        first = s * x.shape[1] if cu_seqlens is None else bos[s]
        for i, (a, b) in enumerate(_spans(s, xs.shape[0], chunk_size, spans)):
            for t in range(a, b):
                dx[first + t] = grad_mean[s, i].double() / (b - a)
    return dx.reshape(x.shape)


def chunk_route(x, query, chunk_size, cu_seqlens=None, max_seqlen=None, scale=None, spans=None, max_chunks=None):
    means = chunk_mean(x, chunk_size, cu_seqlens, max_seqlen, spans, max_chunks)
    seqs = sequences(x, cu_seqlens)
    h, d = x.shape[-2:]
    scale = d ** -0.5 if scale is None else scale
    m = means.shape[1]
    weights = torch.zeros(len(seqs), h, m, dtype=torch.float64)
    summary = torch.zeros(len(seqs), h, d, dtype=torch.float64)
    ys = []
    for s, xs in enumerate(seqs):
        seq_spans = _spans(s, xs.shape[0], chunk_size, spans)
        y = torch.zeros_like(xs)
        for head in range(h):
            qv = (query if query.dim() == 2 else query[s])[head].double()
            scores = [scale * float(torch.dot(qv, means[s, i, head])) for i in range(len(seq_spans))]
            if scores:
                top = max(scores)
                exps = [math.exp(v - top) for v in scores]
                for i, (a, b) in enumerate(seq_spans):
                    w = exps[i] / sum(exps)
                    weights[s, head, i] = w
                    summary[s, head] += w * means[s, i, head]
                    for t in range(a, b):
                        y[t, head] = w * xs[t, head]
        ys.append(y)
    y = torch.stack(ys) if cu_seqlens is None else torch.cat(ys) if ys else torch.zeros(0, h, d).double()
    return y, weights, summary


def route_chunks(q, k, chunk_size, top_k, causal=True, cu_seqlens=None, cu_seqlens_k=None):
    """Queries are the last len(q_s) positions of each sequence of keys: query i sits at t = Lk - Lq + i."""
    qs = sequences(q, cu_seqlens)
    ks = sequences(k, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k)
    hq, hkv = q.shape[-2], k.shape[-2]
    outs = []
    for qq, kk in zip(qs, ks):
        spans = chunks_of(kk.shape[0], chunk_size)
        means = [kk[a:b].mean(0) for a, b in spans]
        out = torch.full((qq.shape[0], hq, top_k), -1, dtype=torch.int64)
        for i in range(qq.shape[0]):
            t = kk.shape[0] - qq.shape[0] + i
            own = t // chunk_size
            for h in range(hq):
                kv = h // (hq // hkv)
                cands = []
                for c, (a, b) in enumerate(spans):
                    if c == own or (causal and b > t):
                        continue
                    cands.append((-float(torch.dot(qq[i, h], means[c][kv])), c))  # sort: best gate, then index
                chosen = sorted([own] + [c for _, c in sorted(cands)[: top_k - 1]])
                out[i, h, : len(chosen)] = torch.tensor(chosen)
        outs.append(out)
    if cu_seqlens is None:
        return torch.stack(outs)
    return torch.cat(outs) if outs else torch.zeros(0, hq, top_k, dtype=torch.int64)


def routed_attention(q, k, v, chunk_size, top_k, causal=True, cu_seqlens=None, scale=None, cu_seqlens_k=None,
                     block_indices=None):
    """A row that selects no visible key (only with block_indices) gives o = 0, lse = -inf."""
    idx = route_chunks(q, k, chunk_size, top_k, causal, cu_seqlens, cu_seqlens_k) if block_indices is None \
        else block_indices
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    qs, ks, vs = sequences(q, cu_seqlens), sequences(k, cu_k), sequences(v, cu_k)
    idx_seqs = sequences(idx, cu_seqlens)
    hq, hkv = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for qq, kk, vv, sel in zip(qs, ks, vs, idx_seqs):
        o = torch.zeros(qq.shape[0], hq, v.shape[-1], dtype=torch.float64)
        lse = torch.zeros(qq.shape[0], hq, dtype=torch.float64)
        for t in range(qq.shape[0]):
            pos = kk.shape[0] - qq.shape[0] + t
            for h in range(hq):
                kv = h // (hq // hkv)
                chosen = {int(c) for c in sel[t, h] if c >= 0}
                keys = [j for j in range(kk.shape[0]) if j // chunk_size in chosen and (not causal or j <= pos)]
                if not keys:
                    lse[t, h] = -math.inf
                    continue
                scores = torch.tensor([scale * float(torch.dot(qq[t, h], kk[j, kv])) for j in keys],
                                      dtype=torch.float64)
                top = scores.max()
                p = torch.exp(scores - top)
                lse[t, h] = top + torch.log(p.sum())
                p = p / p.sum()
                for w, j in zip(p, keys):
                    o[t, h] += w * vv[j, kv]
        outs.append(o)
        lses.append(lse)
    if cu_seqlens is None:
        return torch.stack(outs), torch.stack(lses)
    if not outs:
        return torch.zeros(0, hq, v.shape[-1]).double(), torch.zeros(0, hq).double()
    return torch.cat(outs), torch.cat(lses)
