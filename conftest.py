"""Shared by python_tests/ and bench/: the gpu marker, and the Triton interpreter on GPU-less machines."""
import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter, which must be on before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "triton: Triton kernels (interpreter on CPU, compiled on a GPU)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled float tensors (integers: -12345), and the C++ CPU
    kernels' outputs too, so an output element a kernel forgets to write fails the comparison instead of
    passing on leftover memory (or on a reused buffer of the CPU output cache that happens to hold the
    right answer from an earlier call)."""
    from routing_kernels import _ext

    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    if not _ext.HAS_C:
        yield
        return
    _ext._C.set_cpu_output_cache_poison(True)
    try:
        yield
    finally:
        _ext._C.set_cpu_output_cache_poison(False)


def pytest_terminal_summary(terminalreporter):
    """Tables that tests attach with record_property("resource_table", text) (the GPU kernel resources of
    python_tests/test_triton_sm90_compile.py) go into the pytest output, so CI logs show them without -s."""
    seen = set()
    for kind in ("passed", "failed"):
        for report in terminalreporter.stats.get(kind, []):
            for name, value in getattr(report, "user_properties", ()):
                if name == "resource_table" and value not in seen:
                    seen.add(value)
                    terminalreporter.section("GPU kernel resources (bench/resources.py)")
                    terminalreporter.write(value)
