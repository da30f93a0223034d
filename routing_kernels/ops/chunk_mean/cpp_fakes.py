"""Fake (meta) kernel of the C++ op ``routing_kernels::chunk_mean_bwd`` (schema in csrc/registration.cpp, CPU
kernel in csrc/cpu/chunk_mean.cpp), so that the op runs under fake tensors: ``torch.compile`` and
``torch.library.opcheck``. Importing this module registers it; without the extension ``_C`` it does nothing.

``chunk_mean_bwd(grad_mean, x, chunk_size, cu_seqlens, max_seqlen) -> dx``: grad_mean ``(S, M, H, D)`` in x's
dtype, any strides; dx like x (same shape and dtype, contiguous). ``max_seqlen`` is an int (ignored for dense x).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _ext
from ..._validation import check_cu_seqlens_shape, check_int, check_tensor

__all__ = ["REGISTERED"]


def _chunk_mean_bwd_fake(grad_mean: Tensor, x: Tensor, chunk_size: int, cu_seqlens: Optional[Tensor],
                         max_seqlen: int) -> Tensor:
    varlen = cu_seqlens is not None
    check_tensor("x", x, varlen=varlen)
    check_int("chunk_size", chunk_size, 1)
    check_cu_seqlens_shape(cu_seqlens, max_seqlen, x)
    check_tensor("grad_mean", grad_mean, varlen=False, like=x)
    seqs, n = (cu_seqlens.shape[0] - 1, max_seqlen) if varlen else (x.shape[0], x.shape[1])
    want = (seqs, (n + chunk_size - 1) // chunk_size, *x.shape[-2:])
    torch._check(tuple(grad_mean.shape) == want, lambda: f"grad_mean must be (S, M, H, D) = {want}, got "
                 f"{tuple(grad_mean.shape)}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


REGISTERED = _ext.has_kernel("chunk_mean_bwd", "cpu")
if REGISTERED:
    torch.library.register_fake("routing_kernels::chunk_mean_bwd")(_chunk_mean_bwd_fake)
