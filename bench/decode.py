"""The routed_decode benchmark op: one decode step (q_len 1) against a KV cache of N tokens per sequence.

Shared by the harness (cases.py / providers.py: ``python -m bench --ops routed_decode``) and the standalone
side-by-side script bench/routed_decode_cpu.py (ours interleaved with a copy of the same bytes).

Inputs: q (B, 1, Hq, D), the cache k / v (B, N, Hkv, D), its fp32 chunk key sums (B, M, Hkv, D) and seqused_k
(B,) = N, as a RoutedKVCache holds them. Bytes a step must read (the GB/s convention): q, the chunk sums, the K and
V rows of the union of the chunks the kv group's q heads select (the kernel reads each once per kv head), and the
output o written. The union depends on the data; it is computed here from the same gate (exact for causal decode
at the last position) once per case.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_UNION: dict = {}  # case -> total union size (chunks) over (b, kv head), filled by make_inputs


def chunk_sums(k: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, M, Hkv, D) fp32 sums of each chunk of k (B, N, Hkv, D), the last one partial."""
    b, n, hkv, d = k.shape
    m, full = -(-n // chunk), n // chunk
    sums = torch.zeros(b, m, hkv, d)
    sums[:, :full] = k[:, :full * chunk].float().view(b, full, chunk, hkv, d).sum(2)
    if n % chunk:
        sums[:, -1] = k[:, full * chunk:].float().sum(1)
    return sums


def union_sizes(q, key_sums, n, chunk, top_k):
    """Per (b, kv head): how many chunks the group's heads select together (causal, the last position)."""
    b, _, hq, d = q.shape
    hkv = key_sums.shape[2]
    own = (n - 1) // chunk
    means = key_sums[:, :own] / chunk  # (B, own, Hkv, D): the complete chunks before the own one
    gate = torch.einsum("bhd,bmhd->bhm", q[:, 0].float(), means.repeat_interleave(hq // hkv, dim=2))
    top = gate.topk(min(top_k - 1, own), dim=-1).indices if own and top_k > 1 else gate[..., :0].long()
    picked = torch.zeros(b, hq, own + 1, dtype=torch.bool)
    picked.scatter_(-1, top, True)
    picked[..., own] = True
    return picked.view(b, hkv, hq // hkv, own + 1).any(2).sum(-1)  # (B, Hkv)


def make_inputs(case, seed: int = 0, grouped_q: bool = False) -> tuple:
    """(q, k, v, key_sums, seqused_k) of a decode step; grouped_q: the G q heads of a kv group share one q (+1%
    noise), so that the union is top_k."""
    g = torch.Generator().manual_seed(seed)
    b, n, hq, hkv, d = case.B, case.N, case.H, case.hkv, case.D
    k = torch.randn(b, n, hkv, d, generator=g).to(case.dtype)
    v = torch.randn(b, n, hkv, d, generator=g).to(case.dtype)
    if grouped_q:
        base = torch.randn(b, 1, hkv, 1, d, generator=g)
        q = (base + 0.01 * torch.randn(b, 1, hkv, hq // hkv, d, generator=g)).reshape(b, 1, hq, d).to(case.dtype)
    else:
        q = torch.randn(b, 1, hq, d, generator=g).to(case.dtype)
    sums = chunk_sums(k, case.chunk)
    used = torch.full((b,), n, dtype=torch.int32)
    _UNION[case] = int(union_sizes(q, sums, n, case.chunk, case.top_k).sum())
    return q, k, v, sums, used


def bytes_needed(case) -> float:
    if case not in _UNION:
        make_inputs(case)
    es = torch.empty((), dtype=case.dtype).element_size()
    q_o = 2 * case.B * case.H * case.D * es
    sums = case.B * case.M * case.hkv * case.D * 4
    return float(q_o + sums + _UNION[case] * case.chunk * 2 * case.D * es)


def append_bytes(case) -> float:
    """One token per sequence: its k and v rows written, its chunk's fp32 sum row read and written."""
    es = torch.empty((), dtype=case.dtype).element_size()
    return float(case.B * case.hkv * case.D * (2 * es + 2 * 4))


# ---- providers (bench/providers.py maps names to these) ----

def ours(case, backend=None):
    import routing_kernels

    def run(q, k, v, sums, used):
        return routing_kernels.routed_attention(q, k, v, case.chunk, case.top_k, seqused_k=used, key_sums=sums,
                                                backend=backend)
    return run


def eager(case):
    from routing_kernels.ops.routed_attention.reference import routed_attention_ref

    def run(q, k, v, sums, used):
        return routed_attention_ref(q, k, v, case.chunk, case.top_k, True, seqused_k=used)
    return run


def sdpa(case):
    """Dense decode: SDPA with q_len 1 over the whole cache (the query is the last position: it sees every key)."""
    def run(q, k, v, sums, used):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)
    return run


def append(case):
    """RoutedKVCache.append of one token per sequence at position N - 1 of a cache of capacity N: the fused
    K / V write and chunk-sum update a decode step pays besides the attention. Timing only: the lengths are set
    back before each call (the sums drift; nothing reads them). The cache is torch.zeros, so its untouched pages
    cost no memory."""
    import routing_kernels

    cache = routing_kernels.RoutedKVCache(1, case.B, case.N, case.hkv, case.D, case.chunk, dtype=case.dtype)
    g = torch.Generator().manual_seed(1)
    k_new = torch.randn(case.B, 1, case.hkv, case.D, generator=g).to(case.dtype)
    v_new = torch.randn(case.B, 1, case.hkv, case.D, generator=g).to(case.dtype)

    def run(*inputs):
        cache.seqlens[0].fill_(case.N - 1)
        cache._bound[0] = case.N - 1  # the host-side bound append keeps (no device read while below capacity)
        cache.append(0, k_new, v_new)
        return cache.k[0]
    return run
