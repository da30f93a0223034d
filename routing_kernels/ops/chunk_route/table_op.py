"""torch.library registration of ``routing_kernels::chunk_route_table``: chunk routing over explicit chunk
boundaries (dynamic chunking, see routing_kernels/chunking.py). Packed x only; the public function reads a dense
batch as packed. Same backends as the integer op; the backward runs the forward's backend."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext, _triton
from ..._layout import accum_dtype, seq_chunk_offsets
from ..._validation import check_cu_seqlens_shape, check_tensor
from ...chunking import check_table_shape, prepare_table
from .op import check_args as check_route_args
from .reference import chunk_route_table_backward_ref, chunk_route_table_ref


def check_args(x, query, cu_chunks, cu_seqlens, max_chunks, scale) -> None:
    check_route_args(x, query, 1, cu_seqlens, 0, scale)  # x, query against the S of cu_seqlens, scale
    check_table_shape(cu_chunks, max_chunks, x, None)
    check_cu_seqlens_shape(cu_seqlens, 0, x)


def backend_for(x: Tensor, requested: Optional[str]) -> str:
    device = x.device.type
    available = {"triton": _triton.can_run(device) and x.dtype != torch.float64,
                 "cpu": device == "cpu" and _ext.has_kernel("chunk_route_table_fwd", "cpu"),
                 "cuda": device == "cuda" and _ext.has_kernel("chunk_route_table_fwd", "cuda")}
    return _backend.select("chunk_route (cu_chunks)", device, requested, available)


def _scale(x: Tensor, scale: Optional[float]) -> float:
    return x.shape[-1] ** -0.5 if scale is None else float(scale)


def _cpp_fwd(x, query, cu_chunks, seq_chunks, max_chunks, scale):
    return torch.ops.routing_kernels.chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, max_chunks,
                                                           _scale(x, scale))


def _cpp_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks, scale):
    return torch.ops.routing_kernels.chunk_route_table_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks,
                                                           seq_chunks, max_chunks, _scale(x, scale))


def _triton_fwd(x, query, cu_chunks, seq_chunks, max_chunks, scale):
    from .triton_table import chunk_route_table_fwd
    return chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, max_chunks, _scale(x, scale))


def _triton_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks, scale):
    from .triton_table import chunk_route_table_bwd
    return chunk_route_table_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks,
                                 _scale(x, scale))


KERNELS = {"reference": chunk_route_table_ref, "triton": _triton_fwd, "cpu": _cpp_fwd, "cuda": _cpp_fwd}
BACKWARD_KERNELS = {"reference": chunk_route_table_backward_ref, "triton": _triton_bwd, "cpu": _cpp_bwd,
                    "cuda": _cpp_bwd}


@torch.library.custom_op("routing_kernels::chunk_route_table", mutates_args=())
def chunk_route_table(x: Tensor, query: Tensor, cu_chunks: Tensor, cu_seqlens: Tensor, max_chunks: int,
                      scale: Optional[float] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    check_args(x, query, cu_chunks, cu_seqlens, max_chunks, scale)
    cu_chunks, seq_chunks = prepare_table(cu_chunks, cu_seqlens, x.shape[0], max_chunks)
    y, w, summary = KERNELS[backend_for(x, backend)](x, query, cu_chunks, seq_chunks, max_chunks, scale)
    return y.contiguous(), w.contiguous(), summary.contiguous()


@chunk_route_table.register_fake
def _(x, query, cu_chunks, cu_seqlens, max_chunks, scale=None, backend=None):
    check_args(x, query, cu_chunks, cu_seqlens, max_chunks, scale)
    s, (h, d) = cu_seqlens.shape[0] - 1, x.shape[1:]
    return (x.new_empty(x.shape), x.new_empty((s, h, max_chunks), dtype=accum_dtype(x.dtype)),
            x.new_empty((s, h, d)))


@torch.library.custom_op("routing_kernels::chunk_route_table_backward", mutates_args=())
def chunk_route_table_backward(dy: Tensor, dweights: Tensor, dsummary: Tensor, x: Tensor, query: Tensor,
                               weights: Tensor, cu_chunks: Tensor, cu_seqlens: Tensor, max_chunks: int,
                               scale: Optional[float], backend: str = "reference") -> tuple[Tensor, Tensor]:
    cu_chunks = cu_chunks.contiguous()  # validated by the forward
    seq_chunks = seq_chunk_offsets(cu_chunks, cu_seqlens).contiguous()
    dx, dq = BACKWARD_KERNELS[backend](dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks,
                                       scale)
    return dx.contiguous(), dq.contiguous()


@chunk_route_table_backward.register_fake
def _(dy, dweights, dsummary, x, query, weights, cu_chunks, cu_seqlens, max_chunks, scale, backend="reference"):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(query, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, query, cu_chunks, cu_seqlens, max_chunks, scale, backend = inputs
    ctx.save_for_backward(x, query, output[1], cu_chunks, cu_seqlens)
    ctx.max_chunks, ctx.scale = max_chunks, scale
    ctx.backend = backend_for(x, backend)


def _backward(ctx, dy, dweights, dsummary):
    x, query, weights, cu_chunks, cu_seqlens = ctx.saved_tensors
    dx, dq = torch.ops.routing_kernels.chunk_route_table_backward(
        dy, dweights, dsummary, x, query, weights, cu_chunks, cu_seqlens, ctx.max_chunks, ctx.scale, ctx.backend)
    return dx, dq, None, None, None, None, None


chunk_route_table.register_autograd(_backward, setup_context=_setup_context)
