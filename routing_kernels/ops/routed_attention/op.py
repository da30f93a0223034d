"""torch.library registration of ``routing_kernels::routed_attention``: schema, fake kernel, autograd.

The op always returns ``(o, lse)`` (a custom op's outputs are fixed); the public function's
``return_lse`` decides what the caller sees. lse is needed by the backward anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend
from ..._layout import accum_dtype
from ..._validation import prepare_offsets
from ..route_chunks.op import available_backends, longest
from ..route_chunks.op import check_args as check_routing_args
from .reference import routed_attention_backward_ref, routed_attention_ref


def check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale) -> None:
    check_routing_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen, v=v)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def backend_for(q: Tensor, requested: Optional[str], max_len: int) -> str:
    chosen = _backend.select("routed_attention", q.device.type, requested,
                             available_backends(q, "routed_attention_fwd"))
    # The reference builds (Hq, L, L) scores, probabilities and mask per sequence.
    nbytes = q.shape[-2] * max_len * max_len * (3 * accum_dtype(q.dtype).itemsize + 1)
    _backend.refuse_quadratic_fallback("routed_attention", q.device.type, q.dtype, requested, chosen, nbytes)
    return chosen


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _triton_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale):
    from .triton import routed_attention_fwd_triton
    return routed_attention_fwd_triton(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, _scale(q, scale))


def _cpp_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale):
    return torch.ops.routing_kernels.routed_attention_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens,
                                                          longest(q, cu_seqlens, max_seqlen), _scale(q, scale))


def _triton_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale):
    from .triton import routed_attention_bwd_triton
    return routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens,
                                       max_seqlen, _scale(q, scale))


def _cpp_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale):
    return torch.ops.routing_kernels.routed_attention_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal,
                                                          cu_seqlens, longest(q, cu_seqlens, max_seqlen),
                                                          _scale(q, scale))


def _ref_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale):
    return routed_attention_backward_ref(do, dlse, q, k, v, o, chunk_size, top_k, causal, cu_seqlens, max_seqlen,
                                         scale)


# backend -> implementation (the tests wrap these entries to see what ran); the backward runs the forward's.
KERNELS = {"reference": routed_attention_ref, "triton": _triton_fwd, "cpu": _cpp_fwd}
BACKWARD_KERNELS = {"reference": _ref_bwd, "triton": _triton_bwd, "cpu": _cpp_bwd}


@torch.library.custom_op("routing_kernels::routed_attention", mutates_args=())
def routed_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                     scale: Optional[float] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale)
    cu_seqlens = prepare_offsets(cu_seqlens, max_seqlen, q.shape[0])
    name = backend_for(q, backend, longest(q, cu_seqlens, max_seqlen))
    o, lse = KERNELS[name](q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale)
    return o.contiguous(), lse.contiguous()


@routed_attention.register_fake
def _(q, k, v, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None, scale=None, backend=None):
    check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale)
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=accum_dtype(q.dtype)))


@torch.library.custom_op("routing_kernels::routed_attention_backward", mutates_args=())
def routed_attention_backward(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                              chunk_size: int, top_k: int, causal: bool, cu_seqlens: Optional[Tensor],
                              max_seqlen: Optional[int], scale: Optional[float],
                              backend: str = "reference") -> tuple[Tensor, Tensor, Tensor]:
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    grads = BACKWARD_KERNELS[backend](do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen,
                                      scale)
    return tuple(g.contiguous() for g in grads)


@routed_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend="reference"):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.args = (chunk_size, top_k, causal, max_seqlen, scale,
                backend_for(q, backend, longest(q, cu_seqlens, max_seqlen)))


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    chunk_size, top_k, causal, max_seqlen, scale, backend = ctx.args
    dq, dk, dv = torch.ops.routing_kernels.routed_attention_backward(
        do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend)
    return dq, dk, dv, None, None, None, None, None, None, None


routed_attention.register_autograd(_backward, setup_context=_setup_context)
