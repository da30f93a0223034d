"""The decode path of routed_attention: a few queries per sequence against a dense KV cache.

A call is in the decode layout when k/v are a dense cache with ``seqused_k`` (B, capacity, Hkv, D), q is dense
(B, Lq, Hq, D) with Lq <= MAX_QUERIES (decode, speculative decode), and the gate picks the chunks. Then the
decode kernels run (csrc/cpu/routed_decode.cpp, triton_decode.py): a gate over the chunk key sums (never
rereading K), then attention over the selected chunks split across programs/threads (flash-decoding) and
merged by lse, so one sequence fills the machine and the cost grows with top_k * chunk_size, not with the
cache. The chunk sums come from the cache (``RoutedKVCache.key_sums``, updated in O(new tokens) by append);
without them they are computed here from k_cache, which reads the whole cache once (O(capacity)).

The backward of the decode layout is the C++ CPU inference backward on CPU (routed_attention_inference_bwd, which
recomputes the selection from k as the reference does), the reference's elsewhere (exact; its memory is
Hq * Lq * capacity, small here).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._layout import accum_dtype, ceil_div
from ..._validation import _fail

MAX_QUERIES = 16  # queries per sequence up to which the decode kernels run (beyond: chunked prefill)


def applies(q: Tensor, seqused_k: Optional[Tensor], block_indices: Optional[Tensor]) -> bool:
    return seqused_k is not None and q.dim() == 4 and 1 <= q.shape[1] <= MAX_QUERIES and block_indices is None


def check_key_sums(key_sums: Optional[Tensor], k: Tensor, seqused_k: Optional[Tensor], chunk_size: int) -> None:
    if key_sums is None:
        return
    if seqused_k is None:
        _fail("key_sums belongs to a dense cache: pass seqused_k with it")
    want = (k.shape[0], ceil_div(k.shape[1], chunk_size), *k.shape[2:])
    if not isinstance(key_sums, Tensor) or tuple(key_sums.shape) != want:
        _fail(f"key_sums must be the cache's chunk sums of shape (B, ceil(capacity / chunk_size), Hkv, D) = {want}, "
              f"got {tuple(getattr(key_sums, 'shape', ()))}")
    if key_sums.dtype != accum_dtype(k.dtype):
        _fail(f"key_sums must be {accum_dtype(k.dtype)} (the accumulation type of k), got {key_sums.dtype}",
              TypeError)
    if key_sums.device != k.device:
        _fail(f"key_sums is on {key_sums.device} but the inputs are on {k.device}")


def key_sums_from_cache(k_cache: Tensor, seqused_k: Tensor, chunk_size: int) -> Tensor:
    """(B, M, Hkv, D) sums of each chunk's valid keys: one pass over the whole cache (no host sync)."""
    b, cap = k_cache.shape[:2]
    m = ceil_div(cap, chunk_size)
    valid = torch.arange(cap, device=k_cache.device)[None, :] < seqused_k.to(torch.int64)[:, None]  # (B, cap)
    k = k_cache.to(accum_dtype(k_cache.dtype)) * valid[:, :, None, None]
    k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, m * chunk_size - cap))
    return k.view(b, m, chunk_size, *k.shape[2:]).sum(2)


def _sums(key_sums, k, seqused_k, chunk_size):
    return key_sums_from_cache(k, seqused_k, chunk_size) if key_sums is None else key_sums


def cpu(q, k, v, chunk_size, top_k, causal, scale, seqused_k, key_sums):
    return torch.ops.routing_kernels.routed_decode_fwd(q, k, v, _sums(key_sums, k, seqused_k, chunk_size),
                                                       seqused_k, chunk_size, top_k, causal, scale)


def triton(q, k, v, chunk_size, top_k, causal, scale, seqused_k, key_sums):
    from .triton_decode import routed_decode_triton
    return routed_decode_triton(q, k, v, _sums(key_sums, k, seqused_k, chunk_size), seqused_k, chunk_size, top_k,
                                causal, scale)


def has_triton() -> bool:
    import importlib.util
    return importlib.util.find_spec(__package__ + ".triton_decode") is not None


def trim_to_bound(k_cache: Tensor, v_cache: Tensor, key_sums: Optional[Tensor], bound: int, chunk_size: int,
                  top_k: int, backend: Optional[str]) -> tuple:
    """A cache whose rows all hold at most ``bound`` keys (a host-side bound: no sync), with bound <= top_k *
    chunk_size: every query selects every chunk it may see. Cut the cache views to ``bound`` so that
    routed_attention sees a capacity within top_k chunks and runs one dense masked SDPA instead of the gate and
    the split decode kernels (which at a 4K cache with top_k 8 of 512 were 0.89x dense on CPU). Only when no
    backend was named: a named backend is what runs."""
    if backend is not None or bound < 1 or bound > top_k * chunk_size or bound >= k_cache.shape[1]:
        return k_cache, v_cache, key_sums
    sums = None if key_sums is None else key_sums[:, :ceil_div(bound, chunk_size)]
    return k_cache[:, :bound], v_cache[:, :bound], sums
