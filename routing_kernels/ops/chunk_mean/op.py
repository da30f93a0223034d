"""torch.library registration of ``routing_kernels::chunk_mean``: schema, fake kernel, autograd, dispatch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext, _triton
from ..._layout import ceil_div
from ..._validation import check_cu_seqlens_shape, check_int, check_tensor, prepare_offsets
from .reference import chunk_mean_backward_ref, chunk_mean_ref


def check_args(x, chunk_size, cu_seqlens, max_seqlen) -> None:
    check_tensor("x", x, varlen=cu_seqlens is not None)
    check_int("chunk_size", chunk_size, 1)
    check_cu_seqlens_shape(cu_seqlens, max_seqlen, x)


def out_shape(x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]):
    if cu_seqlens is None:
        return (x.shape[0], ceil_div(x.shape[1], chunk_size), *x.shape[2:])
    return (cu_seqlens.shape[0] - 1, ceil_div(max_seqlen, chunk_size), *x.shape[1:])


def backend_for(x: Tensor, requested: Optional[str]) -> str:
    device = x.device.type
    available = {"cpu": device == "cpu" and _ext.has_kernel("chunk_mean_fwd", "cpu"),
                 "cuda": device == "cuda" and _ext.has_kernel("chunk_mean_fwd", "cuda"),
                 "triton": _triton.can_run(device) and x.dtype != torch.float64}
    return _backend.select("chunk_mean", device, requested, available)


def _max_len(x: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]) -> int:
    return x.shape[1] if cu_seqlens is None else max_seqlen


def _cpp_fwd(x, chunk_size, cu_seqlens, max_seqlen):
    return torch.ops.routing_kernels.chunk_mean_fwd(x, chunk_size, cu_seqlens, _max_len(x, cu_seqlens, max_seqlen))


def _triton_fwd(x, chunk_size, cu_seqlens, max_seqlen):
    from .triton import chunk_mean_fwd
    return chunk_mean_fwd(x, chunk_size, cu_seqlens, max_seqlen)[0].to(x.dtype)


def _cpp_bwd(grad_mean, x, chunk_size, cu_seqlens, max_seqlen):
    return torch.ops.routing_kernels.chunk_mean_bwd(grad_mean, x, chunk_size, cu_seqlens,
                                                    _max_len(x, cu_seqlens, max_seqlen))


def _triton_bwd(grad_mean, x, chunk_size, cu_seqlens, max_seqlen):
    from .triton import chunk_mean_bwd
    return chunk_mean_bwd(grad_mean, x, chunk_size, cu_seqlens, max_seqlen)


# backend -> implementation, forward and backward (the tests wrap these entries to see what ran).
KERNELS = {"reference": chunk_mean_ref, "triton": _triton_fwd, "cpu": _cpp_fwd, "cuda": _cpp_fwd}
BACKWARD_KERNELS = {"reference": chunk_mean_backward_ref, "triton": _triton_bwd, "cpu": _cpp_bwd, "cuda": _cpp_bwd}
# Every backend's backward is its own kernel (the CUDA one runs in CI through the host emulation).
BACKWARD_OF = {"reference": "reference", "triton": "triton", "cpu": "cpu", "cuda": "cuda"}


@torch.library.custom_op("routing_kernels::chunk_mean", mutates_args=())
def chunk_mean(x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
               backend: Optional[str] = None) -> Tensor:
    check_args(x, chunk_size, cu_seqlens, max_seqlen)
    cu_seqlens = prepare_offsets(cu_seqlens, max_seqlen, x.shape[0])
    return KERNELS[backend_for(x, backend)](x, chunk_size, cu_seqlens, max_seqlen)


@chunk_mean.register_fake
def _(x, chunk_size, cu_seqlens=None, max_seqlen=None, backend=None):
    check_args(x, chunk_size, cu_seqlens, max_seqlen)
    return x.new_empty(out_shape(x, chunk_size, cu_seqlens, max_seqlen))


@torch.library.custom_op("routing_kernels::chunk_mean_backward", mutates_args=())
def chunk_mean_backward(grad_mean: Tensor, x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor],
                        max_seqlen: Optional[int], backend: str = "reference") -> Tensor:
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    return BACKWARD_KERNELS[backend](grad_mean, x, chunk_size, cu_seqlens, max_seqlen).contiguous()


@chunk_mean_backward.register_fake
def _(grad_mean, x, chunk_size, cu_seqlens, max_seqlen, backend="reference"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, chunk_size, cu_seqlens, max_seqlen, backend = inputs
    ctx.save_for_backward(x, cu_seqlens)
    ctx.chunk_size, ctx.max_seqlen = chunk_size, max_seqlen
    ctx.backend = BACKWARD_OF[backend_for(x, backend)]


def _backward(ctx, grad_mean):
    x, cu_seqlens = ctx.saved_tensors
    dx = torch.ops.routing_kernels.chunk_mean_backward(grad_mean, x, ctx.chunk_size, cu_seqlens, ctx.max_seqlen,
                                                          ctx.backend)
    return dx, None, None, None, None


chunk_mean.register_autograd(_backward, setup_context=_setup_context)


class _EagerCpu(torch.autograd.Function):
    """The same CPU kernels as the op, for eager calls: a plain autograd.Function dispatches in a fraction of a
    custom op's Python layers (forward, setup_context, the backward op), ~0.1 ms per fwd+bwd, which at N=1024
    (B=4, H=8, D=64) is a sixth of the whole call. torch.compile keeps tracing the custom op."""

    @staticmethod
    def forward(ctx, x, chunk_size, cu_seqlens, max_seqlen):
        ctx.save_for_backward(x, cu_seqlens)
        ctx.chunk_size, ctx.max_seqlen = chunk_size, max_seqlen
        return KERNELS["cpu"](x, chunk_size, cu_seqlens, max_seqlen)

    @staticmethod
    def backward(ctx, grad_mean):
        x, cu_seqlens = ctx.saved_tensors
        return BACKWARD_KERNELS["cpu"](grad_mean, x, ctx.chunk_size, cu_seqlens, ctx.max_seqlen), None, None, None


def eager_cpu_call(x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int],
                   backend: Optional[str]) -> Optional[Tensor]:
    """chunk_mean through _EagerCpu when the op would run the CPU kernel (arguments already checked); None when it
    would not (another backend, another device), so the caller goes through the op."""
    if x.device.type != "cpu" or backend_for(x, backend) != "cpu":
        return None
    cu_seqlens = prepare_offsets(cu_seqlens, max_seqlen, x.shape[0])
    return _EagerCpu.apply(x, chunk_size, cu_seqlens, max_seqlen)
