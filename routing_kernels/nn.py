"""Modules built on the ops: :class:`ChunkRouter` (chunk routing) and :class:`RoutedAttention` (MoBA)."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from ._layout import token_positions
from .functional import chunk_route, routed_attention


class ChunkRouter(nn.Module):
    """The classic chunk-routing layer.

    x (B, N, dim) is cut into chunks of ``chunk_size`` tokens; an optional ``encoder`` (any module mapping
    (B*M, chunk_size, dim) to the same shape, e.g. ``nn.TransformerEncoderLayer(batch_first=True)``) runs on
    all chunks in one batched call; then a learned query per head scores each chunk's mean, and the fused
    :func:`routing_kernels.chunk_route` op weights the chunks by the softmax of the scores.

    The last chunk is zero-padded to ``chunk_size`` for the encoder; the padded positions are dropped from
    its output, and an encoder whose forward takes ``src_key_padding_mask`` (PyTorch's transformer layers)
    is also told which positions are padding so it does not attend to them.

    Args:
        dim: model width, a multiple of ``heads``.  heads: routing heads.  chunk_size: tokens per chunk.
        encoder: optional chunk encoder.  backend: passed to chunk_route (None: fastest available).
    forward(x) returns (y (B, N, dim), weights (B, heads, M) fp32, summary (B, dim)).
    """

    def __init__(self, dim: int, heads: int, chunk_size: int, encoder: Optional[nn.Module] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dim, self.heads, self.chunk_size, self.backend = dim, heads, chunk_size, backend
        self.encoder = encoder
        self.query = nn.Parameter(torch.randn(heads, dim // heads) * (dim // heads) ** -0.5)
        forward_params = inspect.signature(encoder.forward).parameters if encoder is not None else {}
        self._encoder_takes_mask = "src_key_padding_mask" in forward_params

    def _encode(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        m = -(-n // self.chunk_size)
        pad = m * self.chunk_size - n
        chunks = nn.functional.pad(x, (0, 0, 0, pad)).reshape(b * m, self.chunk_size, d)
        if self._encoder_takes_mask:
            is_pad = torch.arange(m * self.chunk_size, device=x.device) >= n  # (M * chunk_size,)
            mask = is_pad.view(1, m, self.chunk_size).expand(b, m, self.chunk_size).reshape(b * m, self.chunk_size)
            chunks = self.encoder(chunks, src_key_padding_mask=mask)
        else:
            chunks = self.encoder(chunks)
        return chunks.reshape(b, m * self.chunk_size, d)[:, :n]

    def forward(self, x: Tensor):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        if self.encoder is not None and n > 0:
            x = self._encode(x)
        xh = x.reshape(b, n, self.heads, self.dim // self.heads)
        y, weights, summary = chunk_route(xh, self.query.to(x.dtype), self.chunk_size, backend=self.backend)
        return y.reshape(b, n, self.dim), weights, summary.reshape(b, self.dim)


class RoutedAttention(nn.Module):
    """Multi-head routed (MoBA) attention as a layer: projections, GQA, an optional caller-supplied rotary
    embedding, varlen input, and a :class:`routing_kernels.RoutedKVCache` for chunked prefill and decode.

    Args:
        dim: model width.  num_heads: query heads.  num_kv_heads: key/value heads (default num_heads; a divisor
            of num_heads: GQA without replicating k/v).  head_dim: default dim // num_heads.
        chunk_size, top_k, causal: as in :func:`routing_kernels.routed_attention`.
        bias: projections with bias.  backend: passed to the op (None: fastest available).
    forward(x, *, cu_seqlens=None, max_seqlen=None, rotary=None, positions=None, cache=None, layer=0):
        x: (B, N, dim), or packed (T, dim) with cu_seqlens int32 (S+1,) (and max_seqlen).
        rotary: optional callable (q, k, positions) -> (q, k) on q (.., N, Hq, head_dim), k (.., N, Hkv,
            head_dim), positions int64 (B, N) or (T,) (the tokens' positions in their sequences).
        cache: a RoutedKVCache (dense x only): the new tokens' K/V are appended to row b of ``layer`` and the
            queries attend over the cache (their positions continue the cached ones).
        Returns (B, N, dim) or (T, dim), x's dtype.
    Example:
        >>> layer = RoutedAttention(256, num_heads=8, num_kv_heads=2, chunk_size=64, top_k=4)
        >>> y = layer(torch.randn(2, 1000, 256))
        >>> cache = RoutedKVCache(1, 2, 4096, num_kv_heads=2, head_dim=32, chunk_size=64)
        >>> y = layer(torch.randn(2, 1000, 256), cache=cache)       # prefill
        >>> y = layer(torch.randn(2, 1, 256), cache=cache)          # one decode step
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *, head_dim: Optional[int] = None,
                 chunk_size: int, top_k: int, causal: bool = True, bias: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        head_dim = dim // num_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.chunk_size, self.top_k, self.causal, self.backend = chunk_size, top_k, causal, backend
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def forward(self, x: Tensor, *, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                rotary=None, positions: Optional[Tensor] = None, cache=None, layer: int = 0) -> Tensor:
        lead = x.shape[:-1]
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cache takes dense x (B, N, dim): one row per cached sequence")
        if cache is not None and cache.chunk_size != self.chunk_size:
            raise ValueError(f"cache.chunk_size ({cache.chunk_size}) must equal the layer's ({self.chunk_size})")
        if rotary is not None:
            if positions is None:
                positions = self._positions(x, cu_seqlens, cache, layer)
            q, k = rotary(q, k, positions)
        if cache is not None:
            cache.append(layer, k, v)
            o = cache.attention(layer, q, self.top_k, causal=self.causal, backend=self.backend)
        else:
            o = routed_attention(q, k, v, self.chunk_size, self.top_k, causal=self.causal, cu_seqlens=cu_seqlens,
                                 max_seqlen=max_seqlen, backend=self.backend)
        return self.o_proj(o.reshape(*lead, -1))

    @staticmethod
    def _positions(x: Tensor, cu_seqlens: Optional[Tensor], cache, layer: int) -> Tensor:
        if cu_seqlens is not None:
            return token_positions(cu_seqlens.to(torch.int64), x.shape[0])[1]
        start = cache.seqlens[layer].to(torch.int64)[:, None] if cache is not None else 0
        return start + torch.arange(x.shape[1], device=x.device)[None, :].expand(x.shape[0], -1)
