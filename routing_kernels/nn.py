"""Modules built on the ops: :class:`ChunkRouter` (chunk routing) and :class:`RoutedAttention` (MoBA)."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from ._layout import token_positions
from .chunking import chunk_boundaries
from .functional import chunk_route, routed_attention


class ChunkRouter(nn.Module):
    """The classic chunk-routing layer.

    x (B, N, dim), or packed (T, dim) with ``cu_seqlens``, is cut into chunks; an optional ``encoder`` (any module
    mapping (chunks, length, dim) to the same shape, e.g. ``nn.TransformerEncoderLayer(batch_first=True)``) runs on
    all chunks in ONE batched call; then a learned query per head scores each chunk's mean, and the fused
    :func:`routing_kernels.chunk_route` op weights the chunks by the softmax of the scores.

    How x is cut (one rule; the constructor's is the default, a forward call may give another):
        chunk_size=C (C tokens per chunk), num_chunks=n (n near-equal chunks per sequence), fraction=f (chunk
        size ceil(f * length) per sequence), and, per call only, chunk_ends (bool flags on tokens that end a
        chunk) or cu_chunks (explicit boundaries, with max_chunks); see :func:`routing_kernels.chunk_boundaries`.
    For the encoder every chunk is zero-padded to the longest one; the padded positions are dropped from its
    output, and an encoder whose forward takes ``src_key_padding_mask`` (PyTorch's transformer layers) is also
    told which positions are padding. With chunks of different sizes the longest one is read from the table (a
    device sync on GPU); a dense batch with chunk_size needs none.

    Args:
        dim: model width, a multiple of ``heads``.  heads: routing heads.
        chunk_size / num_chunks / fraction: the default rule (at most one; None: every call gives one).
        encoder: optional chunk encoder.  backend: passed to chunk_route (None: fastest available).
    forward(x, *, cu_seqlens=None, max_seqlen=None, <a rule>) returns (y like x, weights (B|S, heads, M) fp32,
    summary (B|S, dim)).
    """

    RULES = ("chunk_size", "num_chunks", "fraction", "chunk_ends", "cu_chunks")

    def __init__(self, dim: int, heads: int, chunk_size: Optional[int] = None, encoder: Optional[nn.Module] = None,
                 backend: Optional[str] = None, *, num_chunks: Optional[int] = None, fraction: Optional[float] = None):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.rule = self._one_rule(dict(chunk_size=chunk_size, num_chunks=num_chunks, fraction=fraction),
                                   allow_none=True)
        if self.rule is not None:  # a bad default fails here, not at the first forward
            self._boundaries(torch.zeros(1, 1), None, None, dict([self.rule]))
        self.dim, self.heads, self.chunk_size, self.backend = dim, heads, chunk_size, backend
        self.encoder = encoder
        self.query = nn.Parameter(torch.randn(heads, dim // heads) * (dim // heads) ** -0.5)
        forward_params = inspect.signature(encoder.forward).parameters if encoder is not None else {}
        self._encoder_takes_mask = "src_key_padding_mask" in forward_params

    @staticmethod
    def _one_rule(rules: dict, allow_none: bool) -> Optional[tuple]:
        given = [(k, v) for k, v in rules.items() if v is not None]
        if len(given) > 1 or (not given and not allow_none):
            raise ValueError(f"give exactly one chunking rule of chunk_size, num_chunks, fraction, chunk_ends, "
                             f"cu_chunks; got {[k for k, _ in given] or 'none'}")
        return given[0] if given else None

    def _boundaries(self, x: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], rule: dict):
        if "cu_chunks" in rule:
            return rule["cu_chunks"], rule.get("max_chunks")
        if cu_seqlens is None:
            return chunk_boundaries(batch=x.shape[0], seqlen=x.shape[1], **rule)
        return chunk_boundaries(cu_seqlens, max_seqlen=max_seqlen, **rule)

    def _encode_dense(self, x: Tensor, chunk_size: int) -> Tensor:
        b, n, d = x.shape
        m = -(-n // chunk_size)
        pad = m * chunk_size - n
        chunks = nn.functional.pad(x, (0, 0, 0, pad)).reshape(b * m, chunk_size, d)
        is_pad = (torch.arange(m * chunk_size, device=x.device) >= n).view(1, m, chunk_size)
        chunks = self._run_encoder(chunks, is_pad.expand(b, m, chunk_size).reshape(b * m, chunk_size))
        return chunks.reshape(b, m * chunk_size, d)[:, :n]

    def _encode_table(self, xp: Tensor, cu_chunks: Tensor) -> Tensor:
        """Packed (T, dim) -> every chunk padded to the longest: (K, L_max, dim), one encoder call, and back."""
        starts, ends = cu_chunks[:-1].to(torch.int64), cu_chunks[1:].to(torch.int64)
        longest = int((ends - starts).max())  # the padded length is data (a sync on GPU)
        idx = starts[:, None] + torch.arange(longest, device=xp.device)
        is_pad = idx >= ends[:, None]
        chunks = xp[idx.clamp(max=xp.shape[0] - 1)].masked_fill(is_pad[..., None], 0)
        return self._run_encoder(chunks, is_pad)[~is_pad]  # chunks are in token order: rows come back in order

    def _run_encoder(self, chunks: Tensor, is_pad: Tensor) -> Tensor:
        if self._encoder_takes_mask:
            return self.encoder(chunks, src_key_padding_mask=is_pad)
        return self.encoder(chunks)

    def forward(self, x: Tensor, *, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                chunk_size: Optional[int] = None, num_chunks: Optional[int] = None, fraction: Optional[float] = None,
                chunk_ends: Optional[Tensor] = None, cu_chunks: Optional[Tensor] = None,
                max_chunks: Optional[int] = None):
        packed = cu_seqlens is not None
        if x.dim() != (2 if packed else 3) or x.shape[-1] != self.dim:
            want = f"(T, {self.dim}) with cu_seqlens" if packed else f"(B, N, {self.dim})"
            raise ValueError(f"x must be {want}, got {tuple(x.shape)}")
        rule = self._one_rule(dict(chunk_size=chunk_size, num_chunks=num_chunks, fraction=fraction,
                                   chunk_ends=chunk_ends, cu_chunks=cu_chunks), allow_none=True) or self.rule
        if rule is None:
            raise ValueError("this ChunkRouter has no default chunking rule: give chunk_size, num_chunks, fraction, "
                             "chunk_ends or cu_chunks")
        lead, hd = x.shape[:-1], (self.heads, self.dim // self.heads)
        query = self.query.to(x.dtype)
        if rule[0] == "chunk_size" and not packed:  # the integer path: no table, no sync
            if self.encoder is not None and x.shape[1] > 0:
                x = self._encode_dense(x, rule[1])
            y, weights, summary = chunk_route(x.unflatten(-1, hd), query, rule[1], backend=self.backend)
        else:
            table, most = self._boundaries(x, cu_seqlens, max_seqlen, dict([rule], max_chunks=max_chunks)
                                           if rule[0] == "cu_chunks" else dict([rule]))
            xp = x.reshape(-1, self.dim)
            if self.encoder is not None and xp.shape[0] > 0:
                xp = self._encode_table(xp, table)
            y, weights, summary = chunk_route(xp.unflatten(-1, hd).reshape(*lead, *hd), query, cu_seqlens=cu_seqlens,
                                              max_seqlen=max_seqlen, cu_chunks=table, max_chunks=most,
                                              backend=self.backend)
        return y.reshape(*lead, self.dim), weights, summary.reshape(-1, self.dim)


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
