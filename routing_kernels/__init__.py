"""routing_kernels: fused kernels for chunk routing and routed (block-sparse) attention.

Public API: :func:`chunk_mean`, :func:`chunk_route`, :func:`route_chunks`, :func:`routed_attention`
(each also registered as ``torch.ops.routing_kernels.<name>``) and :func:`build_info`.
"""
from ._ext import build_info
from .functional import ChunkRouteOutput, chunk_mean, chunk_route, route_chunks, routed_attention

__version__ = "0.1.0"
__all__ = ["ChunkRouteOutput", "build_info", "chunk_mean", "chunk_route", "route_chunks", "routed_attention"]
