"""Argument checks shared by every op: one place, messages that name the argument."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str, exc=ValueError):
    raise exc(msg)


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{name} must be an int, got {type(value).__name__}", TypeError)
    if value < minimum:
        _fail(f"{name} must be >= {minimum}, got {value}")


def check_tensor(name: str, t, *, varlen: bool, like: Optional[Tensor] = None,
                 ranks: Optional[tuple[int, ...]] = None) -> None:
    """A float tensor of layout (B, N, H, D), or (T, H, D) when varlen; same device/dtype as ``like``."""
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dtype not in FLOAT_DTYPES:
        _fail(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}", TypeError)
    if ranks is None:
        ranks = (3,) if varlen else (4,)
    if t.dim() not in ranks:
        layout = "(T, H, D) with cu_seqlens" if varlen else "(B, N, H, D)"
        _fail(f"{name} must have rank {' or '.join(map(str, ranks))} {layout}, got shape {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            _fail(f"{name} is on {t.device} but the other inputs are on {like.device}")
        if t.dtype != like.dtype:
            _fail(f"{name} has dtype {t.dtype} but the other inputs have {like.dtype}", TypeError)


def check_same_tokens(name: str, t: Tensor, ref_name: str, ref: Tensor, varlen: bool) -> None:
    lead = 1 if varlen else 2
    if t.shape[:lead] != ref.shape[:lead]:
        _fail(f"{name} has leading shape {tuple(t.shape[:lead])} but {ref_name} has {tuple(ref.shape[:lead])}")


def check_cu_seqlens_shape(cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], like: Tensor, *,
                           name: str = "cu_seqlens", max_name: str = "max_seqlen") -> None:
    """Metadata-only checks (safe under fake tensors and torch.compile)."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}", TypeError)
    if cu_seqlens.dtype != torch.int32:
        _fail(f"{name} must be int32, got {cu_seqlens.dtype}", TypeError)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(f"{name} must be 1-D of shape (S+1,) with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != like.device:
        _fail(f"{name} is on {cu_seqlens.device} but the inputs are on {like.device}")
    if max_seqlen is None:
        _fail(f"{max_name} is required when {name} is given (the public function computes it)")
    check_int(max_name, max_seqlen, 0)


def check_cu_seqlens_values(cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], num_tokens: int, *,
                            name: str = "cu_seqlens", max_name: str = "max_seqlen") -> None:
    """Data checks: reads cu_seqlens (a device sync on GPU), so only run eagerly."""
    if cu_seqlens is None:
        return
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        _fail(f"{name} must start at 0, got {cu[0].item()}")
    if cu[-1].item() != num_tokens:
        _fail(f"{name} must end at the number of tokens T={num_tokens}, got {cu[-1].item()}")
    lengths = cu.diff()
    if (lengths < 0).any():
        _fail(f"{name} must be non-decreasing")
    if max_seqlen is not None and lengths.numel() and lengths.max().item() > max_seqlen:
        _fail(f"{max_name}={max_seqlen} is smaller than the longest sequence ({lengths.max().item()})")


_DEBUG = os.environ.get("ROUTING_KERNELS_DEBUG", "0") == "1"


def set_debug(enabled: bool) -> None:
    """Validate cu_seqlens values on GPU tensors too (start 0, non-decreasing, end T, max_seqlen large
    enough). Off by default there, because reading them is a device sync that would break CUDA-graph capture
    and stall the stream on every call; CPU tensors are always validated. ``ROUTING_KERNELS_DEBUG=1`` turns it
    on at import."""
    global _DEBUG
    _DEBUG = bool(enabled)


def should_read_values(t: Optional[Tensor]) -> bool:
    """Whether an op may read ``t``'s values to validate them: always on CPU, on a device only in debug mode."""
    return t is not None and (t.device.type == "cpu" or _DEBUG)


def prepare_offsets(cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], num_tokens: int,
                    name: str = "cu_seqlens", max_name: str = "max_seqlen") -> Optional[Tensor]:
    """Inside an op: validate cu_seqlens' values where that costs no device sync (CPU tensors, or debug mode)
    and return it contiguous, so that every kernel may index it by raw position (a strided view such as
    ``cu[::2]`` would otherwise be read as the wrong offsets)."""
    if cu_seqlens is None:
        return None
    if should_read_values(cu_seqlens):
        check_cu_seqlens_values(cu_seqlens, max_seqlen, num_tokens, name=name, max_name=max_name)
    return cu_seqlens.contiguous()


def resolve_max_seqlen(cu_seqlens: Optional[Tensor], max_seqlen: Optional[int],
                       name: str = "max_seqlen") -> Optional[int]:
    """The public functions compute max_seqlen when the caller did not give it (a device sync on GPU)."""
    if cu_seqlens is None or max_seqlen is not None:
        return max_seqlen
    if not isinstance(cu_seqlens, Tensor):
        return None  # check_cu_seqlens_shape reports it
    if is_compiling():
        raise ValueError(f"{name} is required with cu_seqlens under torch.compile: it sizes the outputs, and "
                         "computing it from cu_seqlens' values would be a data-dependent shape; pass "
                         f"{name}=int (the longest sequence length)")
    lengths = cu_seqlens.detach().to("cpu", torch.int64).diff()
    return int(lengths.max().item()) if lengths.numel() else 0


def check_heads(q_name: str, hq: int, k_name: str, hkv: int) -> None:
    if hkv < 1 or hq % hkv != 0:
        _fail(f"the number of heads of {q_name} ({hq}) must be a multiple of that of {k_name} ({hkv})")


def is_compiling() -> bool:
    return torch.compiler.is_compiling()
