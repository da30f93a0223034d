"""One tolerance table for comparing a kernel with the eager reference run in the same dtype.

rtol is per dtype; atol is the same number scaled by the reference's magnitude (max |ref|, kept in
[1e-3, 1]), so an output much smaller than 1 (chunk weights ~1/M, gradients of a mean, attention outputs of
small values) is held to its own scale instead of passing whatever it holds, and no output gets a looser
bound than the plain table. The table: about 10 units of the dtype's rounding (fp16 2^-10, bf16 2^-7)."""
from __future__ import annotations

import torch

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _flatten(t):
    if isinstance(t, torch.Tensor):
        return [t]
    return [leaf for item in t for leaf in _flatten(item)]


def assert_close_scaled(got, want, dtype: torch.dtype, *, rtol: float | None = None, name: str = "") -> None:
    """assert_close on every tensor of (nested) got/want with rtol = RTOL[dtype] and a magnitude-scaled atol."""
    tol = RTOL[dtype] if rtol is None else rtol
    got, want = _flatten(got), _flatten(want)
    assert len(got) == len(want), f"{name}: {len(got)} tensors vs {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        scale = b.detach().abs().max().item() if b.numel() and b.is_floating_point() else 1.0
        scale = min(max(scale, 1e-3), 1.0) if scale == scale else 1.0  # NaN reference: compared as NaN
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True,
                                   msg=lambda m, i=i: f"{name}[{i}]: {m}")
