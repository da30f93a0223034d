"""torch.library registration of ``routing_kernels::routed_attention``: schema, fake kernel, autograd.

The op always returns ``(o, lse)`` (a custom op's outputs are fixed); the public function's
``return_lse`` decides what the caller sees. lse is needed by the backward anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext
from ..._keys import Keys, check_block_index_values, check_block_indices, longest_keys
from ..._layout import accum_dtype
from ..._validation import should_read_values
from ..route_chunks.op import (INFERENCE_NOTE, available_backends, check_values, cpp_key_args, is_prefill_layout,
                               is_training_layout, longest)
from ..route_chunks.op import check_args as check_routing_args
from . import decode
from .reference import routed_attention_backward_ref, routed_attention_ref


def check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale, keys: Keys = Keys(),
               block_indices: Optional[Tensor] = None, key_sums: Optional[Tensor] = None) -> None:
    check_routing_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen, v=v, keys=keys)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if block_indices is not None:
        check_block_indices(block_indices, q, top_k)
    decode.check_key_sums(key_sums, k, keys.seqused_k, chunk_size)


def backend_for(q: Tensor, requested: Optional[str], max_len: int, max_len_k: Optional[int] = None,
                layout: str = "training") -> str:
    """layout: "training" (q and k alike, the gate's selection: the attention kernels), "prefill" (queries
    shorter than keys, dense or cu_seqlens_k: the Triton forward and the C++ CPU inference kernels), "decode" (see
    decode.py: the decode kernels) or "other" (block_indices, other seqused_k calls: the C++ CPU inference
    kernels; the reference on GPU for now)."""
    if layout == "decode":
        available = available_backends(q, "routed_decode_fwd")
        available["triton"] = available["triton"] and decode.has_triton()
    else:
        available = available_backends(q, "routed_attention_fwd", layout == "training", layout == "prefill",
                                       "routed_attention_inference_fwd")
    chosen = _backend.select("routed_attention", q.device.type, requested, available,
                             "" if layout == "training" else INFERENCE_NOTE)
    # The reference builds (Hq, Lq, Lk) scores, probabilities and mask per sequence.
    max_len_k = max_len if max_len_k is None else max_len_k
    nbytes = q.shape[-2] * max_len * max_len_k * (3 * accum_dtype(q.dtype).itemsize + 1)
    _backend.refuse_quadratic_fallback("routed_attention", q.device.type, q.dtype, requested, chosen, nbytes)
    return chosen


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


# Every implementation takes the key layout, the caller's selection and the cache's chunk sums; Triton is only
# picked for the training, prefill and decode layouts, the C++ CPU kernels for every layout.
def _triton_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, keys, block_indices,
                key_sums=None):
    if keys.seqused_k is not None:
        return decode.triton(q, k, v, chunk_size, top_k, causal, _scale(q, scale), keys.seqused_k, key_sums)
    from .triton import routed_attention_fwd_triton
    return routed_attention_fwd_triton(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, _scale(q, scale),
                                       cu_seqlens_k=keys.cu_seqlens_k, max_seqlen_k=keys.max_seqlen_k)


def _cpp_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, keys, block_indices,
             key_sums=None):
    if decode.applies(q, keys.seqused_k, block_indices):
        return decode.cpu(q, k, v, chunk_size, top_k, causal, _scale(q, scale), keys.seqused_k, key_sums)
    if block_indices is not None or not is_training_layout(q, k, keys):
        return torch.ops.routing_kernels.routed_attention_inference_fwd(
            q, k, v, chunk_size, top_k, causal, *cpp_key_args(q, k, cu_seqlens, max_seqlen, keys), _scale(q, scale),
            block_indices)
    return torch.ops.routing_kernels.routed_attention_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens,
                                                          longest(q, cu_seqlens, max_seqlen), _scale(q, scale))


def _ref_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, keys, block_indices,
             key_sums=None):
    return routed_attention_ref(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, **keys._asdict(),
                                block_indices=block_indices)


def _triton_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, keys,
                block_indices):
    from .triton import routed_attention_bwd_triton
    return routed_attention_bwd_triton(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens,
                                       max_seqlen, _scale(q, scale))


def _cpp_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, keys,
             block_indices):
    if block_indices is not None or not is_training_layout(q, k, keys):
        return torch.ops.routing_kernels.routed_attention_inference_bwd(
            do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, *cpp_key_args(q, k, cu_seqlens, max_seqlen, keys),
            _scale(q, scale), block_indices)
    return torch.ops.routing_kernels.routed_attention_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal,
                                                          cu_seqlens, longest(q, cu_seqlens, max_seqlen),
                                                          _scale(q, scale))


def _ref_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, keys,
             block_indices):
    return routed_attention_backward_ref(do, dlse, q, k, v, o, chunk_size, top_k, causal, cu_seqlens, max_seqlen,
                                         scale, **keys._asdict(), block_indices=block_indices)


# backend -> implementation (the tests wrap these entries to see what ran); the backward runs the forward's.
KERNELS = {"reference": _ref_fwd, "triton": _triton_fwd, "cpu": _cpp_fwd}
BACKWARD_KERNELS = {"reference": _ref_bwd, "triton": _triton_bwd, "cpu": _cpp_bwd}


@torch.library.custom_op("routing_kernels::routed_attention", mutates_args=())
def routed_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                     scale: Optional[float] = None, backend: Optional[str] = None,
                     cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
                     seqused_k: Optional[Tensor] = None, block_indices: Optional[Tensor] = None,
                     key_sums: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    keys = Keys(cu_seqlens_k, max_seqlen_k, seqused_k)
    check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale, keys, block_indices, key_sums)
    cu_seqlens, keys = check_values(q, k, cu_seqlens, max_seqlen, keys)
    if block_indices is not None and should_read_values(block_indices):
        check_block_index_values(block_indices, q, k, chunk_size, causal, cu_seqlens, max_seqlen, keys)
    name = _resolve(q, k, backend, cu_seqlens, max_seqlen, keys, block_indices)
    o, lse = KERNELS[name](q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, keys, block_indices,
                           key_sums)
    return o.contiguous(), lse.contiguous()


def _layout(q, k, keys, block_indices) -> str:
    if block_indices is not None:
        return "other"
    if is_training_layout(q, k, keys):
        return "training"
    if decode.applies(q, keys.seqused_k, block_indices):
        return "decode"
    return "prefill" if is_prefill_layout(q, k, keys) else "other"


def _resolve(q, k, backend, cu_seqlens, max_seqlen, keys, block_indices) -> str:
    return backend_for(q, backend, longest(q, cu_seqlens, max_seqlen), longest_keys(k, cu_seqlens, max_seqlen, keys),
                       _layout(q, k, keys, block_indices))


@routed_attention.register_fake
def _(q, k, v, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None, scale=None, backend=None,
      cu_seqlens_k=None, max_seqlen_k=None, seqused_k=None, block_indices=None, key_sums=None):
    check_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, scale, Keys(cu_seqlens_k, max_seqlen_k, seqused_k),
               block_indices, key_sums)
    return (q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=accum_dtype(q.dtype)))


@torch.library.custom_op("routing_kernels::routed_attention_backward", mutates_args=())
def routed_attention_backward(do: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                              chunk_size: int, top_k: int, causal: bool, cu_seqlens: Optional[Tensor],
                              max_seqlen: Optional[int], scale: Optional[float], backend: str = "reference",
                              cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
                              seqused_k: Optional[Tensor] = None,
                              block_indices: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    cu_seqlens_k = None if cu_seqlens_k is None else cu_seqlens_k.contiguous()
    keys = Keys(cu_seqlens_k, max_seqlen_k, seqused_k)
    grads = BACKWARD_KERNELS[backend](do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen,
                                      scale, keys, block_indices)
    return tuple(g.contiguous() for g in grads)


@routed_attention_backward.register_fake
def _(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend="reference",
      cu_seqlens_k=None, max_seqlen_k=None, seqused_k=None, block_indices=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    (q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend, cu_seqlens_k, max_seqlen_k,
     seqused_k, block_indices, key_sums) = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens, cu_seqlens_k, seqused_k, block_indices)
    keys = Keys(cu_seqlens_k, max_seqlen_k, seqused_k)
    # The Triton prefill and decode kernels are forward-only: their backward is the reference's. On CPU the C++
    # inference backward takes every layout, the decode one included (it recomputes the selection from k, as the
    # reference does).
    layout = _layout(q, k, keys, block_indices)
    backward = _resolve(q, k, backend, cu_seqlens, max_seqlen, keys, block_indices)
    if layout != "training" and backward != "reference":
        cpu_bwd = q.device.type == "cpu" and _ext.has_kernel("routed_attention_inference_bwd", "cpu")
        backward = "cpu" if cpu_bwd and backward == "cpu" else "reference"
    ctx.args = (chunk_size, top_k, causal, max_seqlen, scale, backward, max_seqlen_k)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens, cu_seqlens_k, seqused_k, block_indices = ctx.saved_tensors
    chunk_size, top_k, causal, max_seqlen, scale, backend, max_seqlen_k = ctx.args
    dq, dk, dv = torch.ops.routing_kernels.routed_attention_backward(
        do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale, backend, cu_seqlens_k,
        max_seqlen_k, seqused_k, block_indices)
    return (dq, dk, dv) + (None,) * 12


routed_attention.register_autograd(_backward, setup_context=_setup_context)
