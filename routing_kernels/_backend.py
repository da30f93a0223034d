"""Which implementation an op runs.

The choice is an argument of every custom op (``backend: str? = None`` in its schema), so it is part of the
call the op sees: it survives ``torch.compile`` (Dynamo passes the string through as a constant; a
thread-local set around the call would only be read while tracing), and ``setup_context`` records the
resolved name so that the backward runs the same implementation.

Each op keeps a table ``KERNELS: name -> callable`` and calls ``KERNELS[resolve(...)]``; the tests wrap the
table's entries to count which implementation really ran, compiled or not.
"""
from __future__ import annotations

from typing import Optional

BACKENDS = ("reference", "triton", "cuda", "cpu")

# Tried in this order when the caller asks for nothing; "reference" is the last resort. Triton is never
# picked by itself on CPU: there it only runs in the (slow, debugging) interpreter.
PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def check_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def select(op: str, device_type: str, requested: Optional[str], available: dict[str, bool], why: str = "") -> str:
    """Pick the backend for ``op`` on ``device_type``.

    available: backend name -> whether it can run this call (built, right device, supported dtype/shape).
    why: appended to the error when the requested backend cannot run this call.
    """
    check_backend(requested)
    if requested is not None:
        if requested == "reference" or available.get(requested, False):
            return requested
        raise ValueError(
            f"backend={requested!r} is not available for {op} on {device_type} tensors"
            f" (available: {[b for b, ok in available.items() if ok] + ['reference']}){why}")
    for name in PREFERENCE.get(device_type, ()):
        if available.get(name, False):
            return name
    return "reference"


def refuse_quadratic_fallback(op: str, device_type: str, dtype, requested: Optional[str], chosen: str,
                              nbytes: int, limit: int = 1 << 30) -> None:
    """The references of the attention ops build dense (heads, L, L) tensors. When the caller asked for no
    backend and none of the kernels fits, running the reference on a long input would quietly need
    ``nbytes`` of memory (terabytes at 128K tokens): refuse, and say how to ask for it by name."""
    if requested is None and chosen == "reference" and nbytes > limit:
        raise ValueError(
            f"{op}: no kernel is available for {dtype} on {device_type} tensors, and the eager reference "
            f"would build O(L^2) tensors of about {nbytes / 2**30:.1f} GiB; pass backend='reference' to run it "
            f"anyway, or use a supported dtype/device (see the function's docstring)")
