"""torch.library registration of ``routing_kernels::route_chunks`` (no autograd: the output is discrete)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext, _triton
from ..._layout import ceil_div
from ..._validation import (check_cu_seqlens_shape, check_heads, check_int, check_same_tokens, check_tensor,
                            prepare_offsets)
from .reference import route_chunks_ref


def check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen, v=None) -> None:
    varlen = cu_seqlens is not None
    check_tensor("q", q, varlen=varlen)
    check_tensor("k", k, varlen=varlen, like=q)
    check_same_tokens("k", k, "q", q, varlen)
    check_heads("q", q.shape[-2], "k", k.shape[-2])
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the head dim of q ({q.shape[-1]}), got {k.shape[-1]}")
    if v is not None:
        check_tensor("v", v, varlen=varlen, like=q)
        check_same_tokens("v", v, "q", q, varlen)
        if v.shape[-2] != k.shape[-2]:
            raise ValueError(f"v must have the heads of k ({k.shape[-2]}), got {v.shape[-2]}")
    check_int("chunk_size", chunk_size, 1)
    check_int("top_k", top_k, 1)
    check_cu_seqlens_shape(cu_seqlens, max_seqlen, q)


def available_backends(q: Tensor, cpp_op: str) -> dict:
    """Shared with routed_attention: Triton (not fp64) and the C++ kernel registered as ``cpp_op``."""
    device = q.device.type
    return {"triton": _triton.can_run(device) and q.dtype != torch.float64,
            "cpu": device == "cpu" and _ext.has_kernel(cpp_op, "cpu")}


def longest(q: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]) -> int:
    return q.shape[1] if cu_seqlens is None else max_seqlen


def backend_for(q: Tensor, requested: Optional[str], chunk_size: int, max_len: int) -> str:
    chosen = _backend.select("route_chunks", q.device.type, requested, available_backends(q, "route_chunks_fwd"))
    # The reference scores every (token, head, chunk) of a sequence at once and sorts them (int64 indices).
    nbytes = max_len * q.shape[-2] * ceil_div(max_len, chunk_size) * 20
    _backend.refuse_quadratic_fallback("route_chunks", q.device.type, q.dtype, requested, chosen, nbytes)
    return chosen


def _triton_fwd(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen):
    from .triton import route_chunks_triton
    return route_chunks_triton(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)


def _cpp_fwd(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen):
    return torch.ops.routing_kernels.route_chunks_fwd(q, k, chunk_size, top_k, causal, cu_seqlens,
                                                      longest(q, cu_seqlens, max_seqlen))


# backend -> implementation (the tests wrap these entries to see what ran).
KERNELS = {"reference": route_chunks_ref, "triton": _triton_fwd, "cpu": _cpp_fwd}


@torch.library.custom_op("routing_kernels::route_chunks", mutates_args=())
def route_chunks(q: Tensor, k: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                 cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                 backend: Optional[str] = None) -> Tensor:
    check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen)
    cu_seqlens = prepare_offsets(cu_seqlens, max_seqlen, q.shape[0])
    name = backend_for(q, backend, chunk_size, longest(q, cu_seqlens, max_seqlen))
    return KERNELS[name](q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)


@route_chunks.register_fake
def _(q, k, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None, backend=None):
    check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen)
    return q.new_empty((*q.shape[:-1], top_k), dtype=torch.int32)
