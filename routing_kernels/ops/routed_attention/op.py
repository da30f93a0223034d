"""torch.library registration of ``routing_kernels::routed_attention``: schema, fake kernel, autograd.

The op always returns ``(o, lse)`` (a custom op's outputs are fixed); the public function's
``return_lse`` decides what the caller sees. lse is needed by the backward anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend
from ..._validation import check_cu_seqlens_values
from ..route_chunks.op import available_backends
from ..route_chunks.op import check_args as check_routing_args
from .reference import routed_attention_backward_ref, routed_attention_ref


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale) -> None:
    check_routing_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen, v=v)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def backend_for(q: Tensor) -> str:
    return _backend.select("routed_attention", q.device.type, _backend.requested_backend(),
                           available_backends(q, "routed_attention_fwd"))


def _max_len(q: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]) -> int:
    return q.shape[1] if cu_seqlens is None else max_seqlen


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


@torch.library.custom_op("routing_kernels::routed_attention", mutates_args=())
def routed_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                     scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale)
    if q.device.type == "cpu":
        check_cu_seqlens_values(cu_seqlens, max_seqlen, q.shape[0])
    backend = backend_for(q)
    if backend == "triton":
        from .triton import routed_attention_fwd_triton
        o, lse = routed_attention_fwd_triton(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen,
                                             _scale(q, scale))
    elif backend == "cpu":
        o, lse = torch.ops.routing_kernels.routed_attention_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens,
                                                                _max_len(q, cu_seqlens, max_seqlen), _scale(q, scale))
    else:
        o, lse = routed_attention_ref(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale)
    return o.contiguous(), lse.contiguous()


@routed_attention.register_fake
def _(q, k, v, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None, scale=None):
    check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale)
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype)))


@torch.library.custom_op("routing_kernels::routed_attention_backward", mutates_args=())
def routed_attention_backward(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                              chunk_size: int, top_k: int, causal: bool, cu_seqlens: Optional[Tensor],
                              max_seqlen: Optional[int], scale: Optional[float],
                              backend: str = "reference") -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        from .triton import routed_attention_bwd_triton
        grads = routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens,
                                            max_seqlen, _scale(q, scale))
    elif backend == "cpu":
        grads = torch.ops.routing_kernels.routed_attention_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal,
                                                               cu_seqlens, _max_len(q, cu_seqlens, max_seqlen),
                                                               _scale(q, scale))
    else:
        grads = routed_attention_backward_ref(do, dlse, q, k, v, o, chunk_size, top_k, causal, cu_seqlens,
                                              max_seqlen, scale)
    return tuple(g.contiguous() for g in grads)


@routed_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend="reference"):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.args = (chunk_size, top_k, causal, max_seqlen, scale, backend_for(q))


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    chunk_size, top_k, causal, max_seqlen, scale, backend = ctx.args
    dq, dk, dv = torch.ops.routing_kernels.routed_attention_backward(
        do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend)
    return dq, dk, dv, None, None, None, None, None, None


routed_attention.register_autograd(_backward, setup_context=_setup_context)
