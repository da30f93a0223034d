"""routing_kernels: fused kernels for chunk routing and routed (block-sparse) attention.

Public API: :func:`chunk_mean`, :func:`chunk_route`, :func:`select_chunks` (alias :func:`route_chunks`),
:func:`routed_attention` (each also registered as ``torch.ops.routing_kernels.<name>``, the gate as
``route_chunks``), :func:`chunk_boundaries` (dynamic chunking), :class:`RoutedKVCache` (inference),
:func:`build_info`, :func:`set_debug`, and the CPU output cache's :func:`cpu_cache_info` / :func:`empty_cpu_cache`.
"""
from ._ext import build_info, cpu_cache_info, empty_cpu_cache
from ._validation import set_debug
from .cache import RoutedKVCache
from .chunking import ChunkBoundaries, chunk_boundaries
from .functional import ChunkRouteOutput, chunk_mean, chunk_route, route_chunks, routed_attention, select_chunks

__version__ = "0.1.0"
__all__ = ["ChunkBoundaries", "ChunkRouteOutput", "RoutedKVCache", "build_info", "chunk_boundaries", "chunk_mean", "chunk_route", "cpu_cache_info",
           "empty_cpu_cache", "route_chunks", "routed_attention", "select_chunks", "set_debug"]
