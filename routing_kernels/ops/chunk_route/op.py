"""torch.library registration of ``routing_kernels::chunk_route``: schema, fake kernel, autograd, dispatch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext, _triton
from ..._layout import accum_dtype
from ..._validation import check_cu_seqlens_shape, check_int, check_tensor, prepare_offsets
from ..chunk_mean.op import out_shape as chunk_mean_shape
from .reference import chunk_route_backward_ref, chunk_route_ref


def check_args(x, query, chunk_size, cu_seqlens, max_seqlen, scale) -> None:
    varlen = cu_seqlens is not None
    check_tensor("x", x, varlen=varlen)
    check_tensor("query", query, varlen=varlen, like=x, ranks=(2, 3))
    check_int("chunk_size", chunk_size, 1)
    check_cu_seqlens_shape(cu_seqlens, max_seqlen, x)
    num_seqs = cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
    expected = tuple(x.shape[-2:]) if query.dim() == 2 else (num_seqs, *x.shape[-2:])
    if tuple(query.shape) != expected:
        _name = "S" if varlen else "B"
        raise ValueError(f"query must have shape (H, D) = {tuple(x.shape[-2:])} or ({_name}, H, D) = "
                         f"{(num_seqs, *x.shape[-2:])} to match x, got {tuple(query.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def out_shapes(x, chunk_size, cu_seqlens, max_seqlen):
    s, m, h, d = chunk_mean_shape(x, chunk_size, cu_seqlens, max_seqlen)
    return (s, h, m), (s, h, d)


def backend_for(x: Tensor, requested: Optional[str]) -> str:
    device = x.device.type
    available = {"triton": _triton.can_run(device) and x.dtype != torch.float64,
                 "cpu": device == "cpu" and _ext.has_kernel("chunk_route_fwd", "cpu"),
                 "cuda": device == "cuda" and _ext.has_kernel("chunk_route_fwd", "cuda")}
    return _backend.select("chunk_route", device, requested, available)


def _max_len(x: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]) -> int:
    return x.shape[1] if cu_seqlens is None else max_seqlen


def _scale(x: Tensor, scale: Optional[float]) -> float:
    return x.shape[-1] ** -0.5 if scale is None else float(scale)


def _triton_fwd(x, query, chunk_size, cu_seqlens, max_seqlen, scale):
    from .triton import chunk_route_fwd
    return chunk_route_fwd(x, query, chunk_size, cu_seqlens, max_seqlen, _scale(x, scale))


def _cpp_fwd(x, query, chunk_size, cu_seqlens, max_seqlen, scale):
    return torch.ops.routing_kernels.chunk_route_fwd(x, query, chunk_size, cu_seqlens,
                                                     _max_len(x, cu_seqlens, max_seqlen), _scale(x, scale))


def _triton_bwd(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen, scale):
    from .triton import chunk_route_bwd
    return chunk_route_bwd(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen,
                           _scale(x, scale))


def _cpp_bwd(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen, scale):
    return torch.ops.routing_kernels.chunk_route_bwd(dy, dweights, dsummary, x, query, weights, chunk_size,
                                                     cu_seqlens, _max_len(x, cu_seqlens, max_seqlen),
                                                     _scale(x, scale))


# backend -> implementation (the tests wrap these entries to see what ran); the backward runs the forward's.
KERNELS = {"reference": chunk_route_ref, "triton": _triton_fwd, "cpu": _cpp_fwd, "cuda": _cpp_fwd}
BACKWARD_KERNELS = {"reference": chunk_route_backward_ref, "triton": _triton_bwd, "cpu": _cpp_bwd, "cuda": _cpp_bwd}


@torch.library.custom_op("routing_kernels::chunk_route", mutates_args=())
def chunk_route(x: Tensor, query: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, scale: Optional[float] = None,
                backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    check_args(x, query, chunk_size, cu_seqlens, max_seqlen, scale)
    cu_seqlens = prepare_offsets(cu_seqlens, max_seqlen, x.shape[0])
    y, w, summary = KERNELS[backend_for(x, backend)](x, query, chunk_size, cu_seqlens, max_seqlen, scale)
    return y.contiguous(), w.contiguous(), summary.contiguous()


@chunk_route.register_fake
def _(x, query, chunk_size, cu_seqlens=None, max_seqlen=None, scale=None, backend=None):
    check_args(x, query, chunk_size, cu_seqlens, max_seqlen, scale)
    w_shape, s_shape = out_shapes(x, chunk_size, cu_seqlens, max_seqlen)
    return (x.new_empty(x.shape), x.new_empty(w_shape, dtype=accum_dtype(x.dtype)), x.new_empty(s_shape))


@torch.library.custom_op("routing_kernels::chunk_route_backward", mutates_args=())
def chunk_route_backward(dy: Tensor, dweights: Tensor, dsummary: Tensor, x: Tensor, query: Tensor,
                         weights: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int],
                         scale: Optional[float], backend: str = "reference") -> tuple[Tensor, Tensor]:
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    dx, dq = BACKWARD_KERNELS[backend](dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens,
                                       max_seqlen, scale)
    return dx.contiguous(), dq.contiguous()


@chunk_route_backward.register_fake
def _(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen, scale, backend="reference"):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(query, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, query, chunk_size, cu_seqlens, max_seqlen, scale, backend = inputs
    ctx.save_for_backward(x, query, output[1], cu_seqlens)
    ctx.chunk_size, ctx.max_seqlen, ctx.scale = chunk_size, max_seqlen, scale
    ctx.backend = backend_for(x, backend)  # the backward runs the forward's backend


def _backward(ctx, dy, dweights, dsummary):
    x, query, weights, cu_seqlens = ctx.saved_tensors
    dx, dq = torch.ops.routing_kernels.chunk_route_backward(
        dy, dweights, dsummary, x, query, weights, ctx.chunk_size, cu_seqlens, ctx.max_seqlen, ctx.scale,
        ctx.backend)
    return dx, dq, None, None, None, None, None


chunk_route.register_autograd(_backward, setup_context=_setup_context)
