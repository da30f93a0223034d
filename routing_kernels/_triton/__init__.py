"""Triton availability, decided without touching the GPU at import time.

Triton kernels run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before the
kernels were defined (the tests do that on GPU-less machines).
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run(device_type: str) -> bool:
    if not HAS_TRITON:
        return False
    return device_type == "cuda" or (device_type == "cpu" and INTERPRET)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
