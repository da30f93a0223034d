"""Public functions. Each validates, fills in ``max_seqlen`` and calls ``torch.ops.routing_kernels.<op>``.

``backend``: None picks the fastest implementation available for the tensors' device; "reference" runs
the eager PyTorch reference (autograd by PyTorch itself); "cpu", "cuda", "triton" ask for that kernel
and raise ValueError when it is not available for the op, device or dtype. The order None tries is in
``_backend.PREFERENCE``: CUDA tensors Triton then CUDA C++; CPU tensors the C++ kernel; else the reference,
except that the attention ops refuse to fall back to their O(L^2)-memory references for long inputs unless
asked by name. The choice is an argument of the op, so it holds under ``torch.compile`` as in eager mode.

Varlen calls: on CPU tensors the values of ``cu_seqlens`` are validated on every call; on GPU tensors only
in debug mode (``routing_kernels.set_debug(True)`` or ``ROUTING_KERNELS_DEBUG=1``), because reading them is a
device sync. Pass ``max_seqlen`` on GPU (computing it is a sync) and always under ``torch.compile``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import ops as _ops  # noqa: F401  (registers the ops)
from ._backend import check_backend
from ._keys import Keys, check_block_index_values
from ._layout import ceil_div
from ._validation import check_cu_seqlens_values, is_compiling, resolve_max_seqlen, should_read_values
from .chunking import check_table_shape, check_table_values, dense_offsets, resolve_max_chunks
from ._layout import seq_chunk_offsets
from ._validation import check_cu_seqlens_shape, check_tensor
from .ops.chunk_mean.op import check_args as _check_chunk_mean
from .ops.chunk_mean.op import eager_cpu_call as _chunk_mean_eager_cpu
from .ops.chunk_mean.reference import chunk_mean_table_ref
from .ops.chunk_mean.table_op import check_args as _check_chunk_mean_table
from .ops.chunk_route.reference import chunk_route_table_ref
from .ops.chunk_route.table_op import check_args as _check_chunk_route_table
from .ops.chunk_mean.reference import chunk_mean_ref
from .ops.chunk_route.op import check_args as _check_chunk_route
from .ops.chunk_route.reference import chunk_route_ref
from .ops.route_chunks.op import check_args as _check_route_chunks
from .ops.route_chunks.reference import route_chunks_ref
from .ops.routed_attention.op import check_args as _check_routed_attention
from .ops.routed_attention.reference import routed_attention_ref


class ChunkRouteOutput(NamedTuple):
    y: Tensor  # like x: every token scaled by its chunk's weight
    weights: Tensor  # (B|S, H, M) fp32 (fp64 for fp64 x): softmax over each sequence's chunks
    summary: Tensor  # (B|S, H, D) like x: sum_i w_i * mean_i


def _prepare(check, x: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int],
             backend: Optional[str], *args, **kwargs) -> Optional[int]:
    """Validate the metadata and fill in max_seqlen. The ops validate cu_seqlens' values themselves; the
    reference path does not go through an op, so it is validated here."""
    check_backend(backend)
    max_seqlen = resolve_max_seqlen(cu_seqlens, max_seqlen)
    check(*args, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kwargs)
    if backend == "reference" and cu_seqlens is not None and not is_compiling():
        check_cu_seqlens_values(cu_seqlens, max_seqlen, x.shape[0])
    return max_seqlen


def _table_layout(x: Tensor, chunk_size, cu_seqlens: Optional[Tensor], cu_chunks, max_chunks, backend) -> tuple:
    """Dynamic chunking: x as packed tokens (a dense batch is read as B sequences of N), its cu_seqlens, and
    max_chunks filled in. Metadata checks here; the ops validate the tables' values."""
    check_backend(backend)
    check_tensor("x", x, varlen=cu_seqlens is not None)
    check_table_shape(cu_chunks, 0 if max_chunks is None else max_chunks, x, chunk_size)
    if cu_seqlens is None:
        xp, cu = x.reshape(-1, *x.shape[2:]), dense_offsets(x.shape[0], x.shape[1], x.device)
    else:
        check_cu_seqlens_shape(cu_seqlens, 0, x)
        xp, cu = x, cu_seqlens
    return xp, cu, resolve_max_chunks(cu_chunks, cu, max_chunks)


def _reference_table(xp: Tensor, cu: Tensor, cu_chunks: Tensor, max_chunks: int) -> Tensor:
    """The reference path does not go through an op: validate the table here; return seq_chunks."""
    if not is_compiling():
        check_table_values(cu_chunks, cu, xp.shape[0], max_chunks)
    return seq_chunk_offsets(cu_chunks, cu)


def chunk_mean(x: Tensor, chunk_size: Optional[int] = None, *, cu_seqlens: Optional[Tensor] = None,
               max_seqlen: Optional[int] = None, cu_chunks: Optional[Tensor] = None, max_chunks: Optional[int] = None,
               backend: Optional[str] = None) -> Tensor:
    """Mean of x over each chunk of ``chunk_size`` consecutive tokens of every sequence, or over explicit
    chunk boundaries ``cu_chunks`` (dynamic chunking, see :mod:`routing_kernels.chunking`).

    Args:
        x: (B, N, H, D), or packed (T, H, D) with ``cu_seqlens``; fp16 / bf16 / fp32 (fp64 on CPU).
        chunk_size: tokens per chunk, >= 1. Chunk i covers [i*chunk_size, min((i+1)*chunk_size, L)).
        cu_seqlens: optional int32 (S+1,) sequence offsets into T: starts at 0, non-decreasing, ends at T.
        max_seqlen: longest sequence length; computed from cu_seqlens when None (a device sync).
        cu_chunks: instead of chunk_size (which must then be None): int32 (K+1,) chunk boundaries on the packed
            tokens (a dense batch's tokens read as B*N), starting at 0, strictly increasing, ending at T and
            containing every offset of cu_seqlens. Build it with :func:`routing_kernels.chunk_boundaries`.
        max_chunks: the most chunks one sequence has (the output's M); computed when None (a device sync).
        backend: None, "reference", "triton" (not fp64), "cpu" or "cuda" (see module docstring).
    Returns:
        (B, M, H, D) with M = ceil(N / chunk_size), or (S, M_max, H, D) for varlen with zeros where a
        sequence has no such chunk (M = max_chunks with cu_chunks); x's dtype, accumulated in fp32 (fp64 for
        fp64).
    Raises:
        ValueError / TypeError naming the argument: wrong rank or dtype, chunk_size < 1, malformed
        cu_seqlens, unavailable backend.
    Example:
        >>> x = torch.randn(2, 100, 4, 64)
        >>> chunk_mean(x, 32).shape
        torch.Size([2, 4, 4, 64])
        >>> cu = torch.tensor([0, 70, 70, 130], dtype=torch.int32)  # 3 sequences, the 2nd empty
        >>> chunk_mean(torch.randn(130, 4, 64), 32, cu_seqlens=cu).shape
        torch.Size([3, 3, 4, 64])
    """
    if cu_chunks is not None:
        xp, cu, max_chunks = _table_layout(x, chunk_size, cu_seqlens, cu_chunks, max_chunks, backend)
        _check_chunk_mean_table(xp, cu_chunks, cu, max_chunks)
        if backend == "reference":
            return chunk_mean_table_ref(xp, cu_chunks, _reference_table(xp, cu, cu_chunks, max_chunks), max_chunks)
        return torch.ops.routing_kernels.chunk_mean_table(xp, cu_chunks, cu, max_chunks, backend=backend)
    if chunk_size is None:
        raise ValueError("chunk_size is required unless cu_chunks is given")
    max_seqlen = _prepare(_check_chunk_mean, x, cu_seqlens, max_seqlen, backend, x, chunk_size)
    if backend == "reference":
        return chunk_mean_ref(x, chunk_size, cu_seqlens, max_seqlen)
    if not is_compiling():
        out = _chunk_mean_eager_cpu(x, chunk_size, cu_seqlens, max_seqlen, backend)
        if out is not None:
            return out
    return torch.ops.routing_kernels.chunk_mean(x, chunk_size, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                                backend=backend)


def chunk_route(x: Tensor, query: Tensor, chunk_size: Optional[int] = None, *, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, scale: Optional[float] = None, cu_chunks: Optional[Tensor] = None,
                max_chunks: Optional[int] = None, backend: Optional[str] = None) -> ChunkRouteOutput:
    """Classic chunk routing: score each chunk's mean against a query, softmax, weight the chunks.

    Per sequence and head: ``s_i = scale * <query, mean_i>``, ``w = softmax_i(s)`` over that sequence's
    chunks, ``y_t = w_{chunk(t)} * x_t``, ``summary = sum_i w_i * mean_i``. Gradients flow to x and query.

    Args:
        x: (B, N, H, D), or packed (T, H, D) with ``cu_seqlens``; fp16 / bf16 / fp32 (fp64 on CPU).
        query: (H, D) shared by all sequences, or (B, H, D) / (S, H, D) per sequence; x's dtype.
        chunk_size: tokens per chunk, >= 1 (None with cu_chunks).
        cu_seqlens, max_seqlen: varlen layout, as in :func:`chunk_mean`.
        cu_chunks, max_chunks: explicit chunk boundaries instead of chunk_size, as in :func:`chunk_mean`.
        scale: score scale, default D ** -0.5.
        backend: None, "reference", "triton" (not fp64), "cpu" or "cuda" (see module docstring).
    Returns:
        ChunkRouteOutput(y like x, weights (B|S, H, M) fp32 (fp64 for fp64 x; 0 beyond a sequence's
        chunks, all 0 for an empty sequence), summary (B|S, H, D) in x's dtype).
    Raises:
        ValueError / TypeError naming the argument (shapes, dtypes, devices, chunk_size, cu_seqlens).
    Example:
        >>> x, q = torch.randn(2, 100, 4, 64), torch.randn(4, 64)
        >>> y, w, summary = chunk_route(x, q, 32)          # w: (2, 4, 4)
        >>> cu = torch.tensor([0, 70, 130], dtype=torch.int32)
        >>> out = chunk_route(torch.randn(130, 4, 64), torch.randn(2, 4, 64), 32, cu_seqlens=cu)
    """
    if cu_chunks is not None:
        return _chunk_route_table(x, query, chunk_size, cu_seqlens, scale, cu_chunks, max_chunks, backend)
    if chunk_size is None:
        raise ValueError("chunk_size is required unless cu_chunks is given")
    max_seqlen = _prepare(_check_chunk_route, x, cu_seqlens, max_seqlen, backend, x, query, chunk_size,
                          scale=scale)
    if backend == "reference":
        return ChunkRouteOutput(*chunk_route_ref(x, query, chunk_size, cu_seqlens, max_seqlen, scale))
    return ChunkRouteOutput(*torch.ops.routing_kernels.chunk_route(x, query, chunk_size, cu_seqlens=cu_seqlens,
                                                                   max_seqlen=max_seqlen, scale=scale,
                                                                   backend=backend))


def _chunk_route_table(x, query, chunk_size, cu_seqlens, scale, cu_chunks, max_chunks, backend) -> ChunkRouteOutput:
    xp, cu, max_chunks = _table_layout(x, chunk_size, cu_seqlens, cu_chunks, max_chunks, backend)
    _check_chunk_route_table(xp, query, cu_chunks, cu, max_chunks, scale)
    if backend == "reference":
        seq_chunks = _reference_table(xp, cu, cu_chunks, max_chunks)
        y, w, summary = chunk_route_table_ref(xp, query, cu_chunks, seq_chunks, max_chunks, scale)
    else:
        y, w, summary = torch.ops.routing_kernels.chunk_route_table(xp, query, cu_chunks, cu, max_chunks, scale=scale,
                                                                    backend=backend)
    return ChunkRouteOutput(y.reshape(x.shape), w, summary)


def select_chunks(q: Tensor, k: Tensor, chunk_size: int, top_k: int, *, causal: bool = True,
                  cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                  cu_seqlens_q: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
                  cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
                  seqused_k: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """MoBA gate: the chunks each query token attends to (its own chunk plus the top_k - 1 best).

    ``route_chunks`` is the same function under its first name (kept as an alias; the op stays
    ``torch.ops.routing_kernels.route_chunks``). The new name says what it returns, and is no longer one
    word order away from :func:`chunk_route`, which is a different op.

    Gate ``g_i = <q_t, mean of k over chunk i>`` (fp32, unscaled) against the chunk means of the token's
    kv head ``h // (Hq // Hkv)``. Eligible chunks besides the own one: those ending before t when causal
    ((i+1)*chunk_size <= t), every other chunk when not. Ties go to the lower index.

    Queries may be fewer than keys (inference): the Lq queries of a sequence with Lk keys are its last Lq
    positions, query i at t = Lk - Lq + i (bottom-right aligned, as flash-attn >= 2.1), so decoding position
    t against t + 1 keys selects exactly what the full sequence selects for row t.

    Args:
        q: (B, N, Hq, D) or packed (T, Hq, D); k: (B, N, Hkv, D) or (T, Hkv, D), Hq a multiple of Hkv.
        chunk_size: >= 1.  top_k: chunks per token including the own one, >= 1 (may exceed M).
        causal: restrict to past chunks (default True).
        cu_seqlens, max_seqlen: varlen layout shared by q and k, as in :func:`chunk_mean`.
        cu_seqlens_q / max_seqlen_q, cu_seqlens_k / max_seqlen_k: separate packed layouts of q and k (T_q and
            T_k tokens, the same number of sequences, each with Lq <= Lk); or dense q (B, Nq, ..) with dense
            k (B, Nk, ..), Nq <= Nk.
        seqused_k: int32 (B,): k is a dense cache (B, capacity, Hkv, D) whose row b holds seqused_k[b]
            valid keys (flash-attn's cache_seqlens); q dense (B, Nq, ..) or packed with B sequences.
        backend: None, "reference", "triton" (not fp64) or "cpu". Every backend takes q and k in one layout;
            queries shorter than keys (dense or cu_seqlens_k) run on Triton and the C++ CPU kernel, the cache
            layout (seqused_k) on the C++ CPU kernel (elsewhere the reference).
    Returns:
        int32 (B, N, Hq, top_k) / (T, Hq, top_k): chunk indices within the sequence, sorted ascending,
        padded with -1 at the end when fewer chunks are eligible. Not differentiable.
    Raises:
        ValueError / TypeError naming the argument (top_k < 1, Hq not a multiple of Hkv, ...).
    Example:
        >>> q, k = torch.randn(1, 1000, 8, 64), torch.randn(1, 1000, 2, 64)
        >>> select_chunks(q, k, 128, 3).shape
        torch.Size([1, 1000, 8, 3])
        >>> cu = torch.tensor([0, 600, 1000], dtype=torch.int32)
        >>> select_chunks(q[0], k[0], 128, 3, cu_seqlens=cu).shape
        torch.Size([1000, 8, 3])
    """
    cu_seqlens, max_seqlen, keys = _layouts(cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q, cu_seqlens_k,
                                            max_seqlen_k, seqused_k)
    max_seqlen = _prepare(_check_route_chunks, q, cu_seqlens, max_seqlen, backend, q, k, chunk_size, top_k,
                          keys=keys)
    if backend == "reference":
        _check_reference_values(q, k, chunk_size, causal, cu_seqlens, max_seqlen, keys)
        return route_chunks_ref(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen, **keys._asdict())
    return torch.ops.routing_kernels.route_chunks(q, k, chunk_size, top_k, causal=causal, cu_seqlens=cu_seqlens,
                                                  max_seqlen=max_seqlen, backend=backend, **keys._asdict())


def routed_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, top_k: int, *, causal: bool = True,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                     cu_seqlens_q: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
                     cu_seqlens_k: Optional[Tensor] = None, max_seqlen_k: Optional[int] = None,
                     seqused_k: Optional[Tensor] = None, block_indices: Optional[Tensor] = None,
                     key_sums: Optional[Tensor] = None, scale: Optional[float] = None, return_lse: bool = False,
                     backend: Optional[str] = None):
    """Block-sparse attention over each query's top_k chunks (MoBA semantics).

    Exact softmax attention of q_t over the keys of the chunks :func:`select_chunks` selects for (t, h),
    restricted to keys at positions <= t when causal. GQA without replicating k/v. With top_k >= M it
    equals dense attention. Gradients flow to q, k and v through the attention, not the selection.

    Queries may be fewer than keys (chunked prefill, decode): they are the last positions of their sequence,
    as in :func:`select_chunks`, and causal masking is bottom-right aligned.

    Args:
        q: (B, N, Hq, D) or packed (T, Hq, D).  k: (.., Hkv, D).  v: (.., Hkv, Dv). Same dtype and device.
        chunk_size, top_k, causal: as in :func:`select_chunks`.
        cu_seqlens, max_seqlen: varlen layout shared by q, k, v, as in :func:`chunk_mean`.
        cu_seqlens_q / max_seqlen_q, cu_seqlens_k / max_seqlen_k, seqused_k: separate layouts of q and k/v,
            as in :func:`select_chunks`.
        block_indices: int32 (.., Hq, top_k) in q's layout: attend to these chunks instead of the gate's
            (e.g. :func:`select_chunks` output reused across layers, or a learned router). Any order, -1 for
            none, repeats count once; each entry must be the query's own chunk or (causal) one that ends at
            or before it. A row that selects nothing gets o = 0, lse = -inf.
        key_sums: with seqused_k, the cache's chunk sums of k (B, ceil(capacity / chunk_size), Hkv, D) fp32,
            as :class:`routing_kernels.RoutedKVCache` keeps them; without it a decode step computes them from
            the whole cache (one extra pass over k_cache).
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the log-sum-exp of the scaled scores, (B, N, Hq) / (T, Hq) fp32.
        backend: None, "reference", "triton" (not fp64) or "cpu". With None, a dense batch in which every
            query selects every chunk it may see (top_k >= M = ceil(N / chunk_size)) runs dense attention
            through ``torch.nn.functional.scaled_dot_product_attention`` instead: the same result (to
            rounding), without the gate, at the speed of PyTorch's flash kernels (not when ``return_lse``,
            or when Dv != D). Naming a backend always runs that backend. Decode (k a cache with seqused_k,
            dense q with at most 16 queries per row) runs the decode kernels where built ("cpu", "triton").
    Returns:
        o (.., Hq, Dv) in q's dtype, or (o, lse) when return_lse.
    Raises:
        ValueError / TypeError naming the argument; ValueError when no kernel fits (e.g. fp64 on CUDA) and the
        O(L^2)-memory reference would need more than 1 GiB, unless backend="reference" was asked for.
    Example:
        >>> q, k, v = torch.randn(1, 1000, 8, 64), torch.randn(1, 1000, 2, 64), torch.randn(1, 1000, 2, 64)
        >>> routed_attention(q, k, v, 128, 3).shape
        torch.Size([1, 1000, 8, 64])
        >>> cu = torch.tensor([0, 600, 1000], dtype=torch.int32)
        >>> o, lse = routed_attention(q[0], k[0], v[0], 128, 3, cu_seqlens=cu, return_lse=True)
    """
    cu_seqlens, max_seqlen, keys = _layouts(cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q, cu_seqlens_k,
                                            max_seqlen_k, seqused_k)
    max_seqlen = _prepare(_check_routed_attention, q, cu_seqlens, max_seqlen, backend, q, k, v, chunk_size, top_k,
                          scale=scale, keys=keys, block_indices=block_indices, key_sums=key_sums)
    plain = keys.like_q and block_indices is None and (cu_seqlens is not None or q.shape[1] == k.shape[1])
    if backend == "reference":
        _check_reference_values(q, k, chunk_size, causal, cu_seqlens, max_seqlen, keys, block_indices)
        o, lse = routed_attention_ref(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale,
                                      **keys._asdict(), block_indices=block_indices)
    elif (backend is None and plain and not return_lse
          and _routing_selects_everything(q, v, chunk_size, top_k, cu_seqlens)):
        return _dense_attention(q, k, v, causal, scale)
    elif (backend is None and not return_lse and block_indices is None and _cache_fits_top_k(q, k, v, chunk_size,
                                                                                           top_k, cu_seqlens, keys)):
        _check_reference_values(q, k, chunk_size, causal, cu_seqlens, max_seqlen, keys)
        return _dense_cache_attention(q, k, v, keys.seqused_k, causal, scale)
    else:
        o, lse = torch.ops.routing_kernels.routed_attention(q, k, v, chunk_size, top_k, causal=causal,
                                                            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                                            scale=scale, backend=backend, **keys._asdict(),
                                                            block_indices=block_indices, key_sums=key_sums)
    return (o, lse) if return_lse else o


def _check_reference_values(q, k, chunk_size, causal, cu_seqlens, max_seqlen, keys, block_indices=None):
    """The values the ops check (key lengths, block_indices), for the reference path that bypasses them."""
    if is_compiling():
        return
    from .ops.route_chunks.op import check_values
    cu_seqlens, keys = check_values(q, k, cu_seqlens, max_seqlen, keys)
    if block_indices is not None and should_read_values(block_indices):
        check_block_index_values(block_indices, q, k, chunk_size, causal, cu_seqlens, max_seqlen, keys)


def _layouts(cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q, cu_seqlens_k, max_seqlen_k, seqused_k):
    """(q's offsets, q's max length, Keys) from the public arguments: ``cu_seqlens`` means q and k share
    offsets; ``cu_seqlens_q`` / ``cu_seqlens_k`` give each its own."""
    if cu_seqlens is not None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        raise ValueError("pass either cu_seqlens (q and k share it) or cu_seqlens_q / cu_seqlens_k, not both")
    if cu_seqlens_q is not None:
        cu_seqlens, max_seqlen = cu_seqlens_q, max_seqlen_q
    elif max_seqlen_q is not None:
        raise ValueError("max_seqlen_q is given without cu_seqlens_q")
    if cu_seqlens_k is None and max_seqlen_k is not None:
        raise ValueError("max_seqlen_k is given without cu_seqlens_k")
    return cu_seqlens, max_seqlen, Keys(cu_seqlens_k, resolve_max_seqlen(cu_seqlens_k, max_seqlen_k, "max_seqlen_k"),
                                        seqused_k)


def _routing_selects_everything(q: Tensor, v: Tensor, chunk_size: int, top_k: int,
                                cu_seqlens: Optional[Tensor]) -> bool:
    """With top_k >= M every query selects every chunk it may see (its own and, causal, all earlier ones;
    non-causal, all), so routed attention IS dense attention and the gate is wasted work. Dense batches only:
    SDPA has no varlen layout on every device."""
    return (cu_seqlens is None and q.shape[1] > 0 and top_k >= ceil_div(q.shape[1], chunk_size)
            and v.shape[-1] == q.shape[-1])


def _cache_fits_top_k(q, k, v, chunk_size, top_k, cu_seqlens, keys) -> bool:
    """A dense cache (seqused_k) of capacity <= top_k * chunk_size: whatever its rows hold, every query selects
    every chunk it may see, so routed attention over it IS dense attention over each row's valid keys (a 4K
    cache with top_k 8 of 512-token chunks: the decode kernels' gate and split would be pure overhead)."""
    return (keys.seqused_k is not None and cu_seqlens is None and q.dim() == 4
            and top_k >= ceil_div(k.shape[1], chunk_size) and v.shape[-1] == q.shape[-1])


def _dense_cache_attention(q: Tensor, k: Tensor, v: Tensor, seqused_k: Tensor, causal: bool,
                           scale: Optional[float]) -> Tensor:
    """Dense attention of q (B, Lq, Hq, D), the last Lq positions of each row, over a cache (B, capacity, Hkv, D)
    whose row b holds seqused_k[b] keys: one SDPA call with a (B, 1, Lq, capacity) mask built on the device (no
    sync). Query i of row b sits at p = seqused_k[b] - Lq + i and sees keys j < seqused_k[b] (and j <= p when
    causal)."""
    lq, cap = q.shape[1], k.shape[1]
    used = seqused_k.to(torch.int64)[:, None, None]  # (B, 1, 1)
    keys = torch.arange(cap, device=q.device)[None, None, :]
    allowed = keys < used
    if causal:
        allowed = allowed & (keys <= used - lq + torch.arange(lq, device=q.device)[None, :, None])
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None], scale=scale,
        enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2).contiguous()


def _dense_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float]) -> Tensor:
    """Dense (B, N, H, D) attention through SDPA (flash / memory-efficient kernels, autograd by PyTorch)."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2).contiguous()  # already (B, N, H, D) in memory for the flash kernels: no copy


route_chunks = select_chunks  # the gate's first name, kept for existing code
