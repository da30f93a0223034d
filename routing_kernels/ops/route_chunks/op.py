"""torch.library registration of ``routing_kernels::route_chunks`` (no autograd: the output is discrete)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext, _triton
from ..._validation import (check_cu_seqlens_shape, check_cu_seqlens_values, check_heads, check_int,
                            check_same_tokens, check_tensor)
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


def backend_for(q: Tensor) -> str:
    return _backend.select("route_chunks", q.device.type, _backend.requested_backend(),
                           available_backends(q, "route_chunks_fwd"))


@torch.library.custom_op("routing_kernels::route_chunks", mutates_args=())
def route_chunks(q: Tensor, k: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                 cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
    check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen)
    if q.device.type == "cpu":
        check_cu_seqlens_values(cu_seqlens, max_seqlen, q.shape[0])
    backend = backend_for(q)
    if backend == "triton":
        from .triton import route_chunks_triton
        return route_chunks_triton(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)
    if backend == "cpu":
        n = max_seqlen if cu_seqlens is not None else q.shape[1]
        return torch.ops.routing_kernels.route_chunks_fwd(q, k, chunk_size, top_k, causal, cu_seqlens, n)
    return route_chunks_ref(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen)


@route_chunks.register_fake
def _(q, k, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None):
    check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen)
    return q.new_empty((*q.shape[:-1], top_k), dtype=torch.int32)
