"""Loads the compiled extension ``routing_kernels._C`` when it was built, and reports on it.

Importing ``_C`` runs its TORCH_LIBRARY registrations, which add the C++ ops (``torch.ops.routing_kernels.
chunk_mean_fwd``, ...) and their CPU/CUDA kernels. Without it the package still imports (one warning) and the
ops fall back to their Triton / reference implementations. Nothing here touches the GPU.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import Any, Optional

import torch

__all__ = ["HAS_C", "HAS_CUDA_KERNELS", "build_info", "cpu_cache_info", "empty_cpu_cache", "has_kernel"]

_VERSION_FALLBACK = "0.1.0"  # keep equal to pyproject.toml (python_tests/test_extension.py checks it)
_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` "
               "(CPU-only: ROUTING_KERNELS_BUILD_CUDA=0)")

_C: Any = None
_IMPORT_ERROR: Optional[str] = None
try:
    # torch is imported first: _C links against libtorch. import_module (unlike `from . import _C`) raises
    # ModuleNotFoundError when _C is not built, which tells "not built" from "failed to load" below.
    _C = importlib.import_module("routing_kernels._C")
except ImportError as error:  # not built, or built against another torch / Python (undefined symbol, ...)
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(f"routing_kernels: the C++/CUDA extension routing_kernels._C is unavailable ({_IMPORT_ERROR}); "
                  f"falling back to the Triton/reference kernels. To get it, {_BUILD_HINT}.",
                  RuntimeWarning, stacklevel=2)

HAS_C: bool = _C is not None
_BUILD = dict(_C.build_info()) if HAS_C else {}
HAS_CUDA_KERNELS: bool = bool(_BUILD.get("cuda_built", False))

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict:
    """How routing_kernels was built and what it runs with.

    Returns a dict with: ``version`` (str); ``extension`` ("loaded", "not built" or "failed to load");
    ``cuda_built`` (bool: CUDA kernels compiled in); ``cuda_archs`` (str, e.g. "8.0;9.0", "" without CUDA);
    ``torch_version`` / ``cuda_version`` used to build ``_C`` (None when not built); ``torch_runtime`` and
    ``triton_runtime`` versions now in use (triton None when absent); ``import_error`` (str or None).
    """
    if HAS_C:
        extension = "loaded"
    elif _IMPORT_ERROR and _IMPORT_ERROR.startswith("ModuleNotFoundError"):
        extension = "not built"
    else:
        extension = "failed to load"
    return {
        "version": _BUILD.get("version") or _distribution_version("routing_kernels") or _VERSION_FALLBACK,
        "extension": extension,
        "cuda_built": HAS_CUDA_KERNELS,
        "cuda_archs": _BUILD.get("cuda_archs", ""),
        "torch_version": _BUILD.get("torch_version"),
        "cuda_version": _BUILD.get("cuda_version"),
        "torch_runtime": torch.__version__,
        "triton_runtime": _distribution_version("triton") or _distribution_version("pytorch-triton"),
        "import_error": _IMPORT_ERROR,
    }


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether ``_C`` registered a kernel of ``routing_kernels::<op_name>`` for ``device_type`` ("cpu"/"cuda").

    Reads the dispatcher's tables only; it does not look at whether a GPU is present.
    """
    key = _DISPATCH_KEYS.get(torch.device(device_type).type)
    if not HAS_C or key is None:
        return False
    qualname = f"routing_kernels::{op_name}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
    except RuntimeError:  # no such op
        return False


def cpu_cache_info() -> dict:
    """The CPU output cache of the C++ kernels (large outputs such as chunk_route's y and dx are reused from
    recently freed buffers instead of being page-faulted in again on every call).

    Returns a dict with ``cached_bytes`` (held for reuse), ``limit_bytes`` (``ROUTING_KERNELS_CPU_CACHE_MB``
    megabytes, default 256; 0 turns the cache off), ``hits`` and ``misses`` (outputs served from the cache /
    from fresh memory). All zero when the extension is not built.
    """
    if not HAS_C:
        return {"cached_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    return dict(_C.cpu_output_cache_stats())


def empty_cpu_cache() -> None:
    """Return the CPU output cache's free buffers to the operating system (like ``torch.cuda.empty_cache``).
    Outputs that are still alive are not affected; they return to the cache when they are freed."""
    if HAS_C:
        _C.empty_cpu_output_cache()
