"""torch.library registration of ``routing_kernels::chunk_mean_table``: chunk means over explicit chunk
boundaries (dynamic chunking, see routing_kernels/chunking.py). Packed x only; the public function reads a dense
batch as packed. Same backends as the integer op; the backward runs the forward's backend."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext, _triton
from ...chunking import check_table_shape, prepare_table
from ..._layout import seq_chunk_offsets
from ..._validation import check_cu_seqlens_shape, check_tensor
from .reference import chunk_mean_table_backward_ref, chunk_mean_table_ref


def check_args(x, cu_chunks, cu_seqlens, max_chunks) -> None:
    check_tensor("x", x, varlen=True)
    check_table_shape(cu_chunks, max_chunks, x, None)
    check_cu_seqlens_shape(cu_seqlens, 0, x)


def backend_for(x: Tensor, requested: Optional[str]) -> str:
    device = x.device.type
    available = {"cpu": device == "cpu" and _ext.has_kernel("chunk_mean_table_fwd", "cpu"),
                 "cuda": device == "cuda" and _ext.has_kernel("chunk_mean_table_fwd", "cuda"),
                 "triton": _triton.can_run(device) and x.dtype != torch.float64}
    return _backend.select("chunk_mean (cu_chunks)", device, requested, available)


def _cpp_fwd(x, cu_chunks, seq_chunks, max_chunks):
    return torch.ops.routing_kernels.chunk_mean_table_fwd(x, cu_chunks, seq_chunks, max_chunks)


def _cpp_bwd(grad_mean, x, cu_chunks, seq_chunks, max_chunks):
    return torch.ops.routing_kernels.chunk_mean_table_bwd(grad_mean, x, cu_chunks, seq_chunks, max_chunks)


def _triton_fwd(x, cu_chunks, seq_chunks, max_chunks):
    from .triton_table import chunk_mean_table_fwd
    return chunk_mean_table_fwd(x, cu_chunks, seq_chunks, max_chunks)


def _triton_bwd(grad_mean, x, cu_chunks, seq_chunks, max_chunks):
    from .triton_table import chunk_mean_table_bwd
    return chunk_mean_table_bwd(grad_mean, x, cu_chunks, seq_chunks, max_chunks)


# backend -> implementation, forward and backward (the tests wrap these entries to see what ran).
KERNELS = {"reference": chunk_mean_table_ref, "triton": _triton_fwd, "cpu": _cpp_fwd, "cuda": _cpp_fwd}
BACKWARD_KERNELS = {"reference": chunk_mean_table_backward_ref, "triton": _triton_bwd, "cpu": _cpp_bwd,
                    "cuda": _cpp_bwd}


@torch.library.custom_op("routing_kernels::chunk_mean_table", mutates_args=())
def chunk_mean_table(x: Tensor, cu_chunks: Tensor, cu_seqlens: Tensor, max_chunks: int,
                     backend: Optional[str] = None) -> Tensor:
    check_args(x, cu_chunks, cu_seqlens, max_chunks)
    cu_chunks, seq_chunks = prepare_table(cu_chunks, cu_seqlens, x.shape[0], max_chunks)
    return KERNELS[backend_for(x, backend)](x, cu_chunks, seq_chunks, max_chunks).contiguous()


@chunk_mean_table.register_fake
def _(x, cu_chunks, cu_seqlens, max_chunks, backend=None):
    check_args(x, cu_chunks, cu_seqlens, max_chunks)
    return x.new_empty((cu_seqlens.shape[0] - 1, max_chunks, *x.shape[1:]))


@torch.library.custom_op("routing_kernels::chunk_mean_table_backward", mutates_args=())
def chunk_mean_table_backward(grad_mean: Tensor, x: Tensor, cu_chunks: Tensor, cu_seqlens: Tensor, max_chunks: int,
                              backend: str = "reference") -> Tensor:
    cu_chunks = cu_chunks.contiguous()  # validated by the forward
    seq_chunks = seq_chunk_offsets(cu_chunks, cu_seqlens).contiguous()
    return BACKWARD_KERNELS[backend](grad_mean, x, cu_chunks, seq_chunks, max_chunks).contiguous()


@chunk_mean_table_backward.register_fake
def _(grad_mean, x, cu_chunks, cu_seqlens, max_chunks, backend="reference"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, cu_chunks, cu_seqlens, max_chunks, backend = inputs
    ctx.save_for_backward(x, cu_chunks, cu_seqlens)
    ctx.max_chunks = max_chunks
    ctx.backend = backend_for(x, backend)


def _backward(ctx, grad_mean):
    x, cu_chunks, cu_seqlens = ctx.saved_tensors
    dx = torch.ops.routing_kernels.chunk_mean_table_backward(grad_mean, x, cu_chunks, cu_seqlens, ctx.max_chunks,
                                                             ctx.backend)
    return dx, None, None, None, None


chunk_mean_table.register_autograd(_backward, setup_context=_setup_context)
