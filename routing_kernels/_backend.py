"""Which implementation an op runs.

The custom ops take no ``backend`` argument (their schemas match the public functions without it), so
the public functions pass an explicit choice through a thread-local that the ops' device kernels read;
``setup_context`` records it so that the backward runs the same backend.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

BACKENDS = ("reference", "triton", "cuda", "cpu")

_state = threading.local()


def check_backend(backend: Optional[str]) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def requested_backend() -> Optional[str]:
    return getattr(_state, "backend", None)


@contextlib.contextmanager
def use_backend(backend: Optional[str]):
    check_backend(backend)
    previous = requested_backend()
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


# Tried in this order when the caller asks for nothing; "reference" is always the last resort. Triton is
# never picked by itself on CPU: there it only runs in the (slow, debugging) interpreter.
PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def select(op: str, device_type: str, requested: Optional[str], available: dict[str, bool]) -> str:
    """Pick the backend for ``op`` on ``device_type``.

    available: backend name -> whether it can run this call (built, right device, supported dtype/shape).
    """
    if requested is not None:
        if requested == "reference" or available.get(requested, False):
            return requested
        raise ValueError(
            f"backend={requested!r} is not available for {op} on {device_type} tensors"
            f" (available: {[b for b, ok in available.items() if ok] + ['reference']})")
    for name in PREFERENCE.get(device_type, ()):
        if available.get(name, False):
            return name
    return "reference"
