"""A KV cache for routed attention at inference: K/V per layer, plus running fp32 key sums per chunk.

Layout (contiguous, per layer; flash-attn's ``k_cache`` / ``cache_seqlens`` convention):
    k, v       (B, capacity, Hkv, D | Dv)  in the model's dtype; row b holds ``seqlens[b]`` valid tokens
    key_sums   (B, ceil(capacity / chunk_size), Hkv, D)  fp32 (fp64 for fp64): sum of k over each chunk so far
    seqlens    (B,) int32, on the cache's device
The chunk sums are what the gate needs (the mean of a complete chunk is its sum / chunk_size), so a decode
step never rereads K to rebuild means; ``append`` updates them in O(new tokens).

No host sync on the GPU path: the cache keeps, on the host, an upper bound of every row's length (exact for
dense appends, where every row grows by the same known count). An append that provably fits (bound + new
tokens <= capacity) reads nothing from the device; only one that might overflow reads the lengths to decide,
and then raises before writing anything.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._layout import accum_dtype, ceil_div
from ._validation import _fail, check_cu_seqlens_shape, check_cu_seqlens_values, check_int, should_read_values


class RoutedKVCache:
    """Preallocated K/V and chunk key sums for ``num_layers`` layers of a batch of ``batch_size`` sequences.

    Args:
        num_layers, batch_size, capacity (tokens per sequence), num_kv_heads, head_dim: sizes, ints >= 1
            (capacity >= 0).
        chunk_size: the routing chunk, >= 1 (the attention calls must use the same).
        v_head_dim: Dv, default head_dim.  dtype, device: of K/V (default fp32, CPU).
    Example (a decode loop; ``model_step`` stands for the layer's projections):
        >>> cache = RoutedKVCache(1, 2, 4096, num_kv_heads=2, head_dim=64, chunk_size=128)
        >>> cu = torch.tensor([0, 700, 1000], dtype=torch.int32)               # prompts of 700 and 300
        >>> q, k, v = torch.randn(1000, 8, 64), torch.randn(1000, 2, 64), torch.randn(1000, 2, 64)
        >>> cache.append(0, k, v, cu_seqlens=cu)                               # prefill
        >>> o = cache.attention(0, q, top_k=4, cu_seqlens_q=cu, max_seqlen_q=700)
        >>> for _ in range(3):                                                 # decode, one token per row
        ...     q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)
        ...     cache.append(0, k, v)
        ...     o = cache.attention(0, q, top_k=4)                             # (2, 1, 8, 64)
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
                 chunk_size: int, *, v_head_dim: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device="cpu"):
        for name, value, minimum in (("num_layers", num_layers, 1), ("batch_size", batch_size, 1),
                                     ("capacity", capacity, 0), ("num_kv_heads", num_kv_heads, 1),
                                     ("head_dim", head_dim, 1), ("chunk_size", chunk_size, 1)):
            check_int(name, value, minimum)
        dv = head_dim if v_head_dim is None else v_head_dim
        check_int("v_head_dim", dv, 1)
        self.chunk_size, self.capacity = chunk_size, capacity
        shape = (num_layers, batch_size, capacity, num_kv_heads)
        self.k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(*shape, dv, dtype=dtype, device=device)
        self.key_sums = torch.zeros(num_layers, batch_size, ceil_div(capacity, chunk_size), num_kv_heads, head_dim,
                                    dtype=accum_dtype(dtype), device=device)
        self.seqlens = torch.zeros(num_layers, batch_size, dtype=torch.int32, device=device)
        self._bound = [0] * num_layers  # host-side upper bound of max(seqlens[layer])

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self, layer: Optional[int] = None) -> None:
        """Forget every sequence (of one layer, or of all); the memory is kept."""
        layers = range(self.num_layers) if layer is None else [self._layer(layer)]
        for i in layers:
            self.seqlens[i].zero_()
            self.key_sums[i].zero_()
            self._bound[i] = 0

    def keys(self, layer: int) -> Tensor:
        """(B, capacity, Hkv, D) view of the layer's keys; row b is valid up to seqlens[b]."""
        return self.k[self._layer(layer)]

    def values(self, layer: int) -> Tensor:
        return self.v[self._layer(layer)]

    def append(self, layer: int, k_new: Tensor, v_new: Tensor, *, cu_seqlens: Optional[Tensor] = None,
               max_seqlen: Optional[int] = None) -> None:
        """Append new tokens to every sequence of ``layer``.

        Args:
            k_new, v_new: dense (B, n, Hkv, D|Dv) (n tokens for every row, n >= 0), or packed (T, Hkv, D|Dv)
                with ``cu_seqlens`` int32 (B+1,) (row b gets cu[b+1] - cu[b] tokens, 0 allowed).
            max_seqlen: the largest per-row count of a packed append; default T (a safe bound, no sync).
        Raises:
            ValueError / TypeError naming the argument (shapes, dtype, device, offsets); ValueError when a
            row would pass ``capacity``. Nothing is written when it raises.
        """
        layer = self._layer(layer)
        n_bound = self._check_append(k_new, v_new, cu_seqlens, max_seqlen)
        lengths = self.seqlens[layer]
        if cu_seqlens is None:
            b, n = k_new.shape[:2]
            counts = None
            rows = torch.arange(b, device=k_new.device).repeat_interleave(n)
            offsets = torch.arange(n, device=k_new.device).repeat(b)
            k_flat, v_flat = k_new.reshape(b * n, *k_new.shape[2:]), v_new.reshape(b * n, *v_new.shape[2:])
        else:
            cu = cu_seqlens.to(torch.int64)
            counts = cu.diff()
            total = k_new.shape[0]
            rows = torch.repeat_interleave(torch.arange(self.batch_size, device=cu.device), counts, output_size=total)
            offsets = torch.arange(total, device=cu.device) - cu[rows]
            k_flat, v_flat = k_new, v_new
        if self._bound[layer] + n_bound > self.capacity:  # might overflow: now it is worth reading the lengths
            grown = lengths.to(torch.int64) + (n_bound if counts is None else counts)
            if (grown > self.capacity).any():
                row = int((grown > self.capacity).nonzero()[0])
                _fail(f"append would pass the cache capacity ({self.capacity} tokens) in row {row}: it holds "
                      f"{int(lengths[row])} and {int(grown[row] - lengths[row])} more were given")
            self._bound[layer] = int(grown.max()) if grown.numel() else 0
        else:
            self._bound[layer] += n_bound
        positions = lengths.to(torch.int64)[rows] + offsets  # (new,)
        self.k[layer].index_put_((rows, positions), k_flat)
        self.v[layer].index_put_((rows, positions), v_flat)
        sums = self.key_sums[layer]
        sums.index_put_((rows, positions // self.chunk_size), k_flat.to(sums.dtype), accumulate=True)
        lengths += (torch.full_like(lengths, n_bound) if counts is None else counts.to(torch.int32))

    def attention(self, layer: int, q: Tensor, top_k: int, *, cu_seqlens_q: Optional[Tensor] = None,
                  max_seqlen_q: Optional[int] = None, causal: bool = True, scale: Optional[float] = None,
                  block_indices: Optional[Tensor] = None, return_lse: bool = False, backend: Optional[str] = None):
        """Routed attention of q (the LAST tokens of each row: append their K/V first) over the cache.

        q: dense (B, Nq, Hq, D) or packed (T, Hq, D) with cu_seqlens_q / max_seqlen_q; other arguments as in
        :func:`routing_kernels.routed_attention`. Returns o (and lse) in q's layout.
        """
        from .functional import routed_attention
        from .ops.routed_attention.decode import trim_to_bound
        layer = self._layer(layer)
        k, v, sums = self.k[layer], self.v[layer], self.key_sums[layer]
        if block_indices is None and not return_lse and cu_seqlens_q is None:
            k, v, sums = trim_to_bound(k, v, sums, self._bound[layer], self.chunk_size, top_k, backend)
        return routed_attention(q, k, v, self.chunk_size, top_k, causal=causal,
                                cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                                seqused_k=self.seqlens[layer], block_indices=block_indices,
                                key_sums=sums, scale=scale, return_lse=return_lse, backend=backend)

    # ---- checks ----

    def _layer(self, layer) -> int:
        check_int("layer", layer, 0)
        if layer >= self.num_layers:
            _fail(f"layer must be < num_layers = {self.num_layers}, got {layer}")
        return layer

    def _check_append(self, k_new, v_new, cu_seqlens, max_seqlen) -> int:
        """Validate an append; returns an upper bound of the tokens any row gets (exact when dense)."""
        hkv, d, dv = self.k.shape[-2], self.k.shape[-1], self.v.shape[-1]
        for name, t, dim in (("k_new", k_new, d), ("v_new", v_new, dv)):
            if not isinstance(t, Tensor):
                _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
            if t.dtype != self.k.dtype:
                _fail(f"{name} has dtype {t.dtype} but the cache holds {self.k.dtype}", TypeError)
            if t.device != self.k.device:
                _fail(f"{name} is on {t.device} but the cache is on {self.k.device}")
            lead = (self.batch_size,) if cu_seqlens is None else ()
            if t.dim() != len(lead) + 3 or tuple(t.shape[:len(lead)]) != lead or tuple(t.shape[-2:]) != (hkv, dim):
                layout = f"(B={self.batch_size}, n, {hkv}, {dim})" if cu_seqlens is None else f"(T, {hkv}, {dim})"
                _fail(f"{name} must be {layout}{' with cu_seqlens' if cu_seqlens is not None else ''}, "
                      f"got shape {tuple(t.shape)}")
        if k_new.shape[:-1] != v_new.shape[:-1]:
            _fail(f"v_new must have the tokens of k_new {tuple(k_new.shape[:-2])}, got {tuple(v_new.shape[:-2])}")
        if cu_seqlens is None:
            return k_new.shape[1]
        total = k_new.shape[0]
        bound = total if max_seqlen is None else max_seqlen
        check_cu_seqlens_shape(cu_seqlens, bound, k_new)
        if cu_seqlens.shape[0] != self.batch_size + 1:
            _fail(f"cu_seqlens must have B+1 = {self.batch_size + 1} entries, got {cu_seqlens.shape[0]}")
        if should_read_values(cu_seqlens):
            check_cu_seqlens_values(cu_seqlens, bound, total)
        return min(bound, total)
