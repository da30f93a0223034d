"""One folder per op: eager reference, kernels and torch.library registration side by side.

Importing this package registers every op under ``torch.ops.routing_kernels``.
"""
from .chunk_mean import op as _chunk_mean  # noqa: F401
from .chunk_route import op as _chunk_route  # noqa: F401
from .chunk_mean import table_op as _chunk_mean_table  # noqa: F401
from .chunk_route import table_op as _chunk_route_table  # noqa: F401
from .route_chunks import op as _route_chunks  # noqa: F401
from .routed_attention import op as _routed_attention  # noqa: F401
from . import cpp_ops as _cpp_ops  # noqa: F401,E402  (fakes and autograd of the C++ kernels)
