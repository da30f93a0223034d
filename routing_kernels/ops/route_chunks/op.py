"""torch.library registration of ``routing_kernels::route_chunks`` (no autograd: the output is discrete)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _backend, _ext, _triton
from ..._layout import ceil_div
from ..._keys import Keys, check_key_layout, check_key_values, longest_keys
from ..._validation import (check_cu_seqlens_shape, check_heads, check_int, check_tensor, prepare_offsets,
                            should_read_values)
from .reference import route_chunks_ref


def check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen, v=None, keys: Keys = Keys()) -> None:
    varlen = cu_seqlens is not None
    check_tensor("q", q, varlen=varlen)
    check_cu_seqlens_shape(cu_seqlens, max_seqlen, q)
    for name, t in (("k", k), ("v", v)):
        if t is None:
            continue
        check_tensor(name, t, varlen=varlen, like=q, ranks=(3, 4))
        check_key_layout(name, t, q, cu_seqlens, keys)
    check_heads("q", q.shape[-2], "k", k.shape[-2])
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the head dim of q ({q.shape[-1]}), got {k.shape[-1]}")
    if v is not None:
        if v.shape[:-2] != k.shape[:-2]:
            raise ValueError(f"v must have the tokens of k {tuple(k.shape[:-2])}, got {tuple(v.shape[:-2])}")
        if v.shape[-2] != k.shape[-2]:
            raise ValueError(f"v must have the heads of k ({k.shape[-2]}), got {v.shape[-2]}")
    check_int("chunk_size", chunk_size, 1)
    check_int("top_k", top_k, 1)


INFERENCE_NOTE = ("; which kernel computes which layout: q and k alike, every backend; queries shorter than keys "
                  "(dense, or cu_seqlens_k), Triton and the C++ CPU kernels; the decode cache layout (seqused_k, "
                  "<= 16 queries), the decode kernels; block_indices and other seqused_k calls, the C++ CPU kernels "
                  "(on GPU the reference for now)")


def is_training_layout(q: Tensor, k: Tensor, keys: Keys) -> bool:
    """q and k in the same layout and length (training, one-shot prefill)."""
    return keys.like_q and (q.dim() == 3 or q.shape[1] == k.shape[1])


def is_prefill_layout(q: Tensor, k: Tensor, keys: Keys) -> bool:
    """Queries shorter than keys, dense or packed with cu_seqlens_k: the Triton kernels take it (SEPARATE_KEYS)."""
    return keys.seqused_k is None and not is_training_layout(q, k, keys)


def check_values(q, k, cu_seqlens, max_seqlen, keys: Keys):
    """Validate offsets where that costs no device sync, and return them contiguous."""
    cu_seqlens = prepare_offsets(cu_seqlens, max_seqlen, q.shape[0])
    cu_k = prepare_offsets(keys.cu_seqlens_k, keys.max_seqlen_k, k.shape[0], "cu_seqlens_k", "max_seqlen_k")
    keys = keys._replace(cu_seqlens_k=cu_k)
    if should_read_values(cu_seqlens if cu_seqlens is not None else keys.seqused_k):
        check_key_values(q, k, cu_seqlens, max_seqlen, keys)
    return cu_seqlens, keys


def available_backends(q: Tensor, cpp_op: str, training_layout: bool = True, prefill_layout: bool = False,
                       cpp_inference_op: Optional[str] = None) -> dict:
    """Shared with routed_attention: Triton (not fp64; also the prefill layout) and the C++ CPU kernel registered
    as ``cpp_op`` (the training layout) or ``cpp_inference_op`` (every other layout, when given)."""
    device = q.device.type
    cpu_op = cpp_op if training_layout else cpp_inference_op
    return {"triton": (training_layout or prefill_layout) and _triton.can_run(device) and q.dtype != torch.float64,
            "cpu": cpu_op is not None and device == "cpu" and _ext.has_kernel(cpu_op, "cpu")}


def longest(q: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int]) -> int:
    return q.shape[1] if cu_seqlens is None else max_seqlen


def backend_for(q: Tensor, requested: Optional[str], chunk_size: int, max_len: int, max_len_k: Optional[int] = None,
                training_layout: bool = True, prefill_layout: bool = False) -> str:
    chosen = _backend.select("route_chunks", q.device.type, requested,
                             available_backends(q, "route_chunks_fwd", training_layout, prefill_layout,
                                                "route_chunks_inference_fwd"),
                             "" if training_layout else INFERENCE_NOTE)
    # The reference scores every (token, head, chunk) of a sequence at once and sorts them (int64 indices).
    max_len_k = max_len if max_len_k is None else max_len_k
    nbytes = max_len * q.shape[-2] * ceil_div(max_len_k, chunk_size) * 20
    _backend.refuse_quadratic_fallback("route_chunks", q.device.type, q.dtype, requested, chosen, nbytes)
    return chosen


# Every implementation takes the key layout; each kernel is only picked for the layouts it computes.
def _triton_fwd(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, keys):
    from .triton import route_chunks_triton
    return route_chunks_triton(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen,
                               cu_seqlens_k=keys.cu_seqlens_k, max_seqlen_k=keys.max_seqlen_k)


def cpp_key_args(q, k, cu_seqlens, max_seqlen, keys: Keys) -> tuple:
    """(cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k) of the C++ inference kernels: int32
    offsets, integer bounds (k's rows when max_seqlen_k is not given: a bound from shapes)."""
    def i32(t):
        return None if t is None else t.to(torch.int32).contiguous()
    max_k = keys.max_seqlen_k if keys.max_seqlen_k is not None else k.shape[0]
    max_q = longest(q, cu_seqlens, max_seqlen)
    return (i32(cu_seqlens), i32(keys.cu_seqlens_k), i32(keys.seqused_k), q.shape[0] if max_q is None else max_q,
            max_k if keys.cu_seqlens_k is not None else 0)


def _cpp_fwd(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, keys):
    if not is_training_layout(q, k, keys):
        return torch.ops.routing_kernels.route_chunks_inference_fwd(
            q, k, chunk_size, top_k, causal, *cpp_key_args(q, k, cu_seqlens, max_seqlen, keys))
    return torch.ops.routing_kernels.route_chunks_fwd(q, k, chunk_size, top_k, causal, cu_seqlens,
                                                      longest(q, cu_seqlens, max_seqlen))


def _ref_fwd(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, keys):
    return route_chunks_ref(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, **keys._asdict())


# backend -> implementation (the tests wrap these entries to see what ran).
KERNELS = {"reference": _ref_fwd, "triton": _triton_fwd, "cpu": _cpp_fwd}


@torch.library.custom_op("routing_kernels::route_chunks", mutates_args=())
def route_chunks(q: Tensor, k: Tensor, chunk_size: int, top_k: int, causal: bool = True,
                 cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                 backend: Optional[str] = None, cu_seqlens_k: Optional[Tensor] = None,
                 max_seqlen_k: Optional[int] = None, seqused_k: Optional[Tensor] = None) -> Tensor:
    keys = Keys(cu_seqlens_k, max_seqlen_k, seqused_k)
    check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen, keys=keys)
    cu_seqlens, keys = check_values(q, k, cu_seqlens, max_seqlen, keys)
    name = backend_for(q, backend, chunk_size, longest(q, cu_seqlens, max_seqlen),
                       longest_keys(k, cu_seqlens, max_seqlen, keys), is_training_layout(q, k, keys),
                       is_prefill_layout(q, k, keys))
    return KERNELS[name](q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, keys)


@route_chunks.register_fake
def _(q, k, chunk_size, top_k, causal=True, cu_seqlens=None, max_seqlen=None, backend=None, cu_seqlens_k=None,
      max_seqlen_k=None, seqused_k=None):
    check_args(q, k, chunk_size, top_k, cu_seqlens, max_seqlen, keys=Keys(cu_seqlens_k, max_seqlen_k, seqused_k))
    return q.new_empty((*q.shape[:-1], top_k), dtype=torch.int32)
