"""Modules built on the ops."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from .functional import chunk_route


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
